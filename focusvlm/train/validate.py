"""``focusvlm train --validate``: scan a whole data file, report every problem, train nothing.

Checks every record (JSON, roles, turn order, ``<image>`` count against the
images), decodes every image fully, and — when a processor is given —
tokenizes every conversation in the chosen format to find samples that
would be skipped (no supervised token after truncation, image placeholders
that do not fit) and boundaries that split a token.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from .data import (DataError, check_record, expand_and_truncate, image_path, image_token_count, open_image,
                   read_records)
from .formats import IGNORE_INDEX, ChatFormat, TokenizationMismatch


def _kind(reason: str) -> str:
    for key, kind in (("malformed", "malformed"), ("unknown role", "unknown role"), ("image not found", "missing image"),
                      ("unreadable image", "unreadable image"), ("placeholder", "image count"),
                      ("alternate", "turn order"), ("last turn", "turn order"), ("no supervised", "no supervised token"),
                      ("do not fit", "image does not fit"), ("boundary", "tokenization"), ("template", "tokenization")):
        if key in reason:
            return kind
    return "other"


def _check_sample(sample, raw, path, image_folder, fmt_obj, image_token_id, per_image: int,
                  max_length: int) -> int | None:
    """Raise DataError for a sample that cannot train (an image that does not open, a turn that does not
    tokenize, nothing supervised after truncation); its full token length when a format is given."""
    for name in sample.images:
        try:
            open_image(image_path(image_folder, name))
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(path, raw.line, sample.id, str(exc)) from None
    if fmt_obj is None:
        return None
    try:
        enc = fmt_obj.encode(sample.turns)
    except (TokenizationMismatch, ValueError) as exc:
        raise DataError(path, raw.line, sample.id, str(exc)) from None
    out = expand_and_truncate(enc.input_ids, enc.labels, image_token_id, per_image, max_length)
    if isinstance(out, str):
        raise DataError(path, raw.line, sample.id, out)
    if not any(label != IGNORE_INDEX for label in out[1]):
        raise DataError(path, raw.line, sample.id, "no supervised token")
    return len(enc.input_ids) + len(sample.images) * (per_image - 1)


def validate_data(path: str | Path, image_folder: str | Path | None = None, processor: Any = None,
                  fmt: str = "vicuna_v1", max_length: int = 2048, image_token_id: int | None = None,
                  progress: bool = True, limit_problems: int = 10000) -> dict[str, Any]:
    """A report dict: counts, token-length statistics (with a processor) and every problem (file:line id)."""
    fmt_obj = None
    per_image = 0
    if processor is not None:
        token = getattr(processor, "image_token", "<image>")
        image_token_id = image_token_id if image_token_id is not None else processor.tokenizer.convert_tokens_to_ids(token)
        fmt_obj = ChatFormat(fmt, processor, image_token_id)
        per_image = image_token_count(processor)
    records = read_records(path)
    if progress:
        from tqdm.auto import tqdm

        records = tqdm(records, desc=f"validating {Path(path).name}", unit=" records", mininterval=0.5)
    problems: list[dict] = []
    kinds: Counter = Counter()
    n = n_image = n_text = ok = 0
    lengths: list[int] = []
    try:
        for index, raw in enumerate(records):
            n += 1
            try:
                sample = check_record(raw, index, path)
                if sample.images:
                    n_image += 1
                else:
                    n_text += 1
                length = _check_sample(sample, raw, path, image_folder, fmt_obj, image_token_id, per_image, max_length)
                if length is not None:
                    lengths.append(length)
                ok += 1
            except DataError as err:
                kinds[_kind(err.reason)] += 1
                if len(problems) < limit_problems:
                    problems.append(err.record())
    except DataError as fatal:  # a broken JSON list cannot be read past the break
        kinds[_kind(fatal.reason)] += 1
        problems.append({**fatal.record(), "fatal": True})
    report: dict[str, Any] = {
        "file": str(path), "image_folder": str(image_folder) if image_folder else None,
        "records": n, "usable": ok, "with_image": n_image, "text_only": n_text,
        "problems_by_kind": dict(kinds), "problems": problems,
    }
    if fmt_obj is not None:
        lengths.sort()
        pick = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))] if lengths else None  # noqa: E731
        report["tokens"] = {"format": fmt, "max_length": max_length, "image_tokens_per_image": per_image,
                            "p50": pick(0.5), "p95": pick(0.95), "max": lengths[-1] if lengths else None,
                            "over_max_length": sum(1 for x in lengths if x > max_length)}
    return report


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return path


def summary_lines(report: dict[str, Any], shown: int = 20) -> list[str]:
    lines = [f"{report['file']}: {report['records']} records, {report['usable']} usable "
             f"({report['with_image']} with image, {report['text_only']} text-only)"]
    if report.get("tokens"):
        t = report["tokens"]
        lines.append(f"tokens ({t['format']}, {t['image_tokens_per_image']} per image): median {t['p50']}, "
                     f"p95 {t['p95']}, max {t['max']}; {t['over_max_length']} over max_length {t['max_length']} "
                     "(truncated in text)")
    if report["problems_by_kind"]:
        lines.append("problems: " + ", ".join(f"{k} {v}" for k, v in sorted(report["problems_by_kind"].items())))
        for p in report["problems"][:shown]:
            lines.append(f"  {p['file']}:{p['line']} id={p['id']}: {p['reason']}")
        if len(report["problems"]) > shown:
            lines.append(f"  ... {len(report['problems']) - shown} more in the report file")
    else:
        lines.append("no problems found")
    return lines
