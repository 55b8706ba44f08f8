"""Kernels of CMAI's per-layer prefill function (focusvlm.inhibit.attention.chunk_blocked: C1-C7 of a chunk of
text rows), eager top-level aten ops against the kernels its inductor compilation launches (issue 29's
"CMAI compiled prefill" row), on a model of the `mid` preset's structure (8 decoder layers, 4 key heads for 4
query heads) at the tiny widths, in the bench layout (batch 1, 64 text tokens, 5 before the image); the counts
depend on the structure, not the widths. The compiled output is checked bit-identical to eager.

    PYTHONPATH=tests .venv/bin/python benchmarks/cmai_chunk_kernels.py
"""

import warnings

import torch

from focusvlm import CMAIConfig, FocusConfig, patch
from focusvlm.bench.opcount import kernel_profiling, launched_kernels, top_level_aten_ops
from focusvlm.inhibit import attention
from focusvlm.models.factory import random_llava
from helpers import make_inputs

OUT = 10   # chunk_blocked's ``out`` argument: the layer's row store (None: rows returned, as compiled)


def main() -> None:
    warnings.simplefilter("ignore")
    model = random_llava("tiny", seed=0, num_hidden_layers=8, num_key_value_heads=4)
    patch(model, FocusConfig(cmai=CMAIConfig()))
    captured, real = [], attention.chunk_blocked
    attention.chunk_blocked = lambda *args: captured.append(args) or real(*args)
    try:
        with torch.inference_mode():
            model(**make_inputs(model, [[5, "img", 59]], seed=1), use_cache=True, logits_to_keep=1)
    finally:
        attention.chunk_blocked = real
    args = list(captured[len(captured) // 2])          # a layer in the middle
    rows = args[OUT]

    def eager():
        with torch.inference_mode():
            return real(*args)

    ops = top_level_aten_ops(eager)
    args[OUT] = None
    compiled = torch.compile(real, dynamic=True)
    with kernel_profiling(), torch.inference_mode():
        compiled(*args)
        kernels = launched_kernels(lambda: compiled(*args))
        blocked, _ = compiled(*args)
        want = real(*args[:OUT], rows.clone(), *args[OUT + 1:])
    print(f"chunk_blocked: {sum(ops.values())} eager ops {dict(ops)}")
    print(f"chunk_blocked compiled (inductor): {kernels} kernels (+1 copy of the rows into the store, outside); "
          f"identical to eager: {torch.equal(blocked, want)}")


if __name__ == "__main__":
    main()
