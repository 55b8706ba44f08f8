"""The guarantees every Qwen family keeps, written once (imported by test_qwen2_5_vl.py and test_qwen3_vl.py).

A test module that imports these defines the ``preset`` fixture (its tiny preset). The CMAI
tests mirror tests/test_cmai.py for LLaVA-1.5; the VMTC tests check the merger stage
against tests/reference/qwen_positions_reference.py.
"""

from __future__ import annotations

import pytest
import torch

from focusvlm import CMAIConfig, FocusConfig, VMTCConfig, patch, patched, unpatch
from qwen_builders import make_inputs, tiny_model, visual_mask
from reference import cmai_reference

LAYOUTS = [
    [5, ("img", (4, 6)), 9],                          # the usual prompt
    [3, ("img", (6, 4)), 4, ("img", (4, 4)), 6],      # two images of different sizes, text between
    [7],                                              # text only: untouched
    [("img", (4, 4)), 12],                            # image first
]
VIDEO_LAYOUTS = [[4, ("vid", (2, 4, 4)), 6], [2, ("img", (4, 4)), 3, ("vid", (2, 4, 6)), 5]]


@pytest.fixture(scope="module")
def model(preset):
    return tiny_model(preset)


def reference_logits(model, inputs: dict, cfg: CMAIConfig) -> torch.Tensor:
    gammas = cfg.gammas(model.config.text_config.num_hidden_layers)
    ref = cmai_reference.ReferenceCMAI(gammas, cfg.focus, cfg.discount)
    ref.types = [["P" if not m else ("I" if v else "T") for v, m in zip(vrow, mrow)]
                 for vrow, mrow in zip(visual_mask(inputs).tolist(), inputs["attention_mask"].tolist())]
    undo = cmai_reference.install(model, ref)
    try:
        with torch.no_grad():
            return model(**inputs).logits
    finally:
        undo()


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


CONFIGS = [CMAIConfig(gamma_max=0.6), CMAIConfig(gamma_max=0.6, focus="discounted", discount=0.7),
           CMAIConfig(schedule=(0.0, 0.3, 0.75))]


# --------------------------------------------------------------------------- CMAI

@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.focus}-{c.schedule}")
@pytest.mark.parametrize("layouts", [LAYOUTS, VIDEO_LAYOUTS], ids=["images", "videos"])
def test_cmai_prefill_matches_reference(model, cfg, layouts):
    inputs = make_inputs(model, layouts, seed=1).inputs
    expected = reference_logits(model, inputs, cfg)
    with patched(model, FocusConfig(cmai=cfg)):
        got = logits(model, inputs)
    mask = inputs["attention_mask"].bool()
    assert (got[mask] - expected[mask]).abs().max().item() <= 1e-5
    assert (logits(model, inputs)[mask] - got[mask]).abs().max().item() > 1e-4  # it did change something


def test_cmai_gamma_zero_and_unpatch_are_bit_identical(model):
    inputs = make_inputs(model, LAYOUTS, seed=2).inputs
    stock = logits(model, inputs)
    with patched(model, FocusConfig(cmai=CMAIConfig(gamma_max=0.0))):
        zero = logits(model, inputs)
    patch(model, FocusConfig(cmai=CMAIConfig(gamma_max=0.6)))
    changed = logits(model, inputs)
    unpatch(model)
    after = logits(model, inputs)
    assert torch.equal(stock, zero) and torch.equal(stock, after)
    assert not torch.equal(stock, changed)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert "generate" not in model.__dict__ and not hasattr(model, "_focusvlm")


def test_cmai_rows_before_any_text_after_an_image_keep_stock_bits(model):
    """Image rows (and the text before the first image) run the stock kernel: identical bits up to the image's end."""
    batch = make_inputs(model, [[6, ("img", (4, 6)), 8]], seed=3)
    inputs = batch.inputs
    stock = logits(model, inputs)
    with patched(model, FocusConfig(cmai=CMAIConfig())):
        got = logits(model, inputs)
    last_image = int(visual_mask(inputs)[0].nonzero().max())
    assert torch.equal(got[0, :last_image + 1], stock[0, :last_image + 1])
    assert not torch.equal(got[0, last_image + 2:], stock[0, last_image + 2:])


@pytest.mark.parametrize("layouts", [LAYOUTS, VIDEO_LAYOUTS], ids=["images", "videos"])
def test_cmai_left_padded_batch_equals_each_sample_alone(model, layouts):
    batch = make_inputs(model, layouts, seed=4)
    with patched(model, FocusConfig(cmai=CMAIConfig())):
        batched = logits(model, batch.inputs)
        for i in range(len(layouts)):
            single = logits(model, batch.sample(i))[0]
            got = batched[i][batch.inputs["attention_mask"][i].bool()]
            assert (got - single).abs().max().item() <= 1e-5, i


def _generate_matches_full_forward(model, batch, cfg: FocusConfig, new: int = 5) -> None:
    inputs = batch.inputs
    n = inputs["input_ids"].shape[0]
    prompt_len = inputs["input_ids"].shape[1]
    with patched(model, cfg), torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        full = dict(inputs)
        full["input_ids"] = gen.sequences
        full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(n, new, dtype=torch.long)], dim=1)
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(n, new, dtype=torch.long)],
                                              dim=1)
        whole = model(**full, use_cache=False).logits
    for step, step_logits in enumerate(gen.logits):
        diff = (step_logits - whole[:, prompt_len - 1 + step]).abs().max().item()
        assert diff <= 1e-5, (step, diff)


@pytest.mark.parametrize("layouts", [LAYOUTS[:2], VIDEO_LAYOUTS], ids=["images", "videos"])
def test_cmai_generate_with_cache_matches_full_forward(model, layouts):
    _generate_matches_full_forward(model, make_inputs(model, layouts, seed=5), FocusConfig(cmai=CMAIConfig()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cmai_low_precision_stays_close(preset, dtype):
    model = tiny_model(preset)
    inputs = make_inputs(model, LAYOUTS[:2], seed=6).inputs
    cfg = CMAIConfig()
    expected = reference_logits(model, inputs, cfg)
    model.to(dtype)
    low = {k: (v.to(dtype) if k.startswith("pixel") else v) for k, v in inputs.items()}
    with patched(model, FocusConfig(cmai=cfg)):
        got = logits(model, low)
    mask = inputs["attention_mask"].bool()
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert (got[mask].float() - expected[mask]).abs().max().item() < 0.1


def test_cmai_eager_base_matches_reference(preset):
    model = tiny_model(preset, attn_implementation="eager")
    inputs = make_inputs(model, LAYOUTS[:2], seed=7).inputs
    expected = reference_logits(model, inputs, CMAIConfig())
    with patched(model, FocusConfig(cmai=CMAIConfig())):
        got = logits(model, inputs)
    assert model.config.text_config._attn_implementation == "eager"
    mask = inputs["attention_mask"].bool()
    assert (got[mask] - expected[mask]).abs().max().item() <= 1e-5
