"""CMAI with a static cache and with torch.compile(fullgraph=True) decode steps: same function as eager."""

from __future__ import annotations

import collections

import pytest
import torch

from focusvlm import hfcompat
from transformers import CompileConfig, StaticCache

from focusvlm import CMAIConfig, FocusConfig, patched
from focusvlm.inhibit.state import CMAIStateError
from focusvlm.models.factory import random_llava
from helpers import make_inputs

LAYOUTS = [[5, "img", 7], [2, "img", 3]]       # left padding in the batch
STEPS = 5
SETTINGS = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, output_logits=True,
                return_dict_in_generate=True, pad_token_id=0)


@pytest.fixture(scope="module")
def model():
    return random_llava("tiny", seed=0)


class CountingBackend:
    """A torch.compile backend that runs the traced graph as is and counts the graphs it was given.

    The count lives in a shared list: transformers deep-copies the backend with its CompileConfig.
    """

    def __init__(self):
        self.seen: list = []

    def __deepcopy__(self, memo):
        return self

    @property
    def graphs(self) -> int:
        return len(self.seen)

    def __call__(self, gm, example_inputs):
        self.seen.append(gm)
        return gm.forward


@pytest.mark.parametrize("focus", ["neighborhood", "discounted"])
def test_static_cache_generate_matches_dynamic_and_full_forward(model, focus):
    inputs = make_inputs(model, LAYOUTS, seed=5)
    prompt = inputs["input_ids"].shape[1]
    with torch.no_grad(), patched(model, FocusConfig(cmai=CMAIConfig(focus=focus, discount=0.8))):
        dynamic = model.generate(**inputs, **SETTINGS)
        static = model.generate(**inputs, cache_implementation="static", **SETTINGS)
        again = model.generate(**inputs, cache_implementation="static", **SETTINGS)   # the cache is reused
        full_mask = torch.cat([inputs["attention_mask"], torch.ones(2, STEPS, dtype=torch.long)], dim=1)
        full = model(input_ids=static.sequences, attention_mask=full_mask, pixel_values=inputs["pixel_values"],
                     use_cache=False).logits
    assert torch.equal(static.sequences, dynamic.sequences)
    for step, (s, d, a) in enumerate(zip(static.logits, dynamic.logits, again.logits)):
        assert (s - d).abs().max().item() <= 1e-5, step
        assert torch.equal(s, a), step
        assert (s - full[:, prompt - 1 + step]).abs().max().item() <= 1e-5, step
    with torch.no_grad():
        stock = model.generate(**inputs, cache_implementation="static", **SETTINGS)
    assert not all(torch.allclose(s, c) for s, c in zip(stock.logits, static.logits))


def _decode(model, inputs, forward, steps=STEPS):
    """Eager prefill into a StaticCache, then ``steps`` greedy decode steps through ``forward``."""
    batch, prompt = inputs["input_ids"].shape
    cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 3)
    with torch.no_grad():
        out = model(**inputs, **hfcompat.cache_kwargs(cache), use_cache=True)
        logits = [out.logits[:, -1]]
        mask, token = inputs["attention_mask"], out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            position = mask.cumsum(-1)[:, -1:] - 1
            out = forward(input_ids=token, attention_mask=mask, **hfcompat.cache_kwargs(cache), use_cache=True,
                          position_ids=position)
            logits.append(out.logits[:, -1])
            token = out.logits[:, -1:].argmax(-1)
    return torch.stack(logits)


def test_compiled_decode_steps_equal_eager(model):
    """torch.compile(model.forward, fullgraph=True) for the decode steps: no graph break, same logits."""
    inputs = make_inputs(model, LAYOUTS, seed=6)
    backend = CountingBackend()
    with patched(model, FocusConfig(cmai=CMAIConfig())):
        eager = _decode(model, inputs, model.forward)
        compiled = _decode(model, inputs, torch.compile(model.forward, fullgraph=True, backend=backend))
    torch._dynamo.reset()
    assert (eager - compiled).abs().max().item() <= 1e-5
    # one graph, plus one more when the growing 2-D mask makes dynamo mark its length dynamic: not one per step
    assert 1 <= backend.graphs <= 2
    with torch.no_grad():
        stock = _decode(model, inputs, model.forward)
    assert not torch.allclose(stock, eager)


