"""PruMerge(+), VisionZip and DivPrune inside the tiny LLaVA: the patched model's image features against the
literal references applied to the STOCK model's tensors, taken the way the official code takes them
(forward hooks on the projections, eager attention weights, hidden states); processor counts, batches,
configs and errors."""

import pytest
import torch

from focusvlm import (ConfigError, DivPruneConfig, FocusConfig, PruMergeConfig, VisionZipConfig, patch, unpatch)
from focusvlm.compress import divprune, prumerge, visionzip
from focusvlm.methods import get_method
from focusvlm.models.factory import random_llava
from reference import peers_reference as ref
from test_vmtc_model import IMAGE_ID, image_features, inputs, run, tiny_processor

F64 = torch.float64


@pytest.fixture(scope="module")
def model():
    m = random_llava("tiny")
    # a random tower attends almost uniformly, so the IQR rule would find no outlier; sharpen the CLS
    # attention of the last two layers (PruMerge's and VisionZip's) so the adaptive paths keep tokens
    with torch.no_grad():
        for layer in m.model.vision_tower.encoder.layers[-2:]:
            layer.self_attn.q_proj.weight.mul_(12)
    return m


def pixels(n, seed=0):
    return torch.randn(n, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


def project(model, tokens):
    with torch.no_grad():
        return model.model.multi_modal_projector(tokens.float())


def official_prumerge(model, px, plus, adaptive, ratio):
    """What 42Shawn/LLaVA-PruMerge feeds the projector, from the stock tower: forward hooks on the LAST
    layer's q_proj / k_proj (their outputs), the features of hidden_states[-2] without CLS, then the
    literal reference."""
    last = model.model.vision_tower.encoder.layers[-1].self_attn
    box = {}
    hooks = [last.q_proj.register_forward_hook(lambda m, i, o: box.__setitem__("q", o)),
             last.k_proj.register_forward_hook(lambda m, i, o: box.__setitem__("k", o))]
    try:
        with torch.no_grad():
            out = model.model.vision_tower(px, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    features, q, k = out.hidden_states[-2][:, 1:], box["q"], box["k"]
    rows = [ref.prumerge_attention(q[b], k[b]) for b in range(len(px))]
    idx, _ = ref.prumerge_indices(rows, plus, adaptive, ratio)
    tokens = [torch.stack(ref.prumerge_image(features[b], k[b, 1:], rows[b], idx[b], prumerge.NEIGHBOURS)[0])
              for b in range(len(px))]
    return project(model, torch.stack(tokens)), idx


@pytest.mark.parametrize("cfg,B", [
    (PruMergeConfig(), 3),                         # official default call of PruMerge: IQR over the whole batch
    (PruMergeConfig(plus=True), 1),                # official default call of PruMerge+ (one image at a time)
    (PruMergeConfig(budget=0.125), 2),             # fixed path, official ratio
    (PruMergeConfig(budget=0.125, plus=True), 2),
    (PruMergeConfig(budget=20), 2),                # a token budget: the fixed path at the ratio that yields it
])
def test_prumerge_in_model_equals_official_on_stock_tensors(model, cfg, B):
    px = pixels(B, seed=1)
    ratio = cfg.ratio(64) if cfg.budget is not None else 1 / 8
    want, idx = official_prumerge(model, px, cfg.plus, cfg.adaptive, ratio)
    handle = patch(model, FocusConfig(prumerge=cfg))
    try:
        handle.vision.record = True
        got = image_features(model, px)
        record = handle.vision.records[0]
    finally:
        unpatch(model)
    assert record.kept.tolist() == idx
    assert len(idx[0]) > 0                       # the adaptive rule found outliers: a real test of the count
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if cfg.budget == 20:
        assert got.shape[1] == 20


def test_prumerge_adaptive_count_depends_on_the_batch(model):
    """The official IQR ratio is taken over the whole batch: an image's count changes with its companions."""
    px = pixels(3, seed=2)
    patch(model, FocusConfig(prumerge=PruMergeConfig()))
    try:
        alone = [image_features(model, px[b:b + 1]).shape[1] for b in range(3)]
        together = image_features(model, px).shape[1]
    finally:
        unpatch(model)
    rows = []
    for b in range(3):
        _, idx = official_prumerge(model, px[b:b + 1], False, True, 1 / 8)
        rows.append(len(idx[0]) + 1)
    assert alone == rows
    assert together == len(official_prumerge(model, px, False, True, 1 / 8)[1][0]) + 1


def official_visionzip(model, px, dominant, contextual):
    """What dvlab-research/VisionZip feeds the projector, from the stock tower run with eager attention:
    attentions[-2] and hidden_states[-2] (CLS included), keys of layers[-2] averaged over heads."""
    tower = model.model.vision_tower
    attn = tower.encoder.layers[-2].self_attn
    box = {}
    hook = attn.k_proj.register_forward_hook(lambda m, i, o: box.__setitem__("k", o))
    model.set_attn_implementation({"vision_config": "eager"})
    try:
        with torch.no_grad():
            out = tower(px, output_hidden_states=True, output_attentions=True)
    finally:
        hook.remove()
        model.set_attn_implementation({"vision_config": "sdpa"})
    B, T, C = box["k"].shape
    metric = box["k"].view(B, T, attn.num_heads, C // attn.num_heads).mean(2)     # official: key_states.mean(1)
    hidden, cls_rows = out.hidden_states[-2], out.attentions[-2][:, :, 0]
    tokens, records = [], []
    for b in range(B):
        toks, dom, targets, assign = ref.visionzip_image(hidden[b], cls_rows[b], metric[b], dominant, contextual)
        tokens.append(torch.stack(toks))
        records.append((dom, targets))
    return project(model, torch.stack(tokens)), records


@pytest.mark.parametrize("cfg", [VisionZipConfig(), VisionZipConfig(dominant=7, contextual=5),
                                 get_method("visionzip").parse("16")])
def test_visionzip_in_model_equals_official_on_stock_tensors(model, cfg):
    px = pixels(2, seed=3)
    want, records = official_visionzip(model, px, cfg.dominant, cfg.contextual)
    handle = patch(model, FocusConfig(visionzip=cfg))
    try:
        handle.vision.record = True
        got = image_features(model, px)
        rec = handle.vision.records[0]
    finally:
        unpatch(model)
    assert got.shape == (2, cfg.tokens, want.shape[-1])
    for b, (dom, targets) in enumerate(records):
        assert rec.dominant[b].tolist() == dom and rec.contextual[b].tolist() == targets
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_visionzip_replaces_the_whole_input_whatever_the_strategy(model):
    """CLS is one of VisionZip's dominant tokens; with LLaVA's 'full' strategy the LLM still gets 64 tokens."""
    px = pixels(1, seed=4)
    patch(model, FocusConfig(visionzip=VisionZipConfig()))
    try:
        default = image_features(model, px)
    finally:
        unpatch(model)
    model.config.vision_feature_select_strategy = "full"
    try:
        handle = patch(model, FocusConfig(visionzip=VisionZipConfig()))
        try:
            assert handle.image_tokens() == 64
            with torch.no_grad():
                full = model.model.get_image_features(px, vision_feature_layer=-2,
                                                      vision_feature_select_strategy="full").pooler_output[0]
        finally:
            unpatch(model)
    finally:
        model.config.vision_feature_select_strategy = "default"
    torch.testing.assert_close(full, default[0])


@pytest.mark.parametrize("cfg", [DivPruneConfig(), DivPruneConfig(budget=0.3), DivPruneConfig(budget=10)])
def test_divprune_in_model_equals_official_on_stock_tensors(model, cfg):
    px = pixels(2, seed=5)
    stock = image_features(model, px)                      # after the projector, per image
    handle = patch(model, FocusConfig(divprune=cfg))
    try:
        handle.vision.record = True
        got = image_features(model, px)
        rec = handle.vision.records[0]
    finally:
        unpatch(model)
    keep = cfg.tokens(64)
    assert got.shape[1] == keep == (int(round(cfg.budget * 64)) if isinstance(cfg.budget, float) else cfg.budget)
    for b in range(2):
        picks, kept = ref.divprune_image(stock[b], keep=keep)
        assert rec.picked[b].tolist() == picks and rec.kept[b].tolist() == kept
        torch.testing.assert_close(got[b], stock[b, kept])


@pytest.mark.parametrize("spec,want", [("prumerge:0.125", 9), ("prumerge:20", 20), ("visionzip", 64),
                                       ("visionzip:16", 16), ("divprune", 6), ("divprune:10", 10)])
def test_processor_counts_batches_generation_and_unpatch(model, spec, want):
    p = tiny_processor()
    stock = run(model, inputs(p))
    name, _, value = spec.partition(":")
    handle = patch(model, FocusConfig(**{name: get_method(name).parse(value or None)}), processor=p)
    try:
        batch = inputs(p)
        assert ((batch["input_ids"] == IMAGE_ID).sum(1) == want).all()
        assert handle.image_tokens() == want
        assert torch.isfinite(run(model, batch)).all()
        feats = image_features(model, batch["pixel_values"])
        for b in range(2):   # a fixed path treats each image on its own
            torch.testing.assert_close(feats[b:b + 1], image_features(model, batch["pixel_values"][b:b + 1]),
                                       rtol=1e-5, atol=1e-5)
        out = model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
        assert out.shape == (2, batch["input_ids"].shape[1] + 2)
    finally:
        unpatch(model, p)
    assert torch.equal(run(model, inputs(p)), stock)


def test_prumerge_plus_fixed_count():
    # 64 patches at 1/8: 8 kept + samples 4, 12, ..., 60 (8 of them) + the merged token
    assert prumerge.token_count(64, 1 / 8, plus=True) == 17
    assert prumerge.token_count(576, 1 / 8) == 73 and prumerge.token_count(576, 1 / 8, plus=True) == 145
    for count in (2, 73, 145, 192, 288, 577):
        assert prumerge.token_count(576, prumerge.ratio_for_count(576, count)) == count
    for count in (3, 73, 145, 192, 288):
        r = prumerge.ratio_for_count(576, count, plus=True)
        assert count - 1 <= prumerge.token_count(576, r, plus=True) <= count
    with pytest.raises(ValueError, match="cannot hand the LLM 2 tokens"):
        prumerge.ratio_for_count(576, 2, plus=True)   # one kept token already brings one sample
    assert int(576 * prumerge.ratio_for_count(576, 73)) == 72


def test_adaptive_prumerge_refuses_a_processor_and_configs(model):
    with pytest.raises(ConfigError, match="adaptive"):
        patch(model, FocusConfig(prumerge=PruMergeConfig()), processor=tiny_processor())
    assert getattr(model, "_focusvlm", None) is None
    with pytest.raises(ConfigError, match="PruMergeConfig.budget"):
        PruMergeConfig(budget=1)
    with pytest.raises(ConfigError, match="PruMergeConfig.budget"):
        patch(model, FocusConfig(prumerge=PruMergeConfig(budget=500)))
    with pytest.raises(ConfigError, match="VisionZipConfig.dominant"):
        VisionZipConfig(dominant=0)
    with pytest.raises(ConfigError, match="exceeds"):
        patch(model, FocusConfig(visionzip=VisionZipConfig(dominant=60, contextual=10)))
    with pytest.raises(ConfigError, match="token count"):
        get_method("visionzip").parse("0.5")
    with pytest.raises(ConfigError, match="DivPruneConfig.budget"):
        DivPruneConfig(budget=2.5)
    with pytest.raises(ConfigError, match="exceeds"):
        patch(model, FocusConfig(divprune=DivPruneConfig(budget=100)))
    assert getattr(model, "_focusvlm", None) is None
    assert get_method("prumerge").parse("192") == PruMergeConfig(budget=192)
    assert get_method("divprune").parse("0.25") == DivPruneConfig(budget=0.25)
