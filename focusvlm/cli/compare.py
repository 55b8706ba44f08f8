"""`focusvlm compare DIR DIR ...`: scored runs side by side, deltas against the first, a bar chart."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compare", help="compare scored runs (first = baseline) with deltas and a PNG chart")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="DIR")
    p.add_argument("-o", "--out", type=Path, default=None,
                   help="folder for compare.md / compare.json / compare.png (default: print only, chart in cwd)")
    p.add_argument("--names", default=None, help="comma-separated column names (default: folder names)")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="print the comparison even when the runs differ in benchmark data, generation settings "
                        "or answered samples (marked NOT LIKE FOR LIKE) instead of refusing")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=_compare)


def _compare(args: argparse.Namespace) -> int:
    from ..eval import registry
    from ..eval.ifreport import compare_generic
    from ..eval.runs import benchmark_of_run

    for d in args.run_dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"run folder not found: {d}")
    kinds = {benchmark_of_run(d) for d in args.run_dirs}
    if len(kinds) > 1:
        raise ValueError(f"cannot compare runs of different benchmarks: {', '.join(sorted(kinds))}")
    names = args.names.split(",") if args.names else None
    if names is not None and len(names) != len(args.run_dirs):
        raise ValueError(f"--names has {len(names)} names for {len(args.run_dirs)} folders")
    from ..eval.runs import atomic_write_text, comparability_problems
    from ..eval.scoring import load_scores

    shown = names or [d.name for d in args.run_dirs]
    # scored first (or rescored when stale), so completeness is current
    statuses = [load_scores(d)["completeness"] for d in args.run_dirs]
    problems = comparability_problems(statuses, shown)
    if problems and not args.allow_mismatch:
        raise ValueError("these runs are not like for like, so deltas would mislead: " + "; ".join(problems)
                         + ". Finish or rerun them with the same settings, or pass --allow-mismatch to print the "
                           "comparison marked as such")
    bench = registry.get(kinds.pop())
    text = bench.compare(args.run_dirs, args.out, names=names)
    if text is None:
        text = compare_generic(args.run_dirs, args.out, names=names)
    if problems:
        warning = "**WARNING: NOT LIKE FOR LIKE** (shown because of --allow-mismatch):\n" + \
            "\n".join(f"* {p}" for p in problems) + "\n\n"
        text = warning + text
        if args.out is not None:
            atomic_write_text(args.out / "compare.md", text)
    print(text)
    return 0

