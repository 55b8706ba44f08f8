"""Speed / memory / FLOPs of each method against the stock model, measured in one process.

Fairness rules this module follows (why the numbers can be compared):
* one model object; each method is patched on, measured and unpatched in
  turn, so every method shares weights, allocator state and thermal state;
* interleaved rounds with the method order rotated every round (slow drifts
  from other work on the machine hit every method alike), warm-up rounds
  discarded, medians reported;
* every method decodes exactly ``new_tokens`` (greedy, min_new_tokens =
  max_new_tokens), and its prompt holds as many image placeholders as its
  vision path produces features, read from the patched model itself;
* memory is measured in a separate pass, so the sampler never disturbs timings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import platform
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from .. import hfcompat
from ..api import ProcessorHint, unpatch
from ..api import patch as _patch


def patch(model, config):
    """focusvlm.patch without a processor: the bench builds inputs with the reduced count itself."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProcessorHint)
        return _patch(model, config)
from ..runtime import resolve_device_dtype
from .flops import TextShape, VisionShape, merged_vmtc_flops, merger_prefill_flops, prefill_flops
from .methods import Method, parse_method
from .timing import Clock, median, peak_memory

# torch.compile backend of --compile (tests swap in "eager" to check the wiring without inductor's compile time)
COMPILE_BACKEND = "inductor"
# text tokens before the image placeholders, as in LLaVA-1.5's "USER: <image>\n..." prompts
PROMPT_PREFIX = 5
# a vision-only run keeps the preset's tower and projector input but hangs a token LM behind it
_TOKEN_LM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2)


@dataclass
class BenchOptions:
    preset: str | None = "mid"
    model: str | None = None
    methods: list[Method] = field(default_factory=lambda: [parse_method("stock"), parse_method("cmai")])
    batches: list[int] = field(default_factory=lambda: [1])
    prompt_tokens: int | list[int] = 64      # one length, or a sweep (every length x every batch size)
    new_tokens: int = 128
    repeats: int = 5
    warmup: int = 1
    device: str | None = None
    dtype: str | None = None
    seed: int = 0
    vision_only: bool = False
    threads: int | None = None
    progress: bool = True
    # "round": one model, each method patched on/off in turn, whole calls interleaved (GPU default).
    # "step": one identical model copy per method, calls interleaved one by one and decode steps in
    # lockstep, so a load swing on a shared CPU hits every method in the same second (CPU default).
    interleave: str = "auto"
    # "none": memory as the interleave mode measures it; "process": the prefill's peak memory, each method in a
    # fresh process of its own (CPU: peak RSS; GPU: max allocated), so no allocator history is shared
    memory: str = "none"
    # static cache + torch.compile(model.forward, fullgraph=True) for the decode steps (prefill stays eager)
    compile: bool = False
    count_ops: bool = False                   # top-level aten ops of one decode step (torch.profiler)
    clock: str = "wall"                       # "cpu": process CPU time, immune to other jobs taking the cores
    profile: int = 0                          # > 0: profile one prefill per method, keep the top ops by extra time

    def __post_init__(self) -> None:
        lengths = [self.prompt_tokens] if isinstance(self.prompt_tokens, int) else list(self.prompt_tokens)
        if not lengths or any(p < PROMPT_PREFIX + 1 for p in lengths):
            raise ValueError(f"--prompt-tokens must be at least {PROMPT_PREFIX + 1} (text before and after the image)")
        self.prompt_lengths = lengths
        if self.memory not in ("none", "process"):
            raise ValueError(f"--memory must be none or process, got {self.memory!r}")
        if self.clock not in ("wall", "cpu"):
            raise ValueError(f"--clock must be wall or cpu, got {self.clock!r}")
        if self.new_tokens < 0 or self.repeats < 1 or self.warmup < 0:
            raise ValueError("--new-tokens must be >= 0, --repeats >= 1, --warmup >= 0")
        if any(b < 1 for b in self.batches):
            raise ValueError(f"batch sizes must be positive, got {self.batches}")
        if self.interleave not in ("auto", "round", "step"):
            raise ValueError(f"--interleave must be auto, round or step, got {self.interleave!r}")
        if not any(m.is_stock for m in self.methods):  # every ratio needs the stock reference
            self.methods.insert(0, parse_method("stock"))


