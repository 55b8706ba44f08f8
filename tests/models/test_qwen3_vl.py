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