def test_generate_auto_compiles_decode_with_cmai(model):
    """transformers' own path: static cache + compile_config compiles the decode steps, prefill stays eager."""
    inputs = make_inputs(model, LAYOUTS, seed=7)
    backend = CountingBackend()
    config = CompileConfig(fullgraph=True, backend=backend, mode=None, dynamic=False)
    config._compile_all_devices = True   # transformers compiles only on accelerators unless told otherwise
    with torch.no_grad(), patched(model, FocusConfig(cmai=CMAIConfig())):
        eager = model.generate(**inputs, cache_implementation="static", **SETTINGS)
        compiled = model.generate(**inputs, cache_implementation="static", compile_config=config, **SETTINGS)
    torch._dynamo.reset()
    model.__dict__.pop("_compiled_call", None)
    assert backend.graphs >= 1
    assert torch.equal(eager.sequences, compiled.sequences)
    for e, c in zip(eager.logits, compiled.logits):
        assert (e - c).abs().max().item() <= 1e-5


def test_compiled_prefill_is_refused_with_the_way_out(model):
    inputs = make_inputs(model, LAYOUTS, seed=8)
    with patched(model, FocusConfig(cmai=CMAIConfig())):
        compiled = torch.compile(model.forward, fullgraph=True, backend="eager")
        with torch.no_grad(), pytest.raises(Exception, match="compile the decode steps"):
            compiled(**inputs)
    torch._dynamo.reset()


def test_compiled_decode_with_dynamic_cache_is_refused(model):
    inputs = make_inputs(model, LAYOUTS, seed=9)
    with patched(model, FocusConfig(cmai=CMAIConfig())), torch.no_grad():
        out = model(**inputs, use_cache=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
        compiled = torch.compile(model.forward, fullgraph=True, backend="eager")
        with pytest.raises(Exception, match="static cache"):
            compiled(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=mask, **hfcompat.cache_kwargs(hfcompat.output_cache(out)))
    torch._dynamo.reset()


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_beams=2), "beam search"),
    (dict(penalty_alpha=0.5, top_k=4), "contrastive"),
    (dict(prompt_lookup_num_tokens=2), "assisted"),
    (dict(cache_implementation="sliding_window"), "evicts"),
])
def test_generate_modes_that_cannot_work_are_refused(model, kwargs, message):
    inputs = make_inputs(model, LAYOUTS, seed=10)
    with patched(model, FocusConfig(cmai=CMAIConfig())), pytest.raises(NotImplementedError, match=message):
        model.generate(**inputs, max_new_tokens=2, **kwargs)


def test_state_error_is_raised_for_prefill_under_compile_directly():
    """The message itself, from the state (no model needed)."""
    from focusvlm.inhibit.state import COMPILED_PREFILL_ERROR, CMAIState

    assert "compile the decode steps" in COMPILED_PREFILL_ERROR
    assert issubclass(CMAIStateError, RuntimeError)
    assert CMAIState("neighborhood", 0.9).plan is None


def test_a_second_prompt_continues_a_static_cache(model):
    """Multi-turn: prefill, decode steps, then more prompt text into the same static cache."""
    inputs = make_inputs(model, [[5, "img", 7]], seed=12)
    extra = torch.randint(1, 400, (1, 6), generator=torch.Generator().manual_seed(3))
    prompt = inputs["input_ids"].shape[1]

    def run(cache):
        with torch.no_grad():
            out = model(**inputs, **hfcompat.cache_kwargs(cache), use_cache=True)
            cache = hfcompat.output_cache(out)
            tokens = [out.logits[:, -1:].argmax(-1)]
            for _ in range(3):
                mask = torch.ones(1, prompt + len(tokens), dtype=torch.long)
                out = model(input_ids=tokens[-1], attention_mask=mask, **hfcompat.cache_kwargs(cache), use_cache=True)
                tokens.append(out.logits[:, -1:].argmax(-1))
            mask = torch.ones(1, prompt + 3 + extra.shape[1], dtype=torch.long)
            follow = model(input_ids=extra, attention_mask=mask, **hfcompat.cache_kwargs(cache), use_cache=True).logits
        sequence = torch.cat([inputs["input_ids"]] + tokens[:-1] + [extra], dim=1)
        return follow, sequence

    with patched(model, FocusConfig(cmai=CMAIConfig())):
        static, sequence = run(StaticCache(config=model.config, max_cache_len=prompt + 16))
        dynamic, _ = run(None)
        with torch.no_grad():
            full = model(input_ids=sequence, attention_mask=torch.ones_like(sequence),
                         pixel_values=inputs["pixel_values"], use_cache=False).logits
    assert (static - dynamic).abs().max().item() <= 1e-5
    assert (static - full[:, -extra.shape[1]:]).abs().max().item() <= 1e-5


