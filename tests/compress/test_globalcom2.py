"""GlobalCom2: the pure functions against the literal official oracle (tests/reference/globalcom2_official.py)
on random inputs and edge cases; in the tiny and mid LLaVA-NeXT, the patched image features against the
oracle applied to the STOCK model's tensors, taken the way the official code takes them (forward hooks on
the last encoder layer's q/k projections, hidden_states[-2], the stock projector); unpatch, configs,
processor refusal, unsupported families, YAML, panels and the benchmark."""

from __future__ import annotations

import pytest
import torch

import anyres_builders as ab
from focusvlm import ConfigError, FocusConfig, GlobalCom2Config, UnsupportedModelError, patch, patched, unpatch
from focusvlm.compress import globalcom2 as gc
from focusvlm.methods import get_method
from focusvlm.models import adapter_for
from focusvlm.models.llava_next import anyres_tiles, random_llava_next
from reference import globalcom2_official as ref

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


# =========================================================================== pure functions vs the oracle

def test_cls_scores_are_the_head_mean_of_pre_softmax_logits():
    g = gen(0)
    B, T, heads, d = 3, 10, 4, 8
    q = torch.randn(B, T, heads * d, generator=g, dtype=F64)
    k = torch.randn(B, T, heads * d, generator=g, dtype=F64)
    scale = d ** -0.5
    logits = gc.cls_scores(q[:, 0], k, heads, scale)
    soft = gc.cls_scores(q[:, 0], k, heads, scale, kind="softmax")
    assert logits.shape == (B, T - 1)
    for b in range(B):
        torch.testing.assert_close(logits[b], torch.tensor(ref.cls_logits(q[b], k[b], heads, scale), dtype=F64),
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(soft[b], torch.tensor(ref.cls_softmax(q[b], k[b], heads, scale), dtype=F64),
                                   rtol=1e-12, atol=1e-12)
    # pre-softmax: the logits are not probabilities (negative values, no unit sum)
    assert (logits < 0).any() and (soft > 0).all()
    with pytest.raises(ValueError, match="heads"):
        gc.cls_scores(q[:, 0], k, 5, scale)
    with pytest.raises(ValueError, match="scores must be one of"):
        gc.cls_scores(q[:, 0], k, heads, scale, kind="probs")


def test_thumbnail_keeps_the_top_share_in_score_order():
    g = gen(1)
    scores = torch.randn(4, 36, generator=g, dtype=F64)
    for ratio in (0.25, 0.1, 1.0, 0.01):
        got = gc.thumbnail_keep(scores, ratio)
        assert got.shape == (4, int(36 * ratio))
        for b in range(4):
            _, want = ref.compress_thumbnail(list(range(36)), scores[b].tolist(), ratio)
            assert got[b].tolist() == want
            assert gc.thumbnail_keep(scores, ratio, "position")[b].tolist() == sorted(want)
    # equal scores: the earlier patch wins (the official argsort leaves it unspecified)
    assert gc.thumbnail_keep(torch.zeros(1, 8), 0.5).tolist() == [[0, 1, 2, 3]]


@pytest.mark.parametrize("side", [4, 5, 24])
@pytest.mark.parametrize("tiles", [(1, 2), (2, 1), (2, 2), (1, 3), (3, 1), (2, 3), (3, 3)])
def test_tile_ratios_match_the_official_numpy_loop(side, tiles):
    g = gen(side * 10 + tiles[0] * 3 + tiles[1])
    for ratio, temperature, spread in ((0.25, 10.0, 1.0), (0.95, 10.0, 30.0), (0.5, 0.5, 3.0), (0.1, 1e4, 1.0)):
        scores = spread * torch.randn(side * side, generator=g, dtype=F64)
        got = gc.tile_ratios(scores, (side, side), tiles, ratio, temperature)
        want = ref.generate_scale_for_crop_features(scores.tolist(), tiles[1], tiles[0], ratio, temperature)
        torch.testing.assert_close(got, torch.tensor(want, dtype=F64), rtol=1e-14, atol=1e-14)
        assert (got <= 1.0).all()
    # a large ratio and a peaked thumbnail hit the cap of 1
    peaked = torch.zeros(side * side, dtype=F64)
    peaked[0] = 1e3
    assert gc.tile_ratios(peaked, (side, side), tiles, 0.95, 10.0).max() == 1.0


def test_tile_regions_generalise_to_rectangular_grids():
    # a 4 x 6 grid cut into 2 x 3 tiles: blocks of 2 x 2 patches
    got = gc.tile_regions((4, 6), (2, 3)).view(4, 6)
    want = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2], [3, 3, 4, 4, 5, 5], [3, 3, 4, 4, 5, 5]])
    assert torch.equal(got, want)
    # more tiles than patches along an axis: blocks of one patch, the last tile row takes none
    assert gc.tile_regions((2, 2), (3, 1)).tolist() == [0, 0, 1, 1]