# ----------------------------------------------------------------------------- model and inputs

def build_model(opts: BenchOptions, device: torch.device, dtype: torch.dtype):
    """The model under test: a checkpoint (``--model``) or a random-weight preset of its family's adapter."""
    if opts.model:
        from ..runtime import load_model

        model, _ = load_model(opts.model, device, dtype)
    else:
        from ..models import adapter_for_preset

        adapter = adapter_for_preset(opts.preset)
        overrides = _TOKEN_LM if opts.vision_only else {}
        # build in place on the target device and dtype: a 7B/13B preset made in fp32 on the host first
        # would need 28/52 GB of RAM and minutes of copying
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = adapter.random_model(opts.preset, seed=opts.seed, dtype=dtype, attn_implementation="sdpa",
                                             **overrides)
        finally:
            torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = 0
    return model.to(device).eval()


@contextlib.contextmanager
def method_applied(model, method: Method) -> Iterator[Any]:
    """The model as ``method`` wants it, restored to stock on exit."""
    original = model.config._attn_implementation
    if method.attn_implementation is not None:
        model.set_attn_implementation(method.attn_implementation)
    handle = None
    try:
        if not method.config.is_stock:
            handle = patch(model, method.config)
        yield handle
    finally:
        if handle is not None:
            unpatch(model)
        if method.attn_implementation is not None:
            model.set_attn_implementation(original)


def fit_method(model, method: Method) -> Method:
    """Shrink VMTC's stage count to the encoder layers a small tower runs before its feature layer."""
    from ..models import adapter_for

    vmtc = method.config.vmtc
    adapter = adapter_for(model)
    if vmtc is None or vmtc.layers is not None or adapter.reduces_after_merger:  # one stage after a merger: no layers
        return method
    used = adapter.tower_geometry(model).layers_before_features
    if vmtc.stages <= used:
        return method
    config = method.config.replace(vmtc=dataclasses.replace(vmtc, stages=used))
    return Method(method.name, config, method.attn_implementation)


def _vision_call(model, vision: dict[str, torch.Tensor]) -> Callable[[], Any]:
    from ..models import adapter_for

    adapter = adapter_for(model)
    return lambda: adapter.image_features(model, **vision)


