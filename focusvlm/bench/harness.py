"""Speed / memory / FLOPs of each benchmark arm against the stock model, measured in one process.

Fairness rules this module follows (why the numbers can be compared):
* one model object; each arm is patched on, measured and unpatched in
  turn, so every arm shares weights, allocator state and thermal state;
* interleaved rounds with the arm order rotated every round (slow drifts
  from other work on the machine hit every arm alike), warm-up rounds
  discarded, medians reported;
* every arm decodes exactly ``new_tokens`` (greedy, min_new_tokens =
  max_new_tokens), and its prompt holds as many image placeholders as its
  vision path produces features, read from the patched model itself;
* memory is measured in a separate pass, so the sampler never disturbs timings.

The set-up (options, model, inputs, an arm applied and probed) is
``focusvlm.bench.setup``; this module measures.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import platform
import sys
from typing import Any, Callable, Iterator

import torch

from .. import hfcompat
from ..api import unpatch
from ..methods import SelectionShape
from ..runtime import resolve_device_dtype
from .arms import BenchArm
from .flops import PrefillFlops, TextShape, VisionShape, merged_vmtc_flops, merger_prefill_flops, prefill_flops
from .memproc import measure_in_subprocess
from .setup import (BenchOptions, arm_applied, bench_inputs, build_model, fit_arm, patch_quietly, prompt_inputs,
                    probe_vision, vision_call)
from .timing import Clock, median, peak_memory

# torch.compile backend of --compile (tests swap in "eager" to check the wiring without inductor's compile time)
COMPILE_BACKEND = "inductor"

Plans = dict[str, dict[str, Any]]            # arm name -> what ``_plan`` prepared for it
Samples = dict[str, dict[str, list[float]]]  # arm name -> stage -> seconds of each timed round


# ----------------------------------------------------------------------------- the run

def _environment(device: torch.device) -> dict[str, Any]:
    import transformers

    from .. import __version__

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "focusvlm": __version__, "platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
           "device": str(device), "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    else:
        env["device_name"] = platform.processor() or platform.machine()
        try:
            env["cpu_count"] = os.cpu_count()
        except Exception:  # pragma: no cover
            pass
    return env


def _log(opts: BenchOptions, msg: str) -> None:
    if opts.progress:
        print(msg, file=sys.stderr, flush=True)


def _rotated(names: list[str], i: int) -> list[str]:
    """``names`` rotated by ``i``: round ``i`` starts with a different arm."""
    return names[i % len(names):] + names[:i % len(names)]


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    """Measure every arm at every batch size; returns the JSON-ready report."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device, dtype = resolve_device_dtype(opts.device, opts.dtype)
    clock = Clock(device, cpu_time=opts.clock == "cpu")
    model = build_model(opts, device, dtype)
    cfg = model.config
    from ..models import adapter_for

    adapter = adapter_for(model)
    vshape = None if adapter.reduces_after_merger else VisionShape.from_config(cfg.vision_config)
    tshape = TextShape.from_config(cfg.text_config)
    gen = torch.Generator().manual_seed(opts.seed)
    report: dict[str, Any] = {
        "meta": {"preset": opts.preset if not opts.model else None, "model": opts.model, "dtype": str(dtype).replace("torch.", ""),
                 "vision_only": opts.vision_only, "prompt_tokens": opts.prompt_tokens, "new_tokens": opts.new_tokens,
                 "repeats": opts.repeats, "warmup": opts.warmup, "methods": [m.name for m in opts.methods],
                 "batches": opts.batches, "seed": opts.seed, "memory": opts.memory, "compile": opts.compile,
                 "tower_graphs": opts.tower_graphs, "clock": opts.clock, **_environment(device)},
        "runs": [],
    }
    for prompt in opts.prompt_lengths:
        for batch in opts.batches:
            vision, text_ids = bench_inputs(model, batch, prompt, gen, device, dtype)
            run = _run_batch(model, opts, clock, batch, vision, text_ids, vshape, tshape)
            run["prompt_tokens"] = prompt
            if opts.memory == "process":
                _process_memory(opts, run, batch, prompt)
            if opts.profile and not opts.vision_only:
                run["profile"] = _profile_prefill(model, opts, batch, vision, text_ids)
            report["runs"].append(run)
    return report


