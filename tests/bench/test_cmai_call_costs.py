"""CMAI's per-call costs, pinned from above: top-level aten ops per decoder layer (prefill and decode step) and
reads of tensor values by the host per prefill call.

Work that depends only on the call (index maps, C6's quantile positions for every layer's gamma, the causal
triangle, buffers) is done once per call by the plan, and no layer reads a tensor value back to the host. The
model is the ``mid`` benchmark preset's structure (8 decoder layers; with 4 key heads for 4 query heads, no GQA,
like ``mid``) at the tiny preset's widths, and the benchmark's layout (batch 1, 64 text tokens, 5 of them before
the image): op counts depend on the structure, not the widths, and equal ``focusvlm bench --preset mid`` counts.
"""

from __future__ import annotations

import pytest
import torch

from focusvlm import CMAIConfig, FocusConfig, patched
from focusvlm.bench.opcount import decode_step_ops, extra_ops_per_layer, top_level_aten_ops
from focusvlm.inhibit import state as state_module
from focusvlm.models.factory import random_llava
from helpers import make_inputs
from focusvlm.bench.opcount import HostReadCounter

LAYERS = 8
BENCH_LAYOUT = [[5, "img", 59]]

# (prefill, decode step) extra top-level ops per layer, measured; the targets: prefill <= 25 (was +108),
# decode <= 10 (was +17.25). GQA adds a view per layer to C1 and the flash kernel's key/value head selection.
MAX_EXTRA = {"mid-structure": (22.625, 9.375), "gqa": (26.375, 10.25)}
# host reads per prefill call added by CMAI: one (the call's counts) for one chunk of rows, one more for the key
# ranges of several chunks; the target: <= 3 (was 31 + 3)
MAX_PREFILL_READS = {"one chunk": 1, "chunks": 2}
# a padded batch with a text-only sample (index maps of padded rows and image slots, a sorted C6)
MAX_PREFILL_EXTRA_PADDED = 36.125


def _model(kind: str):
    overrides = {"num_key_value_heads": 4} if kind == "mid-structure" else {}
    return random_llava("tiny", seed=0, num_hidden_layers=LAYERS, **overrides)


def _prefill_ops(model, inputs):
    def call():
        with torch.inference_mode():
            model(**inputs, use_cache=True, logits_to_keep=1)

    call()
    return top_level_aten_ops(call)


def _prefill_reads(model, inputs) -> int:
    counter = HostReadCounter()
    with torch.inference_mode(), counter:
        model(**inputs, use_cache=True, logits_to_keep=1)
    return sum(counter.counts.values())


@pytest.mark.parametrize("kind", list(MAX_EXTRA))
def test_extra_ops_per_layer(kind):
    model = _model(kind)
    inputs = make_inputs(model, BENCH_LAYOUT, seed=1)
    stock_prefill, stock_decode = _prefill_ops(model, inputs), decode_step_ops(model, inputs)
    with patched(model, FocusConfig(cmai=CMAIConfig())):
        cmai_prefill, cmai_decode = _prefill_ops(model, inputs), decode_step_ops(model, inputs)
    prefill = extra_ops_per_layer(stock_prefill, cmai_prefill, LAYERS)
    decode = extra_ops_per_layer(stock_decode, cmai_decode, LAYERS)
    max_prefill, max_decode = MAX_EXTRA[kind]
    assert 0 < prefill <= max_prefill, (prefill, cmai_prefill - stock_prefill)
    assert 0 < decode <= max_decode, (decode, cmai_decode - stock_decode)


def test_padded_batch_prefill_ops():
    model = _model("mid-structure")
    inputs = make_inputs(model, [[5, "img", 7], [2, "img", 3], [9]], seed=1)
    stock = _prefill_ops(model, inputs)
    with patched(model, FocusConfig(cmai=CMAIConfig())):
        cmai = _prefill_ops(model, inputs)
    extra = extra_ops_per_layer(stock, cmai, LAYERS)
    assert 0 < extra <= MAX_PREFILL_EXTRA_PADDED, (extra, cmai - stock)


@pytest.mark.parametrize("chunks", list(MAX_PREFILL_READS))
def test_prefill_host_reads_per_call(monkeypatch, chunks):
    model = _model("mid-structure")
    inputs = make_inputs(model, [[5, "img", 59], [3, "img", 40]], seed=2)
    stock = _prefill_reads(model, inputs)
    if chunks == "chunks":   # rows in chunks of 16
        monkeypatch.setitem(state_module.CHUNK_ELEMENTS, "cpu", 1)
    with patched(model, FocusConfig(cmai=CMAIConfig())) as handle:
        added = _prefill_reads(model, inputs) - stock
        assert (len(handle.cmai.state.plan.chunks) > 1) == (chunks == "chunks")
    assert added <= MAX_PREFILL_READS[chunks], added
