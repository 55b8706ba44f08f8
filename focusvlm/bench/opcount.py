"""Top-level aten ops of one decode step, counted with torch.profiler (deterministic, unlike times).

"Top-level" means an aten op not called from inside another aten op: what the Python side of the
model dispatches, one kernel launch (or more) each on a GPU, where a large model's decode step is
bound by launches. Used by ``focusvlm bench --count-ops`` and pinned by a test.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

import torch

from .. import hfcompat


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


def decode_step_ops(model: torch.nn.Module, inputs: dict[str, torch.Tensor], warm_steps: int = 1) -> collections.Counter:
    """Ops of one greedy decode step after a prefill of ``inputs`` and ``warm_steps`` untimed steps."""
    batch = inputs["input_ids"].shape[0]
    with torch.inference_mode():
        out = model(**inputs, use_cache=True)
        cache, mask = hfcompat.output_cache(out), inputs["attention_mask"]
        token = out.logits[:, -1:].argmax(-1)

        def step():
            nonlocal mask, token
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            result = model(input_ids=token, attention_mask=mask, **hfcompat.cache_kwargs(cache), use_cache=True,
                           logits_to_keep=1)
            token = result.logits[:, -1:].argmax(-1)

        for _ in range(warm_steps):
            step()
        return top_level_aten_ops(step)


def extra_ops_per_layer(stock: collections.Counter, method: collections.Counter, layers: int) -> float:
    """(method ops - stock ops) / decoder layers: the per-layer price of a method's decode step."""
    return (sum(method.values()) - sum(stock.values())) / layers


__all__ = ["decode_step_ops", "extra_ops_per_layer", "top_level_aten_ops"]