def _profile_prefill(model, opts: BenchOptions, batch: int, vision: dict[str, torch.Tensor],
                     text_ids) -> dict[str, Any]:
    """Self CPU time per aten op of one prefill (TTFT call) per arm, after one untimed call.

    Returns the ``opts.profile`` ops whose time grows most against stock: where an arm's extra goes.
    """
    from torch.profiler import ProfilerActivity, profile

    from ..models import adapter_for

    per_arm: dict[str, dict[str, float]] = {}
    for arm in opts.methods:
        arm = fit_arm(model, arm)
        ids, mask = prompt_inputs(text_ids, probe_vision(model, arm, vision), model.config.image_token_id)
        extra = adapter_for(model).prompt_inputs(model, ids)

        def call():
            return model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **vision, **extra)

        _log(opts, f"[bench] batch {batch}: profiling one prefill of {arm.name}")
        with arm_applied(model, arm), torch.inference_mode():
            call()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                call()
        per_arm[arm.name] = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
    stock = next(a.name for a in opts.methods if a.is_stock)
    out: dict[str, Any] = {"unit": "ms self CPU time (torch.profiler, wall clock)", "total": {}, "top": {}}
    for name, ops in per_arm.items():
        out["total"][name] = sum(ops.values())
        if name == stock:
            continue
        base = per_arm[stock]
        extra = sorted(((op, ms - base.get(op, 0.0), ms, base.get(op, 0.0)) for op, ms in ops.items()),
                       key=lambda x: -x[1])
        out["top"][name] = [{"op": op, "extra_ms": d, "method_ms": m, "stock_ms": b} for op, d, m, b in
                            extra[:opts.profile]]
    return out


def _process_memory(opts: BenchOptions, run: dict[str, Any], batch: int, prompt: int) -> None:
    """Each arm's prefill peak memory, measured in a fresh process of its own (``focusvlm.bench.memproc``)."""
    stock = run["reference"]
    for name, row in run["methods"].items():
        _log(opts, f"[bench] batch {batch}, {prompt} prompt tokens: prefill memory of {name} (own process)")
        result = measure_in_subprocess(opts, name, batch, prompt)
        row["peak_mem_bytes"], row["peak_mem_delta_bytes"] = result["peak"], result["delta"]
    for name, row in run["methods"].items():
        row["ratio"]["peak_mem_bytes"] = _ratio(row["peak_mem_bytes"], run["methods"][stock]["peak_mem_bytes"])
    run["memory_source"] = result["source"]


# ----------------------------------------------------------------------------- one batch size

def _run_batch(model, opts: BenchOptions, clock: Clock, batch: int, vision: dict[str, torch.Tensor],
               text_ids: torch.Tensor, vshape: VisionShape | None, tshape: TextShape) -> dict[str, Any]:
    """Every arm at one (batch, prompt length): plan each, count ops, time them interleaved, measure memory."""
    plans = {arm.name: _plan(model, arm, vision, text_ids, tshape) for arm in opts.methods}
    stock_tokens = next(plan["visual_tokens"] for plan in plans.values() if plan["arm"].is_stock)
    for plan in plans.values():
        plan["flops"] = _prefill_flops(model, plan["arm"], plan, vision, text_ids.shape[1], batch, vshape, tshape,
                                       stock_tokens)
    mode = opts.interleave if opts.interleave != "auto" else ("round" if clock.cuda else "step")
    ops = _count_ops(model, plans, vision, opts.compile) if opts.count_ops and not opts.vision_only else None
    if mode == "step":
        return _finish(_run_lockstep(model, opts, clock, batch, vision, plans), plans, batch, opts.new_tokens, mode,
                       None, ops)
    calls = _ArmCalls(model, opts, vision, plans)
    samples = _run_rounds(model, opts, clock, batch, plans, calls)
    memory = _round_memory(model, clock, plans, calls)
    return _finish(samples, plans, batch, opts.new_tokens, mode, memory, ops)


def _plan(model, arm: BenchArm, vision: dict[str, torch.Tensor], text_ids: torch.Tensor,
          tshape: TextShape) -> dict[str, Any]:
    """What measuring ``arm`` needs: the arm fitted to the model, its prompt, what its vision path makes (its
    FLOPs are added once every arm is planned: they need the stock arm's image tokens)."""
    from ..models import adapter_for

    arm = fit_arm(model, arm)
    info = probe_vision(model, arm, vision)
    ids, mask = prompt_inputs(text_ids, info, model.config.image_token_id)
    return {"arm": arm, "ids": ids, "mask": mask, **info,
            "extra": adapter_for(model).prompt_inputs(model, ids), "llm_layers": tshape.layers}


