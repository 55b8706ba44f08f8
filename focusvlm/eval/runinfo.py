"""What a run folder covers: how many of its samples have an answer, under which settings.

A score is only as good as the set of samples behind it. ``focusvlm eval`` records
the sample set it was asked for in the manifest (``"samples": {"expected": N,
"ids_sha256": ...}``); this module compares that with the predictions on disk
(:func:`run_status`), attaches the result to every scores.json
(``"completeness"``), and says when two runs cannot be compared like for like
(:func:`comparability_problems`): another benchmark or data version, other
generation settings, or another set of answered samples.

No torch: `score`, `report` and `compare` read JSON files only.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

MANIFEST = "manifest.json"
PREDICTIONS = "predictions.jsonl"
SCORES = "scores.json"


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def ids_digest(ids: Iterable[Any]) -> str:
    """Order-free fingerprint of a set of sample ids."""
    h = hashlib.sha256()
    for sid in sorted({str(i) for i in ids}):
        h.update(sid.encode("utf-8") + b"\n")
    return "sha256:" + h.hexdigest()


def sample_set(ids: Sequence[Any]) -> dict[str, Any]:
    """The manifest's record of the samples a run was asked for."""
    return {"expected": len(ids), "ids_sha256": ids_digest(ids)}


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {MANIFEST}; not a `focusvlm eval` output folder")
    return json.loads(path.read_text())


def is_run_dir(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def run_status(run_dir: Path, manifest: dict | None = None) -> dict[str, Any]:
    """Completeness and identity of a run folder, from its manifest and predictions on disk."""
    from .engine import existing_predictions

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir) if manifest is None else manifest
    records = existing_predictions(run_dir)
    errors = sorted((sid for sid, r in records.items() if r.get("error")), key=str)
    samples = manifest.get("samples") or {}
    expected = samples.get("expected")
    digest = ids_digest(records)
    complete = None if expected is None else (len(records) == expected and digest == samples.get("ids_sha256"))
    return {
        "expected": expected, "answered": len(records) - len(errors), "predicted": len(records),
        "errors": len(errors), "error_ids": errors[:20], "complete": complete, "ids_sha256": digest,
        "benchmark": manifest.get("benchmark"), "benchmark_fingerprint": manifest.get("benchmark_fingerprint"),
        "generation": manifest.get("generation"), "dtype": manifest.get("dtype"),
        "device_type": manifest.get("device_type"), "model": manifest.get("model"),
    }


def status_line(status: dict[str, Any]) -> str:
    """One line a reader cannot miss: how much of the run the scores cover."""
    n, expected, errors = status["predicted"], status["expected"], status["errors"]
    err = f", {errors} failed (scored as wrong; redo with --retry-errors)" if errors else ", 0 errors"
    if expected is None:
        return (f"samples: {n}{err}; completeness unknown (the run was made by a focusvlm that did not record "
                "its sample count)")
    if status["complete"]:
        return f"complete: {n} of {expected} samples{err}"
    share = f" ({100 * n / expected:.1f}%)" if expected else ""
    return (f"INCOMPLETE: {n} of {expected} samples{share}{err} - these scores cover only the answered "
            "samples; rerun the same `focusvlm eval` command to finish (it resumes)")


def completeness_marker(status: dict[str, Any]) -> str:
    """Short tag for table cells: "" when complete, else e.g. "6/48"."""
    if status.get("complete"):
        return ""
    if status.get("expected") is None:
        return f"{status['predicted']}/?"
    return f"{status['predicted']}/{status['expected']}"


def _generation_text(gen: dict | None) -> str:
    if not gen:
        return "unknown"
    return ", ".join(f"{k}={v}" for k, v in sorted(gen.items()) if k != "decoding") or "default"


def comparability_problems(statuses: Sequence[dict[str, Any]], names: Sequence[str]) -> list[str]:
    """Why these runs are not like for like (empty when they are): benchmark, data, settings, samples."""
    problems = []
    first, base = statuses[0], names[0]

    def differs(key: str, label: str, show=lambda v: json.dumps(v, sort_keys=True)) -> None:
        for name, st in zip(names[1:], statuses[1:]):
            if st.get(key) != first.get(key):
                problems.append(f"{label} differ: {base} has {show(first.get(key))}, {name} has {show(st.get(key))}")

    differs("benchmark", "benchmarks")
    differs("benchmark_fingerprint", "benchmark data (fingerprints)", lambda v: _short(v))
    differs("generation", "generation settings", _generation_text)
    for name, st in zip(names[1:], statuses[1:]):
        if st["ids_sha256"] != first["ids_sha256"]:
            problems.append(f"sample sets differ: {base} answered {first['predicted']} samples, {name} "
                            f"{st['predicted']} (or other ids); deltas would mix different questions")
    for name, st in zip(names, statuses):
        if st.get("complete") is False:
            problems.append(f"{name} is incomplete ({st['predicted']} of {st['expected']} samples)")
    return problems


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- scores with completeness

def score_run(run_dir: Path, args: Any = None, benchmark: str | None = None) -> dict[str, Any]:
    """Score a run folder with its benchmark's scorer, then record completeness in scores.json and report.md."""
    from . import registry

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
    report = run_dir / "report.md"
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
