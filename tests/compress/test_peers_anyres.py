"""VisionZip, DivPrune and FastV on AnyRes models (LLaVA-NeXT; LLaVA-OneVision where the inputs exist).

VisionZip: its official LLaVA-NeXT layout (visionzip/llava_arch.py) against a literal restatement on the stock
tower's tensors (next-tiny and next-mid geometry); refused on OneVision's SigLIP (no CLS token).
DivPrune: the official LLaVA-1.6 path, selection over each image's whole packed sequence, against the slow
reference on the stock model's packed features (both families).
FastV: image positions of an AnyRes image (every placeholder, newlines included) and the pruned model against
the float64 restatement. For all three: the processor's counts against the model's, unpatch exact, bench.
"""

from __future__ import annotations

import pytest
import torch

import anyres_builders as ab
from focusvlm import (ConfigError, DivPruneConfig, FastVConfig, FocusConfig, UnsupportedModelError, VisionZipConfig,
                      patch, patched, unpatch)
from focusvlm.compress import visionzip
from focusvlm.compress.divprune_method import AnyResDivPruneRecord, anyres_divprune_panel
from focusvlm.methods import get_method
from focusvlm.models import adapter_for
from focusvlm.models.llava_next import anyres_tiles, random_llava_next
from focusvlm.models.llava_onevision import random_llava_onevision
from focusvlm.viz import PRIMARY
from reference import peers_anyres_reference as aref
from reference import peers_reference as ref
from test_peer_methods import official_visionzip

SIZES = [(8, 8), (56, 56), (50, 90), (90, 50), (57, 200), (200, 57), (30, 300), (112, 112), (113, 111),
         (168, 56), (500, 120), (77, 333), (400, 401)]
# OneVision: (300, 400) and (224, 224) take the anyres_max_9 downscale of the stock packing
OV_SIZES = [(8, 8), (50, 90), (120, 60), (70, 70), (224, 224), (300, 400), (60, 330)]


@pytest.fixture(scope="module")
def next_model():
    m = random_llava_next("next-tiny")
    # sharpen the tower's attention so VisionZip's CLS ranking has clear winners
    with torch.no_grad():
        for layer in m.model.vision_tower.encoder.layers[-2:]:
            layer.self_attn.q_proj.weight.mul_(8)
    return m


@pytest.fixture(scope="module")
def ov_model():
    return random_llava_onevision("onevision-tiny")


def tiles_of(model, size):
    crop = model.config.vision_config.image_size
    rows, cols = anyres_tiles(list(size), model.config.image_grid_pinpoints, (crop, crop))
    return rows, cols


def per_image(features):
    return list(features)


def stock_logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# =========================================================================== VisionZip: the pure layout

@pytest.mark.parametrize("tiles", [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (2, 3)])
def test_visionzip_pack_anyres_equals_the_official_restore(tiles):
    g = torch.Generator().manual_seed(sum(tiles))
    rows, cols = tiles
    grid, d, c, D = (4, 5), 6, 3, 7
    crops = torch.randn(1 + rows * cols, d + c, D, generator=g, dtype=torch.float64)
    dominant = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long),
                                       torch.randperm(20, generator=g)[:d - 1].sort().values + 1])
                            for _ in range(1 + rows * cols)])
    newline = torch.randn(D, generator=g, dtype=torch.float64)
    got = visionzip.pack_anyres(crops, dominant, tiles, grid, newline)
    # the official code takes the kept indices in top-k order: shuffle them (the restore sorts)
    shuffled = torch.stack([torch.cat([row[:1], row[1:][torch.randperm(d - 1, generator=g)]]) for row in dominant])
    want = aref.visionzip_anyres_image(crops, shuffled, tiles, grid, newline)
    assert got.shape[0] == visionzip.anyres_token_count(rows * cols, d, c) == (1 + rows * cols) * (d + c)
    assert torch.equal(got, want)


