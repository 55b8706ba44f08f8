"""SPD and PruMerge(+): pure functions against literal references, then inside the tiny LLaVA."""

import pytest
import torch

from focusvlm import CMAIConfig, ConfigError, FocusConfig, PruMergeConfig, SPDConfig, patch, unpatch
from focusvlm.compress import baselines, spd
from focusvlm.models.factory import random_llava
from reference import baselines_reference as ref
from test_vmtc_model import IMAGE_ID, image_features, inputs, run, tiny_processor


@pytest.mark.parametrize("h,w,f", [(8, 8, 2), (6, 4, 2), (5, 7, 2), (24, 24, 5), (3, 3, 3)])
def test_spd_matches_reference(h, w, f):
    x = torch.randn(2, h * w, 3, generator=torch.Generator().manual_seed(h * w + f))
    got = spd.spd_pool(x, (h, w), f)
    for b in range(2):
        torch.testing.assert_close(got[b], torch.tensor(ref.spd(x[b].tolist(), h, w, f)), rtol=1e-5, atol=1e-6)
    assert spd.spd_grid(24, 24, 2) == (12, 12)


def test_spd_errors():
    with pytest.raises(ValueError, match="do not form"):
        spd.spd_pool(torch.zeros(1, 10, 2), (3, 3), 2)
    with pytest.raises(ValueError, match="larger than"):
        spd.spd_grid(4, 4, 5)


@pytest.mark.parametrize("budget,plus", [(None, False), (None, True), (5, False), (5, True), (6, True)])
def test_keep_set_matches_reference(budget, plus):
    g = torch.Generator().manual_seed(7)
    attn = torch.rand(1 if budget is None and plus else 3, 36, generator=g) ** 6
    mask = baselines.prumerge_keep(attn, budget, plus)
    for b in range(attn.shape[0]):
        assert mask[b].nonzero().flatten().tolist() == ref.keep_set(attn[b].tolist(), budget, plus)
    if budget is not None:
        assert (mask.sum(-1) == budget).all()


def test_iqr_rule_keeps_outliers_only():
    attn = torch.cat([torch.linspace(0.01, 0.03, 20), torch.tensor([0.5, 0.025, 0.3])]).unsqueeze(0)
    assert baselines.iqr_outliers(attn).nonzero()[:, 1].tolist() == [20, 22]


@pytest.mark.parametrize("neighbours", [3, 50])
def test_prumerge_merge_matches_reference(neighbours):
    g = torch.Generator().manual_seed(8)
    x, keys, attn = torch.randn(2, 16, 4, generator=g), torch.randn(2, 16, 5, generator=g), torch.rand(2, 16, generator=g)
    keep = baselines.prumerge_keep(attn, 4, False)
    out, kept, near = baselines.prumerge_merge(x, keys, attn, keep, neighbours)
    assert out.shape == (2, 4, 4) and near.shape == (2, 4, min(neighbours, 12))
    for b in range(2):
        want = ref.merge(x[b].tolist(), keys[b].tolist(), attn[b].tolist(), kept[b].tolist(), neighbours)
        torch.testing.assert_close(out[b], torch.tensor(want), rtol=1e-5, atol=1e-6)


def test_prumerge_unequal_counts_rejected():
    keep = torch.zeros(2, 6, dtype=torch.bool)
    keep[0, :2] = True
    keep[1, :3] = True
    with pytest.raises(ValueError, match="budget"):
        baselines.prumerge_merge(torch.zeros(2, 6, 2), torch.zeros(2, 6, 2), torch.ones(2, 6), keep, 2)


@pytest.fixture(scope="module")
def model():
    return random_llava("tiny")


@pytest.mark.parametrize("cfg,want", [(SPDConfig(factor=2), 16), (SPDConfig(factor=3), 9),
                                      (PruMergeConfig(budget=10), 10), (PruMergeConfig(budget=0.25, plus=True), 16)])
def test_in_model_counts_identity_and_batching(model, cfg, want):
    p = tiny_processor()
    stock = run(model, inputs(p))
    handle = patch(model, FocusConfig(cmai=CMAIConfig(gamma_max=0.4), **{"spd" if isinstance(cfg, SPDConfig) else "prumerge": cfg}),
                   processor=p)
    try:
        batch = inputs(p)
        assert ((batch["input_ids"] == IMAGE_ID).sum(1) == want).all()
        assert handle.vision.image_tokens() == want
        logits = run(model, batch)
        assert torch.isfinite(logits).all()
        feats = image_features(model, batch["pixel_values"])
        assert feats.shape[1] == want
        for b in range(2):
            torch.testing.assert_close(feats[b:b + 1], image_features(model, batch["pixel_values"][b:b + 1]),
                                       rtol=1e-5, atol=1e-5)
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert out.shape == (2, batch["input_ids"].shape[1] + 3)
    finally:
        unpatch(model, p)
    assert torch.equal(run(model, inputs(p)), stock)


def test_spd_in_model_equals_pooled_stock_features(model):
    px = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hs = model.model.vision_tower(px, output_hidden_states=True).hidden_states[-2][:, 1:]
        want = model.model.multi_modal_projector(spd.spd_pool(hs, (8, 8), 2))
    patch(model, FocusConfig(spd=SPDConfig(factor=2)))
    try:
        torch.testing.assert_close(image_features(model, px), want)
    finally:
        unpatch(model)


def test_prumerge_adaptive(model):
    px = torch.randn(1, 3, 112, 112)
    with pytest.raises(ConfigError, match="budget"):
        patch(model, FocusConfig(prumerge=PruMergeConfig()), processor=tiny_processor())
    assert getattr(model, "_focusvlm", None) is None
    handle = patch(model, FocusConfig(prumerge=PruMergeConfig(neighbours=4)))
    try:
        handle.vision.record = True
        feats = image_features(model, px)
        rec = handle.vision.records[0]
        assert 1 <= feats.shape[1] < 64 and rec["kept"].shape[1] == feats.shape[1]
    finally:
        unpatch(model)