def _decode_buffers(model):
    from focusvlm.inhibit.state import _static_buffers

    state = model._focusvlm_cmai_state if hasattr(model, "_focusvlm_cmai_state") else None
    if state is None:  # the wiring keeps the state; find it on any patched layer
        state = next(m._focusvlm_cmai.state for m in model.modules() if hasattr(m, "_focusvlm_cmai"))
    return state, [None if t is None else t.data_ptr() for t in _static_buffers(state.store)]


@pytest.mark.parametrize("layouts", [LAYOUTS, [[4, "img", 6], [4, "img", 6]]])
def test_static_buffers_are_reused_across_generate_calls_with_the_same_outputs(model, layouts):
    """A second generate on another prompt of the same shape decodes from the first call's buffers (the same
    addresses: ready for CUDA graphs) and gives exactly what a freshly patched model gives; another shape gets
    buffers of its own."""
    first, second = make_inputs(model, layouts, seed=11), make_inputs(model, layouts, seed=12)
    config = FocusConfig(cmai=CMAIConfig(focus="discounted", discount=0.8))
    with torch.no_grad():
        with patched(model, config):
            model.generate(**first, cache_implementation="static", **SETTINGS)
            state, before = _decode_buffers(model)
            reused = model.generate(**second, cache_implementation="static", **SETTINGS)
            _, after = _decode_buffers(model)
            other = make_inputs(model, [[3, "img", 2]], seed=13)
            model.generate(**other, cache_implementation="static", **SETTINGS)
            _, third = _decode_buffers(model)
        with patched(model, config):
            fresh = model.generate(**second, cache_implementation="static", **SETTINGS)
    assert before == after and third != after
    assert torch.equal(reused.sequences, fresh.sequences)
    for r, f in zip(reused.logits, fresh.logits):
        assert torch.equal(r, f)


def test_compiled_decode_is_not_traced_again_by_the_next_generate_call(model):
    backend = CountingBackend()
    config = CompileConfig(fullgraph=True, backend=backend, mode=None, dynamic=False)
    config._compile_all_devices = True
    with torch.no_grad(), patched(model, FocusConfig(cmai=CMAIConfig())):
        model.generate(**make_inputs(model, LAYOUTS, seed=14), cache_implementation="static", compile_config=config,
                       **SETTINGS)
        graphs = backend.graphs
        model.generate(**make_inputs(model, LAYOUTS, seed=15), cache_implementation="static", compile_config=config,
                       **SETTINGS)
    torch._dynamo.reset()
    model.__dict__.pop("_compiled_call", None)
    assert graphs >= 1 and backend.graphs == graphs


