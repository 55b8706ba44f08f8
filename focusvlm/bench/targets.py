"""The speed and kernel-count targets of issues 6, 12 and 29, checked against a benchmark report.

A target applies to a run when device type, preset, dtype and batch match;
it is a ratio to stock measured in the same run. The benchmark prints the
verdicts; no timed unit test asserts them (timings on shared machines are
too noisy for a test to be honest about).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Target:
    label: str
    device: str             # "cpu" or "cuda"
    preset: str
    vision_only: bool
    batches: tuple[int, ...]
    method: str
    field: str              # a key of the ratio dict
    limit: float            # ratio must be <= limit
    dtype: str
    prompt_tokens: tuple[int, ...] | None = None   # None: any prompt length
    new_tokens: int | None = None                  # None: any number of new tokens
    compiled: bool = False                         # measured with --compile (static cache, compiled decode)
    absolute: bool = False                         # the field itself (not its ratio to stock) is compared


TARGETS: tuple[Target, ...] = (
    Target("CMAI forward (TTFT)", "cpu", "mid", False, (1,), "cmai", "ttft_s", 1.15, "float32"),
    Target("CMAI generate", "cpu", "mid", False, (1,), "cmai", "generate_s", 1.25, "float32"),
    Target("VMTC vision tower (CLIP-L/14-336)", "cpu", "llava-1.5-7b", True, (1,), "vmtc", "vision_s", 1.10, "float32"),
    Target("CMAI TTFT", "cuda", "llava-1.5-7b", False, (1, 16), "cmai", "ttft_s", 1.10, "bfloat16"),
    Target("CMAI decode/token", "cuda", "llava-1.5-7b", False, (1, 16), "cmai", "decode_s_per_token", 1.15, "bfloat16"),
    Target("CMAI peak memory", "cuda", "llava-1.5-7b", False, (1, 16), "cmai", "peak_mem_bytes", 1.05, "bfloat16"),
    Target("VMTC vision tower", "cuda", "llava-1.5-7b", False, (1, 16), "vmtc", "vision_s", 1.10, "bfloat16"),
    Target("VMTC TTFT", "cuda", "llava-1.5-7b", False, (1, 16), "vmtc", "ttft_s", 0.70, "bfloat16"),
    Target("VMTC decode/token", "cuda", "llava-1.5-7b", False, (1, 16), "vmtc", "decode_s_per_token", 1.00, "bfloat16"),
    Target("VMTC+CMAI TTFT", "cuda", "llava-1.5-7b", False, (1, 16), "vmtc+cmai", "ttft_s", 0.75, "bfloat16"),
    # issue 12: CMAI's overhead independent of prompt length, a lean decode step, compiled decoding
    Target("CMAI prefill (TTFT)", "cpu", "mid", False, (1,), "cmai", "ttft_s", 1.10, "float32",
           prompt_tokens=(64, 256, 1024)),
    Target("CMAI prefill (TTFT)", "cpu", "mid", False, (4,), "cmai", "ttft_s", 1.10, "float32",
           prompt_tokens=(256, 1024)),
    Target("CMAI decode/token, 512 new tokens", "cpu", "mid", False, (4,), "cmai", "decode_s_per_token", 1.10,
           "float32", new_tokens=512),
    Target("CMAI extra aten ops per layer per decode step", "cpu", "mid", False, (1, 4), "cmai",
           "extra_decode_ops_per_layer", 20.0, "float32", absolute=True),
    # issue 29: kernel economy, as deterministic counts (preset mid, batch 1, 64 text tokens, --count-ops)
    Target("CMAI extra aten ops per layer, prefill", "cpu", "mid", False, (1,), "cmai",
           "extra_prefill_ops_per_layer", 25.0, "float32", prompt_tokens=(64,), absolute=True),
    Target("CMAI extra host reads per prefill call", "cpu", "mid", False, (1,), "cmai",
           "extra_prefill_host_reads", 3.0, "float32", prompt_tokens=(64,), absolute=True),
    Target("CMAI extra aten ops per layer per decode step (issue 29)", "cpu", "mid", False, (1,), "cmai",
           "extra_decode_ops_per_layer", 10.0, "float32", prompt_tokens=(64,), absolute=True),
    Target("VMTC extra aten ops per tower, default schedule", "cpu", "mid", False, (1,), "vmtc",
           "extra_vision_ops", 500.0, "float32", prompt_tokens=(64,), absolute=True),
    Target("CMAI prefill peak memory", "cpu", "mid", False, (4,), "cmai", "peak_mem_bytes", 1.05, "float32",
           prompt_tokens=(1024,)),
    Target("CMAI compiled decode/token (static cache)", "cpu", "mid", False, (1, 4), "cmai", "decode_s_per_token",
           1.10, "float32", compiled=True),
)


def check_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Verdicts of every target that applies to this report (empty when none does)."""
    meta = report["meta"]
    device = "cuda" if str(meta.get("device", "")).startswith("cuda") else "cpu"
    out = []
    for t in TARGETS:
        if (t.device, t.preset, t.vision_only, t.dtype) != (device, meta.get("preset"), bool(meta.get("vision_only")),
                                                          meta.get("dtype")):
            continue
        if t.compiled != bool(meta.get("compile")) or (t.new_tokens is not None and t.new_tokens != meta.get("new_tokens")):
            continue
        for run in report["runs"]:
            if run["batch"] not in t.batches or t.method not in run["methods"]:
                continue
            prompt = run.get("prompt_tokens", meta.get("prompt_tokens"))
            if t.prompt_tokens is not None and prompt not in t.prompt_tokens:
                continue
            row = run["methods"][t.method]
            value = row.get(t.field) if t.absolute else row["ratio"].get(t.field)
            if value is None:
                continue   # not measured in this run (no generate with --new-tokens 0, no --count-ops, ...)
            if t.field == "peak_mem_bytes" and "own process" not in str(run.get("memory_source", "")):
                continue   # the memory target is stated for per-process measurements (--memory process)
            out.append({"target": t.label, "batch": run["batch"], "prompt_tokens": prompt, "method": t.method,
                        "field": t.field, "limit": t.limit, "ratio": value, "absolute": t.absolute,
                        "met": value is not None and value <= t.limit})
    return out
