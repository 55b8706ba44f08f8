"""VMTC's per-image budget on AnyRes (SPEC "Other model families", "Per-image budget"), LLaVA-NeXT and
LLaVA-OneVision: the count formula against its literal reference, never above the stock count, the
model-side stock count equal to the processor's own, and on the tiny presets the processor's placeholders
equal to the tokens the model hands the LLM for images that take every stock path (unpadding of rows and
of columns, OneVision's anyres_max downscale, 10:1 images, one tile, many tiles); each crop of a packed
image is what VMTC makes of that crop alone at its own count."""

from __future__ import annotations

import random

import pytest
import torch

import anyres_builders as ab
from focusvlm import CMAIConfig, FocusConfig, VMTCConfig, patched
from focusvlm.compress import vmtc
from focusvlm.compress.vmtc import CropRecords, anyres_budget, anyres_count, compress, compress_crops, crop_stage
from focusvlm.models import adapter_for
from focusvlm.models.llava_next import PRESETS as NEXT_PRESETS
from focusvlm.models.llava_next import anyres_stock_tokens, anyres_tiles, random_llava_next
from focusvlm.models.llava_onevision import PRESETS as OV_PRESETS
from focusvlm.models.llava_onevision import random_llava_onevision
from reference import vmtc_reference as ref

FAMILIES = {"next": (random_llava_next, ab.next_processor), "onevision": (random_llava_onevision, ab.onevision_processor)}
P_TINY = 16   # 4x4 patches per 56 px crop on both tiny presets

# every stock path on the tiny presets: smaller than a crop, one crop, unpadded rows (60x100) and columns
# (100x60), 10:1 and 1:10, OneVision's downscale (400x401, 1000x1000: 36 tiles), square grids, 2000 px sides
PATH_SIZES = [(8, 8), (56, 56), (50, 90), (60, 100), (100, 60), (2000, 200), (200, 2000), (30, 300), (300, 30),
              (112, 112), (170, 120), (400, 401), (1000, 1000)]

CONFIGS = {
    "half": VMTCConfig(target=0.5, stages=2),
    "quarter-clusters": VMTCConfig(target=0.25, stages=3, cluster_frac=0.3),
    "0.7-prune": VMTCConfig(target=0.7, stages=1, prune_only=True),
    "count5": VMTCConfig(target=5, stages=2),
    # the schedule ends in layer 0, before the feature layer: the budget's cut runs as a stage of its own
    "early-layer-received": VMTCConfig(target=0.4, layers=(0,), importance="received"),
}


def stock_counts(processor, sizes):
    """The stock processor's own placeholder count per image (the class method, whatever is patched)."""
    return list(type(processor)._get_num_multimodal_tokens(processor, image_sizes=sizes).num_image_tokens)


def budget_of(size, stock, target, pinpoints):
    tiles = anyres_tiles(size, pinpoints, (56, 56))
    tiles = tiles[0] * tiles[1]
    base, tile = anyres_budget(stock, P_TINY, tiles, target)
    return tiles, base, tile


# --------------------------------------------------------------------------- the formula

FRACTIONS = [0.05, 0.1, 0.2, 0.25, 1 / 3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.9, 1.0]


def test_budget_equals_the_literal_spec_and_never_exceeds_stock_over_many_cases():
    rng = random.Random(0)
    seen = {"kept": 0, "cut": 0, "dropped": 0, "no tiles": 0}
    for _ in range(4000):
        patches = rng.choice([4, 16, 64, 576, 729])
        tiles = rng.choice([0, 1, 2, 3, 4, 5, 6, 8, 9, 12, 15, 24, 36])
        side = int(patches ** 0.5)
        stock = patches + 1 if tiles == 0 else rng.randint(patches + side + 1, (1 + tiles) * patches + tiles * side)
        target = rng.choice(FRACTIONS + [rng.uniform(0.01, 1.0), rng.randint(2, patches)])
        if isinstance(target, float) and vmtc.round_half_up(target * patches) < 1:
            continue
        base, tile = anyres_budget(stock, patches, tiles, target)
        count = anyres_count(base, tile, tiles)
        assert (base, tile, count) == ref.anyres_budget(stock, patches, tiles, target)
        budget = vmtc.round_half_up(target * stock) if isinstance(target, float) else target
        assert count <= budget <= stock, (stock, patches, tiles, target)
        assert 0 <= tile <= base and count == (base + tiles * (tile + 1) if tile else base)
        seen["no tiles" if tiles == 0 else "dropped" if tile == 0 else "cut" if tile < base else "kept"] += 1
    assert min(seen.values()) > 100, seen   # every branch of the rule ran many times