# image sizes (height, width) against tile grids: both padding directions, none, thin slivers, whole tiles of
# padding (a row whose FIRST tile is all padding: the official row offset does not advance)
SIZES = [(50, 90), (90, 50), (70, 70), (40, 160), (160, 40), (33, 47), (100, 100), (12, 300), (300, 12)]
TILES = [(1, 2), (2, 1), (2, 2), (1, 3), (3, 1), (2, 3), (3, 2)]


def random_image(side, tiles, seed, D=3):
    g = gen(seed)
    T, P = tiles[0] * tiles[1], side * side
    crops = torch.randn(1 + T, P, D, generator=g, dtype=F64)
    scores = torch.randn(1 + T, P, generator=g, dtype=F64)
    return crops, scores, torch.randn(D, generator=g, dtype=F64)


def check_image(side, tiles, size, ratio=0.25, temperature=10.0, seed=0):
    crops, scores, newline = random_image(side, tiles, seed)
    out, rec = gc.globalcom2_image(crops, scores, tiles, (side, side), size, newline, ratio=ratio,
                                   temperature=temperature)
    want, base_idx, scales, kept = ref.official_image(crops, scores, (size[1], size[0]), tiles[1], tiles[0],
                                                      newline, ratio, temperature)
    assert rec.base_kept.tolist() == base_idx
    torch.testing.assert_close(rec.ratios, torch.tensor(scales, dtype=F64), rtol=1e-14, atol=1e-14)
    assert [torch.nonzero(k).flatten().tolist() for k in rec.kept] == kept
    assert out.shape == want.shape
    assert torch.equal(out, want)                 # the same tokens in the same places, exactly
    return out, rec


@pytest.mark.parametrize("side", [4, 5])
@pytest.mark.parametrize("tiles", TILES)
def test_one_image_equals_the_official_pipeline(side, tiles):
    checked = 0
    for i, size in enumerate(SIZES):
        if not gc.unpad_mask(size, tiles, (side, side)).any():
            continue   # nothing of the image in the tiles: the official interpolation fails (size 0)
        for ratio in (0.25, 0.6, 0.05):
            check_image(side, tiles, size, ratio, seed=i)
        checked += 1
    assert checked >= 6


def test_one_image_on_the_official_24x24_grid():
    for i, (size, tiles) in enumerate([((672, 672), (2, 2)), ((480, 640), (2, 2)), ((300, 1000), (1, 3)),
                                       ((1000, 300), (3, 1)), ((333, 700), (1, 2))]):
        out, rec = check_image(24, tiles, size, seed=i)
        assert rec.base_kept.numel() == 144            # int(576 * 0.25)
        assert out.shape[0] == 144 + int(rec.kept.sum()) + tiles[0] * 24


def test_quirks_are_exercised():
    """The edge cases the parity tests above cover really occur: a tile of padding only whose row does not
    advance the official offset, tokens moved by the unpadded-index placement, newlines on padded rows."""
    side, tiles, size = 4, (2, 3), (160, 40)
    mask = gc.unpad_mask(size, tiles, (side, side))
    assert not mask[0].any() and mask[1].any()               # tile (0, 0) is all padding
    guide = gc.tile_global_scores(torch.arange(16, dtype=F64), mask, tiles, (side, side))
    # both tile rows read the same rows of the resized thumbnail (the official offset did not advance)
    torch.testing.assert_close(guide[1][mask[1]], guide[4][mask[4]])
    # placement, by hand: a 1 x 1 tile grid of 3 x 2 patches whose top row is padding; tokens 12 and 15 are
    # kept (unpadded indices 0 and 3). Official: slots 0 and 3 (rows 0 and 1), a newline after every row;
    # "position": their own patches, a newline after the two unpadded rows only
    feats = (torch.arange(6, dtype=F64) + 10).view(1, 6, 1)
    valid = torch.tensor([[False, False, True, True, True, True]])
    kept = torch.tensor([[False, False, True, False, False, True]])
    nl = torch.tensor([-1.0], dtype=F64)
    assert gc.place_tiles(feats, kept, valid, (1, 1), (3, 2), nl)[:, 0].tolist() == [12, -1, 15, -1, -1]
    assert gc.place_tiles(feats, kept, valid, (1, 1), (3, 2), nl, "position")[:, 0].tolist() == [12, -1, 15, -1]


