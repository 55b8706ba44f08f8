"""Qwen3-VL: the shared Qwen guarantees (qwen_guarantees.py) plus what deepstack adds."""

import pytest
import torch

from focusvlm import CMAIConfig, FocusConfig, patched
from qwen_builders import make_inputs, tiny_model
from qwen_guarantees import *  # noqa: F401,F403  (the shared guarantee tests run against this family)
from qwen_guarantees import LAYOUTS, logits, reference_logits


@pytest.fixture(scope="module")
def preset():
    return "qwen3-vl-tiny"


def test_deepstack_is_active_and_cmai_still_matches_reference(preset):
    """Deepstack adds vision features to the image positions of the first LLM layers; CMAI (which only
    types positions and replaces attention) must still compute exactly what the reference does."""
    model = tiny_model(preset)
    inputs = make_inputs(model, LAYOUTS[:2], seed=11).inputs
    mask = inputs["attention_mask"].bool()
    cfg = CMAIConfig()
    expected = reference_logits(model, inputs, cfg)
    with patched(model, FocusConfig(cmai=cfg)):
        got = logits(model, inputs)
    assert (got[mask] - expected[mask]).abs().max().item() <= 1e-5
    # the taps are in play: silencing their mergers changes the stock logits
    stock = logits(model, inputs)
    with torch.no_grad():
        for merger in model.model.visual.deepstack_merger_list:
            merger.linear_fc2.weight.zero_()
            merger.linear_fc2.bias.zero_()
    assert (logits(model, inputs)[mask] - stock[mask]).abs().max().item() > 1e-4


def _expected_frame(rows: torch.Tensor, record, frame: int, stage) -> torch.Tensor:
    """One frame's reduced tokens, literally: kept rows as they are, each cluster as the importance-weighted
    mean of its members, placed at its most important member's position."""
    importance = record.importance[frame].double()
    primary = record.primary[frame].tolist()
    redundant = record.redundant[frame].tolist()
    labels = record.labels[frame].tolist()
    out = {}
    for token in primary:
        out[token] = rows[token].double()
    for c in range(stage.clusters):
        members = [t for t, label in zip(redundant, labels) if label == c]
        best = max(members, key=lambda t: (float(importance[t]), -t))
        weights = torch.stack([importance[t] for t in members])
        out[best] = (weights[:, None] * torch.stack([rows[t].double() for t in members])).sum(0) / weights.sum()
    return torch.stack([out[k] for k in sorted(out)])


def test_vmtc_reduces_deepstack_features_with_the_same_selection_and_weights(model, monkeypatch):
    from qwen_guarantees import Recorder

    from focusvlm import VMTCConfig

    recorder = Recorder(monkeypatch)
    grids = torch.tensor([[1, 6, 8], [2, 4, 6]])
    vc = model.config.vision_config
    pixels = torch.randn(int(grids.prod(-1).sum()), vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2,
                         generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        stock = model.model.get_image_features(pixels, grids, return_dict=True)
        with patched(model, FocusConfig(vmtc=VMTCConfig(target=0.5))):
            got = model.model.get_image_features(pixels, grids, return_dict=True)
    levels = len(stock.deepstack_features)
    assert levels == 2 and len(recorder.calls) == 2
    for i, ((t, h, w), (stage, record, _, extras)) in enumerate(zip(grids.tolist(), recorder.calls)):
        n = (h // 2) * (w // 2)
        pairs = [(stock.pooler_output[i], got.pooler_output[i])]
        pairs += [(stock.deepstack_features[lv][i], got.deepstack_features[lv][i]) for lv in range(levels)]
        for stock_rows, reduced in pairs:
            assert reduced.shape[0] == t * stage.n_out
            frames = stock_rows.view(t, n, -1)
            expected = torch.cat([_expected_frame(frames[f], record, f, stage) for f in range(t)])
            assert torch.allclose(reduced.double(), expected, atol=1e-5)
