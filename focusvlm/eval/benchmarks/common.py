"""Shared pieces of the standard benchmarks: data errors, file discovery, LLaVA-1.5
prompts, reading run folders.

Kept free of torch/transformers: the CLI imports every benchmark to build its
arguments, and data problems must surface before any model is loaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..runs import MANIFEST, PREDICTIONS, REPORT, SCORES, atomic_write_text, file_fingerprint, read_jsonl_records

# LLaVA-1.5's evaluation prompts (its question files and lmms-eval's "llava" prompt kwargs).
SHORT_ANSWER = "Answer the question using a single word or phrase."
MME_YES_NO = " Please answer yes or no."
MMBENCH_LETTER = "Answer with the option's letter from the given choices directly."
OCR_PREFIX = "Reference OCR token:"


class DataError(ValueError):
    """A dataset file is missing or malformed; the message names file, line and field."""

    def __init__(self, path: Any, problem: str, line: int | None = None, field: str | None = None):
        where = str(path) + (f":{line}" if line is not None else "")
        what = f" field {field!r}" if field else ""
        super().__init__(f"{where}:{what} {problem}")
        self.path, self.line, self.field = str(path), line, field


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(path, f"{what} not found" + ("" if path.parent.is_dir() else f" (folder {path.parent} does not exist)"))
    return path


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(path, f"{what} folder not found")
    return path


def pick(data: Path, explicit: Path | None, candidates: Iterable[str], what: str, *, required: bool = True,
         folder: bool = False) -> Path | None:
    """An explicit path, else the first candidate name that exists under ``data``."""
    if explicit is not None:
        return require_dir(explicit, what) if folder else require_file(explicit, what)
    names = list(candidates)
    for name in names:
        p = data / name
        if (p.is_dir() if folder else p.is_file()):
            return p
    if required:
        raise DataError(data, f"no {what} found; looked for {', '.join(names)} (or pass it explicitly)")
    return None


def single_jsonl(data: Path, preferred: Iterable[str], what: str, explicit: Path | None) -> Path:
    """The question JSONL: explicit, a preferred name, or the only *.jsonl in the folder."""
    if explicit is not None:
        return require_file(explicit, what)
    if data.is_file():
        return data
    require_dir(data, "--data")
    for name in preferred:
        if (data / name).is_file():
            return data / name
    found = sorted(data.glob("*.jsonl"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataError(data, f"no {what} (*.jsonl) in this folder")
    raise DataError(data, f"several *.jsonl files ({', '.join(p.name for p in found)}); choose one with --questions")


def read_jsonl(path: Path, required: dict[str, type | tuple[type, ...]]) -> Iterator[tuple[int, dict]]:
    """(line number, record) of a JSONL file, each checked for the required fields and types."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(path, f"not valid JSON ({exc.msg}, column {exc.colno})", line=n) from exc
            if not isinstance(rec, dict):
                raise DataError(path, "a line must hold a JSON object", line=n)
            check_fields(rec, required, path, n)
            yield n, rec


def check_fields(rec: dict, required: dict[str, Any], path: Any, line: int | None) -> None:
    for key, types in required.items():
        if key not in rec or rec[key] is None:
            raise DataError(path, "is missing", line=line, field=key)
        if not isinstance(rec[key], types):
            names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
            raise DataError(path, f"must be {names}, got {type(rec[key]).__name__} {rec[key]!r:.60}",
                            line=line, field=key)


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(path, f"not valid JSON ({exc.msg}, column {exc.colno})", line=exc.lineno) from exc


def check_images(samples: list, image_dir: Path, path: Path, lines: dict[str, int]) -> None:
    """Every referenced image must exist: report the first missing one with its question line."""
    for s in samples:
        if isinstance(s.image, (str, Path)) and not Path(s.image).is_file():
            raise DataError(path, f"image {Path(s.image).name!r} not found in {image_dir}", line=lines.get(s.id),
                            field="image")


# --------------------------------------------------------------------------- prompts

def bare_question(text: str, suffixes: Iterable[str] = (SHORT_ANSWER,)) -> str:
    """Strip a trailing instruction suffix (LLaVA's files already carry it), so the
    configured suffix is added exactly once."""
    t = text.rstrip()
    changed = True
    while changed:
        changed = False
        for s in suffixes:
            s = s.strip()
            if s and t.endswith(s):
                t = t[: -len(s)].rstrip()
                changed = True
    return t


def with_suffix(question: str, suffix: str) -> str:
    return f"{question}\n{suffix}" if suffix else question


def add_prompt_arg(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--prompt-suffix", default=default,
                        help=f"instruction line after the question (LLaVA-1.5: {default!r}); '' for none")


# --------------------------------------------------------------------------- run folders

def predictions(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / PREDICTIONS
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {PREDICTIONS}; run `focusvlm eval` first")
    return read_jsonl_records(path)


def response_text(rec: dict) -> str:
    """A failed sample (error recorded) counts as an empty, wrong answer."""
    return "" if rec.get("error") or rec.get("response") is None else str(rec["response"])


def manifest(run_dir: Path) -> dict:
    path = Path(run_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def write_scores(run_dir: Path, benchmark: str, summary: dict, details: dict, report_lines: list[str]) -> dict:
    """scores.json (the registry convention) + report.md (what `focusvlm score` prints)."""
    scores = {"benchmark": benchmark, "summary": summary, **details}
    atomic_write_text(Path(run_dir) / SCORES, json.dumps(scores, indent=2, sort_keys=True))
    atomic_write_text(Path(run_dir) / REPORT, "\n".join(report_lines) + "\n")
    return scores


def write_accuracy(run_dir: Path, benchmark: str, title: str, recs: list[dict], values: list[float]) -> dict:
    """scores for benchmarks summarised by one mean accuracy (values in [0, 1] per sample)."""
    errors = sum(bool(r.get("error")) for r in recs)
    acc = 100 * sum(values) / len(values) if values else 0.0
    summary = {"accuracy": acc, "samples": len(recs), "errors": errors}
    lines = [f"# {title} — {run_dir}", "", f"accuracy: {acc:.2f}% over {len(recs)} questions ({errors} errors)"]
    return write_scores(run_dir, benchmark, summary, {}, lines)


def fingerprint_files(*paths: Path | None) -> dict:
    """Hashes of the question/answer files (image folders are too large to hash)."""
    return {p.name: file_fingerprint(p) for p in paths if p is not None and p.is_file()}