def test_lone_crop_and_degenerate_tiles():
    crops, scores, newline = random_image(4, (1, 1), 0)
    out, rec = gc.globalcom2_image(crops[:1], scores[:1], (0, 0), (4, 4), (50, 50), newline)
    assert torch.equal(out, torch.cat([crops[0], newline[None]]))       # official: kept whole, one newline
    assert rec.tiles == (0, 0) and rec.tokens == 16
    # no tile token survives a tiny ratio (int(n * r) = 0): the thumbnail's int(16 * 0.05) = 0 too, newlines stay
    crops, scores, newline = random_image(4, (2, 2), 1)
    out, rec = gc.globalcom2_image(crops, scores, (2, 2), (4, 4), (70, 70), newline, ratio=0.05)
    assert rec.tokens == 0 and out.shape[0] == 8
    # nothing of the image inside the tiles (an impossible processor choice): no tokens, no failure
    out, rec = gc.globalcom2_image(crops, scores, (2, 2), (4, 4), (1, 500), newline)
    assert not rec.valid.any() and rec.kept.sum() == 0 and out.shape[0] == int(16 * 0.25) + 8
    with pytest.raises(ValueError, match="do not match"):
        gc.globalcom2_image(crops, scores, (1, 2), (4, 4), (70, 70), newline)


def test_batched_images_equal_each_alone():
    images = [random_image(4, t, s) for s, t in enumerate([(2, 2), (1, 2), (3, 1), (1, 1)])]
    tiles = [(2, 2), (1, 2), (3, 1), (0, 0)]
    crops = [c if t != (0, 0) else c[:1] for (c, _, _), t in zip(images, tiles)]
    scores = [s if t != (0, 0) else s[:1] for (_, s, _), t in zip(images, tiles)]
    sizes = [(70, 70), (50, 90), (160, 50), (40, 40)]
    newline = images[0][2]
    out, records = gc.globalcom2(crops, scores, tiles, (4, 4), sizes, newline, ratio=0.4)
    for i in range(4):
        one, rec = gc.globalcom2_image(crops[i], scores[i], tiles[i], (4, 4), sizes[i], newline, ratio=0.4)
        assert torch.equal(out[i], one) and torch.equal(records[i].base_kept, rec.base_kept)


def test_position_variants_keep_the_same_tokens():
    crops, scores, newline = random_image(4, (2, 2), 5)
    official, rec = gc.globalcom2_image(crops, scores, (2, 2), (4, 4), (60, 100), newline)
    variant, rec2 = gc.globalcom2_image(crops, scores, (2, 2), (4, 4), (60, 100), newline, thumbnail_order="position",
                                        placement="position")
    assert torch.equal(rec.kept, rec2.kept) and sorted(rec.base_kept.tolist()) == rec2.base_kept.tolist()
    assert rec2.base_kept.tolist() != rec.base_kept.tolist()
    is_token = lambda x: ~(x == newline).all(1)  # noqa: E731
    a, b = official[is_token(official)], variant[is_token(variant)]
    assert a.shape == b.shape and not torch.equal(a, b)
    assert {tuple(r.tolist()) for r in a} == {tuple(r.tolist()) for r in b}   # the same tokens, other places


# =========================================================================== in the model

def sharpened(model):
    """A random tower's CLS logits are flat; scale the last layer's queries so the thumbnail's scores differ
    between regions and the tiles get visibly different ratios (a real test of the allocation)."""
    with torch.no_grad():
        model.model.vision_tower.encoder.layers[-1].self_attn.q_proj.weight.mul_(8)
    return model


@pytest.fixture(scope="module")
def tiny():
    return sharpened(random_llava_next("next-tiny"))


@pytest.fixture(scope="module")
def processor():
    return ab.next_processor()