def test_visionzip_lone_crop_and_counts():
    crops = torch.arange(2 * 4 * 1, dtype=torch.float32).view(1, 8, 1)[:, :4]
    got = visionzip.pack_anyres(crops, torch.tensor([[0, 3]]), (0, 0), (2, 2), torch.tensor([-1.0]))
    assert got[:, 0].tolist() == [0, 1, 2, 3, -1]
    assert visionzip.anyres_token_count(0, 2, 2) == 5 and visionzip.anyres_token_count(4, 54, 10) == 320
    with pytest.raises(ValueError, match="CLS"):
        visionzip.pack_anyres(torch.zeros(2, 4, 1), torch.tensor([[1, 2], [0, 3]]), (1, 1), (2, 2), torch.zeros(1))
    with pytest.raises(ValueError, match="tiles"):
        visionzip.pack_anyres(torch.zeros(3, 4, 1), torch.tensor([[0, 2]] * 3), (1, 1), (2, 2), torch.zeros(1))


# =========================================================================== VisionZip in the model

def official_visionzip_anyres(model, inputs, dominant, contextual):
    """Per image: each crop through the literal VisionZip on the stock tower's tensors (eager attention, hidden
    states, k_proj hook), projected, then the official LLaVA-NeXT layout restated literally."""
    vc = model.config.vision_config
    grid = (vc.image_size // vc.patch_size,) * 2
    out = []
    for i, size in enumerate(inputs["image_sizes"].tolist()):
        rows, cols = tiles_of(model, size)
        crops = inputs["pixel_values"][i, :1 + rows * cols]
        feats, records = official_visionzip(model, crops, dominant, contextual)
        keep = torch.tensor([dom for dom, _ in records])
        out.append(aref.visionzip_anyres_image(feats.double(), keep, (rows, cols), grid,
                                               model.model.image_newline.detach().double()))
    return out


def check_visionzip_official(model, inputs, cfg):
    want = official_visionzip_anyres(model, inputs, cfg.dominant, cfg.contextual)
    with patched(model, FocusConfig(visionzip=cfg)):
        with torch.no_grad():
            got = per_image(adapter_for(model).image_features(model, inputs["pixel_values"],
                                                              image_sizes=inputs["image_sizes"]))
    assert len(got) == len(want)
    for g, w, size in zip(got, want, inputs["image_sizes"].tolist()):
        rows, cols = tiles_of(model, size)
        assert g.shape[0] == visionzip.anyres_token_count(rows * cols, cfg.dominant, cfg.contextual)
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg", [VisionZipConfig(dominant=5, contextual=3), VisionZipConfig(dominant=2, contextual=6),
                                 VisionZipConfig(dominant=12, contextual=5)], ids=["5+3", "2+6", "12+5"])
def test_visionzip_next_tiny_equals_official_anyres(next_model, cfg):
    inputs = ab.batch(ab.next_processor(), sizes=[(50, 90), (120, 60), (70, 70), (168, 56)],
                      prompts=["<image> w1"] * 4)
    check_visionzip_official(next_model, inputs, cfg)


def next_mid_image_processor():
    from transformers import LlavaNextImageProcessorPil

    from focusvlm.models.llava_next import PRESETS

    return LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                      image_grid_pinpoints=[list(p) for p in PRESETS["next-mid"].pinpoints])