def test_budget_hand_examples():
    # OneVision at its real geometry: 2000x2000 stock 7371 tokens (36 tiles); 0.5 -> B = 3686, b = 365,
    # t = min(365, floor((3686 - 365 - 36) / 36)) = 91 -> 365 + 36 x 92 = 3677 (the old packing: 13,541)
    assert anyres_budget(7371, 729, 36, 0.5) == (365, 91) and anyres_count(365, 91, 36) == 3677
    # LLaVA-NeXT 672x672: 2928 stock, 2x2 tiles; 0.5 -> t = min(288, 293) = 288, the old count 1444
    assert anyres_budget(2928, 576, 4, 0.5) == (288, 288) and anyres_count(288, 288, 4) == 1444
    # a count target is the image's whole budget: B = b, so tiles are always dropped
    assert anyres_budget(2928, 576, 4, 100) == (100, 0) and anyres_count(100, 0, 4) == 100
    # no tiles (one crop of a multi-image prompt): the crop alone, capped at B
    assert anyres_budget(730, 729, 0, 0.5) == (365, 0) and anyres_budget(17, 16, 0, 0.5) == (8, 0)
    # few tokens left per tile: 1 each, then none
    assert anyres_budget(172, 16, 36, 0.5) == (8, 1) and anyres_budget(172, 16, 36, 0.25) == (4, 0)