def official_features(model, pixel_values, image_sizes, ratio=0.25, temperature=10.0, kind="logits"):
    """What xuyang-liu16/GlobalCom2 hands the LLM for each image, from the STOCK model: forward hooks on the LAST
    encoder layer's q_proj / k_proj (the official CustomCLIPAttention's inputs), hidden_states[-2] without
    CLS through the stock projector, the model's image_newline, then the literal oracle per image."""
    from transformers.models.llava_next.modeling_llava_next import (get_anyres_image_grid_shape,
                                                                    image_size_to_num_patches)

    core = model.model
    vc = core.config.vision_config
    counts = [image_size_to_num_patches(s, core.config.image_grid_pinpoints, vc.image_size) for s in image_sizes]
    crops = torch.cat([px[:n] for px, n in zip(pixel_values, counts)])
    attn = core.vision_tower.encoder.layers[-1].self_attn
    box = {}
    hooks = [attn.q_proj.register_forward_hook(lambda m, i, o: box.__setitem__("q", o)),
             attn.k_proj.register_forward_hook(lambda m, i, o: box.__setitem__("k", o))]
    try:
        with torch.no_grad():
            hidden = core.vision_tower(crops, output_hidden_states=True).hidden_states[-2][:, 1:]
            projected = core.multi_modal_projector(hidden)
    finally:
        for h in hooks:
            h.remove()
    score_fn = ref.cls_logits if kind == "logits" else ref.cls_softmax
    scores = torch.tensor([score_fn(box["q"][c], box["k"][c], attn.num_heads, attn.scale)
                           for c in range(len(crops))], dtype=F64)
    out, start = [], 0
    for size, n in zip(image_sizes, counts):
        rows, cols = get_anyres_image_grid_shape(size, core.config.image_grid_pinpoints, vc.image_size)
        h, w = (int(x) for x in size)
        out.append(ref.official_image(projected[start:start + n], scores[start:start + n], (w, h), cols, rows,
                                      core.image_newline.detach(), ratio, temperature))
        start += n
    return out


def patched_features(model, inputs, cfg):
    handle = patch(model, FocusConfig(globalcom2=cfg))
    try:
        handle.vision.record = True
        with torch.no_grad():
            feats = adapter_for(model).image_features(model, inputs["pixel_values"], image_sizes=inputs["image_sizes"])
        return list(feats), handle.vision.records
    finally:
        unpatch(model)


MANY = [(50, 90), (120, 60), (70, 70), (30, 200), (200, 30), (56, 56), (113, 111)]


@pytest.mark.parametrize("cfg", [GlobalCom2Config(), GlobalCom2Config(ratio=0.5, temperature=2.0),
                                 GlobalCom2Config(ratio=0.8, scores="softmax")], ids=["official", "r05", "softmax"])
