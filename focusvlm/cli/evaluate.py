"""`focusvlm eval NAME ...` and `focusvlm score NAME DIR`: one subcommand per registered benchmark."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..eval.engine import MODES, GenerationSettings, HFGenerator, RunResult, process_state, run
from ..eval.runs import build_manifest, check_manifest
from .common import add_model_args, focus_config_from_args, load_from_args, resolve_device_dtype


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
        for line in summary_lines(result, getattr(args, "_methods", None), getattr(args, "argv", None)):
            print(line, file=sys.stderr)
    # every process returns the same code: accelerate reports a failure if any rank does
    return 1 if result.failed else 0


def _ids(ids, limit: int = 5) -> str:
    ids = list(ids)
    return ", ".join(ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def retry_command(argv: list[str] | None) -> str:
    """The command line that was run, with --retry-errors added."""
    import shlex

    if not argv:
        return "the same `focusvlm eval ...` command with --retry-errors"
    return "focusvlm " + " ".join(shlex.quote(a) for a in argv if a != "--retry-errors") + " --retry-errors"


def summary_lines(result: RunResult, methods: str | None = None, argv: list[str] | None = None) -> list[str]:
    """What `focusvlm eval` tells the user at the end: counts, kept and new failures, how to retry."""
    lines = [f"{result.out_dir}: {result.total} samples" + (f" with {methods}" if methods else "")
             + f"; generated {result.generated} now (skipped {result.skipped} already done, {result.errors} "
             f"new errors) -> {result.out_dir / 'predictions.jsonl'}"]
    if result.kept_errors:
        lines.append(f"resumed: kept {len(result.kept_errors)} error row(s) from an earlier run "
                     f"({_ids(result.kept_errors)}); they are not retried without --retry-errors")
    if result.failed:
        first_id, first_error = next(iter(result.failed.items()))
        lines.append(f"FAILED: {len(result.failed)} of {result.total} samples have no answer "
                     f"({_ids(result.failed)}; first error: {first_id}: {first_error}); they score as wrong. "
                     f"Retry them with: {retry_command(argv)}")
    return lines


def _score(args: argparse.Namespace) -> int:
    from ..eval import registry

    if not args.run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {args.run_dir}")
    from ..eval.runs import status_line
    from ..eval.scoring import score_run

    registry.get(args.benchmark)  # an unknown name fails here, before any file is read
    scores = score_run(args.run_dir, args, benchmark=args.benchmark)
    report = args.run_dir / "report.md"
    if report.is_file():
        print(report.read_text())
    else:
        print(status_line(scores["completeness"]))
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
                        help="describe-then-answer: describe the image, then answer from the description alone; "
                             "given-description: no image, answer from the description each bench row carries "
                             "(a true caption: the language model's own level)")
    parser.add_argument("--retry-errors", action="store_true", help="on resume, redo samples that recorded an error")


def run_from_args(benchmark: Any, args: Any) -> RunResult:
    """`focusvlm eval NAME ...`: load, shard, run, merge. Works under `accelerate launch`."""
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, mode=args.mode)
    samples = list(benchmark.load_samples(args))
    if args.limit is not None:
        samples = samples[:args.limit]
    config = focus_config_from_args(args, quiet=not _is_main())
    args._methods = config.describe()
    state = process_state()
    if state is not None and state.num_processes > 1 and getattr(args, "device", None) is None:
        args.device = str(state.device)
    device, dtype = resolve_device_dtype(getattr(args, "device", None), getattr(args, "dtype", None))
    manifest = build_manifest(model=str(args.model), config=config.to_dict(), benchmark=benchmark.name,
                              settings=settings, fingerprint=benchmark.fingerprint(args), dtype=dtype, device=device)
    # fail before the (slow) model load when the folder belongs to another run
    check_manifest(Path(args.out), manifest)
    model, processor, _ = load_from_args(args, config=config)
    generator = HFGenerator(model, processor)
    result = run(samples, generator, args.out, manifest, settings,
                 process_index=state.process_index if state else 0,
                 num_processes=state.num_processes if state else 1,
                 barrier=state.wait_for_everyone if state else None,
                 progress=not args.no_progress, retry_errors=args.retry_errors,
                 answer_from_description=benchmark.answer_from_description,
                 config_yaml=config.to_yaml())
    return result