def _prefill_flops(model, arm: BenchArm, info: dict[str, Any], vision: dict[str, torch.Tensor], prompt_tokens: int,
                   batch: int, vshape: VisionShape | None, tshape: TextShape, stock_tokens: int) -> PrefillFlops:
    """``arm``'s analytic prefill FLOPs, from its probed vision path and what the registry says of its methods
    (the layers they change, their own selection work)."""
    inhibited = arm.inhibited_layers(tshape.layers)
    if vshape is None:  # a merger tower (Qwen): its own formula, the vision method's stage after the merger
        vc = model.config.vision_config
        grids = vision["image_grid_thw"].tolist()
        return merger_prefill_flops(vc, tshape, grids=grids, prompt_tokens=prompt_tokens,
                                    visual_tokens=info["visual_tokens"], batch=batch,
                                    vmtc=merged_vmtc_flops(vc, grids[:1], info["vision_stages"]),
                                    cmai_layers=inhibited)
    # image tokens leaving the LLM after some layer (FastV) shorten the layers behind it
    layer_tokens = arm.llm_layer_tokens(tshape.layers, prompt_tokens, info["visual_tokens"])
    selection = arm.selection_flops(SelectionShape(
        crops=info["crops"], patches=vshape.patches, vision_width=vshape.hidden, llm_width=tshape.hidden,
        stock_tokens=stock_tokens, kept_tokens=info["visual_tokens"], sequence=prompt_tokens + stock_tokens))
    return prefill_flops(vshape, tshape, prompt_tokens=prompt_tokens, visual_tokens=info["visual_tokens"],
                         batch=batch, vision_schedule=info["schedule"], vmtc_stages=info["vision_stages"],
                         cmai_layers=inhibited, llm_layer_seq=layer_tokens, crops=info["crops"],
                         selection=selection)


def _count_ops(model, plans: Plans, vision: dict[str, torch.Tensor], compile: bool = False) -> dict[str, dict[str, int]]:
    """What each arm dispatches (deterministic: measured once, untimed): top-level aten ops of the vision path,
    of the whole prefill and of one decode step, and the host reads of one prefill call; with ``compile``, also
    the kernels the compiled vision tower and a compiled decode step launch."""
    from .opcount import decode_step_ops, host_reads, top_level_aten_ops

    out = {}
    for name, plan in plans.items():
        inputs = {"input_ids": plan["ids"], "attention_mask": plan["mask"], **vision, **plan["extra"]}

        def prefill():
            with torch.inference_mode():
                model(**inputs, use_cache=True, logits_to_keep=1)

        with arm_applied(model, plan["arm"]):
            tower = vision_call(model, vision)
            with torch.inference_mode():
                tower()  # first calls build per-model state (buffers, caches): count a warm call
                out[name] = {"vision_ops": sum(top_level_aten_ops(tower).values())}
            prefill()
            out[name].update(prefill_ops=sum(top_level_aten_ops(prefill).values()), prefill_host_reads=host_reads(prefill),
                             decode_ops=sum(decode_step_ops(model, inputs).values()))
            if compile:
                out[name].update(_compiled_kernels(model, plan, vision, tower))
    return out