def test_in_model_equals_official_on_stock_tensors(tiny, processor, cfg):
    inputs = ab.batch(processor, MANY, ["<image> w1"] * len(MANY), seed=3)
    want = official_features(tiny, inputs["pixel_values"], inputs["image_sizes"], cfg.ratio, cfg.temperature,
                             cfg.scores)
    got, records = patched_features(tiny, inputs, cfg)
    assert len(got) == len(want) == len(records) == len(MANY)
    for g, (w, base_idx, scales, kept), rec in zip(got, want, records):
        assert rec.base_kept.tolist() == base_idx
        torch.testing.assert_close(rec.ratios, torch.tensor(scales, dtype=F64), rtol=1e-6, atol=1e-8)
        assert [torch.nonzero(k).flatten().tolist() for k in rec.kept] == kept
        torch.testing.assert_close(g, w.to(g.dtype), rtol=1e-5, atol=1e-5)
    stock = adapter_for(tiny).image_features(tiny, inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    assert all(g.shape[0] < s.shape[0] for g, s in zip(got, stock))
    # the allocation is adaptive: the tiles of one image get different ratios, hence different counts
    assert max(float(r.ratios.max() - r.ratios.min()) for r in records) > 0.01


def test_in_model_on_the_real_anyres_geometry():
    """next-mid: 336 px crops of 24 x 24 patches and the real pinpoints (the official 576-token shapes)."""
    model = sharpened(random_llava_next("next-mid", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=4))
    vc = model.config.vision_config
    sizes = [(480, 640), (300, 1000)]
    tiles = [anyres_tiles(s, model.config.image_grid_pinpoints, (336, 336)) for s in sizes]
    crops = max(1 + r * c for r, c in tiles)
    pixels = torch.randn(len(sizes), crops, 3, vc.image_size, vc.image_size, generator=gen(7))
    inputs = {"pixel_values": pixels, "image_sizes": torch.tensor(sizes)}
    want = official_features(model, pixels, inputs["image_sizes"])
    got, records = patched_features(model, inputs, GlobalCom2Config())
    for g, (w, base_idx, _, kept), rec, (r, c) in zip(got, want, records, tiles):
        assert rec.base_kept.numel() == 144 and rec.base_kept.tolist() == base_idx
        assert [torch.nonzero(k).flatten().tolist() for k in rec.kept] == kept
        torch.testing.assert_close(g, w.to(g.dtype), rtol=1e-5, atol=1e-5)
        assert g.shape[0] == 144 + int(rec.kept.sum()) + 24 * r


def prompts_for(counts, text=(5, 6, 7)):
    """Left-padded ids holding ``counts[i]`` image placeholders each (GlobalCom2's counts, read from the features)."""
    rows = [[text[0]] + [ab.IMAGE_ID] * n + list(text[1:]) for n in counts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_generates_with_its_counts_and_unpatch_restores_stock_exactly(tiny, processor):
    inputs = ab.batch(processor)
    stock = ab.logits(tiny, inputs)
    layer = tiny.model.vision_tower.encoder.layers[-1]
    handle = patch(tiny, FocusConfig(globalcom2=GlobalCom2Config()))
    try:
        with torch.no_grad():
            feats = adapter_for(tiny).image_features(tiny, inputs["pixel_values"], image_sizes=inputs["image_sizes"])
        ids, mask = prompts_for([f.shape[0] for f in feats])
        reduced = {**inputs, "input_ids": ids, "attention_mask": mask}
        out = ab.logits(tiny, reduced)
        assert torch.isfinite(out).all()
        gen_ids = tiny.generate(**reduced, max_new_tokens=2, do_sample=False, pad_token_id=0)
        assert gen_ids.shape == (3, ids.shape[1] + 2)
        with pytest.raises(ConfigError, match="only known after the image is encoded"):
            handle.image_tokens()
    finally:
        unpatch(tiny)
    assert torch.equal(ab.logits(tiny, inputs), stock)
    assert "pack_image_features" not in tiny.model.__dict__ and not layer._forward_pre_hooks
    assert not hasattr(tiny, "_focusvlm")


def test_position_placement_is_the_stock_layout_without_the_dropped_tokens(tiny, processor):
    """placement="position" + thumbnail_order="position": the stock packing (transformers' own unpadding and
    newlines) with exactly the tokens GlobalCom2 dropped left out."""
    sizes = [(50, 90), (120, 60), (30, 200)]
    inputs = ab.batch(processor, sizes, ["<image> w1"] * 3)
    adapter = adapter_for(tiny)
    with torch.no_grad():
        stock = adapter.image_features(tiny, inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    got, records = patched_features(tiny, inputs, GlobalCom2Config(thumbnail_order="position",
                                                                   placement="position"))
    for s, g, rec in zip(stock, got, records):
        keep = [p in set(rec.base_kept.tolist()) for p in range(16)]
        (rows, cols), side = rec.tiles, 4
        for Y in range(rows * side):
            line = [(Y // side * cols + X // side, Y % side * side + X % side) for X in range(cols * side)]
            if not any(rec.valid[t, p] for t, p in line):
                continue                                   # a padded row: the stock unpadding drops it
            keep += [bool(rec.kept[t, p]) for t, p in line if rec.valid[t, p]] + [True]   # + its newline
        assert len(keep) == s.shape[0]
        torch.testing.assert_close(g, s[torch.tensor(keep)])


# =========================================================================== configuration and refusals

def test_config_validation_and_parsing():
    assert GlobalCom2Config() == GlobalCom2Config(ratio=0.25, temperature=10.0, scores="logits",
                                                  thumbnail_order="score", placement="unpadded_index")
    assert GlobalCom2Config(ratio=1).ratio == 1.0 and isinstance(GlobalCom2Config(temperature=3).temperature, float)
    for bad, match in [(dict(ratio=0), "ratio"), (dict(ratio=1.5), "ratio"), (dict(ratio=True), "ratio"),
                       (dict(ratio="0.5"), "ratio"), (dict(ratio=float("nan")), "ratio"),
                       (dict(temperature=0), "temperature"), (dict(temperature=-1.0), "temperature"),
                       (dict(temperature=float("inf")), "temperature"), (dict(scores="probs"), "scores"),
                       (dict(thumbnail_order="random"), "thumbnail_order"), (dict(placement="grid"), "placement")]:
        with pytest.raises(ConfigError, match=rf"GlobalCom2Config\.{match}:"):
            GlobalCom2Config(**bad)
    method = get_method("globalcom2")
    assert method.side == "vision" and method.cli_arg == "ratio"
    assert method.parse(None) == GlobalCom2Config()
    assert method.parse("0.5") == GlobalCom2Config(ratio=0.5)
    with pytest.raises(ConfigError, match="no token-count budget"):
        method.parse("192")
    from focusvlm.bench.arms import parse_arm

    assert parse_arm("globalcom2:0.1").config.globalcom2 == GlobalCom2Config(ratio=0.1)


def test_yaml_round_trip(tmp_path):
    cfg = FocusConfig(globalcom2=GlobalCom2Config(ratio=0.3, temperature=5.0, placement="position"))
    path = tmp_path / "gc2.yaml"
    cfg.save(path)
    assert "globalcom2:" in path.read_text()
    assert FocusConfig.load(path) == cfg and FocusConfig.from_dict(cfg.to_dict()) == cfg
    assert FocusConfig(globalcom2={"ratio": 0.5}).globalcom2 == GlobalCom2Config(ratio=0.5)
    with pytest.raises(ConfigError, match="only one vision-side reduction"):
        FocusConfig(vmtc={}, globalcom2={})


def test_processor_is_refused(tiny, processor):
    with pytest.raises(ConfigError, match="GlobalCom2: the tokens per image .* only known after the image is encoded"):
        patch(tiny, FocusConfig(globalcom2=GlobalCom2Config()), processor=processor)
    assert "pack_image_features" not in tiny.model.__dict__ and not hasattr(tiny, "_focusvlm")
    assert not tiny.model.vision_tower.encoder.layers[-1]._forward_pre_hooks


def test_unsupported_families_name_the_reason():
    from focusvlm.models.factory import random_llava
    from focusvlm.models.llava_onevision import random_llava_onevision

    one_crop = random_llava("tiny")
    with pytest.raises(UnsupportedModelError, match=r"GlobalCom2 needs an AnyRes model .*LLaVA-1.5: an image is "
                                                    r"one crop here"):
        patch(one_crop, FocusConfig(globalcom2=GlobalCom2Config()))
    assert not one_crop.model.vision_tower.encoder.layers[-1]._forward_pre_hooks
    with pytest.raises(UnsupportedModelError, match="LLaVA-OneVision vision tower has no CLS token"):
        patch(random_llava_onevision("onevision-tiny"), FocusConfig(globalcom2=GlobalCom2Config()))
    model = random_llava_next("next-tiny")
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(UnsupportedModelError, match="'full'"):
        patch(model, FocusConfig(globalcom2=GlobalCom2Config()))


# =========================================================================== show and bench

def test_panels_draw_every_crop(tiny, processor):
    inputs = ab.batch(processor, [(50, 90), (70, 70)], ["<image> w1"] * 2)
    with patched(tiny, FocusConfig(globalcom2=GlobalCom2Config())) as handle:
        handle.vision.record = True
        with torch.no_grad():
            adapter_for(tiny).image_features(tiny, inputs["pixel_values"], image_sizes=inputs["image_sizes"])
        records = handle.vision.records
        panels = [handle.vision.panels(i) for i in range(3 + 5 + 1)]
    assert [len(p) for p in panels] == [1] * 8 + [0]          # 3 crops of the first image, 5 of the second
    assert panels[0][0].title.startswith("GlobalCom2 thumbnail: 16 -> 4")
    assert (panels[3][0].state == 1).sum() == 4 and (panels[0][0].state == 1).sum() == 4
    for crop in range(2):
        assert (panels[1 + crop][0].state == 1).sum() == int(records[0].kept[crop].sum())
        assert f"ratio {float(records[0].ratios[crop]):.3f}" in panels[1 + crop][0].title


def test_bench_runs_it_with_its_measured_count():
    from focusvlm.bench.arms import parse_arms
    from focusvlm.bench.harness import run_bench
    from focusvlm.bench.setup import BenchOptions

    opts = BenchOptions(preset="next-tiny", methods=parse_arms("stock,globalcom2"), batches=[1], prompt_tokens=8,
                        new_tokens=2, repeats=1, warmup=0, progress=False)
    rows = run_bench(opts)["runs"][0]["methods"]
    # one 112 px image: 88 tokens stock; GlobalCom2 keeps int(16 / 4) = 4 of the thumbnail, about a quarter of
    # each 4 x 4 tile, and the 8 newlines of the 8 x 8 tile grid
    assert rows["stock"]["visual_tokens"] == 88
    assert 4 + 8 < rows["globalcom2"]["visual_tokens"] < 4 + 8 + 4 * 8
    assert rows["globalcom2"]["ratio"]["prefill_flops"] < 1
