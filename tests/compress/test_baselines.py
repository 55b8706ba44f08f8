"""SPD: pure function against a literal reference, then SPD and PruMerge(+) counts inside the tiny LLaVA.

PruMerge's parity with the official code is in tests/compress/test_peer_methods.py."""

import pytest
import torch

from focusvlm import CMAIConfig, ConfigError, FocusConfig, PruMergeConfig, SPDConfig, patch, unpatch
from focusvlm.compress import spd
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


@pytest.fixture(scope="module")
def model():
    return random_llava("tiny")


@pytest.mark.parametrize("cfg,want", [(SPDConfig(factor=2), 16), (SPDConfig(factor=3), 9),
                                      (PruMergeConfig(budget=10), 10),
                                      # official fixed PruMerge+ at 1/4: 16 kept + 16 samples + 1 merged
                                      (PruMergeConfig(budget=0.25, plus=True), 33)])
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
    handle = patch(model, FocusConfig(prumerge=PruMergeConfig()))
    try:
        handle.vision.record = True
        feats = image_features(model, px)
        rec = handle.vision.records[0]
        # the official output: the kept tokens (IQR outlier share of 64) and the merged one
        assert feats.shape[1] == rec.kept.shape[1] + 1 == int(64 * rec.ratio) + 1
    finally:
        unpatch(model)