def _compiled_kernels(model, plan: dict[str, Any], vision: dict[str, torch.Tensor], tower: Callable[[], Any]):
    """Kernels launched by the compiled vision tower and by one compiled decode step (after warm-up steps)."""
    from ..compiling import prefill_compiled, tower_compiled
    from ..models import adapter_for
    from .opcount import kernel_profiling, launched_kernels

    inputs = {"input_ids": plan["ids"], "attention_mask": plan["mask"], **vision, **plan["extra"]}

    def prefill():
        model(**inputs, use_cache=True, logits_to_keep=1)

    with kernel_profiling(), torch.inference_mode():
        with tower_compiled(model, COMPILE_BACKEND):
            tower()   # compiles
            vision_kernels = launched_kernels(tower)
        with prefill_compiled(model, COMPILE_BACKEND):   # CMAI's per-layer prefill math, regionally compiled
            prefill()
            prefill_kernels = launched_kernels(prefill)
        (cache, token, mask), forward = _compiled_decoder(model, plan, vision, 4)
        prompt = plan["ids"].shape[1]
        steps = []
        for step in range(3):
            mask = mask.clone()
            mask[:, prompt + step] = 1

            step_inputs = adapter_for(model).step_inputs(model, mask[:, :prompt + step + 1])

            def one_step(token=token, mask=mask, step_inputs=step_inputs):
                steps.append(forward(input_ids=token, attention_mask=mask, **hfcompat.cache_kwargs(cache),
                                     use_cache=True, logits_to_keep=1, **step_inputs))

            if step < 2:
                one_step()        # the first compiles, the second runs what was compiled
            else:
                decode_kernels = launched_kernels(one_step)
            token = steps[-1].logits[:, -1:].argmax(-1)
    return {"vision_kernels": vision_kernels, "prefill_kernels": prefill_kernels, "decode_kernels": decode_kernels}


@contextlib.contextmanager
def _compiled_prefill(model, opts: BenchOptions) -> Iterator[None]:
    """--compile: the vision tower and CMAI's per-layer prefill math compiled while an arm's calls are timed (the
    first, warm-up call compiles), so TTFT is compiled on both sides; decode steps are compiled by generate
    (round interleave) or ``_compiled_decoder`` (step)."""
    if not opts.compile:
        yield
        return
    from ..compiling import prefill_compiled, tower_compiled

    mode = "reduce-overhead" if opts.tower_graphs else None
    with tower_compiled(model, COMPILE_BACKEND, mode), prefill_compiled(model, COMPILE_BACKEND):
        yield


# ----------------------------------------------------------------------------- round interleave

def _compile_kwargs(opts: BenchOptions) -> dict[str, Any]:
    """generate's arguments for --compile: transformers compiles the decode steps itself with a static cache."""
    if not opts.compile:
        return {}
    from types import SimpleNamespace

    settings = SimpleNamespace()
    hfcompat.compile_decode_steps(settings, COMPILE_BACKEND, mode="reduce-overhead")   # CUDA graphs on a GPU
    return vars(settings)


class _ArmCalls:
    """The timed calls of an arm in round interleave, by stage; ``decoded``: new tokens each generate returned."""

    def __init__(self, model, opts: BenchOptions, vision: dict[str, torch.Tensor], plans: Plans):
        self.model, self.opts, self.vision, self.plans = model, opts, vision, plans
        self.decoded: dict[str, int] = {}
        self.compile_kwargs = _compile_kwargs(opts)

    def __call__(self, name: str) -> dict[str, Callable[[], Any]]:
        model, vision, n_new = self.model, self.vision, self.opts.new_tokens
        plan = self.plans[name]
        ids, mask, extra = plan["ids"], plan["mask"], plan["extra"]
        out = {"vision": vision_call(model, vision)}
        if not self.opts.vision_only:
            out["ttft"] = lambda: model(input_ids=ids, attention_mask=mask, **vision, **extra,
                                        use_cache=True, logits_to_keep=1)
            if n_new > 0:
                def generate():
                    seq = model.generate(input_ids=ids, attention_mask=mask, **vision, **extra,
                                         max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, num_beams=1,
                                         use_cache=True, pad_token_id=0, **self.compile_kwargs)
                    self.decoded[name] = seq.shape[1] - ids.shape[1]
                out["generate"] = generate
        return out


def _run_rounds(model, opts: BenchOptions, clock: Clock, batch: int, plans: Plans, calls: _ArmCalls) -> Samples:
    """Round interleave: one model, each arm patched on in turn for its whole calls, the order rotated per round."""
    names = list(plans)
    samples: Samples = {name: {} for name in names}
    n_new = opts.new_tokens
    rounds = opts.warmup + opts.repeats
    for r in range(rounds):
        _log(opts, f"[bench] batch {batch}: round {r + 1}/{rounds}{' (warm-up)' if r < opts.warmup else ''}")
        for name in _rotated(names, r):
            with arm_applied(model, plans[name]["arm"]), _compiled_prefill(model, opts), \
                    torch.inference_mode():
                for stage, fn in calls(name).items():
                    seconds = clock.time(fn)
                    if r >= opts.warmup:
                        samples[name].setdefault(stage, []).append(seconds)
        wrong = {k: v for k, v in calls.decoded.items() if v != n_new}
        if wrong:  # every arm must decode exactly n_new tokens, or per-token figures would lie
            raise RuntimeError(f"generate returned {wrong} new tokens, expected {n_new} for every method")
    return samples