def test_visionzip_next_mid_geometry_equals_official_anyres():
    """The real LLaVA-NeXT image geometry (336 px crops of 24x24 patches, the real pinpoints), a small LM."""
    model = random_llava_next("next-mid", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=4)
    images = ab.random_images([(500, 700), (300, 900)], seed=3)
    inputs = next_mid_image_processor()(images, return_tensors="pt")
    assert [tiles_of(model, s) for s in inputs["image_sizes"].tolist()] == [(2, 2), (1, 3)]
    check_visionzip_official(model, inputs, VisionZipConfig())                     # the official 54 + 10
    from transformers import LlavaNextProcessor

    proc = LlavaNextProcessor(image_processor=next_mid_image_processor(), tokenizer=ab.word_tokenizer(),
                              patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    with patched(model, FocusConfig(visionzip=VisionZipConfig()), processor=proc):
        counts = proc._get_num_multimodal_tokens(image_sizes=[[500, 700], [300, 900], [336, 336]]).num_image_tokens
    assert counts == [5 * 64, 4 * 64, 3 * 64]                   # a square 336 px image still takes two tiles
    assert tiles_of(model, (336, 336)) in ((1, 2), (2, 1))
    assert "_get_num_multimodal_tokens" not in proc.__dict__


@pytest.mark.parametrize("cfg", [VisionZipConfig(dominant=5, contextual=3), VisionZipConfig(dominant=1, contextual=1)],
                         ids=["5+3", "1+1"])
def test_visionzip_counts_match_the_model_for_many_sizes(next_model, cfg):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    processor = ab.next_processor()
    config = FocusConfig(visionzip=cfg)
    placeholders, features, stock, _ = ab.count_case(next_model, processor, config, SIZES)
    pins = next_model.config.image_grid_pinpoints
    for size, n_ph, n_feat in zip(SIZES, placeholders, features):
        tiles = image_size_to_num_patches(list(size), pins, 56) - 1
        assert n_ph == n_feat == (1 + tiles) * cfg.tokens, size      # no newlines: the official layout
    with patched(next_model, config, processor=processor):
        assert processor._get_num_multimodal_tokens(image_sizes=SIZES).num_image_tokens == placeholders


def test_visionzip_batch_equals_single_and_unpatch_exact(next_model):
    processor = ab.next_processor()
    cfg = FocusConfig(visionzip=VisionZipConfig(dominant=5, contextual=3))
    inputs = ab.batch(processor)
    stock = stock_logits(next_model, inputs)
    ab.assert_batch_equals_single(next_model, processor, cfg)
    with patched(next_model, cfg, processor=processor):
        reduced = ab.batch(processor)
        assert (reduced["input_ids"] == ab.IMAGE_ID).sum() < (inputs["input_ids"] == ab.IMAGE_ID).sum()
        assert torch.isfinite(stock_logits(next_model, reduced)).all()
    core = next_model.model
    assert "pack_image_features" not in core.__dict__ and "_focusvlm_image_count" not in core.__dict__
    assert "replace_image_token" not in processor.__dict__
    assert torch.equal(stock_logits(next_model, ab.batch(processor)), stock)


def test_visionzip_generate_with_cache_equals_full_forward(next_model):
    processor = ab.next_processor()
    cfg = FocusConfig(visionzip=VisionZipConfig(dominant=5, contextual=3))
    with patched(next_model, cfg, processor=processor):
        inputs = ab.batch(processor)
    ab.assert_generate_matches_full_forward(next_model, inputs, cfg)


def test_visionzip_refusals_and_fit_to_model(next_model, ov_model):
    with pytest.raises(ConfigError, match="exceeds the 17 tokens"):
        patch(next_model, FocusConfig(visionzip=VisionZipConfig()))
    with pytest.raises(UnsupportedModelError, match="CLS token"):
        patch(ov_model, FocusConfig(visionzip=VisionZipConfig(dominant=5, contextual=3)))
    for m in (next_model, ov_model):
        assert getattr(m, "_focusvlm", None) is None and "pack_image_features" not in m.model.__dict__
    cls = get_method("visionzip")
    adapter = adapter_for(next_model)
    fitted = cls.fit_to_model(VisionZipConfig(), next_model, adapter)
    assert fitted == VisionZipConfig(dominant=1, contextual=1)              # 64 of 576 -> 2 of next-tiny's 16
    assert cls.fit_to_model(cls.parse("192"), next_model, adapter) == VisionZipConfig(dominant=4, contextual=1)
    assert cls.fit_to_model(VisionZipConfig(dominant=9, contextual=8), next_model, adapter) == \
        VisionZipConfig(dominant=9, contextual=8)                            # fits 17 tokens: unchanged
    from focusvlm.models.llava import random_llava

    tiny = random_llava("tiny")
    assert cls.fit_to_model(VisionZipConfig(), tiny, adapter_for(tiny)) == VisionZipConfig()   # 64 <= 65
    with patched(next_model, FocusConfig(visionzip=fitted)) as handle:
        with pytest.raises(ValueError, match="depends on its tiles"):   # per image, not per crop: the processor's
            handle.image_tokens()


# =========================================================================== DivPrune

def expected_kept(cfg, stock_count):
    if isinstance(cfg.budget, int):
        return min(cfg.budget, stock_count)
    return max(1, int(round(cfg.budget * stock_count)))


def check_divprune_official(model, inputs, cfg, extra=()):
    adapter = adapter_for(model)
    kwargs = {"image_sizes": inputs["image_sizes"], **{k: inputs[k] for k in extra}}
    with torch.no_grad():
        stock = per_image(adapter.image_features(model, inputs["pixel_values"], **kwargs))
    handle = patch(model, FocusConfig(divprune=cfg))
    try:
        handle.vision.record = True
        with torch.no_grad():
            got = per_image(adapter.image_features(model, inputs["pixel_values"], **kwargs))
        records = handle.vision.records
    finally:
        unpatch(model)
    assert len(got) == len(stock) == len(records)
    for g, s, rec in zip(got, stock, records):
        keep = expected_kept(cfg, s.shape[0])
        picks, kept = ref.divprune_image(s, keep=keep)
        if isinstance(cfg.budget, float) and keep > 1:
            assert keep == int(round(cfg.budget * s.shape[0]))             # the official count of the packed length
        assert rec.selection.picked[0].tolist() == picks and rec.selection.kept[0].tolist() == kept
        assert torch.equal(g, s[kept])
    return stock, got, records


@pytest.mark.parametrize("cfg", [DivPruneConfig(), DivPruneConfig(budget=0.3), DivPruneConfig(budget=20)],
                         ids=["official", "0.3", "20"])
def test_divprune_next_tiny_equals_official_on_the_packed_sequence(next_model, cfg):
    inputs = ab.batch(ab.next_processor(), sizes=[(50, 90), (120, 60), (70, 70)], prompts=["<image> w1"] * 3)
    check_divprune_official(next_model, inputs, cfg)


@pytest.mark.parametrize("cfg", [DivPruneConfig(), DivPruneConfig(budget=0.25)], ids=["official", "0.25"])
def test_divprune_onevision_equals_official_on_the_packed_sequence(ov_model, cfg):
    """Including images whose stock packing is downscaled (anyres_max_9) and a multi-image sample."""
    processor = ab.onevision_processor()
    images = ab.random_images([(300, 400), (50, 90), (70, 70), (60, 40)], seed=5)
    inputs = processor(images=[images[:1], images[1:2], images[2:]], text=["<image> w1", "w2 <image>", "<image> w3 <image>"], return_tensors="pt", padding=True)
    assert inputs["batch_num_images"].tolist() == [1, 1, 2]
    check_divprune_official(ov_model, inputs, cfg, extra=("batch_num_images",))


def test_divprune_sources_name_the_crop_token_of_each_packed_row(next_model, ov_model):
    """The record's sources: a row with a source is that crop token's projected feature, a newline row is the
    newline, and OneVision's downscaled rows (blends) have none."""
    for model, processor, size in ((next_model, ab.next_processor(), (50, 90)),
                                   (ov_model, ab.onevision_processor(), (300, 400))):
        inputs = processor(images=ab.random_images([size]), text=["<image> w1"], return_tensors="pt")
        box = {}
        projector = model.model.multi_modal_projector
        hook = projector.register_forward_hook(lambda m, i, o: box.__setitem__("crops", o))
        handle = patch(model, FocusConfig(divprune=DivPruneConfig(budget=0.5)))
        try:
            handle.vision.record = True
            with torch.no_grad():
                packed = adapter_for(model).image_features(model, inputs["pixel_values"],
                                                           image_sizes=inputs["image_sizes"])
            rec: AnyResDivPruneRecord = handle.vision.records[0]
        finally:
            unpatch(model)
            hook.remove()
        flat = box["crops"].flatten(0, 1)
        newline = model.model.image_newline
        src = rec.sources
        kept_rows = packed[0]
        with torch.no_grad():
            stock = adapter_for(model).image_features(model, inputs["pixel_values"], image_sizes=inputs["image_sizes"])[0]
        assert stock.shape[0] == src.shape[0]
        has = src >= 0
        torch.testing.assert_close(stock[has], flat[src[has]], rtol=0, atol=0)
        is_newline = (stock == newline).all(-1)
        assert is_newline.any() and (src[is_newline] == -1).all()
        blended = ~has & ~is_newline
        assert bool(blended.any()) == (model is ov_model)                 # only the downscale blends rows
        torch.testing.assert_close(kept_rows, stock[rec.selection.kept[0]])
        # one panel per crop; together they account for every kept row that is one crop token
        n = model.config.vision_config.image_size // model.config.vision_config.patch_size
        crops = int(box["crops"].shape[0])
        shown = sum(int((anyres_divprune_panel(rec, n * n, c).state == PRIMARY).sum()) for c in range(crops))
        assert shown == int(has[rec.selection.kept[0]].sum())


@pytest.mark.parametrize("cfg", [DivPruneConfig(), DivPruneConfig(budget=0.5), DivPruneConfig(budget=40)],
                         ids=["official", "half", "40"])
def test_divprune_counts_match_the_model_for_many_sizes(next_model, ov_model, cfg):
    for model, processor, sizes in ((next_model, ab.next_processor(), SIZES), (ov_model, ab.onevision_processor(),
                                                                               OV_SIZES)):
        placeholders, features, stock, _ = ab.count_case(model, processor, FocusConfig(divprune=cfg), sizes)
        assert placeholders == features == [expected_kept(cfg, s) for s in stock]
        assert any(s < 40 for s in stock) and any(s > 40 for s in stock)   # the count budget meets both cases
        with patched(model, FocusConfig(divprune=cfg), processor=processor):
            assert processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens == placeholders


def test_divprune_onevision_multi_image_prompt_counts(ov_model):
    processor = ab.onevision_processor()
    images = ab.random_images([(50, 90), (300, 400)], seed=2)
    stock = processor(images=[images], text=["<image> w1 <image>"], return_tensors="pt")
    with patched(ov_model, FocusConfig(divprune=DivPruneConfig(budget=0.5)), processor=processor):
        inputs = processor(images=[images], text=["<image> w1 <image>"], return_tensors="pt")
        with torch.no_grad():
            feats = adapter_for(ov_model).image_features(ov_model, inputs["pixel_values"],
                                                         image_sizes=inputs["image_sizes"],
                                                         batch_num_images=inputs["batch_num_images"])
        assert torch.isfinite(stock_logits(ov_model, inputs)).all()
    per = 16 + 1                                                  # multi-image mode: one crop + one newline each
    assert int((stock["input_ids"] == ab.IMAGE_ID).sum()) == 2 * per
    assert [f.shape[0] for f in feats] == [round(0.5 * per)] * 2
    assert int((inputs["input_ids"] == ab.IMAGE_ID).sum()) == 2 * round(0.5 * per)


@pytest.mark.parametrize("family", ["next", "onevision"])
def test_divprune_batch_and_unpatch_exact(next_model, ov_model, family):
    model, processor = (next_model, ab.next_processor()) if family == "next" else (ov_model, ab.onevision_processor())
    cfg = FocusConfig(divprune=DivPruneConfig(budget=0.3))
    stock = stock_logits(model, ab.batch(processor))
    ab.assert_batch_equals_single(model, processor, cfg)
    core = model.model
    assert "pack_image_features" not in core.__dict__ and "_focusvlm_image_count" not in core.__dict__
    assert "replace_image_token" not in processor.__dict__
    assert torch.equal(stock_logits(model, ab.batch(processor)), stock)


def test_a_count_equal_to_a_stock_crop_is_not_taken_for_a_stock_prompt(next_model):
    """DivPrune 0.3 gives a 50x90 image round(0.3 x 52) = 16 tokens, a stock crop's patch count: the placeholder
    guard (which compares per-crop counts) must not refuse the patched prompt; the per-image count is the
    processor's, so image_tokens() refuses to give a per-crop one."""
    processor = ab.next_processor()
    with patched(next_model, FocusConfig(divprune=DivPruneConfig(budget=0.3)), processor=processor) as handle:
        inputs = processor(images=ab.random_images([(50, 90)]), text=["<image> w1"], return_tensors="pt")
        assert int((inputs["input_ids"] == ab.IMAGE_ID).sum()) == 16
        assert torch.isfinite(stock_logits(next_model, inputs)).all()
        with pytest.raises(ValueError, match="share of its whole packed sequence"):
            handle.image_tokens()


def test_divprune_llava15_path_is_unchanged():
    from focusvlm.models.llava import random_llava

    tiny = random_llava("tiny")
    assert not adapter_for(tiny).packs_crops
    with patched(tiny, FocusConfig(divprune=DivPruneConfig())) as handle:
        assert handle.image_tokens() == 6 and not handle.vision.anyres
    with pytest.raises(ConfigError, match="exceeds the 64"):
        patch(tiny, FocusConfig(divprune=DivPruneConfig(budget=100)))


# =========================================================================== FastV

def check_fastv(model, processor, sizes, prompt, k, ratio, extra=()):
    inputs = processor(images=[ab.random_images(sizes, seed=7)], text=[prompt], return_tensors="pt")
    ids = inputs["input_ids"][0]
    adapter = adapter_for(model)
    with torch.no_grad():
        rows = torch.cat(per_image(adapter.image_features(model, inputs["pixel_values"],
                                                          image_sizes=inputs["image_sizes"],
                                                          **{key: inputs[key] for key in extra})))
    n = int((ids == ab.IMAGE_ID).sum())
    assert n == rows.shape[0]                                    # every placeholder is an image row ...
    newline_rows = (rows == model.model.image_newline).all(-1)
    assert newline_rows.any()                                    # ... the newline rows among them
    stock = stock_logits(model, inputs)
    handle = patch(model, FocusConfig(fastv=FastVConfig(k=k, ratio=ratio)))
    try:
        with torch.no_grad():
            got = model(**inputs).logits
        sel, kept = handle.llm.last_selection, handle.llm.last_positions
    finally:
        unpatch(model)
    image_positions = (ids == ab.IMAGE_ID).nonzero().flatten()
    assert sel.counts.tolist() == [round(n * (1 - ratio))]
    kept_image = sel.kept_image[0][sel.kept_image[0] >= 0]
    assert torch.isin(kept_image, image_positions).all()
    want, want_pos, want_img = aref.fastv_pruned_forward_rows(model, ids, rows, k, ratio)
    assert kept[0].tolist() == want_pos and kept_image.tolist() == want_img
    assert got.shape[1] == len(want_pos) == ids.shape[0] - (n - round(n * (1 - ratio)))
    torch.testing.assert_close(got[0].double(), want, rtol=1e-4, atol=1e-4)
    assert torch.equal(stock_logits(model, inputs), stock)      # unpatch: stock again, bit for bit


@pytest.mark.parametrize("k,ratio", [(1, 0.5), (2, 0.75)])
def test_fastv_next_tiny_prunes_the_packed_image_positions(next_model, k, ratio):
    check_fastv(next_model, ab.next_processor(), [(50, 90)], "w1 w2 <image> w3 w4 w5", k, ratio)


def test_fastv_next_tiny_two_images_in_one_prompt(next_model):
    check_fastv(next_model, ab.next_processor(), [(50, 90), (120, 60)], "w1 <image> w2 w3 <image> w4", 1, 0.5)


@pytest.mark.parametrize("sizes,prompt", [([(300, 400)], "w1 <image> w2 w3"),
                                          ([(50, 90), (70, 70)], "w1 <image> w2 <image> w3")],
                         ids=["downscaled", "multi-image"])
def test_fastv_onevision_tiny_prunes_the_packed_image_positions(ov_model, sizes, prompt):
    check_fastv(ov_model, ab.onevision_processor(), sizes, prompt, 1, 0.5, extra=("batch_num_images",))


def test_fastv_after_a_vision_method_prunes_its_tokens(next_model):
    processor = ab.next_processor()
    cfg = FocusConfig(visionzip=VisionZipConfig(dominant=5, contextual=3), fastv=FastVConfig(k=1, ratio=0.5))
    handle = patch(next_model, cfg, processor=processor)
    try:
        inputs = processor(images=ab.random_images([(50, 90)]), text=["w1 <image> w2"], return_tensors="pt")
        with torch.no_grad():
            next_model(**inputs)
        n = int((inputs["input_ids"] == ab.IMAGE_ID).sum())
        assert n == 3 * 8 and handle.llm.last_selection.counts.tolist() == [12]
    finally:
        unpatch(next_model, processor)


# =========================================================================== bench

def test_bench_runs_the_three_peers_on_next_tiny():
    from focusvlm.bench.arms import parse_arms
    from focusvlm.bench.harness import run_bench
    from focusvlm.bench.setup import BenchOptions

    opts = BenchOptions(preset="next-tiny", methods=parse_arms("stock,visionzip,divprune,fastv"), batches=[1],
                        prompt_tokens=8, new_tokens=2, repeats=1, warmup=0, progress=False)
    rows = run_bench(opts)["runs"][0]["methods"]
    # one 112 px image: base crop + 2x2 tiles; stock 16 + 8x8 + 8 newlines = 88
    assert rows["stock"]["visual_tokens"] == 88
    assert rows["visionzip"]["visual_tokens"] == 5 * 2                     # fitted to 1 + 1 per crop, no newlines
    assert rows["divprune"]["visual_tokens"] == round(0.098 * 88)
    assert rows["fastv"]["visual_tokens"] == 88
    assert rows["fastv"]["flops"]["llm"] < rows["stock"]["flops"]["llm"]


# =========================================================================== show

def test_show_draws_each_crop_for_visionzip_and_divprune(tmp_path, next_model, capsys):
    import argparse

    from PIL import Image

    from focusvlm.cli import show
    from focusvlm.models.factory import demo_image_path

    next_model.save_pretrained(tmp_path / "m")
    ab.next_processor().save_pretrained(tmp_path / "m")
    ap = argparse.ArgumentParser()
    show.register(ap.add_subparsers(dest="command"))
    image = Image.open(demo_image_path("chelsea"))
    rows, cols = tiles_of(next_model, (image.height, image.width))
    stock = ab.next_processor()(images=[image], text=["<image>"], return_tensors="pt")
    stock_count = int((stock["input_ids"] == ab.IMAGE_ID).sum())
    for spec, tokens in (("visionzip:8", (1 + rows * cols) * 8), ("divprune", round(0.098 * stock_count))):
        out = tmp_path / f"{spec.replace(':', '_')}.png"
        args = ap.parse_args(["show", "--image", str(demo_image_path("chelsea")), "--model", str(tmp_path / "m"),
                              "--device", "cpu", "-o", str(out), "--method", spec])
        assert args.func(args) == 0
        assert f"({tokens} image tokens, {1 + rows * cols} crops)" in capsys.readouterr().out
        assert Image.open(out).height % (1 + rows * cols) == 0        # one strip per crop


def test_fastv_refuses_a_family_without_decoder_query_key_at_patch_time():
    """Qwen-VL exposes no decoder q/k (its 3-D rope): FastV says so when patched, not at the first forward."""
    from focusvlm import FastVConfig, FocusConfig, UnsupportedModelError, patch
    from focusvlm.models import adapter_for_preset

    model = adapter_for_preset("qwen2.5-vl-tiny").random_model("qwen2.5-vl-tiny")
    with pytest.raises(UnsupportedModelError, match="decoder_query_key"):
        patch(model, FocusConfig(fastv=FastVConfig()))
    assert not hasattr(model, "_focusvlm")
