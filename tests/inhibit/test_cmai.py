"""CMAI on a real (random-weight) transformers LLaVA against the literal reference."""

from __future__ import annotations

import pytest
import torch

from focusvlm import CMAIConfig, FocusConfig, patch, patched, unpatch
from focusvlm.inhibit.focus import masked_quantile
from focusvlm.models.factory import random_llava
from helpers import assert_is_torch_quantile, make_inputs, split_sample
from reference import cmai_reference

LAYOUTS = [
    [5, "img", 9],            # the usual LLaVA prompt
    [3, "img", 4, "img", 6],  # two images, text between
    [7],                      # text only: untouched
    ["img", 12],              # image first, no system text
]


@pytest.fixture(scope="module")
def model():
    return random_llava("tiny", seed=0)


def _valid_logits(out, mask):
    return out.logits[mask.bool()]


def _reference_logits(model, inputs, cfg: CMAIConfig):
    gammas = cfg.gammas(model.config.text_config.num_hidden_layers)
    ref = cmai_reference.ReferenceCMAI(gammas, cfg.focus, cfg.discount, model.config.image_token_id)
    ref.set_inputs(inputs["input_ids"], inputs["attention_mask"])
    undo = cmai_reference.install(model, ref)
    try:
        with torch.no_grad():
            return model(**inputs).logits
    finally:
        undo()


CONFIGS = [
    CMAIConfig(gamma_max=0.6, focus="neighborhood"),
    CMAIConfig(gamma_max=0.6, focus="tia"),
    CMAIConfig(gamma_max=0.6, focus="sum"),
    CMAIConfig(gamma_max=0.6, focus="discounted", discount=0.7),
    CMAIConfig(gamma_max=0.45, schedule="constant"),
    CMAIConfig(schedule=(0.0, 0.3, 0.75)),
    CMAIConfig(gamma_max=0.5, schedule="constant", layers=(1,)),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.focus}-{c.schedule}-{c.layers}")
def test_prefill_matches_reference(model, cfg):
    inputs = make_inputs(model, LAYOUTS, seed=1)
    expected = _reference_logits(model, inputs, cfg)
    with patched(model, FocusConfig(cmai=cfg)), torch.no_grad():
        got = model(**inputs).logits
    mask = inputs["attention_mask"].bool()
    diff = (got[mask] - expected[mask]).abs().max().item()
    assert diff <= 1e-5, diff
    # the method must actually change something, or the comparison proves nothing
    with torch.no_grad():
        stock = model(**inputs).logits
    assert (stock[mask] - got[mask]).abs().max().item() > 1e-4


def test_gamma_zero_and_unpatch_are_bit_identical(model):
    inputs = make_inputs(model, LAYOUTS, seed=2)
    with torch.no_grad():
        stock = model(**inputs).logits
        with patched(model, FocusConfig(cmai=CMAIConfig(gamma_max=0.0))):
            zero = model(**inputs).logits
        patch(model, FocusConfig(cmai=CMAIConfig(gamma_max=0.6)))
        changed = model(**inputs).logits
        unpatch(model)
        after = model(**inputs).logits
    assert torch.equal(stock, zero)
    assert not torch.equal(stock, changed)
    assert torch.equal(stock, after)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert "generate" not in model.__dict__
    assert not hasattr(model, "_focusvlm")


def test_batch_equals_single_samples(model):
    inputs = make_inputs(model, LAYOUTS, seed=3)
    with patched(model, FocusConfig(cmai=CMAIConfig())), torch.no_grad():
        batched = model(**inputs).logits
        for i in range(len(LAYOUTS)):
            single_inputs = split_sample(inputs, i, LAYOUTS, model)
            single = model(**single_inputs).logits[0]
            got = batched[i][inputs["attention_mask"][i].bool()]
            assert (got - single).abs().max().item() <= 1e-5


def test_text_only_sample_is_untouched(model):
    inputs = make_inputs(model, [[4, "img", 6], [11]], seed=4)
    with torch.no_grad():
        stock = model(**inputs).logits
        with patched(model, FocusConfig(cmai=CMAIConfig())):
            got = model(**inputs).logits
    valid = inputs["attention_mask"][1].bool()
    assert (got[1][valid] - stock[1][valid]).abs().max().item() <= 1e-6
    # through cached decoding too: the text-only sample's steps are the stock kernel's bits
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                    return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        stock_gen = model.generate(**inputs, **settings)
        with patched(model, FocusConfig(cmai=CMAIConfig())):
            cmai_gen = model.generate(**inputs, **settings)
    for s_logits, c_logits in zip(stock_gen.logits, cmai_gen.logits):
        assert torch.equal(s_logits[1], c_logits[1])
    assert not all(torch.equal(s[0], c[0]) for s, c in zip(stock_gen.logits, cmai_gen.logits))