def _round_memory(model, clock: Clock, plans: Plans, calls: _ArmCalls) -> dict[str, dict[str, Any]]:
    """Peak memory of each arm's longest call (generate, else prefill, else the vision path), untimed."""
    memory: dict[str, dict[str, Any]] = {}
    for name in plans:
        with arm_applied(model, plans[name]["arm"]), torch.inference_mode():
            fns = calls(name)
            memory[name] = peak_memory(fns.get("generate") or fns.get("ttft") or fns["vision"], clock.device)
    return memory


# ----------------------------------------------------------------------------- the figures of one batch size

def _paired(a: list[float], b: list[float]) -> float | None:
    """Median of per-round ratios a[i] / b[i]: each pair was measured back to back, so slow swings cancel."""
    pairs = [x / y for x, y in zip(a, b) if y > 0]
    return median(pairs) if pairs else None


def _finish(samples: Samples, plans: Plans, batch: int, n_new: int, mode: str,
            memory: dict[str, dict[str, Any]] | None, ops: dict[str, int] | None = None) -> dict[str, Any]:
    names = list(plans)
    if memory is None:
        memory = {n: {"peak": float("nan"), "delta": float("nan"),
                      "source": "n/a (step interleave keeps one model copy per method)"} for n in names}
    results = {name: _row(samples[name], plans[name], memory[name], batch, n_new) for name in names}
    stock = next(n for n in names if plans[n]["arm"].is_stock)
    for name in names:
        results[name]["ratio"] = _ratios(results[name], results[stock], samples[name], samples[stock], n_new)
    if ops is not None:
        for name in names:
            results[name].update(_op_counts(ops[name], ops[stock], plans[name], plans[stock]["llm_layers"]))
    return {"batch": batch, "reference": stock, "interleave": mode, "memory_source": memory[stock]["source"],
            "seq_len_stock": plans[stock]["flops"].detail["seq_len"], "methods": results}


def _op_counts(arm: dict[str, int], stock: dict[str, int], plan: dict[str, Any], layers: int) -> dict[str, Any]:
    """An arm's counts and their price against stock's: extra ops per LLM layer (prefill, decode step) and per
    compressing vision stage, extra host reads per prefill call."""
    stages = len(plan["vision_stages"])
    return {**arm,
            # the LLM's part of the prefill: the vision path's ops are counted apart
            "extra_prefill_ops_per_layer": ((arm["prefill_ops"] - arm["vision_ops"])
                                            - (stock["prefill_ops"] - stock["vision_ops"])) / layers,
            # the per-layer price of an arm's decode step, against stock's step
            "extra_decode_ops_per_layer": (arm["decode_ops"] - stock["decode_ops"]) / layers,
            "extra_vision_ops": arm["vision_ops"] - stock["vision_ops"],
            "extra_vision_ops_per_stage": (arm["vision_ops"] - stock["vision_ops"]) / stages if stages else None,
            "extra_prefill_host_reads": arm["prefill_host_reads"] - stock["prefill_host_reads"],
            **({"extra_vision_kernels_per_stage": (arm["vision_kernels"] - stock["vision_kernels"]) / stages
                if stages else None,
                # the LLM's part of a prefill whose CMAI math runs compiled (the tower eager, its kernels apart)
                "extra_prefill_kernels_per_layer": ((arm["prefill_kernels"] - arm["vision_ops"])
                                                    - (stock["prefill_kernels"] - stock["vision_ops"])) / layers,
                "extra_decode_kernels_per_layer": (arm["decode_kernels"] - stock["decode_kernels"]) / layers}
               if "vision_kernels" in arm else {})}


