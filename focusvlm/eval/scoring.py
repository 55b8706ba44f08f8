"""Scoring a run folder: its benchmark's scorer, with the run's completeness recorded next to the scores.

:func:`score_run` is what `focusvlm score NAME DIR` does; :func:`load_scores`
is how `report` and `compare` read scores: rescored when scores.json is
missing or older than the predictions it should describe. (The per-benchmark
answer matching lives in ``focusvlm.eval.scorers``; the run-folder format in
``focusvlm.eval.runs``.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import registry
from .runs import REPORT, SCORES, atomic_write_text, read_manifest, run_status, status_line


def score_run(run_dir: Path, args: Any = None, benchmark: str | None = None) -> dict[str, Any]:
    """Score a run folder with its benchmark's scorer, then record completeness in scores.json and report.md."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    recorded = manifest.get("benchmark")
    if benchmark is not None and recorded != benchmark:
        raise ValueError(f"{run_dir} holds a {recorded!r} run, not {benchmark!r}; use `focusvlm score {recorded} "
                         f"{run_dir}`")
    scores = registry.get(recorded).score(run_dir, args)
    status = run_status(run_dir, manifest)
    scores = {**scores, "completeness": status, "generation": manifest.get("generation"),
              "benchmark_fingerprint": manifest.get("benchmark_fingerprint")}
    atomic_write_text(run_dir / SCORES, json.dumps(scores, indent=2, sort_keys=True))
    report = run_dir / REPORT
    if report.is_file():
        atomic_write_text(report, f"{status_line(status)}\n\n{report.read_text()}")
    return scores


def load_scores(run_dir: Path) -> dict[str, Any]:
    """scores.json of a run, rescored when missing or older than the predictions it should describe."""
    run_dir = Path(run_dir)
    path = run_dir / SCORES
    if path.is_file():
        scores = json.loads(path.read_text())
        stored = scores.get("completeness") or {}
        live = run_status(run_dir)
        if all(stored.get(k) == live[k] for k in ("ids_sha256", "predicted", "errors", "expected")):
            return scores
    return score_run(run_dir)


__all__ = ["score_run", "load_scores"]
