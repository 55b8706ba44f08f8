"""`focusvlm report DIR...`: the paper's Table 2 (IF, VQAv2, GQA, TextVQA, MME, MMBench)
from finished run folders.

Each run folder holds manifest.json (model, FocusConfig, benchmark) and
scores.json (written by `focusvlm score`; scored here if missing). Runs of the
same model + config + prompting mode form one row; a later run of the same benchmark replaces
an earlier one, and the folder used for every cell is listed in the JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .runs import atomic_write_text, comparability_problems, completeness_marker, is_run_dir, read_manifest
from .scoring import load_scores

COLUMNS = ("IF", "VQAv2", "GQA", "TextVQA", "MME", "MMBench")
# benchmark name -> (column, summary key, scale): the number the paper reports
HEADLINE = {
    "if": ("IF", "strict_avg", 100.0),        # IF success rates are stored as fractions
    "vqav2": ("VQAv2", "accuracy", 1.0),
    "gqa": ("GQA", "accuracy", 1.0),
    "textvqa": ("TextVQA", "accuracy", 1.0),
    "mme": ("MME", "perception", 1.0),         # the paper's MME column is the perception score
    "mmbench": ("MMBench", "circular", 1.0),
}
UNITS = {"IF": "%", "VQAv2": "%", "GQA": "%", "TextVQA": "%", "MME": "score", "MMBench": "%"}


def _method(config: dict) -> str:
    """A short label of a FocusConfig dict: the switched-on parts, CMAI with its gamma."""
    parts = []
    for key, value in (config or {}).items():
        if not value:
            continue
        if key == "cmai" and isinstance(value, dict) and "gamma_max" in value:
            parts.append(f"cmai({value['gamma_max']})")
        elif isinstance(value, dict):
            parts.append(key)
    return " + ".join(parts) or "stock"


def load_run(run_dir: Path) -> tuple[dict, dict]:
    """(manifest, scores) of a run folder; scored (or rescored, when stale) as needed."""
    manifest = read_manifest(Path(run_dir))
    return manifest, load_scores(Path(run_dir))


def build(run_dirs: list[Path]) -> dict[str, Any]:
    """Rows of Table 2. Folders that are not runs (a compare output, say) are skipped and listed."""
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    skipped: list[str] = []
    for d in run_dirs:
        d = Path(d)
        if not d.is_dir():
            raise FileNotFoundError(f"run folder not found: {d}")
        if not is_run_dir(d):
            skipped.append(f"{d} (no manifest.json: not a `focusvlm eval` folder)")
            continue
        manifest, scores = load_run(d)
        bench = manifest["benchmark"]
        if bench not in HEADLINE:
            skipped.append(f"{d} (benchmark {bench!r} has no Table 2 column)")
            continue
        column, key, scale = HEADLINE[bench]
        value = (scores.get("summary") or {}).get(key)
        model, cfg = str(manifest.get("model")), json.dumps(manifest.get("config") or {}, sort_keys=True)
        # a run's prompting mode is part of what it measures: describe-then-answer gets its own row
        mode = (manifest.get("generation") or {}).get("mode") or "direct"
        method = _method(manifest.get("config") or {}) + ("" if mode == "direct" else f" ({mode})")
        row = rows.setdefault((model, cfg, mode), {"model": model, "method": method,
                                                   "cells": {}, "runs": {}, "samples": {}, "completeness": {}})
        status = scores.get("completeness") or {}
        row["cells"][column] = None if value is None else value * scale
        row["runs"][column] = str(d)
        row["samples"][column] = (scores.get("summary") or {}).get("samples")
        row["completeness"][column] = {**status, "marker": completeness_marker(status)}
    if not rows and run_dirs:
        raise ValueError("no run folders among the arguments: " + "; ".join(skipped))
    table = {"columns": list(COLUMNS), "rows": list(rows.values()), "skipped": skipped}
    table["mismatches"] = _column_mismatches(table)
    return table


def _column_mismatches(table: dict[str, Any]) -> dict[str, list[str]]:
    """Per column, why its cells are not like for like across rows (other data, settings or samples)."""
    out: dict[str, list[str]] = {}
    for column in table["columns"]:
        cells = [(r, r["completeness"][column]) for r in table["rows"] if column in r["completeness"]]
        if len(cells) < 2:
            continue
        names = [f"{r['method']} ({r['model']})" for r, _ in cells]
        problems = [p for p in comparability_problems([st for _, st in cells], names) if "is incomplete" not in p]
        if problems:
            out[column] = problems
    return out


def markdown(table: dict[str, Any]) -> str:
    cols = table["columns"]
    mismatched = table.get("mismatches") or {}
    head = [f"{c} ({UNITS[c]})" for c in cols]
    lines = ["| model | method | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(cols)]
    notes = []
    for row in table["rows"]:
        cells = []
        for c in cols:
            v = row["cells"].get(c)
            status = row.get("completeness", {}).get(c) or {}
            text = "" if v is None else f"{v:.1f}"
            if v is not None and status.get("marker"):
                text += f" INCOMPLETE {status['marker']}"
                notes.append(f"{c} of {row['method']} ({row['runs'][c]}): only {status['marker']} samples "
                             "answered; the score covers those alone")
            if v is not None and c in mismatched:
                text += " †"
            cells.append(text)
        lines.append(f"| {row['model']} | {row['method']} | " + " | ".join(cells) + " |")
    lines += ["", "IF: strict average success rate (%); VQAv2/GQA/TextVQA: accuracy (%); "
              "MME: perception score (sum of subtask scores, max 2000); MMBench: circular accuracy (%)."]
    if notes:
        lines += ["", "**WARNING: incomplete runs** (rerun the same `focusvlm eval` command to finish them):"]
        lines += [f"* {n}" for n in notes]
    for c, problems in mismatched.items():
        lines += ["", f"**WARNING: † column {c} compares runs that are not like for like:**"]
        lines += [f"* {p}" for p in problems]
    if table.get("skipped"):
        lines += ["", "skipped: " + "; ".join(table["skipped"])]
    return "\n".join(lines)


def report(run_dirs: list[Path], out: Path | None = None) -> str:
    table = build(run_dirs)
    text = markdown(table)
    if out is not None:
        out = Path(out)
        atomic_write_text(out / "table2.json", json.dumps(table, indent=2))
        atomic_write_text(out / "table2.md", text + "\n")
    return text