@pytest.mark.parametrize("focus", ["neighborhood", "discounted"])
def test_generate_with_cache_matches_full_forward(model, focus):
    inputs = make_inputs(model, [[5, "img", 7], [2, "img", 3]], seed=5)
    prompt_len = inputs["input_ids"].shape[1]
    new = 6
    with patched(model, FocusConfig(cmai=CMAIConfig(focus=focus, discount=0.8))), torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        full_mask = torch.cat([inputs["attention_mask"], torch.ones(2, new, dtype=torch.long)], dim=1)
        full = model(input_ids=gen.sequences, attention_mask=full_mask, pixel_values=inputs["pixel_values"],
                     use_cache=False).logits
    for step, step_logits in enumerate(gen.logits):
        diff = (step_logits - full[:, prompt_len - 1 + step]).abs().max().item()
        assert diff <= 1e-5, (step, diff)


def test_image_rows_keep_stock_attention_bitwise():
    """Call the layer function directly: image query rows are the stock kernel's bits."""
    from focusvlm.inhibit.attention import LayerLink, cmai_attention_forward
    from focusvlm.inhibit.state import CMAIState
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    b, h, hkv, s, d = 2, 4, 2, 20, 8
    q, k, v = torch.randn(b, h, s, d), torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
    image = torch.zeros(b, s, dtype=torch.bool)
    image[:, 3:13] = True
    state = CMAIState("neighborhood", 0.9)
    state.begin_call(image, None, 0)

    class Module(torch.nn.Module):
        layer_idx, is_causal, num_key_value_groups = 0, True, h // hkv

    module = Module()
    module._focusvlm_cmai = LayerLink(state, 0.5, sdpa_attention_forward)
    got, _ = cmai_attention_forward(module, q, k, v, None, scaling=d ** -0.5)
    stock, _ = sdpa_attention_forward(module, q, k, v, None, scaling=d ** -0.5)
    assert torch.equal(got[:, 3:13], stock[:, 3:13])      # image rows
    assert torch.equal(got[:, :3], stock[:, :3])          # text before the image sees no image: same bits
    assert not torch.allclose(got[:, 13:], stock[:, 13:])  # text rows after the image are inhibited


@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 0.6, 0.999])
def test_masked_quantile_matches_torch_quantile(gamma):
    torch.manual_seed(1)
    values = torch.randn(3, 5, 17)
    values[0, 0, :6] = 0.5  # ties
    valid = torch.rand(3, 5, 17) > 0.3
    valid[1, 1] = False
    valid[2, 2, :] = False
    valid[2, 2, 4] = True   # a single valid entry
    got = masked_quantile(values, valid, gamma)
    for i in range(3):
        for j in range(5):
            row = values[i, j][valid[i, j]]
            if row.numel() == 0:
                assert got[i, j] == float("inf")
            else:
                assert_is_torch_quantile(got[i, j], row, gamma)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_and_stays_close(dtype):
    model = random_llava("tiny", seed=0, dtype=dtype)
    inputs = make_inputs(model, LAYOUTS[:2], seed=6)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    cfg = CMAIConfig()
    expected = _reference_logits(model.float(), {**inputs, "pixel_values": inputs["pixel_values"].float()}, cfg)
    model.to(dtype)
    with patched(model, FocusConfig(cmai=cfg)), torch.no_grad():
        got = model(**inputs).logits
    assert got.dtype == dtype
    assert torch.isfinite(got).all()
    mask = inputs["attention_mask"].bool()
    # same method in reduced precision: close to the fp32 reference, not exact
    assert (got[mask].float() - expected[mask]).abs().max().item() < 0.1


def test_fp32_eager_base_also_matches_reference():
    model = random_llava("tiny", seed=0, attn_implementation="eager")
    inputs = make_inputs(model, LAYOUTS[:2], seed=7)
    cfg = CMAIConfig()
    expected = _reference_logits(model, inputs, cfg)
    with patched(model, FocusConfig(cmai=cfg)), torch.no_grad():
        got = model(**inputs).logits
    assert model.config.text_config._attn_implementation == "eager"
    mask = inputs["attention_mask"].bool()
    assert (got[mask] - expected[mask]).abs().max().item() <= 1e-5


def test_training_backward_flows():
    model = random_llava("tiny", seed=0)
    model.train()
    inputs = make_inputs(model, LAYOUTS[:2], seed=8)
    with patched(model, FocusConfig(cmai=CMAIConfig())):
        out = model(**inputs, labels=inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100))
        out.loss.backward()
    grads = [p.grad for p in model.model.language_model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_training_step_with_vmtc_and_cmai_reaches_the_vision_tower():
    from focusvlm import VMTCConfig

    model = random_llava("tiny", seed=0)
    model.train()
    per_image = 32  # VMTC target 0.5 of the tiny tower's 64 patches
    inputs = make_inputs(model, [[3, "img", 5], [2, "img", 4]], seed=9, image_tokens=per_image)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with patched(model, FocusConfig(vmtc=VMTCConfig(target=0.5, stages=2), cmai=CMAIConfig())):
        model(**inputs, labels=labels).loss.backward()
    first_vision_layer = next(m for m in model.model.vision_tower.modules() if type(m).__name__ == "CLIPEncoderLayer")
    grad = first_vision_layer.self_attn.q_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
