"""HiRED: the pure functions against the literal oracle (tests/reference/hired_official.py), then the patched
LLaVA-NeXT / LLaVA-1.5 against the oracle applied to the STOCK model's tensors, taken the way the official code
takes them (forward hooks on q_proj / k_proj of layers 0 and F - 1, hidden_states[-2], the projector);
counts, unpatch, configs, processor refusal, YAML, bench and show."""

from __future__ import annotations

import pytest
import torch

import anyres_builders as ab
from focusvlm import ConfigError, FocusConfig, HiREDConfig, UnsupportedModelError, patch, unpatch
from focusvlm.compress import hired
from focusvlm.methods import get_method
from focusvlm.models import adapter_for
from focusvlm.models.llava_next import random_llava_next
from reference import hired_official as ref

NEXT_PINS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]     # next-tiny's: 2, 2, 4, 3, 3 tiles


def scores_like(rows, n, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    if ties:   # few distinct values: the tie rule decides most picks
        return torch.randint(0, 3, (rows, n), generator=g).to(torch.float64)
    return torch.rand(rows, n, generator=g, dtype=torch.float64)


# --------------------------------------------------------------------------- pure functions vs the oracle

def test_cls_attention_is_the_hooks_cls_row_summed_over_heads():
    g = torch.Generator().manual_seed(0)
    B, T, heads, d = 3, 10, 4, 8
    q_out, k_out = torch.randn(B, T, heads * d, generator=g), torch.randn(B, T, heads * d, generator=g)
    q = q_out[:, 0].view(B, heads, d)
    k = k_out.view(B, T, heads, d).transpose(1, 2)
    got = hired.cls_attention(q, k, d ** -0.5)
    assert got.dtype == torch.float32 and got.shape == (B, T)
    for b in range(B):
        want = torch.tensor(ref.summed_scores(ref.cls_attention_row(q_out[b], k_out[b], heads), T), dtype=torch.float64)
        torch.testing.assert_close(got[b].double(), want, rtol=1e-5, atol=1e-6)
    assert hired.cls_attention(q.double(), k.double(), d ** -0.5).dtype == torch.float64


CROPS = [3, 5, 4, 2, 1]                    # base crop + 2, 4, 3, 1 tiles, and a lone crop
GRIDS = [(1, 2), (2, 2), (3, 1), (1, 1), (0, 0)]


@pytest.mark.parametrize("budget", [0.2, 0.1, 0.5, 0.9, 1.0, 40, 7])
@pytest.mark.parametrize("alpha", [0.5, 0.3, 0.0])
@pytest.mark.parametrize("split", ["rows", "regions"])
@pytest.mark.parametrize("ties", [False, True])
def test_select_matches_the_official_selection(budget, alpha, split, ties):
    n, grid = 16, (4, 4)                    # 16 tokens: the 3-tile image needs the rows generalisation
    early = scores_like(len(CROPS), n, seed=1, ties=ties)
    final = scores_like(sum(CROPS), n, seed=2, ties=ties)
    got = hired.select(early, final, CROPS, budget, alpha, split, grid=grid, tile_grids=GRIDS)
    start = 0
    for i, c in enumerate(CROPS):
        top = [early[i].tolist()] + [[0.0] * n] * (c - 1)
        bottom = [final[start + j].tolist() for j in range(c)]
        masks, budgets = ref.hired_masks(top, bottom, budget, alpha, split, grid, GRIDS[i])
        assert torch.equal(got.selected[start:start + c], masks), (i, budget)
        assert got.budgets[start:start + c].tolist() == budgets, (i, budget)
        start += c


def test_select_on_the_real_geometry_and_its_counts():
    """576 tokens, 4 tiles (2x2): the defaults keep 288 for the base crop and split 288 by the early votes."""
    crops, n = [5, 3, 4], 576
    early, final = scores_like(3, n, seed=3).float(), scores_like(12, n, seed=4).float()
    got = hired.select(early, final, crops, 0.2, 0.5, tile_grids=[(2, 2), (2, 1), (1, 3)], grid=(24, 24))
    assert got.budgets[0] == min(int(5 * 576 * 0.2 * 0.5), 576) == 288
    assert got.budgets[:5].sum() <= 576 and got.budgets[5:8].sum() <= int(3 * 576 * 0.2)
    start = 0
    for i, c in enumerate(crops):
        masks, budgets = ref.hired_masks([early[i].tolist()], [final[start + j].tolist() for j in range(c)], 0.2, 0.5)
        assert torch.equal(got.selected[start:start + c], masks) and got.budgets[start:start + c].tolist() == budgets
        start += c
    assert (got.selected.sum(1) == got.budgets).all()


def test_rows_split_is_contiguous_slices_not_quadrants():
    """The official quirk: with 2x2 tiles, tile 0's votes come from the first quarter of the base crop's
    sequence (its top rows), not from its top-left quadrant; 'regions' counts the quadrant."""
    rows = hired.tile_of_token(16, 4, "rows")
    regions = hired.tile_of_token(16, 4, "regions", grid=(4, 4), tile_grid=(2, 2))
    assert rows.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert regions.view(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert hired.tile_of_token(16, 3).tolist() == [0] * 6 + [1] * 5 + [2] * 5    # 16 = 6 + 5 + 5 (generalised)


def test_tile_budgets_truncate_a_float32_ratio_as_officially():
    """7/12 * 108 = 63 exactly, but the official float32 ratio gives 62.999996 and int() drops it to 62."""
    votes = torch.tensor([True] * 12)
    tile = torch.tensor([0] * 7 + [1] * 5)
    got = hired.tile_budgets(votes, tile, 2, 108, 576)
    assert got.tolist() == ref.sub_img_budgets([7, 5], 108, 576) == [62, 45]
    assert hired.tile_budgets(votes, tile, 2, 10_000, 576).tolist() == [576, 576]      # at most N per tile


def test_top_mask_ties_counts_and_errors():
    s = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    assert hired.top_mask(s, 2).tolist() == [[False, True, True, False, False]]
    assert hired.top_mask(s.expand(3, 5), torch.tensor([0, 5, 1])).sum(1).tolist() == [0, 5, 1]
    with pytest.raises(ValueError, match="one count per row"):
        hired.top_mask(s, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="0 base-crop tokens"):
        hired.select(torch.zeros(1, 4), torch.zeros(3, 4), [3], 0.9, alpha=1.0)
    with pytest.raises(ValueError, match="early_base"):
        hired.select(torch.zeros(1, 4), torch.zeros(2, 4), [3], 0.2)
    with pytest.raises(ValueError, match="regions"):
        hired.select(torch.zeros(1, 4), torch.zeros(3, 4), [3], 0.9, split="regions")


@pytest.mark.parametrize("budget", [0.2, 0.05, 1.0, 10, 100])
@pytest.mark.parametrize("ties", [False, True])
def test_single_crop_matches_the_llava15_version(budget, ties):
    scores = scores_like(3, 64, seed=5, ties=ties)
    feats = torch.randn(3, 64, 4, dtype=torch.float64)
    out, kept = hired.select_single(feats, scores, budget)
    for b in range(3):
        want = ref.hired_single(scores[b].tolist(), budget)
        assert kept[b].tolist() == want and torch.equal(out[b], feats[b, want])
    assert hired.keep_count(64, budget) == len(ref.hired_single(scores[0].tolist(), budget))
    with pytest.raises(ValueError, match="keeps no token"):
        hired.select_single(feats, scores, 0.01)


@pytest.mark.parametrize("size", [(50, 90), (120, 60), (70, 70), (30, 150), (160, 40), (56, 112)])
def test_pack_image_equals_the_official_packing(size):
    """Base crop masked in sequence order, tiles laid out on the unpadded grid, no newline; ``order`` from the
    stock layout of the indices themselves."""
    rows, cols = ref.tile_grid(size, NEXT_PINS, 56)
    crops, n = 1 + rows * cols, 16
    g = torch.Generator().manual_seed(sum(size))
    feats = torch.randn(crops, n, 3, generator=g)
    mask = torch.rand(crops, n, generator=g) < 0.4
    index = torch.arange(crops * n, dtype=torch.float64).view(crops, n, 1)
    order = ref.pack_hired(index, torch.ones(crops, n, dtype=torch.bool), size, NEXT_PINS, 56, 4)[:, 0].long()
    got = hired.pack_image(feats, mask, order)
    torch.testing.assert_close(got, ref.pack_hired(feats, mask, size, NEXT_PINS, 56, 4), rtol=0, atol=0)
    placed = hired.present(order, crops, n)
    assert got.shape[0] == int((mask & placed).sum())
    assert placed[0].all()


# --------------------------------------------------------------------------- the patched LLaVA-NeXT

def sharpen(model, layers):
    """A random tower attends almost uniformly; sharper CLS attention keeps the float32 (focusvlm) and float64
    (oracle) rankings away from near-ties."""
    with torch.no_grad():
        for i in layers:
            model.model.vision_tower.encoder.layers[i].self_attn.q_proj.weight.mul_(8)
    return model


@pytest.fixture(scope="module")
def next_model():
    return sharpen(random_llava_next("next-tiny"), [0, 2])


@pytest.fixture(scope="module")
def processor():
    return ab.next_processor()


def official_next(model, pixel_values, image_sizes, budget=0.2, alpha=0.5, split="rows", early=0, final=None):
    """What HiRED's modeling_llava_next hands the LLM, from the stock model: forward hooks on q_proj / k_proj
    (outputs) of layers ``early`` and ``final`` (default F - 1), hidden_states[-2] without CLS, the projector,
    then the literal selection and packing per image. Returns per image (features, budgets, selected masks)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    core, cfg = model.model, model.config
    layers = core.vision_tower.encoder.layers
    final = len(layers) - 2 if final is None else final
    box = {}
    hooks = []
    for name, i in (("top", early), ("bottom", final)):
        attn = layers[i].self_attn
        hooks += [attn.q_proj.register_forward_hook(lambda m, a, o, name=name: box.__setitem__(name + "_q", o)),
                  attn.k_proj.register_forward_hook(lambda m, a, o, name=name: box.__setitem__(name + "_k", o))]
    crop = cfg.vision_config.image_size
    counts = [image_size_to_num_patches(list(s), cfg.image_grid_pinpoints, crop) for s in image_sizes.tolist()]
    pixels = torch.cat([pv[:c] for pv, c in zip(pixel_values, counts)])
    try:
        with torch.no_grad():
            out = core.vision_tower(pixels, output_hidden_states=True)
            feats = core.multi_modal_projector(out.hidden_states[-2][:, 1:])
    finally:
        for h in hooks:
            h.remove()
    heads, n = cfg.vision_config.num_attention_heads, feats.shape[1]
    side = crop // cfg.vision_config.patch_size
    results, start = [], 0
    for size, c in zip(image_sizes.tolist(), counts):
        top = [ref.summed_scores(ref.cls_attention_row(box["top_q"][start], box["top_k"][start], heads), n)]
        bottom = [ref.summed_scores(ref.cls_attention_row(box["bottom_q"][start + j], box["bottom_k"][start + j],
                                                          heads), n) for j in range(c)]
        grid = ref.tile_grid(size, cfg.image_grid_pinpoints, crop)
        masks, budgets = ref.hired_masks(top, bottom, budget, alpha, split, (side, side), grid)
        results.append((ref.pack_hired(feats[start:start + c], masks, size, cfg.image_grid_pinpoints, crop, side),
                        budgets, masks))
        start += c
    return results


def patched_features(model, cfg, pixel_values, image_sizes):
    adapter = adapter_for(model)
    handle = patch(model, FocusConfig(hired=cfg))
    try:
        handle.vision.record = True
        with torch.no_grad():
            feats = adapter.image_features(model, pixel_values, image_sizes=image_sizes)
        return list(feats), handle.vision.records[0]
    finally:
        unpatch(model)


@pytest.mark.parametrize("cfg", [HiREDConfig(), HiREDConfig(budget=0.35, alpha=0.3), HiREDConfig(budget=30),
                                 HiREDConfig(budget=0.5, split="regions"), HiREDConfig(budget=0.3, early_layer=1,
                                                                                      final_layer=3),
                                 HiREDConfig(budget=1.0)],
                         ids=["default", "rate-alpha", "count", "regions", "layers", "all"])
def test_next_tiny_features_equal_the_official_pipeline(next_model, processor, cfg):
    sizes = [(50, 90), (120, 60), (70, 70), (30, 150), (160, 40)]      # 2, 2, 4, 3, 3 tiles; most unpad
    inputs = processor(images=ab.random_images(sizes, seed=7), text=["<image> w1"] * len(sizes),
                       return_tensors="pt", padding=True)
    got, record = patched_features(next_model, cfg, inputs["pixel_values"], inputs["image_sizes"])
    want = official_next(next_model, inputs["pixel_values"], inputs["image_sizes"], cfg.budget, cfg.alpha, cfg.split,
                         cfg.early_layer, cfg.final_layer)
    budgets = torch.tensor([b for _, bs, _ in want for b in bs])
    assert torch.equal(record.budgets, budgets)
    assert torch.equal(record.selected, torch.cat([m for _, _, m in want]))
    for g, (w, _, _) in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    # the count is the kept tokens: at most the budget, less where a chosen tile token lay in the padding
    crops = [1 + r * c for r, c in (ref.tile_grid(s, NEXT_PINS, 56) for s in sizes)]
    assert crops == [3, 3, 5, 4, 4]
    assert [g.shape[0] for g in got] == [int(k.sum()) for k in record.kept.split(crops)]
    counts = [g.shape[0] for g in got]
    if cfg.budget != 1.0:
        assert int(record.selected.sum()) == int(budgets.sum())
        assert sum(counts) < int(record.selected.sum()), "some chosen tokens must be lost to the unpadding"


def test_next_mid_real_geometry_equals_the_official_pipeline():
    """576 tokens per crop, 8 heads, a 2x2 image that unpads (650 x 700) and a 1x2 one (300 x 700)."""
    model = sharpen(random_llava_next("next-mid"), [0, 6])
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 5, 3, 336, 336, generator=g)
    sizes = torch.tensor([[650, 700], [300, 700]])
    got, record = patched_features(model, HiREDConfig(), pixels, sizes)
    want = official_next(model, pixels, sizes)
    assert record.budgets.tolist() == [b for _, bs, _ in want for b in bs]
    assert record.budgets[0] == 288                                       # int(5 * 576 * 0.2 * 0.5)
    for gf, (w, _, _) in zip(got, want):
        assert gf.shape == w.shape
        torch.testing.assert_close(gf, w, rtol=1e-5, atol=1e-5)


def test_next_patched_model_logits_follow_the_features_and_unpatch_is_exact(next_model, processor):
    """The LLM receives exactly the packed features (placeholders = their count), generation runs, and unpatch
    restores the stock logits bit for bit."""
    inputs = ab.batch(processor, sizes=[(50, 90)], prompts=["w1 <image> w2 w3"])
    stock = ab.logits(next_model, inputs)
    want = official_next(next_model, inputs["pixel_values"], inputs["image_sizes"])[0][0]
    ids = inputs["input_ids"][0]
    at = int((ids == ab.IMAGE_ID).nonzero()[0])
    n_stock = int((ids == ab.IMAGE_ID).sum())
    short = torch.cat([ids[:at], torch.full((want.shape[0],), ab.IMAGE_ID), ids[at + n_stock:]])[None]
    hired_inputs = {**inputs, "input_ids": short, "attention_mask": torch.ones_like(short)}
    handle = patch(next_model, FocusConfig(hired=HiREDConfig()))
    try:
        assert "pack_image_features" in next_model.model.__dict__
        got = ab.logits(next_model, hired_inputs)
        out = next_model.generate(**hired_inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
        assert out.shape == (1, short.shape[1] + 2)
        with pytest.raises(ConfigError, match="only known after"):
            handle.image_tokens()
    finally:
        unpatch(next_model)
    with torch.no_grad():   # the stock LLM on embeddings that hold the oracle's features at the placeholders
        embeds = next_model.get_input_embeddings()(short.masked_fill(short == ab.IMAGE_ID, 0))
        embeds[short == ab.IMAGE_ID] = want
        manual = next_model(inputs_embeds=embeds, attention_mask=torch.ones_like(short)).logits
    torch.testing.assert_close(got, manual, rtol=1e-4, atol=1e-4)
    assert "pack_image_features" not in next_model.model.__dict__ and not hasattr(next_model, "_focusvlm")
    assert all(not layer._forward_pre_hooks for layer in next_model.model.vision_tower.encoder.layers)
    assert torch.equal(ab.logits(next_model, inputs), stock)


def test_next_refuses_a_processor_and_bad_configs(next_model, processor):
    with pytest.raises(ConfigError, match="only known after the image is seen"):
        patch(next_model, FocusConfig(hired=HiREDConfig()), processor=processor)
    assert "pack_image_features" not in next_model.model.__dict__ and not hasattr(next_model, "_focusvlm")
    assert "replace_image_token" not in processor.__dict__
    assert all(not layer._forward_pre_hooks for layer in next_model.model.vision_tower.encoder.layers)
    with pytest.raises(ConfigError, match="HiREDConfig.final_layer=4: the vision tower has 4 encoder layers"):
        patch(next_model, FocusConfig(hired=HiREDConfig(final_layer=4)))
    with pytest.raises(ConfigError, match="HiREDConfig.alpha=1.0 leaves"):
        patch(next_model, FocusConfig(hired=HiREDConfig(alpha=1.0)))
    assert not hasattr(next_model, "_focusvlm")
    next_model.config.vision_feature_select_strategy = "full"
    try:
        with pytest.raises(UnsupportedModelError, match="CLS token"):
            patch(next_model, FocusConfig(hired=HiREDConfig()))
    finally:
        next_model.config.vision_feature_select_strategy = "default"


@pytest.mark.parametrize("kwargs,match", [
    (dict(budget=1), "ambiguous"), (dict(budget=2.5), "whole"), (dict(budget=0), "fraction"),
    (dict(budget=True), "fraction"), (dict(alpha=1.5), "alpha"), (dict(alpha=True), "alpha"),
    (dict(early_layer=-1), "early_layer"), (dict(final_layer="22"), "final_layer"),
    (dict(split="quadrants"), "split")])
def test_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=f"HiREDConfig.*{match}|{match}"):
        HiREDConfig(**kwargs)


def test_config_defaults_cli_and_yaml_round_trip(tmp_path):
    d = HiREDConfig()
    assert (d.budget, d.alpha, d.early_layer, d.final_layer, d.split) == (0.2, 0.5, 0, None, "rows")
    assert HiREDConfig(budget=192.0).budget == 192 and isinstance(HiREDConfig(budget=192.0).budget, int)
    method = get_method("hired")
    assert method.side == "vision" and method.cli_arg == "budget" and method.parse(None) == d
    assert method.parse("0.1") == HiREDConfig(budget=0.1) and method.parse("300") == HiREDConfig(budget=300)
    cfg = FocusConfig(hired=HiREDConfig(budget=0.1, alpha=0.3, early_layer=1, final_layer=2, split="regions"))
    assert FocusConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "hired.yaml"
    cfg.save(path)
    assert "hired" in path.read_text() and FocusConfig.load(path) == cfg
    assert FocusConfig.from_dict({"hired": {"budget": 100}}).hired == HiREDConfig(budget=100)


# --------------------------------------------------------------------------- one crop, other families

def _final_layer_qk(model, pixels):
    """(attention module, {"q", "k"} projections, hidden states) of the layer the LLM reads (-2), as the official
    code hooks them, on the stock tower."""
    attn = model.model.vision_tower.encoder.layers[-2].self_attn
    box = {}
    hooks = [attn.q_proj.register_forward_hook(lambda m, a, o: box.__setitem__("q", o)),
             attn.k_proj.register_forward_hook(lambda m, a, o: box.__setitem__("k", o))]
    try:
        with torch.no_grad():
            hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
    finally:
        for h in hooks:
            h.remove()
    return attn, box, hidden


def test_llava15_single_crop_equals_the_official_version_with_processor_counts():
    """The repository's modeling_llava.py: layer 22 (F - 1) CLS attention, top min(N, int(N * rate)) tokens in
    sequence order before the projector; a fixed count, so the processor follows it."""
    from focusvlm.models.factory import random_llava
    from test_vmtc_model import inputs as llava_inputs, run, tiny_processor

    model = sharpen(random_llava("tiny"), [2])
    p = tiny_processor()
    batch = llava_inputs(p)
    stock = run(model, batch)
    attn, box, hidden = _final_layer_qk(model, batch["pixel_values"])
    hidden = hidden[:, 1:]
    heads = attn.num_heads
    handle = patch(model, FocusConfig(hired=HiREDConfig()), processor=p)
    try:
        handle.vision.record = True
        assert handle.image_tokens() == int(64 * 0.2) == 12
        reduced = llava_inputs(p)
        assert ((reduced["input_ids"] == 511).sum(1) == 12).all()
        assert torch.isfinite(run(model, reduced)).all()
        with torch.no_grad():
            got = model.model.get_image_features(reduced["pixel_values"]).pooler_output
        assert handle.vision.panels(1)[0].state.sum() == 12
    finally:
        unpatch(model, p)
    for b in range(2):
        kept = ref.hired_single(ref.summed_scores(ref.cls_attention_row(box["q"][b], box["k"][b], heads), 64), 0.2)
        with torch.no_grad():
            want = model.model.multi_modal_projector(hidden[b, kept])
        torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-5)
    assert torch.equal(run(model, llava_inputs(p)), stock)


def test_llava15_full_strategy_ranks_the_cls_token_too():
    """With 'full' the official num_vision_tokens is 65 (CLS + 64): CLS competes for the int(65 * 0.2) = 13 slots."""
    from focusvlm.models.factory import random_llava
    from test_vmtc_model import inputs as llava_inputs, tiny_processor

    model = sharpen(random_llava("tiny"), [2])
    model.config.vision_feature_select_strategy = "full"
    p = tiny_processor("full")
    batch = llava_inputs(p)
    attn, box, hidden = _final_layer_qk(model, batch["pixel_values"])
    handle = patch(model, FocusConfig(hired=HiREDConfig()), processor=p)
    try:
        assert handle.image_tokens() == 13
        reduced = llava_inputs(p)
        assert ((reduced["input_ids"] == 511).sum(1) == 13).all()
        with torch.no_grad():
            got = model.model.get_image_features(reduced["pixel_values"]).pooler_output
    finally:
        unpatch(model, p)
    for b in range(2):
        kept = ref.hired_single(ref.summed_scores(ref.cls_attention_row(box["q"][b], box["k"][b], attn.num_heads), 65),
                                0.2)
        with torch.no_grad():
            torch.testing.assert_close(got[b], model.model.multi_modal_projector(hidden[b, kept]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["onevision-tiny", "qwen2.5-vl-tiny"])
def test_towers_without_cls_are_refused(preset):
    from focusvlm.models import adapter_for_preset

    model = adapter_for_preset(preset).random_model(preset)
    with pytest.raises(UnsupportedModelError, match="CLS token"):
        patch(model, FocusConfig(hired=HiREDConfig()))
    assert not hasattr(model, "_focusvlm")


# --------------------------------------------------------------------------- bench and show

def test_bench_runs_hired_on_the_anyres_preset():
    from focusvlm.bench.arms import parse_arms
    from focusvlm.bench.harness import run_bench
    from focusvlm.bench.setup import BenchOptions

    opts = BenchOptions(preset="next-tiny", methods=parse_arms("stock,hired"), batches=[1], prompt_tokens=8,
                        new_tokens=2, repeats=1, warmup=0, progress=False)
    rows = run_bench(opts)["runs"][0]["methods"]
    # one 112 px image = base crop + 2x2 tiles of 16 tokens: 88 stock; HiRED keeps int(80 * 0.2) = 16 at most
    assert rows["stock"]["visual_tokens"] == 88
    assert 8 <= rows["hired"]["visual_tokens"] <= 16


def test_show_draws_hired_per_crop(tmp_path, next_model, processor, capsys):
    import argparse

    from PIL import Image

    from focusvlm.cli import show
    from focusvlm.models.factory import demo_image_path
    from focusvlm.models.llava_next import anyres_tiles

    next_model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    ap = argparse.ArgumentParser()
    show.register(ap.add_subparsers(dest="command"))
    out = tmp_path / "hired.png"
    args = ap.parse_args(["show", "--image", str(demo_image_path("chelsea")), "--model", str(tmp_path / "m"),
                          "--device", "cpu", "-o", str(out), "--method", "hired:0.3"])
    assert args.func(args) == 0
    image = Image.open(demo_image_path("chelsea"))
    rows, cols = anyres_tiles((image.height, image.width), next_model.config.image_grid_pinpoints, (56, 56))
    text = capsys.readouterr().out
    assert f"{1 + rows * cols} crops) with hired(budget=0.3)" in text
    tokens = int(text.split("(")[1].split(" image tokens")[0])
    assert 0 < tokens <= int((1 + rows * cols) * 16 * 0.3)        # the budget, less what the unpadding drops
    picture = Image.open(out)
    assert picture.height % (1 + rows * cols) == 0               # one strip per crop, base crop first
