"""`focusvlm bench`: time, memory and FLOPs of each method against the stock model, same process."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..bench.arms import DEFAULT_METHODS

    p = subparsers.add_parser(
        "bench", help="speed / memory / FLOPs of each method vs the stock model",
        description="Seeded random weights of the preset's exact architecture (no download) or a real "
                    "checkpoint with --model. Every figure comes with its ratio to stock measured in the same "
                    "process (warm-up, interleaved rounds, medians; CUDA events on GPU).")
    # no `choices`: listing the presets imports torch and transformers, which `--help` must not wait for;
    # an unknown name is refused by the family registry with the known presets named
    p.add_argument("--preset", default="mid",
                   help="random-weight architecture to build (default: mid), e.g. tiny, mid, llava-1.5-7b, "
                        "llava-v1.6-vicuna-7b, llava-onevision-qwen2-7b, qwen2.5-vl-mid, qwen3-vl-8b "
                        "(an unknown name is answered with the full list)")
    p.add_argument("--model", help="measure this checkpoint (hub id or folder) instead of a preset")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated: stock, eager, spd[:factor], prumerge[:budget], visionzip[:tokens], "
                        "divprune[:budget], vmtc[:target], cmai[:gamma_max], fastv[:R|keep], vmtc+cmai ... "
                        "Equal budgets: stock,vmtc:192,visionzip:192,prumerge:192,divprune:192,fastv:192 "
                        "(default: " + ",".join(DEFAULT_METHODS) + ")")
    p.add_argument("--batch", type=_ints, default=[1], help="batch sizes, e.g. 1,16 (default: 1)")
    p.add_argument("--prompt-tokens", type=_ints, default=[64],
                   help="text tokens around the image (5 before it, the rest after); a comma-separated list sweeps "
                        "them, e.g. 64,256,1024 (default: 64)")
    p.add_argument("--new-tokens", type=int, default=128, help="greedy tokens to generate, exactly (default: 128)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per method (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: 1)")
    p.add_argument("--vision-only", action="store_true",
                   help="time the vision path (tower + projector) only, with a token-sized LM behind it: "
                        "e.g. --preset llava-1.5-7b --vision-only is the CLIP-ViT-L/14-336 tower on a CPU")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--interleave", default="auto", choices=["auto", "round", "step"],
                   help="round: one model, whole calls alternate between methods (GPU default; measures memory); "
                        "step: one model copy per method, calls alternate one by one and decode steps run in "
                        "lockstep, so load swings on a shared CPU cancel (CPU default; no memory figure)")
    p.add_argument("--memory", default="none", choices=["none", "process"],
                   help="process: measure each method's prefill peak memory in a fresh process of its own "
                        "(CPU: peak RSS; GPU: max allocated), so no method inherits another's freed memory")
    p.add_argument("--compile", action="store_true",
                   help="the compiled path on every arm: vision tower and CMAI's per-layer prefill math "
                        "(torch.compile), decode steps with a static cache (fullgraph); compilation happens in the "
                        "warm-up round (--warmup >= 1); with --count-ops also the kernels the compiled parts launch")
    p.add_argument("--tower-graphs", action="store_true",
                   help="with --compile: compile the vision tower with mode reduce-overhead (CUDA graphs on a GPU) "
                        "on every arm")
    p.add_argument("--count-ops", action="store_true",
                   help="count the top-level aten ops of one decode step per method (torch.profiler)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="cpu: time CPU runs by process CPU time, which other jobs on a shared machine cannot "
                        "inflate (use with --threads 1)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="profile one prefill per method (torch.profiler) and list the N ops whose time grows most "
                        "against stock")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the full report (all samples, FLOPs breakdown, targets) here")
    p.add_argument("--plot", type=Path, help="write a PNG of the ratios to stock here")
    p.add_argument("--markdown", type=Path, help="append the tables (with the command and device) to this file")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from ..bench.arms import parse_arms
    from ..bench.harness import run_bench
    from ..bench.setup import BenchOptions
    from ..bench.report import environment_line, markdown_tables, plot, write_json

    opts = BenchOptions(preset=args.preset, model=args.model, methods=parse_arms(args.methods),
                        batches=args.batch, prompt_tokens=args.prompt_tokens if len(args.prompt_tokens) > 1
                        else args.prompt_tokens[0], new_tokens=args.new_tokens,
                        repeats=args.repeats, warmup=args.warmup, device=args.device, dtype=args.dtype,
                        seed=args.seed, vision_only=args.vision_only, threads=args.threads, progress=not args.quiet,
                        interleave=args.interleave, memory=args.memory, compile=args.compile,
                        tower_graphs=args.tower_graphs,
                        count_ops=args.count_ops, clock=args.clock, profile=args.profile)
    report = run_bench(opts)
    command = "focusvlm " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith(("focusvlm", "__main__.py")) \
        else "focusvlm bench ..."
    report["meta"]["command"] = command
    tables = markdown_tables(report)
    print(environment_line(report))
    print(tables)
    if args.json:
        write_json(report, args.json)
    if args.plot:
        plot(report, args.plot)
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write(f"`{command}`\n\n{environment_line(report)}\n\n{tables}\n")
    return 0