def probe_vision(model, method: Method, vision: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Visual token count (first image) and per-layer token schedule of the patched vision path, run on the whole
    batch: PruMerge's adaptive count is taken over the batch."""
    from ..models import adapter_for

    adapter = adapter_for(model)
    # a merger tower keeps every patch through its blocks (packed rows, no batch axis): no schedule to record
    layers = [] if adapter.reduces_after_merger else adapter.encoder_layers(model)
    schedule: list[tuple[int, int]] = []
    crops: list[int] = []   # tower batch of one image: its crops

    def record(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        out = output[0] if isinstance(output, (tuple, list)) else output
        schedule.append((int(hidden.shape[1]), int(out.shape[1])))
        crops.append(int(hidden.shape[0]))

    hooks = [layer.register_forward_hook(record, with_kwargs=True) for layer in layers]
    try:
        with method_applied(model, method) as handle, torch.inference_mode():
            # the whole batch: PruMerge's adaptive count is taken over it, and every image gets that count
            feats = _vision_call(model, vision)()[0]
            method_ = handle.vision if handle is not None else None
            stages = method_.stage_plan() if method_ is not None else []
            if method_ is not None and getattr(method_, "merged", False):
                merge = adapter.core(model).visual.spatial_merge_size
                stages = [stage for t, h, w in vision["image_grid_thw"][:1].tolist()
                          if not (stage := method_.merged_stage_for((h // merge) * (w // merge))).is_identity]
    finally:
        for h in hooks:
            h.remove()
    images = int(vision["pixel_values"].shape[0]) if "pixel_values" in vision and not adapter.reduces_after_merger else 1
    return {"visual_tokens": int(feats.shape[0]), "schedule": schedule, "vmtc_stages": stages,
            "crops": crops[0] // images if crops else 1}


def make_input_ids(text_ids: torch.Tensor, visual_tokens: int, image_token_id: int) -> torch.Tensor:
    """LLaVA layout: a few text tokens, the image placeholders, then the rest of the prompt."""
    b = text_ids.shape[0]
    image = torch.full((b, visual_tokens), image_token_id, dtype=text_ids.dtype, device=text_ids.device)
    return torch.cat([text_ids[:, :PROMPT_PREFIX], image, text_ids[:, PROMPT_PREFIX:]], dim=1)


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
            import os

            env["cpu_count"] = os.cpu_count()
        except Exception:  # pragma: no cover
            pass
    return env


def _log(opts: BenchOptions, msg: str) -> None:
    if opts.progress:
        print(msg, file=sys.stderr, flush=True)


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    """Measure every method at every batch size; returns the JSON-ready report."""
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
                 "clock": opts.clock, **_environment(device)},
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


def bench_inputs(model, batch: int, prompt: int, gen: torch.Generator, device, dtype):
    """(the family's random vision inputs for ``batch`` samples, ``prompt`` random text ids per sample).

    Text ids never hit an image or video token, so only the placeholders added later carry images.
    """
    from ..models import adapter_for

    cfg = model.config
    vision = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
              for k, v in adapter_for(model).random_pixel_inputs(model, batch, gen).items()}
    text_ids = torch.randint(0, cfg.text_config.vocab_size - 2, (batch, prompt), generator=gen)
    specials = [getattr(cfg, k) for k in ("image_token_id", "video_token_id") if getattr(cfg, k, None) is not None]
    return vision, text_ids.masked_fill(torch.isin(text_ids, torch.tensor(specials)), 1).to(device)


def _profile_prefill(model, opts: BenchOptions, batch: int, vision: dict[str, torch.Tensor],
                     text_ids) -> dict[str, Any]:
    """Self CPU time per aten op of one prefill (TTFT call) per method, after one untimed call.

    Returns the ``opts.profile`` ops whose time grows most against stock: where a method's extra goes.
    """
    from torch.profiler import ProfilerActivity, profile

    from ..models import adapter_for

    per_method: dict[str, dict[str, float]] = {}
    for method in opts.methods:
        method = fit_method(model, method)
        visual = probe_vision(model, method, vision)["visual_tokens"]
        ids = make_input_ids(text_ids, visual, model.config.image_token_id)
        extra = adapter_for(model).prompt_inputs(model, ids)

        def call():
            return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1,
                         **vision, **extra)

        _log(opts, f"[bench] batch {batch}: profiling one prefill of {method.name}")
        with method_applied(model, method), torch.inference_mode():
            call()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                call()
        per_method[method.name] = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
    stock = next(m.name for m in opts.methods if m.is_stock)
    out: dict[str, Any] = {"unit": "ms self CPU time (torch.profiler, wall clock)", "total": {}, "top": {}}
    for name, ops in per_method.items():
        out["total"][name] = sum(ops.values())
        if name == stock:
            continue
        base = per_method[stock]
        extra = sorted(((op, ms - base.get(op, 0.0), ms, base.get(op, 0.0)) for op, ms in ops.items()),
                       key=lambda x: -x[1])
        out["top"][name] = [{"op": op, "extra_ms": d, "method_ms": m, "stock_ms": b} for op, d, m, b in
                            extra[:opts.profile]]
    return out


def _process_memory(opts: BenchOptions, run: dict[str, Any], batch: int, prompt: int) -> None:
    """Each method's prefill peak memory, measured in a fresh process of its own (``focusvlm.bench.memproc``)."""
    from .memproc import measure_in_subprocess

    stock = run["reference"]
    for name, row in run["methods"].items():
        _log(opts, f"[bench] batch {batch}, {prompt} prompt tokens: prefill memory of {name} (own process)")
        result = measure_in_subprocess(opts, name, batch, prompt)
        row["peak_mem_bytes"], row["peak_mem_delta_bytes"] = result["peak"], result["delta"]
    for name, row in run["methods"].items():
        row["ratio"]["peak_mem_bytes"] = _ratio(row["peak_mem_bytes"], run["methods"][stock]["peak_mem_bytes"])
    run["memory_source"] = result["source"]


def _run_batch(model, opts: BenchOptions, clock: Clock, batch: int, vision: dict[str, torch.Tensor],
               text_ids: torch.Tensor, vshape: VisionShape | None, tshape: TextShape) -> dict[str, Any]:
    from ..models import adapter_for

    adapter = adapter_for(model)
    cfg = model.config
    n_new = opts.new_tokens
    plans: dict[str, dict[str, Any]] = {}
    for m in opts.methods:
        m = fit_method(model, m)
        info = probe_vision(model, m, vision)
        ids = make_input_ids(text_ids, info["visual_tokens"], cfg.image_token_id)
        cmai_layers = 0
        if m.config.cmai is not None:
            cmai_layers = sum(g > 0 for g in m.config.cmai.gammas(tshape.layers))
        prompt_tokens = text_ids.shape[1]
        if vshape is None:  # a merger tower (Qwen): its own formula, VMTC's stage after the merger
            grids = vision["image_grid_thw"].tolist()
            extra = merged_vmtc_flops(cfg.vision_config, grids[:1], info["vmtc_stages"], m.config.vmtc.kmeans_iters) \
                if m.config.vmtc is not None and info["vmtc_stages"] else 0
            flops = merger_prefill_flops(cfg.vision_config, tshape, grids=grids, prompt_tokens=prompt_tokens,
                                         visual_tokens=info["visual_tokens"], batch=batch, vmtc=extra,
                                         cmai_layers=cmai_layers)
            info["vmtc_stages"] = [(s.n_in, s.keep, s.clusters, m.config.vmtc.kmeans_iters) for s in info["vmtc_stages"]]
        else:
            layer_seq = None
            if m.config.fastv is not None:  # image tokens leave the LLM after layer K
                from ..prune.fastv_method import layer_positions

                layer_seq = layer_positions(m.config.fastv, tshape.layers, prompt_tokens, info["visual_tokens"])
            flops = prefill_flops(vshape, tshape, prompt_tokens=prompt_tokens,
                                  visual_tokens=info["visual_tokens"], batch=batch, vision_schedule=info["schedule"],
                                  vmtc_stages=info["vmtc_stages"], cmai_layers=cmai_layers, llm_layer_seq=layer_seq,
                                  crops=info["crops"])
        plans[m.name] = {"method": m, "ids": ids, "mask": torch.ones_like(ids), **info, "flops": flops,
                         "extra": adapter.prompt_inputs(model, ids), "llm_layers": tshape.layers}

    def calls(name: str) -> dict[str, Callable[[], Any]]:
        plan = plans[name]
        ids, mask, extra = plan["ids"], plan["mask"], plan["extra"]
        out = {"vision": _vision_call(model, vision)}
        if not opts.vision_only:
            out["ttft"] = lambda: model(input_ids=ids, attention_mask=mask, **vision, **extra,
                                        use_cache=True, logits_to_keep=1)
            if n_new > 0:
                def generate():
                    seq = model.generate(input_ids=ids, attention_mask=mask, **vision, **extra,
                                         max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, num_beams=1,
                                         use_cache=True, pad_token_id=0, **compile_kwargs)
                    decoded[name] = seq.shape[1] - ids.shape[1]
                out["generate"] = generate
        return out

    decoded: dict[str, int] = {}
    compile_kwargs: dict[str, Any] = {}
    if opts.compile:  # transformers compiles the decode steps itself with a static cache and a compile config
        from transformers import CompileConfig

        config = CompileConfig(fullgraph=True, dynamic=False, backend=COMPILE_BACKEND)
        config._compile_all_devices = True
        compile_kwargs = dict(cache_implementation="static", compile_config=config)

    samples: dict[str, dict[str, list[float]]] = {name: {} for name in plans}
    names = list(plans)
    mode = opts.interleave if opts.interleave != "auto" else ("round" if clock.cuda else "step")
    ops = _decode_ops(model, opts, plans, vision) if opts.count_ops and not opts.vision_only else None
    if mode == "step":
        return _finish(_run_lockstep(model, opts, clock, batch, vision, plans), plans, batch, n_new, mode,
                       None, ops)
    rounds = opts.warmup + opts.repeats
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        _log(opts, f"[bench] batch {batch}: round {r + 1}/{rounds}{' (warm-up)' if r < opts.warmup else ''}")
        for name in order:
            with method_applied(model, plans[name]["method"]), torch.inference_mode():
                for stage, fn in calls(name).items():
                    seconds = clock.time(fn)
                    if r >= opts.warmup:
                        samples[name].setdefault(stage, []).append(seconds)
        wrong = {k: v for k, v in decoded.items() if v != n_new}
        if wrong:  # every method must decode exactly n_new tokens, or per-token figures would lie
            raise RuntimeError(f"generate returned {wrong} new tokens, expected {n_new} for every method")

    memory: dict[str, dict[str, Any]] = {}
    for name in names:
        with method_applied(model, plans[name]["method"]), torch.inference_mode():
            fns = calls(name)
            memory[name] = peak_memory(fns.get("generate") or fns.get("ttft") or fns["vision"], clock.device)
    return _finish(samples, plans, batch, n_new, mode, memory, ops)


def _decode_ops(model, opts: BenchOptions, plans: dict[str, dict[str, Any]],
                vision: dict[str, torch.Tensor]) -> dict[str, int]:
    """Top-level aten ops of one decode step of each method (deterministic: measured once, untimed)."""
    from .opcount import decode_step_ops

    out = {}
    for name, plan in plans.items():
        with method_applied(model, plan["method"]):
            inputs = {"input_ids": plan["ids"], "attention_mask": plan["mask"], **vision, **plan["extra"]}
            out[name] = sum(decode_step_ops(model, inputs).values())
    return out


def _paired(a: list[float], b: list[float]) -> float | None:
    """Median of per-round ratios a[i] / b[i]: each pair was measured back to back, so slow swings cancel."""
    pairs = [x / y for x, y in zip(a, b) if y > 0]
    return median(pairs) if pairs else None


def _finish(samples: dict[str, dict[str, list[float]]], plans: dict[str, dict[str, Any]], batch: int, n_new: int,
            mode: str, memory: dict[str, dict[str, Any]] | None, ops: dict[str, int] | None = None) -> dict[str, Any]:
    names = list(plans)
    if memory is None:
        memory = {n: {"peak": float("nan"), "delta": float("nan"),
                      "source": "n/a (step interleave keeps one model copy per method)"} for n in names}
    results = {}
    for name in names:
        s = samples[name]
        row: dict[str, Any] = {
            "visual_tokens": plans[name]["visual_tokens"],
            "vision_s": median(s.get("vision", [])),
            "ttft_s": median(s["ttft"]) if "ttft" in s else None,
            "generate_s": median(s["generate"]) if "generate" in s else None,
            "peak_mem_bytes": memory[name]["peak"],
            "peak_mem_delta_bytes": memory[name]["delta"],
            "prefill_flops": plans[name]["flops"].total,
            "flops": plans[name]["flops"].as_dict(),
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
        results[name] = row
    stock = next(n for n in names if plans[n]["method"].is_stock)
    for name in names:
        ratio = {k: _ratio(results[name].get(k), results[stock].get(k)) for k in RATIO_FIELDS}
        # timings: the median of back-to-back ratios beats a ratio of medians on a machine others share
        mine, ref = samples[name], samples[stock]
        for field, stage in (("vision_s", "vision"), ("ttft_s", "ttft"), ("decode_s_per_token", "decode_step")):
            if stage in mine and stage in ref:
                ratio[field] = _paired(mine[stage], ref[stage])
        if "generate" in mine and "generate" in ref:
            ratio["generate_s"] = _paired(mine["generate"], ref["generate"])
            if ratio["generate_s"]:
                ratio["throughput_tok_s"] = 1.0 / ratio["generate_s"]
        elif "decode_step" in mine and ratio.get("ttft_s") and ratio.get("decode_s_per_token") and n_new > 0:
            # generate = prefill + (n_new - 1) steps: combine the paired ratios with stock's own split
            t0, d0 = results[stock]["ttft_s"], results[stock]["decode_s_per_token"] * (n_new - 1)
            ratio["generate_s"] = (ratio["ttft_s"] * t0 + ratio["decode_s_per_token"] * d0) / (t0 + d0)
            ratio["throughput_tok_s"] = 1.0 / ratio["generate_s"]
        results[name]["ratio"] = ratio
    if ops is not None:
        layers = plans[stock]["llm_layers"]
        for name in names:
            results[name]["decode_ops"] = ops[name]
            # the per-layer price of a method's decode step, against stock's step (issue 12: <= 20 for CMAI)
            results[name]["extra_decode_ops_per_layer"] = (ops[name] - ops[stock]) / layers
    return {"batch": batch, "reference": stock, "interleave": mode, "memory_source": memory[stock]["source"],
            "seq_len_stock": plans[stock]["flops"].detail["seq_len"], "methods": results}


def _run_lockstep(model, opts: BenchOptions, clock: Clock, batch: int, vision: dict[str, torch.Tensor],
                  plans: dict[str, dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Step interleave: one patched copy per method; calls alternate one by one, decode steps in lockstep."""
    import copy

    names = list(plans)
    models = {}
    original_attn = model.config._attn_implementation
    for name in names:
        method = plans[name]["method"]
        copy_ = model if method.is_stock else copy.deepcopy(model)
        if method.attn_implementation is not None:
            copy_.set_attn_implementation(method.attn_implementation)
        if not method.config.is_stock:
            patch(copy_, method.config)
        models[name] = copy_
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    n_new = opts.new_tokens

    def rotated(i: int) -> list[str]:
        return names[i % len(names):] + names[:i % len(names)]

    def prefill(name: str):
        plan = plans[name]
        return models[name](input_ids=plan["ids"], attention_mask=plan["mask"], **vision, **plan["extra"],
                            use_cache=True, logits_to_keep=1)

    try:
        with torch.inference_mode():
            stages = [("vision", lambda n: _vision_call(models[n], vision))]
            if not opts.vision_only:
                stages.append(("ttft", lambda n: (lambda: prefill(n))))
            for stage, make in stages:
                for r in range(opts.warmup + opts.repeats):
                    _log(opts, f"[bench] batch {batch}: {stage} round {r + 1}/{opts.warmup + opts.repeats}")
                    for name in rotated(r):
                        seconds = clock.time(make(name))
                        if r >= opts.warmup:
                            samples[name].setdefault(stage, []).append(seconds)
            if opts.vision_only or n_new < 2:
                return samples
            _log(opts, f"[bench] batch {batch}: {n_new - 1} decode steps in lockstep")
            live, forwards = {}, {}
            for name in names:
                if opts.compile:
                    live[name], forwards[name] = _compiled_decoder(models[name], plans[name], vision, n_new)
                else:
                    out = prefill(name)
                    live[name] = [hfcompat.output_cache(out), out.logits[:, -1:].argmax(-1), plans[name]["mask"]]
                    forwards[name] = models[name]
            # the first steps pay one-off allocations (and, compiled, the compilation)
            warm = min(max(opts.warmup * 4, 3 if opts.compile else 0), n_new - 2)
            for step in range(n_new - 1):
                for name in rotated(step):
                    cache, token, mask = live[name]
                    if opts.compile:  # a fixed-length mask: one graph for every step
                        mask = mask.clone()
                        mask[:, plans[name]["ids"].shape[1] + step] = 1
                    else:
                        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
                    result = {}

                    def one_step(name=name, cache=cache, token=token, mask=mask, result=result):
                        result["out"] = forwards[name](input_ids=token, attention_mask=mask, **hfcompat.cache_kwargs(cache),
                                                       use_cache=True, logits_to_keep=1)

                    seconds = clock.time(one_step)
                    out = result["out"]
                    live[name] = [hfcompat.output_cache(out), out.logits[:, -1:].argmax(-1), mask]
                    if step >= warm:
                        samples[name].setdefault("decode_step", []).append(seconds)
    finally:
        for name, m in models.items():
            if not plans[name]["method"].config.is_stock:
                unpatch(m)
            if m is model and plans[name]["method"].attn_implementation is not None:
                m.set_attn_implementation(original_attn)
    return samples


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
