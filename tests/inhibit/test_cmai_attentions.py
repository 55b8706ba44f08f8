"""output_attentions with CMAI on: every layer returns the weights it applied."""

from __future__ import annotations

import pytest
import torch

from focusvlm import CMAIConfig, FocusConfig, patched
from focusvlm.models.factory import random_llava
from helpers import make_inputs

LAYOUTS = [[5, "img", 9], [3, "img", 4, "img", 6]]


def _types(model, inputs):
    """Per sample: positions of image tokens, and of text tokens after the sample's first image."""
    image = (inputs["input_ids"] == model.config.image_token_id) & inputs["attention_mask"].bool()
    first = torch.where(image.any(1), image.float().argmax(1), image.shape[1])
    after = (torch.arange(image.shape[1]) > first[:, None]) & ~image & inputs["attention_mask"].bool()
    return image, after


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_every_layer_returns_the_weights_it_applied(implementation):
    model = random_llava("tiny", seed=0, attn_implementation=implementation)
    inputs = make_inputs(model, LAYOUTS, seed=11)
    layers = model.config.text_config.num_hidden_layers
    cfg = CMAIConfig(gamma_max=0.6)
    gammas = cfg.gammas(layers)
    with torch.no_grad():
        eager_model = random_llava("tiny", seed=0, attn_implementation="eager")
        stock = eager_model(**inputs, output_attentions=True).attentions
        with patched(model, FocusConfig(cmai=cfg)):
            out = model(**inputs, output_attentions=True)
    got = out.attentions
    assert got is not None and len(got) == layers            # one tensor per decoder layer, never fewer
    image, after = _types(model, inputs)
    valid = inputs["attention_mask"].bool()
    for layer, (weights, reference, gamma) in enumerate(zip(got, stock, gammas)):
        assert weights.shape == reference.shape
        rows_sum = weights.sum(-1)[valid[:, None, :].expand(-1, weights.shape[1], -1)]
        assert torch.allclose(rows_sum, torch.ones_like(rows_sum), atol=1e-5)
        # image rows and text before the first image get the stock weights. Compared with the stock model:
        # up to the first inhibited layer every row's inputs are stock; later, only rows before the first
        # inhibited text row (causal attention: nothing inhibited reaches them)
        untouched = valid & ~after
        if layer > gammas.index(next(g for g in gammas if g > 0)):
            first_after = torch.where(after.any(1), after.float().argmax(1), after.shape[1])
            untouched &= torch.arange(after.shape[1]) < first_after[:, None]
        for b in range(weights.shape[0]):
            rows = untouched[b]
            assert rows.any()
            assert torch.allclose(weights[b][:, rows], reference[b][:, rows], atol=1e-6), (layer, b)
        # text rows after the image: inhibited image keys get exactly zero, the rest renormalised
        for b in range(weights.shape[0]):
            text_rows = weights[b][:, after[b]][:, :, image[b]]            # (H, text rows, image keys)
            zeros = (text_rows == 0).all(dim=0)                            # inhibited for every head alike
            if gamma == 0 and layer == 0:
                assert torch.allclose(weights[b][:, after[b]], reference[b][:, after[b]], atol=1e-6)
            elif gamma > 0:
                assert zeros.any(), (layer, b)
                assert not torch.allclose(weights[b][:, after[b]], reference[b][:, after[b]], atol=1e-4)
    # the weights returned are the weights used: the patched model's logits match the returned rows' effect
    with torch.no_grad(), patched(model, FocusConfig(cmai=cfg)):
        plain = model(**inputs).logits
    assert torch.allclose(out.logits[valid], plain[valid], atol=1e-5)
