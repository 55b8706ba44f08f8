"""The benchmark's issue-12 features on the tiny preset: prompt sweep, per-process memory, op counts,
compiled decode (structure and wiring, not timings)."""

from __future__ import annotations

import argparse

import pytest
import torch

from focusvlm.bench import harness
from focusvlm.bench.arms import parse_arms
from focusvlm.bench.harness import run_bench
from focusvlm.bench.report import markdown_tables
from focusvlm.bench.setup import BenchOptions
from focusvlm.bench.targets import check_targets


def _opts(**kw):
    base = dict(preset="tiny", methods=parse_arms("stock,cmai"), batches=[1], prompt_tokens=8, new_tokens=4,
                repeats=1, warmup=0, progress=False)
    return BenchOptions(**{**base, **kw})


def test_prompt_sweep_runs_every_length_and_batch():
    report = run_bench(_opts(prompt_tokens=[8, 24], batches=[1, 2], new_tokens=3))
    assert [(r["prompt_tokens"], r["batch"]) for r in report["runs"]] == [(8, 1), (8, 2), (24, 1), (24, 2)]
    # the analytic prefill FLOPs follow the prompt length
    flops = [r["methods"]["stock"]["prefill_flops"] for r in report["runs"]]
    assert flops[2] > flops[0] and flops[3] > flops[1]
    text = markdown_tables(report)
    assert "8 prompt tokens" in text and "24 prompt tokens" in text


def test_profile_lists_where_the_extra_time_goes():
    report = run_bench(_opts(profile=5, new_tokens=0))
    prof = report["runs"][0]["profile"]
    assert set(prof["total"]) == {"stock", "cmai"} and len(prof["top"]["cmai"]) == 5
    assert all(row["extra_ms"] >= prof["top"]["cmai"][-1]["extra_ms"] for row in prof["top"]["cmai"])
    assert "Where cmai's extra prefill time goes" in markdown_tables(report)


def test_memory_in_a_process_per_method_and_op_counts():
    report = run_bench(_opts(memory="process", count_ops=True, prompt_tokens=[16]))
    run = report["runs"][0]
    assert "own process" in run["memory_source"]
    stock, cmai = run["methods"]["stock"], run["methods"]["cmai"]
    for row in (stock, cmai):
        assert row["peak_mem_bytes"] > 50 * 2 ** 20        # the process holds torch and the model
        assert row["decode_ops"] > 0
    assert cmai["ratio"]["peak_mem_bytes"] == pytest.approx(cmai["peak_mem_bytes"] / stock["peak_mem_bytes"])
    assert stock["extra_decode_ops_per_layer"] == 0
    assert 0 < cmai["extra_decode_ops_per_layer"] <= 20
    assert "ops/decode step" in markdown_tables(report)


def test_count_ops_reports_every_part_of_a_call():
    """--count-ops: the vision path, the prefill (its LLM part per layer), one decode step and the prefill's host
    reads, each against stock; the figures are the counters' own, taken on the same inputs here."""
    from focusvlm.bench.opcount import host_reads, top_level_aten_ops
    from focusvlm.bench.setup import arm_applied, build_model, vision_call

    opts = _opts(methods=parse_arms("stock,cmai,vmtc:0.5"), count_ops=True, prompt_tokens=[16], new_tokens=2)
    run = run_bench(opts)["runs"][0]
    stock, cmai, vmtc = (run["methods"][n] for n in ("stock", "cmai", "vmtc:0.5"))
    assert stock["extra_prefill_ops_per_layer"] == stock["extra_vision_ops"] == stock["extra_prefill_host_reads"] == 0
    assert cmai["extra_vision_ops"] == 0 and cmai["extra_vision_ops_per_stage"] is None   # nothing in the tower
    # (per-layer bounds are pinned on the mid structure in test_cmai_call_costs: tiny's 2 layers share the per-call
    # work between fewer layers)
    assert cmai["extra_prefill_ops_per_layer"] > 0 and 0 < cmai["extra_prefill_host_reads"] <= 3
    assert vmtc["extra_vision_ops"] > 0 and vmtc["extra_decode_ops_per_layer"] == 0
    stages = vmtc["extra_vision_ops"] / vmtc["extra_vision_ops_per_stage"]
    assert stages == pytest.approx(round(stages)) and round(stages) >= 1
    # the stock vision path's count is what the counter gives on the bench's own vision inputs
    model = build_model(opts, torch.device("cpu"), torch.float32)
    vision, _ = harness.bench_inputs(model, 1, 16, torch.Generator().manual_seed(opts.seed), "cpu", torch.float32)
    with arm_applied(model, opts.methods[0]), torch.inference_mode():
        tower = vision_call(model, vision)
        tower()
        assert sum(top_level_aten_ops(tower).values()) == stock["vision_ops"]
        assert host_reads(tower) == 0
    text = markdown_tables({"meta": {**run_bench(_opts(count_ops=True, new_tokens=1))["meta"]}, "runs": [run]})
    assert "extra prefill ops/layer" in text and "host reads/prefill" in text and "extra ops/stage" in text