def real_processor(family):
    """The image geometry of llava-v1.6 (336 px, 24x24) or llava-onevision (384 px, 27x27, anyres_max_9),
    built offline; only counts are asked of it."""
    from transformers import (LlavaNextImageProcessorPil, LlavaNextProcessor, LlavaOnevisionImageProcessorPil,
                              LlavaOnevisionProcessor)

    if family == "next":
        pins = [list(p) for p in NEXT_PRESETS["llava-v1.6-vicuna-7b"].pinpoints]
        images = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                            image_grid_pinpoints=pins)
        return LlavaNextProcessor(image_processor=images, tokenizer=ab.word_tokenizer(), patch_size=14,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1), 336, None
    pins = [list(p) for p in OV_PRESETS["llava-onevision-qwen2-7b"].pinpoints]
    images = LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384}, image_grid_pinpoints=pins)

    class NoVideo(LlavaOnevisionProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return NoVideo(image_processor=images, tokenizer=ab.word_tokenizer(), video_processor=None, num_image_tokens=729,
                   vision_feature_select_strategy="full"), 384, 9


@pytest.mark.parametrize("family", ["next", "onevision"])
def test_real_geometry_stock_count_from_size_and_budget_never_above_stock(family):
    processor, crop, max_tiles = real_processor(family)
    sides = [100, 200, 336, 384, 500, 672, 768, 1000, 1080, 1500, 1920, 2000, 3000, 4000]
    sizes = [(h, w) for h in sides for w in sides] + [(2000, 200), (200, 2000), (4000, 100), (100, 4000)]
    pins = processor.image_processor.image_grid_pinpoints
    grid = (crop // 14, crop // 14)
    patches = grid[0] * grid[1]
    downscaled = 0
    for size, stock in zip(sizes, stock_counts(processor, sizes)):
        # what the model computes from the size alone == the processor's own stock count
        assert anyres_stock_tokens(size, pins, (crop, crop), grid, max_tiles) == stock, size
        downscaled += max_tiles is not None and anyres_stock_tokens(size, pins, (crop, crop), grid) > stock
        rows, cols = anyres_tiles(size, pins, (crop, crop))
        for target in FRACTIONS[:-1] + [64, 144, patches // 2]:
            base, tile = anyres_budget(stock, patches, rows * cols, target)
            count = anyres_count(base, tile, rows * cols)
            assert (base, tile, count) == ref.anyres_budget(stock, patches, rows * cols, target)
            budget = vmtc.round_half_up(target * stock) if isinstance(target, float) else target
            assert count <= budget <= stock, (size, target)
    assert downscaled > 20 or max_tiles is None


# --------------------------------------------------------------------------- the tensor function

def test_crop_stage_is_the_schedules_one_step():
    for n in (1, 5, 16, 97):
        for k in range(0, n + 2):
            for frac in (0.0, 0.125, 0.3, 1.0):
                for prune in (False, True):
                    want = ref.schedule(n, k, 1, frac, prune)[0] if k <= n else (n, n, 0)
                    s = crop_stage(n, k, frac, prune)
                    assert (s.n_in, s.keep, s.clusters) == want, (n, k, frac, prune)


@pytest.mark.parametrize("prune", [False, True])
@pytest.mark.parametrize("prefix", [0, 1])
def test_compress_crops_is_each_crop_compressed_alone(prune, prefix):
    g = torch.Generator().manual_seed(4)
    counts = [9, 3, 9, 0, 5, 3, 12]        # 12 = every patch: that crop passes unchanged
    n, D = 12, 6
    z = torch.randn(len(counts), prefix + n, D, generator=g)
    importance = torch.rand(len(counts), n, generator=g)
    out, records = compress_crops(z, importance, counts, 4, 0.3, "mean", prune, prefix)
    assert out.shape == (len(counts), prefix + max(counts), D) and isinstance(records, CropRecords)
    for i, count in enumerate(counts):
        stage = crop_stage(n, count, 0.3, prune)
        alone, record = compress(z[i:i + 1], importance[i:i + 1], stage, 4, "mean", prune, prefix)
        assert alone.shape[1] == prefix + count
        torch.testing.assert_close(out[i, :prefix + count], alone[0], rtol=0, atol=0)
        assert not out[i, prefix + count:].any()           # the padding a caller trims
        mine = records.of(i)
        assert torch.equal(mine.primary, record.primary) and torch.equal(mine.labels, record.labels)
        assert mine.primary.shape[1] + stage.clusters == count
    torch.testing.assert_close(out[counts.index(12), :], z[counts.index(12)])


def test_compress_crops_refuses_a_count_list_of_another_length():
    with pytest.raises(ValueError, match="3 crop counts for a batch of 2"):
        compress_crops(torch.zeros(2, 5, 3), torch.ones(2, 5), [1, 2, 3], 2, 0.5)


# --------------------------------------------------------------------------- tiny models: counts

def test_path_sizes_take_every_stock_path():
    """The sizes above are worth testing: each stock path is taken, and each branch of the budget."""
    def whole_grid(size, pins):   # base crop + every tile row with its newline, nothing cut away
        rows, cols = anyres_tiles(size, pins, (56, 56))
        return 16 + 16 * rows * cols + 4 * rows

    for preset, maxt in ((NEXT_PRESETS["next-tiny"], None), (OV_PRESETS["onevision-tiny"], 9)):
        pins = [list(p) for p in preset.pinpoints]
        stock = {s: anyres_stock_tokens(s, pins, (56, 56), (4, 4), maxt) for s in PATH_SIZES}
        unscaled = {s: anyres_stock_tokens(s, pins, (56, 56), (4, 4)) for s in PATH_SIZES}
        # 2x2 tiles = an 8x8 grid: 4 rows (of 8 patches + a newline) or 4 columns (8 patches) cut away
        assert whole_grid((60, 100), pins) - unscaled[(60, 100)] == 4 * 9
        assert whole_grid((100, 60), pins) - unscaled[(100, 60)] == 4 * 8
        assert unscaled[(2000, 200)] < whole_grid((2000, 200), pins) and unscaled[(200, 2000)] < whole_grid((200, 2000), pins)
        if maxt:
            assert stock[(1000, 1000)] < unscaled[(1000, 1000)] and stock[(400, 401)] < unscaled[(400, 401)]
            tiles = {s: budget_of(s, stock[s], 0.5, pins)[0] for s in PATH_SIZES}
            assert tiles[(56, 56)] == 1 and tiles[(1000, 1000)] == 36
        branches = set()
        for target in [c.target for c in CONFIGS.values()]:
            for s in PATH_SIZES:
                tiles, base, tile = budget_of(s, stock[s], target, pins)
                branches.add("dropped" if tile == 0 else "cut" if tile < base else "kept")
        assert branches == {"kept", "cut", "dropped"}, (preset, branches)


@pytest.mark.parametrize("cfg", list(CONFIGS.values()), ids=list(CONFIGS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_processor_count_equals_model_tokens_and_the_formula(family, cfg):
    build, make_processor = FAMILIES[family]
    model, processor = build(), make_processor()
    pins = model.config.image_grid_pinpoints
    stock_sizes = stock_counts(processor, PATH_SIZES)
    placeholders, features, stock, _ = ab.count_case(model, processor, FocusConfig(vmtc=cfg), PATH_SIZES)
    assert stock == stock_sizes
    for size, n_ph, n_feat, s in zip(PATH_SIZES, placeholders, features, stock):
        tiles, base, tile = budget_of(size, s, cfg.target, pins)
        assert n_ph == n_feat == anyres_count(base, tile, tiles) <= s, size
        if isinstance(cfg.target, float):
            assert n_ph <= vmtc.round_half_up(cfg.target * s)
    with patched(model, FocusConfig(vmtc=cfg), processor=processor):
        assert processor._get_num_multimodal_tokens(image_sizes=PATH_SIZES).num_image_tokens == placeholders


def test_onevision_multi_image_crops_get_the_base_count_alone():
    model, processor = random_llava_onevision(), ab.onevision_processor()
    images = ab.random_images([(50, 90), (300, 60), (70, 70), (1000, 1000)])
    text = ["w1 <image> w2 <image>", "<image> w3", "w4 <image>"]
    grouped = [images[:2], images[2:3], images[3:]]
    with patched(model, FocusConfig(vmtc=VMTCConfig(target=0.5, stages=2)), processor=processor):
        inputs = processor(images=grouped, text=text, return_tensors="pt", padding=True)
        counts = (inputs["input_ids"] == ab.IMAGE_ID).sum(1).tolist()
        single = [budget_of(s, n, 0.5, model.config.image_grid_pinpoints)
                  for s, n in zip([(70, 70), (1000, 1000)], stock_counts(processor, [(70, 70), (1000, 1000)]))]
        # one crop per image, no tiles: S = 16 + 1, B = 9, the crop keeps b = 8 and no newline
        assert counts == [2 * 8] + [anyres_count(b, t, n) for n, b, t in single]
        assert torch.isfinite(ab.logits(model, inputs)).all()   # the model's own count check passes


# --------------------------------------------------------------------------- tiny models: what each crop holds

def crops_alone(model, handle, pixels, counts):
    """Each crop through the patched tower on its own, forced to its count, projected, trimmed to it."""
    core = model.model
    strategy = model.config.vision_feature_select_strategy
    layer = model.config.vision_feature_layer
    out = []
    with torch.no_grad():
        for crop, count in zip(pixels, counts):
            handle.vision.crop_counts = lambda c=count: [c]
            hidden = core.vision_tower(crop[None], output_hidden_states=True).hidden_states[layer]
            hidden = hidden[:, 1:] if strategy == "default" else hidden
            out.append(core.multi_modal_projector(hidden)[0, :count])
    return out


@pytest.mark.parametrize("cfg", [CONFIGS["half"], CONFIGS["quarter-clusters"], CONFIGS["early-layer-received"]],
                         ids=["half", "quarter-clusters", "early-layer"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_image_is_each_crop_alone_at_its_own_count(family, cfg):
    build, make_processor = FAMILIES[family]
    model, processor = build(), make_processor()
    sizes = [(8, 8), (50, 90), (1000, 1000)] if family == "onevision" else [(8, 8), (50, 90), (300, 30)]
    pins = model.config.image_grid_pinpoints
    stock = stock_counts(processor, sizes)
    with patched(model, FocusConfig(vmtc=cfg), processor=processor) as handle:
        inputs = ab.batch(processor, sizes, ab.MIXED_PROMPTS)
        handle.vision.record = True
        with torch.no_grad():
            packed = adapter_for(model).image_features(model, inputs["pixel_values"], image_sizes=inputs["image_sizes"])
        # the cut's record: every crop of the batch kept its own count (primary + clusters)
        last = handle.vision.records[-1]
        wanted = []
        for size, s in zip(sizes, stock):
            tiles, base, tile = budget_of(size, s, cfg.target, pins)
            wanted += [base] + [tile] * tiles
        if len(set(wanted)) > 1:
            assert isinstance(last, CropRecords)
            for i, count in enumerate(wanted):
                rec = last.of(i)
                kept = rec.primary.shape[1] + (int(rec.labels.max()) + 1 if rec.labels.numel() else 0)
                assert kept == count, (i, count)
        cuts = set()
        stock_crop_counts = handle.vision.crop_counts
        for i, (size, s) in enumerate(zip(sizes, stock)):
            tiles, base, tile = budget_of(size, s, cfg.target, pins)
            cuts.add("dropped" if tile == 0 else "cut" if tile < base else "kept")
            alone = crops_alone(model, handle, inputs["pixel_values"][i, :1 + tiles], [base] + [tile] * tiles)
            handle.vision.crop_counts = stock_crop_counts
            newline = model.model.image_newline[None]
            expected = torch.cat([alone[0]] + ([torch.cat([t, newline]) for t in alone[1:]] if tile else []))
            assert packed[i].shape[0] == anyres_count(base, tile, tiles) <= s
            torch.testing.assert_close(packed[i], expected, rtol=1e-5, atol=1e-5)
    assert len(set(wanted)) > 1 and cuts != {"kept"}   # the batch really mixes counts


@pytest.mark.parametrize("family", list(FAMILIES))
def test_batch_of_different_budgets_equals_each_alone_with_cmai(family):
    build, make_processor = FAMILIES[family]
    model, processor = build(), make_processor()
    sizes = [(8, 8), (50, 90), (1000, 1000)] if family == "onevision" else [(8, 8), (50, 90), (300, 30)]
    config = FocusConfig(vmtc=VMTCConfig(target=0.5, stages=2), cmai=CMAIConfig())
    ab.assert_batch_equals_single(model, processor, config, sizes=sizes, prompts=ab.MIXED_PROMPTS, tol=1e-4)


def test_show_panels_draw_each_crops_own_count():
    model, processor = random_llava_onevision(), ab.onevision_processor()
    size = (1000, 1000)                                    # 36 tiles: each tile keeps 1 token at 0.5
    ip = processor.image_processor(images=ab.random_images([size]), return_tensors="pt")
    with patched(model, FocusConfig(vmtc=VMTCConfig(target=0.5, stages=2))) as handle:
        handle.vision.record = True
        with torch.no_grad():
            adapter_for(model).image_features(model, ip["pixel_values"], image_sizes=ip["image_sizes"])
        base_panels, tile_panels = handle.vision.panels(sample=0), handle.vision.panels(sample=5)
    assert base_panels[-1].title.endswith("-> 8") and tile_panels[-1].title.endswith("-> 1")
    assert (tile_panels[-1].state != base_panels[-1].state).any()


def test_a_next_model_that_keeps_cls_is_refused_with_the_reason():
    from focusvlm import patch
    from focusvlm.models import UnsupportedModelError

    model = random_llava_next()
    model.config.vision_feature_select_strategy = "full"   # the stock packing cannot run this either
    with pytest.raises(UnsupportedModelError, match="per-image budget counts patch tokens"):
        patch(model, FocusConfig(vmtc=VMTCConfig(target=0.5, stages=2)))
    assert not hasattr(model, "_focusvlm") and "pack_image_features" not in model.model.__dict__
    assert all(type(l).__name__ == "CLIPEncoderLayer" for l in model.model.vision_tower.encoder.layers)