def _reachable_tensors(root, depth: int = 6) -> list[torch.Tensor]:
    """Every tensor reachable from ``root`` through attributes, dataclass fields, dicts, lists and tuples."""
    found, seen = [], set()

    def walk(obj, left):
        if isinstance(obj, torch.Tensor):
            found.append(obj)
            return
        if left == 0 or id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None), torch.nn.Module)):
            return
        seen.add(id(obj))
        if isinstance(obj, dict):
            items = list(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            items = list(obj)
        elif hasattr(obj, "__dict__"):
            items = list(vars(obj).values())
        else:
            items = [getattr(obj, s) for s in getattr(type(obj), "__slots__", ()) if hasattr(obj, s)]
        for item in items:
            walk(item, left - 1)

    walk(root, depth)
    return found


class _InPlaceWrites:
    """Storages that ops write in place (schema arguments marked as written: ``add_``, ``index_copy_``, ``out=``)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        writes = self.storages = set()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                schema = func._schema.arguments
                values = list(args) + [kwargs.get(a.name) for a in schema[len(args):]]
                for arg, value in zip(schema, values):
                    if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.Tensor):
                        writes.add(value.untyped_storage().data_ptr())
                return func(*args, **kwargs)

        self.mode = Mode()


@pytest.mark.parametrize("layouts", [LAYOUTS, [[4, "img", 6], [4, "img", 6]]])
def test_every_buffer_a_decode_step_writes_is_a_static_address(model, layouts):
    """CUDA graphs (compile mode "reduce-overhead") are recorded only when every graph input a step mutates is
    a static address; an H200 run showed inductor skipping them for CMAI's decode ("mutated inputs") because the
    row store's counters and rows were not marked. Every persistent tensor a decode step writes in place (CMAI's
    store and the KV cache) must be marked, as transformers marks its static cache."""
    inputs = make_inputs(model, layouts, seed=16)
    batch, prompt = inputs["input_ids"].shape
    cache = StaticCache(config=model.config, max_cache_len=prompt + 4)
    with torch.no_grad(), patched(model, FocusConfig(cmai=CMAIConfig())):
        out = model(**inputs, **hfcompat.cache_kwargs(cache), use_cache=True)
        state, _ = _decode_buffers(model)
        store_ptrs = {t.untyped_storage().data_ptr() for t in _reachable_tensors(state.store)}
        # everything the state holds but the last call's plan (its views of the store are not read by a decode
        # step: ``begin_call`` replaces the plan first), and the KV cache
        held = {name: value for name, value in vars(state).items() if name != "plan"}
        persistent = _reachable_tensors(held) + _reachable_tensors(cache)
        by_storage = {}
        for t in persistent:
            by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(t)
        mask = torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones(batch, 1)], dim=1)
        writes = _InPlaceWrites()
        with writes.mode:
            model(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=mask, **hfcompat.cache_kwargs(cache),
                  use_cache=True, position_ids=mask.cumsum(-1)[:, -1:] - 1)
    written = {ptr: by_storage[ptr] for ptr in writes.storages if ptr in by_storage}
    assert store_ptrs & set(written), "the decode step wrote none of CMAI's store (the check would prove nothing)"
    unmarked = [tuple(t.shape) for ts in written.values() for t in ts if not hasattr(t, "_dynamo_static_input_type")]
    assert not unmarked, f"written in place but not static addresses: {unmarked}"


def _decode_step_kernels(model, inputs, compiled: bool = True) -> tuple[int, collections.Counter, torch.Tensor]:
    """Three greedy decode steps after a static-cache prefill, the forward inductor-compiled or eager: the kernels
    the third launches (the bench's count), the eager ops around them, and every step's logits."""
    from focusvlm.bench.opcount import kernel_profiling, launched_kernels, top_level_aten_ops

    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    batch, prompt = ids.shape
    cache = hfcompat.static_cache(model, prompt + 4)
    forward = torch.compile(model.forward, fullgraph=True) if compiled else model.forward
    logits = []
    with kernel_profiling(), torch.inference_mode():
        out = model(**inputs, **hfcompat.cache_kwargs(cache), use_cache=True, logits_to_keep=1)
        full = torch.cat([mask, mask.new_zeros(batch, 4)], dim=1)
        token = out.logits[:, -1:].argmax(-1)
        for step in range(3):      # the first compiles, the second runs what was compiled, the third is counted
            full = full.clone()
            full[:, prompt + step] = 1

            def one_step(token=token, full=full):
                return forward(input_ids=token, attention_mask=full, **hfcompat.cache_kwargs(cache), use_cache=True,
                               logits_to_keep=1)

            if step < 2:
                logits.append(one_step().logits[:, -1])
                token = logits[-1].argmax(-1, keepdim=True)
        kernels = launched_kernels(lambda: logits.append(one_step().logits[:, -1]))
        host_ops = top_level_aten_ops(one_step)   # a fourth step, into the cache's last slot
    torch._dynamo.reset()
    return kernels, host_ops, torch.stack(logits)


def test_compiled_decode_step_costs_at_most_three_kernels_per_inhibited_layer(model):
    """Issue 29's count: an inhibited layer's compiled decode step adds its text-row product (C1), one fused
    kernel (the softmax, head mean, gathers, the focus score's sum over the rows) and the quantile's selection;
    the step itself at most one kernel (the new row's position, rank and validity, and the last row moved into
    the store: inductor fuses them into the first layer's kernels with torch 2.13, not with 2.14). The step
    leaves no tensor in Python state and reads no view of a buffer it writes, so AOTAutograd adds no host op
    around the graph (before: 6 kernels per inhibited layer on this preset, 9 host ops per step)."""
    inputs = make_inputs(model, [[5, "img", 7]], seed=17)
    stock, _, _ = _decode_step_kernels(model, inputs)
    with patched(model, FocusConfig(cmai=CMAIConfig())) as handle:
        inhibited = len(handle.cmai.state.inhibited)
        kernels, ops, logits = _decode_step_kernels(model, inputs)
        _, _, eager = _decode_step_kernels(model, inputs, compiled=False)
    torch.testing.assert_close(logits, eager, rtol=1e-4, atol=1e-5)   # inductor's code computes what eager does
    assert inhibited >= 2
    assert not {"aten::empty", "aten::set_", "aten::view", "aten::expand", "aten::as_strided"} & set(ops), ops
    assert kernels - stock <= 3 * inhibited + 1, (kernels, stock, ops)
