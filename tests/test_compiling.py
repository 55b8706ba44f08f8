"""The compiled path (focusvlm.compiling, load(..., compile=True), --compile): what it compiles, and that it
computes the same function (SPEC "Compiled and fused paths": logits within a tolerance, discrete decisions
reported; VMTC's cluster labels are compared exactly here, and are identical on the test presets in fp32)."""

from __future__ import annotations

import argparse
import warnings

import pytest
import torch

from focusvlm import CMAIConfig, FocusConfig, VMTCConfig, compile_model, patch, unpatch
from focusvlm.compiling import compiled_parts
from focusvlm.compress import vmtc, vmtc_method
from focusvlm.models.factory import random_llava
from helpers import make_inputs

STEPS = 4
SETTINGS = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, output_logits=True,
                return_dict_in_generate=True, pad_token_id=0)


def _patched(model, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # no processor: the placeholder-count hint
        return patch(model, config)


def test_compile_model_compiles_the_tower_and_the_decode_steps_and_generates_the_same():
    """aot_eager traces both parts as inductor would (graphs, functionalisation) without generating code."""
    config = FocusConfig(vmtc=VMTCConfig(target=0.5, stages=2), cmai=CMAIConfig())
    eager_model, compiled = random_llava("tiny", seed=0), random_llava("tiny", seed=0)
    handle = _patched(eager_model, config)
    _patched(compiled, config)
    assert compile_model(compiled, backend="aot_eager") is compiled
    assert compiled_parts(compiled) == {"backend": "aot_eager", "mode": None, "tower": True, "decode": True,
                                       "prefill": True}
    assert compiled_parts(eager_model) is None
    assert compiled.generation_config.cache_implementation == "static"
    assert compiled.model.vision_tower._compiled_call_impl is not None
    torch._dynamo.reset()
    inputs = make_inputs(eager_model, [[5, "img", 7], [2, "img", 3]], seed=5,   # a padded batch
                         image_tokens=handle.image_tokens())
    with torch.no_grad():
        want = eager_model.generate(**inputs, **SETTINGS)
        got = compiled.generate(**inputs, **SETTINGS)
    assert torch.equal(got.sequences, want.sequences)
    for g, w in zip(got.logits, want.logits):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def _stage_inputs(preset: str, stages: int):
    """(z, importance, stage, iters) of every VMTC stage of a random ``preset`` model on random pixels."""
    model = random_llava(preset, seed=0)
    seen = []
    real = vmtc_method.compress

    def record(z, importance, stage, iters, *args, **kwargs):
        seen.append((z.clone(), importance.clone(), stage, iters))
        return real(z, importance, stage, iters, *args, **kwargs)

    size = model.config.vision_config.image_size
    vmtc_method.compress = record
    try:
        _patched(model, FocusConfig(vmtc=VMTCConfig(stages=stages)))
        with torch.no_grad():
            model.model.get_image_features(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)),
                                           vision_feature_layer=-2, vision_feature_select_strategy="default")
    finally:
        vmtc_method.compress = real
        unpatch(model)
    return seen


@pytest.mark.slow
def test_inductor_vmtc_stage_labels_identical_to_eager():
    """Each VMTC stage of the tiny preset through inductor (fullgraph: no graph break, no host read): the same
    cluster labels and primary tokens as eager, merged tokens within float32 rounding."""
    compiled = torch.compile(vmtc.compress, fullgraph=True, dynamic=False, backend="inductor")
    differing, total = 0, 0
    for z, importance, stage, iters in _stage_inputs("tiny", 3):
        with torch.no_grad():
            want, want_record = vmtc.compress(z, importance, stage, iters)
            got, got_record = compiled(z, importance, stage, iters)
        assert torch.equal(got_record.primary, want_record.primary)
        differing += int((got_record.labels != want_record.labels).sum())
        total += want_record.labels.numel()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    print(f"VMTC labels that differ, inductor vs eager: {differing} of {total}")
    assert total > 0 and differing == 0
    torch._dynamo.reset()


def test_load_and_the_cli_switch_compile(monkeypatch, tmp_path):
    import focusvlm.compiling as compiling
    from focusvlm.cli import common

    calls = []
    monkeypatch.setattr(compiling, "compile_model", lambda model, **kw: calls.append(model) or model)
    parser = argparse.ArgumentParser()
    common.add_model_args(parser)
    args = parser.parse_args(["--model", "demo-random", "--compile", "--no-progress"])
    assert args.compile
    model, _, _ = common.load_from_args(args)
    assert calls == [model]
    args = parser.parse_args(["--model", "demo-random", "--no-progress"])
    common.load_from_args(args)
    assert len(calls) == 1


def test_compile_model_refuses_a_model_it_does_not_know():
    from focusvlm import UnsupportedModelError

    with pytest.raises(UnsupportedModelError):
        compile_model(torch.nn.Linear(2, 2), backend="eager")


def test_cmai_prefill_math_compiled_regionally_equals_eager_and_does_not_recompile_per_prompt():
    """compile_model's prefill part: C1-C7 of each chunk of text rows through torch.compile (dynamic shapes), the
    plan eager. Same logits as eager on padded batches of different lengths; a prompt of a new length reuses the
    graphs (no recompile)."""
    from focusvlm.inhibit import attention

    config = FocusConfig(cmai=CMAIConfig())
    eager_model, compiled = random_llava("tiny", seed=0), random_llava("tiny", seed=0)
    _patched(eager_model, config)
    _patched(compiled, config)
    compile_model(compiled, backend="aot_eager", tower=False, decode=False)
    torch._dynamo.reset()
    attention._COMPILED.clear()
    graphs = torch._dynamo.utils.counters["stats"]
    # the graphs differ by the threshold's branch (per layer's gamma) and by padding (visible keys or not): the
    # first two prompts show every variant; the third, of new lengths, must run what was compiled
    layouts = ([[5, "img", 7], [2, "img", 3]], [[5, "img", 20]], [[3, "img", 12], [6, "img", 2]])
    try:
        for layout in layouts:
            inputs = make_inputs(eager_model, layout, seed=5)
            with torch.inference_mode():   # the row store is made of inference tensors (bench, lmms-eval)
                want = eager_model(**inputs).logits
                got = compiled(**inputs).logits
            assert torch.equal(got, want)
            if layout is layouts[1]:
                seen = graphs["unique_graphs"]
        assert seen >= 1 and graphs["unique_graphs"] == seen
    finally:
        attention._COMPILED.clear()
        torch._dynamo.reset()
