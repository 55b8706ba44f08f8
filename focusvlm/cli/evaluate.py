"""`focusvlm eval NAME ...` and `focusvlm score NAME DIR`: one subcommand per registered benchmark."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..eval.engine import (MODES, GenerationSettings, HFGenerator, RunResult, build_manifest, check_manifest,
                           process_state, run)
from .common import add_model_args, focus_config_from_args, load_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..eval import registry
    ev = subparsers.add_parser("eval", help="run a benchmark (resumable; shards under `accelerate launch`)")
    ev_sub = ev.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    sc = subparsers.add_parser("score", help="score a run folder written by `focusvlm eval`")
    sc_sub = sc.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name in registry.names():
        bench = registry.get(name)
        p = ev_sub.add_parser(name, help=bench.description, description=bench.description)
        add_run_args(p, bench.default_max_new_tokens)
        bench.add_eval_args(p)
        p.set_defaults(func=_eval)
        s = sc_sub.add_parser(name, help=bench.description)
        s.add_argument("run_dir", type=Path)
        s.add_argument("--debug", action="store_true")
        bench.add_score_args(s)
        s.set_defaults(func=_score)


def _eval(args: argparse.Namespace) -> int:
    from ..eval import registry
    bench = registry.get(args.benchmark)
    result = run_from_args(bench, args)
    if _is_main():
        print(f"{result.out_dir}: {result.total} samples; generated {result.generated} now "
              f"(skipped {result.skipped} already done, {result.errors} errors) -> "
              f"{result.out_dir / 'predictions.jsonl'}", file=sys.stderr)
    return 0


def _score(args: argparse.Namespace) -> int:
    from ..eval import registry

    if not args.run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {args.run_dir}")
    scores = registry.get(args.benchmark).score(args.run_dir, args)
    report = args.run_dir / "report.md"
    if report.is_file():
        print(report.read_text())
    else:
        print(json.dumps(scores.get("summary", scores), indent=2))
    return 0


def _is_main() -> bool:
    try:
        import torch
        from accelerate import PartialState

        return PartialState(cpu=not torch.cuda.is_available()).is_main_process
    except ImportError:
        return True


# --------------------------------------------------------------------------- the eval driver

def add_run_args(parser, default_max_new_tokens: int = 1024) -> None:
    """Arguments every `focusvlm eval NAME` shares (model args come from cli.common)."""
    add_model_args(parser)
    parser.add_argument("--out", type=Path, required=True, help="run folder (created; resumed if it exists)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=default_max_new_tokens)
    parser.add_argument("--limit", type=int, default=None, help="only the first N samples")
    parser.add_argument("--mode", choices=MODES, default="direct",
                        help="describe-then-answer: describe the image, then answer from the description alone")
    parser.add_argument("--retry-errors", action="store_true", help="on resume, redo samples that recorded an error")
    parser.add_argument("--no-progress", action="store_true")


def run_from_args(benchmark: Any, args: Any) -> RunResult:
    """`focusvlm eval NAME ...`: load, shard, run, merge. Works under `accelerate launch`."""
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, mode=args.mode)
    samples = list(benchmark.load_samples(args))
    if args.limit is not None:
        samples = samples[:args.limit]
    config = focus_config_from_args(args)
    dtype = args.dtype or "auto"
    manifest = build_manifest(model=str(args.model), config=config.to_dict(), benchmark=benchmark.name,
                              settings=settings, fingerprint=benchmark.fingerprint(args), dtype=dtype)
    state = process_state()
    # fail before the (slow) model load when the folder belongs to another run
    check_manifest(Path(args.out), manifest)
    if state is not None and state.num_processes > 1 and getattr(args, "device", None) is None:
        args.device = str(state.device)
    model, processor, _ = load_from_args(args)
    generator = HFGenerator(model, processor)
    result = run(samples, generator, args.out, manifest, settings,
                 process_index=state.process_index if state else 0,
                 num_processes=state.num_processes if state else 1,
                 barrier=state.wait_for_everyone if state else None,
                 progress=not args.no_progress, retry_errors=args.retry_errors,
                 answer_from_description=benchmark.answer_from_description,
                 config_yaml=config.to_yaml())
    return result