def test_compiled_decode_runs_and_matches_eager_decoding(monkeypatch):
    monkeypatch.setattr(harness, "COMPILE_BACKEND", "eager")
    report = run_bench(_opts(compile=True, new_tokens=6, warmup=1))
    torch._dynamo.reset()
    run = report["runs"][0]
    assert report["meta"]["compile"] is True
    for row in run["methods"].values():
        assert row["decode_s_per_token"] > 0 and row["ttft_s"] > 0
    assert "compiled: vision tower, CMAI prefill math, decode steps" in markdown_tables(report)
    with pytest.raises(ValueError, match="--warmup"):
        _opts(compile=True, warmup=0)


def test_compiled_arms_time_a_compiled_tower_and_prefill(monkeypatch):
    """--compile in both interleaves: while an arm's calls are timed, its tower and CMAI's prefill math are the
    compiled ones (the contexts are entered)."""
    entered = []
    real = harness._compiled_prefill

    def spy(model, opts):
        entered.append(opts.compile)
        return real(model, opts)

    monkeypatch.setattr(harness, "COMPILE_BACKEND", "eager")
    monkeypatch.setattr(harness, "_compiled_prefill", spy)
    for interleave in ("round", "step"):
        entered.clear()
        opts = _opts(compile=True, new_tokens=3, warmup=1, interleave=interleave)
        run_bench(opts)
        assert entered and all(entered)
    torch._dynamo.reset()


def test_tower_graphs_compile_the_tower_with_cuda_graph_mode(monkeypatch):
    """--tower-graphs: every arm's tower is compiled with mode reduce-overhead (CUDA graphs on a GPU; a no-op
    for CPU tensors), and the report says so; without --compile it is refused."""
    import focusvlm.compiling as compiling

    modes = []
    real = compiling.tower_compiled

    def spy(model, backend="inductor", mode=None):
        modes.append(mode)
        return real(model, backend, mode)

    monkeypatch.setattr(harness, "COMPILE_BACKEND", "eager")
    monkeypatch.setattr(compiling, "tower_compiled", spy)
    report = run_bench(_opts(compile=True, tower_graphs=True, new_tokens=2, warmup=1))
    torch._dynamo.reset()
    assert modes and set(modes) == {"reduce-overhead"}
    assert report["meta"]["tower_graphs"] is True
    assert "vision tower (CUDA graphs)" in markdown_tables(report)
    modes.clear()
    run_bench(_opts(compile=True, new_tokens=2, warmup=1))
    torch._dynamo.reset()
    assert modes and set(modes) == {None}
    with pytest.raises(ValueError, match="--tower-graphs needs --compile"):
        _opts(tower_graphs=True)


def test_targets_know_prompt_lengths_and_absolute_limits():
    report = {"meta": {"device": "cpu", "preset": "mid", "vision_only": False, "dtype": "float32",
                       "prompt_tokens": [64, 1024], "new_tokens": 128, "compile": False},
              "runs": [{"batch": 1, "prompt_tokens": 64, "memory_source": "n/a",
                        "methods": {"cmai": {"ratio": {"ttft_s": 1.05}, "extra_decode_ops_per_layer": 15.0}}},
                       {"batch": 4, "prompt_tokens": 1024, "memory_source": "prefill, own process per method",
                        "methods": {"cmai": {"ratio": {"ttft_s": 1.2, "peak_mem_bytes": 1.02},
                                             "extra_decode_ops_per_layer": 25.0}}}]}
    verdicts = {(v["target"], v["batch"]): v for v in check_targets(report)}
    assert verdicts[("CMAI prefill (TTFT)", 1)]["met"] is True
    assert verdicts[("CMAI prefill (TTFT)", 4)]["met"] is False
    assert verdicts[("CMAI prefill peak memory", 4)]["met"] is True
    assert verdicts[("CMAI extra aten ops per layer per decode step", 4)]["met"] is False
    assert ("CMAI decode/token, 512 new tokens", 4) not in verdicts       # stated for 512 new tokens only
    assert not any("compiled" in t for t, _ in verdicts)                 # stated for --compile runs only


def test_cli_accepts_the_new_options():
    from focusvlm.cli import bench

    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--prompt-tokens", "64,256,1024", "--memory", "process", "--compile",
                              "--count-ops", "--clock", "cpu", "--tower-graphs"])
    assert args.prompt_tokens == [64, 256, 1024] and args.memory == "process" and args.compile
    assert args.tower_graphs
    assert args.count_ops and args.clock == "cpu"
    with pytest.raises(ValueError, match="--memory"):
        _opts(memory="rss")