def _row(s: dict[str, list[float]], plan: dict[str, Any], memory: dict[str, Any], batch: int,
         n_new: int) -> dict[str, Any]:
    """One arm's figures: medians of its samples, memory, FLOPs, and decode / throughput derived from them."""
    row: dict[str, Any] = {
        "visual_tokens": plan["visual_tokens"],
        "vision_s": median(s.get("vision", [])),
        "ttft_s": median(s["ttft"]) if "ttft" in s else None,
        "generate_s": median(s["generate"]) if "generate" in s else None,
        "peak_mem_bytes": memory["peak"],
        "peak_mem_delta_bytes": memory["delta"],
        "prefill_flops": plan["flops"].total,
        "flops": plan["flops"].as_dict(),
        "samples": s,
    }
    if "decode_step" in s:  # lockstep: decode measured step by step, generate rebuilt from its parts
        row["decode_s_per_token"] = median(s["decode_step"])
        row["generate_s"] = row["ttft_s"] + max(n_new - 1, 0) * row["decode_s_per_token"]
        row["throughput_tok_s"] = batch * n_new / row["generate_s"]
    elif row["generate_s"] is not None and row["ttft_s"] is not None:
        # generate = one prefill + (n_new - 1) decode steps: the first new token comes from the prefill
        steps = max(n_new - 1, 1)
        row["decode_s_per_token"] = max(row["generate_s"] - row["ttft_s"], 0.0) / steps
        row["throughput_tok_s"] = batch * n_new / row["generate_s"]
    else:
        row["decode_s_per_token"] = row["throughput_tok_s"] = None
    return row


def _ratios(row: dict[str, Any], ref: dict[str, Any], mine: dict[str, list[float]], ref_samples: dict[str, list[float]],
            n_new: int) -> dict[str, float | None]:
    """An arm's figures over stock's; timings as the median of back-to-back ratios, which beats a ratio of
    medians on a machine others share."""
    ratio = {k: _ratio(row.get(k), ref.get(k)) for k in RATIO_FIELDS}
    for field, stage in (("vision_s", "vision"), ("ttft_s", "ttft"), ("decode_s_per_token", "decode_step")):
        if stage in mine and stage in ref_samples:
            ratio[field] = _paired(mine[stage], ref_samples[stage])
    if "generate" in mine and "generate" in ref_samples:
        ratio["generate_s"] = _paired(mine["generate"], ref_samples["generate"])
        if ratio["generate_s"]:
            ratio["throughput_tok_s"] = 1.0 / ratio["generate_s"]
    elif "decode_step" in mine and ratio.get("ttft_s") and ratio.get("decode_s_per_token") and n_new > 0:
        # generate = prefill + (n_new - 1) steps: combine the paired ratios with stock's own split
        t0, d0 = ref["ttft_s"], ref["decode_s_per_token"] * (n_new - 1)
        ratio["generate_s"] = (ratio["ttft_s"] * t0 + ratio["decode_s_per_token"] * d0) / (t0 + d0)
        ratio["throughput_tok_s"] = 1.0 / ratio["generate_s"]
    return ratio


# ----------------------------------------------------------------------------- step interleave

def _run_lockstep(model, opts: BenchOptions, clock: Clock, batch: int, vision: dict[str, torch.Tensor],
                  plans: Plans) -> Samples:
    """Step interleave: one patched copy per arm; calls alternate one by one, decode steps in lockstep."""
    original_attn = model.config._attn_implementation
    models = _arm_copies(model, plans)
    try:
        with torch.inference_mode(), contextlib.ExitStack() as compiled:
            for m in models.values():
                compiled.enter_context(_compiled_prefill(m, opts))
            samples = _lockstep_calls(models, opts, clock, batch, vision, plans)
            if not opts.vision_only and opts.new_tokens >= 2:
                _lockstep_decode(models, opts, clock, batch, vision, plans, samples)
    finally:
        for name, m in models.items():
            if not plans[name]["arm"].config.is_stock:
                unpatch(m)
            if m is model and plans[name]["arm"].attn_implementation is not None:
                m.set_attn_implementation(original_attn)
    return samples


def _arm_copies(model, plans: Plans) -> dict[str, Any]:
    """One model per arm, patched as the arm wants: stock keeps ``model`` itself, every other arm a deep copy."""
    models = {}
    for name, plan in plans.items():
        arm = plan["arm"]
        copy_ = model if arm.is_stock else copy.deepcopy(model)
        if arm.attn_implementation is not None:
            copy_.set_attn_implementation(arm.attn_implementation)
        if not arm.config.is_stock:
            patch_quietly(copy_, arm.config)
        models[name] = copy_
    return models


