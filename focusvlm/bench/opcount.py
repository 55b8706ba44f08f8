"""What a call costs a GPU besides arithmetic, counted on any device (deterministic, unlike times).

* Top-level aten ops, counted with torch.profiler: an aten op not called from inside another aten op,
  what the Python side of the model dispatches, one kernel launch (or more) each on a GPU, where a
  batch-1 call is bound by launches (~25 us each).
* Host reads: operations that read tensor values back to the host (``.item()``, ``if tensor:``,
  ``nonzero``, boolean-mask indexing, ...); on a GPU each one stalls the host until the queued kernels
  finish, so nothing can be queued behind them.

Used by ``focusvlm bench --count-ops`` and pinned by tests.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .. import hfcompat

# operators whose result (or output shape) depends on device data, so CUDA must finish before they return
HOST_READS = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "equal", "unique_dim", "_unique2",
              "unique_consecutive", "repeat_interleave"}


# Python-level reads: under inference mode a CPU tensor's ``item()`` dispatches no ``_local_scalar_dense``
PYTHON_READS = ("item", "tolist", "__float__", "__int__", "__bool__")


class HostReadCounter(TorchDispatchMode):
    """Counts reads of tensor data by the host: ``Tensor.item``-like calls (wrapped for the while) and
    dispatched operators that need the data (each read counted once, at the outermost level)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self._saved: dict[str, object] = {}
        self._in_python_read = False

    def __enter__(self):
        for name in PYTHON_READS:
            original = self._saved[name] = getattr(torch.Tensor, name)

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                if self._in_python_read:
                    return _original(tensor, *args, **kwargs)
                self.counts[_name] += 1
                self._in_python_read = True
                try:
                    return _original(tensor, *args, **kwargs)
                finally:
                    self._in_python_read = False

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        masked_index = name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())
        if (name in HOST_READS or masked_index) and not self._in_python_read:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def host_reads(fn: Callable[[], Any]) -> int:
    """Reads of tensor values by the host while ``fn`` runs."""
    counter = HostReadCounter()
    with counter:
        fn()
    return sum(counter.counts.values())


def top_level_aten_ops(fn: Callable[[], Any]) -> collections.Counter:
    """Names and counts of the aten ops ``fn`` dispatches at the top level."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: collections.Counter = collections.Counter()
    for event in prof.events():
        parent = event.cpu_parent
        if event.name.startswith("aten::") and (parent is None or not parent.name.startswith("aten::")):
            counts[event.name] += 1
    return counts


def launched_kernels(fn: Callable[[], Any]) -> int:
    """Kernels one call of ``fn`` launches, compiled parts included.

    On CUDA: the device kernels the profiler records. On a CPU: inductor's fused kernels (each a profiler
    event when compiled under ``kernel_profiling()``) plus the top-level aten ops (the eager parts, and the
    extern kernels a compiled graph calls: matmuls, sorts, scatters). For an eager ``fn`` on a CPU this is
    ``top_level_aten_ops``' total.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
    events = list(prof.events())
    device = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    if device:
        return len(device)
    fused = sum(1 for e in events if "cpp_fused" in e.name)
    eager = sum(1 for e in events
                if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
    return fused + eager


def kernel_profiling():
    """Inductor's CPU kernels record themselves in the profiler (for ``launched_kernels``); enter it while the
    graphs compile."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch({"cpp.enable_kernel_profile": True})


def decode_step_ops(model: torch.nn.Module, inputs: dict[str, torch.Tensor], warm_steps: int = 1) -> collections.Counter:
    """Ops of one greedy decode step after a prefill of ``inputs`` and ``warm_steps`` untimed steps."""
    from ..models import adapter_for

    adapter = adapter_for(model)
    batch = inputs["input_ids"].shape[0]
    with torch.inference_mode():
        out = model(**inputs, use_cache=True)
        cache, mask = hfcompat.output_cache(out), inputs["attention_mask"]
        token = out.logits[:, -1:].argmax(-1)

        def step():
            nonlocal mask, token
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            result = model(input_ids=token, attention_mask=mask, **hfcompat.cache_kwargs(cache), use_cache=True,
                           logits_to_keep=1, **adapter.step_inputs(model, mask))
            token = result.logits[:, -1:].argmax(-1)

        for _ in range(warm_steps):
            step()
        return top_level_aten_ops(step)


def extra_ops_per_layer(stock: collections.Counter, method: collections.Counter, layers: int) -> float:
    """(method ops - stock ops) / decoder layers: the per-layer price of a method's decode step."""
    return (sum(method.values()) - sum(stock.values())) / layers


__all__ = ["HostReadCounter", "decode_step_ops", "extra_ops_per_layer", "host_reads", "kernel_profiling", "launched_kernels",
           "top_level_aten_ops"]
