"""One benchmark arm's prefill peak memory, measured in a fresh process of its own.

In one long process a method measured after another reuses the memory the
first one freed (glibc keeps freed pages, the CUDA caching allocator keeps
blocks), so the later method looks cheaper than it is. Here every method gets
a new process: build the model, apply the method, reset the peak, run one
prefill (``use_cache=True``: the cache it leaves behind is part of the cost),
read the peak.

CPU: the kernel's high-water mark of the resident set (VmHWM), reset just
before the call through /proc/self/clear_refs; where that is not allowed, the
process's lifetime maximum (ru_maxrss), which also covers building the model.
GPU: ``torch.cuda.max_memory_allocated``.

Run by ``focusvlm bench --memory process``:
``python -m focusvlm.bench.memproc '{"method": "cmai", "batch": 4, "prompt": 1024, ...}'``
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from .arms import parse_arm
from .setup import BenchOptions, arm_applied, bench_inputs, build_model, fit_arm, probe_vision, prompt_inputs


def measure_in_subprocess(opts: Any, method: str, batch: int, prompt: int) -> dict[str, Any]:
    """Peak memory of the prefill of the arm named ``method`` (its ``--methods`` spec) at (batch, prompt), from a
    child process."""
    payload = {"preset": opts.preset, "model": opts.model, "method": method, "batch": batch, "prompt": prompt,
               "device": opts.device, "dtype": opts.dtype, "seed": opts.seed, "threads": opts.threads}
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "focusvlm.bench.memproc", json.dumps(payload)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement of {method} failed in its process:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_high_water_mark() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_of(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Peak memory while ``fn`` runs: absolute, and above what the process held just before."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        kept = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del kept
        return {"peak": float(peak), "delta": float(peak - before),
                "source": "prefill, own process per method: cuda.max_memory_allocated"}
    before = (_status_kib("VmRSS") or 0) * 1024
    if _reset_high_water_mark():
        kept = fn()
        peak, source = (_status_kib("VmHWM") or 0) * 1024, "prefill, own process per method: peak RSS (VmHWM)"
    else:
        import resource

        kept = fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        source = "prefill, own process per method: lifetime peak RSS (ru_maxrss, model build included)"
    del kept
    return {"peak": float(peak), "delta": float(peak - before), "source": source}


def main(argv: list[str]) -> int:
    from ..models import adapter_for
    from ..runtime import resolve_device_dtype

    args = json.loads(argv[0])
    if args.get("threads"):
        torch.set_num_threads(args["threads"])
    arm = parse_arm(args["method"])
    opts = BenchOptions(preset=args["preset"], model=args["model"], methods=[arm], batches=[args["batch"]],
                        prompt_tokens=args["prompt"], device=args["device"], dtype=args["dtype"], seed=args["seed"],
                        progress=False)
    device, dtype = resolve_device_dtype(opts.device, opts.dtype)
    model = build_model(opts, device, dtype)
    arm = fit_arm(model, arm)
    gen = torch.Generator().manual_seed(opts.seed)
    vision, text_ids = bench_inputs(model, args["batch"], args["prompt"], gen, device, dtype)
    ids, mask = prompt_inputs(text_ids, probe_vision(model, arm, vision), model.config.image_token_id)
    extra = adapter_for(model).prompt_inputs(model, ids)
    with arm_applied(model, arm), torch.inference_mode():
        result = peak_of(lambda: model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1,
                                       **vision, **extra), device)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
