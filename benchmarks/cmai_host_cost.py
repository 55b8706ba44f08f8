"""CMAI's host-side cost per decoder layer, measured where kernels cost almost nothing.

On a GPU at batch 1 a prefill waits on the host: every op's dispatch and launch, every Python call around
them. The `tiny` preset's tensors are so small that its CPU time is nearly all of that, so the difference
between CMAI's prefill and stock's per layer approximates what CMAI adds on a GPU's host (on a faster host
proportionally less). Two layer counts separate the per-call part from the per-layer part.

    python benchmarks/cmai_host_cost.py tiny 3
    python benchmarks/cmai_host_cost.py tiny 15
"""
import time, torch, statistics, sys
from focusvlm import FocusConfig, CMAIConfig, patched
from focusvlm.models.factory import random_llava
from focusvlm.bench.setup import bench_inputs, probe_vision, prompt_inputs, fit_arm
from focusvlm.bench.arms import parse_arm
from focusvlm.compiling import prefill_compiled
torch.set_num_threads(1)
preset = sys.argv[1]
model = random_llava(preset, seed=0, num_hidden_layers=int(sys.argv[2])).eval()
L = model.config.text_config.num_hidden_layers
gen = torch.Generator().manual_seed(0)
vision, text_ids = bench_inputs(model, 1, 64, gen, torch.device("cpu"), torch.float32)
arm = fit_arm(model, parse_arm("stock")); info = probe_vision(model, arm, vision)
ids, mask = prompt_inputs(text_ids, info, model.config.image_token_id)
def call():
    model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **vision)
def timeit(n=60):
    with torch.inference_mode():
        for _ in range(5): call()
        ts=[]
        for _ in range(n):
            t=time.perf_counter(); call(); ts.append(time.perf_counter()-t)
    return statistics.median(ts)
res = {}
for rnd in range(3):
    res.setdefault("stock", []).append(timeit())
    with patched(model, FocusConfig(cmai=CMAIConfig())):
        res.setdefault("cmai", []).append(timeit())
        with prefill_compiled(model, "inductor"):
            res.setdefault("cmai compiled", []).append(timeit())
s = statistics.median(res["stock"])
for k, v in res.items():
    m = statistics.median(v)
    print(f"{preset} {k}: {m*1e3:.2f} ms per prefill, extra {(m-s)*1e6/L:.0f} us per layer ({L} layers)")