def _prefill(model, plan: dict[str, Any], vision: dict[str, torch.Tensor]):
    return model(input_ids=plan["ids"], attention_mask=plan["mask"], **vision, **plan["extra"],
                 use_cache=True, logits_to_keep=1)


def _lockstep_calls(models: dict[str, Any], opts: BenchOptions, clock: Clock, batch: int,
                    vision: dict[str, torch.Tensor], plans: Plans) -> Samples:
    """The vision path, then the prefill, of every arm: one call each in turn, the order rotated per round."""
    names = list(plans)
    samples: Samples = {name: {} for name in names}
    stages = [("vision", lambda n: vision_call(models[n], vision))]
    if not opts.vision_only:
        stages.append(("ttft", lambda n: (lambda: _prefill(models[n], plans[n], vision))))
    for stage, make in stages:
        for r in range(opts.warmup + opts.repeats):
            _log(opts, f"[bench] batch {batch}: {stage} round {r + 1}/{opts.warmup + opts.repeats}")
            for name in _rotated(names, r):
                seconds = clock.time(make(name))
                if r >= opts.warmup:
                    samples[name].setdefault(stage, []).append(seconds)
    return samples


def _lockstep_decode(models: dict[str, Any], opts: BenchOptions, clock: Clock, batch: int,
                     vision: dict[str, torch.Tensor], plans: Plans, samples: Samples) -> None:
    """``new_tokens - 1`` greedy decode steps of every arm in lockstep, timed one by one into ``samples``."""
    from ..models import adapter_for

    n_new = opts.new_tokens
    names = list(plans)
    adapter = adapter_for(next(iter(models.values())))
    _log(opts, f"[bench] batch {batch}: {n_new - 1} decode steps in lockstep")
    live, forwards = {}, {}
    for name in names:
        if opts.compile:
            live[name], forwards[name] = _compiled_decoder(models[name], plans[name], vision, n_new)
        else:
            out = _prefill(models[name], plans[name], vision)
            live[name] = [hfcompat.output_cache(out), out.logits[:, -1:].argmax(-1), plans[name]["mask"]]
            forwards[name] = models[name]
    # the first steps pay one-off allocations (and, compiled, the compilation)
    warm = min(max(opts.warmup * 4, 3 if opts.compile else 0), n_new - 2)
    for step in range(n_new - 1):
        for name in _rotated(names, step):
            cache, token, mask = live[name]
            if opts.compile:  # a fixed-length mask: one graph for every step
                mask = mask.clone()
                mask[:, plans[name]["ids"].shape[1] + step] = 1
            else:
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            result = {}

            step_inputs = adapter.step_inputs(models[name], mask[:, :plans[name]["ids"].shape[1] + step + 1])

            def one_step(name=name, cache=cache, token=token, mask=mask, result=result, step_inputs=step_inputs):
                result["out"] = forwards[name](input_ids=token, attention_mask=mask, **hfcompat.cache_kwargs(cache),
                                               use_cache=True, logits_to_keep=1, **step_inputs)

            seconds = clock.time(one_step)
            out = result["out"]
            live[name] = [hfcompat.output_cache(out), out.logits[:, -1:].argmax(-1), mask]
            if step >= warm:
                samples[name].setdefault("decode_step", []).append(seconds)


def _compiled_decoder(model, plan: dict[str, Any], vision: dict[str, torch.Tensor], n_new: int):
    """Eager prefill into a static cache; decode steps through torch.compile(model.forward, fullgraph=True)."""
    ids, mask = plan["ids"], plan["mask"]
    length = ids.shape[1] + n_new
    cache = hfcompat.static_cache(model, length)
    out = model(input_ids=ids, attention_mask=mask, **hfcompat.cache_kwargs(cache), use_cache=True, logits_to_keep=1,
                **vision, **plan["extra"])
    full = torch.zeros(ids.shape[0], length, dtype=mask.dtype, device=mask.device)
    full[:, :ids.shape[1]] = mask
    return [cache, out.logits[:, -1:].argmax(-1), full], torch.compile(model.forward, fullgraph=True,
                                                                       backend=COMPILE_BACKEND)


RATIO_FIELDS = ("vision_s", "ttft_s", "decode_s_per_token", "generate_s", "throughput_tok_s", "peak_mem_bytes",
                "visual_tokens", "prefill_flops")


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b != b or a != a or b == 0:
        return None
    return float(a) / float(b)
