"""Scores, the Table-1 report and run comparisons for the instruction-following benchmark.

Rates: a task's strict (loose) rate is the share of its samples whose response
passes the checker; samples that recorded an error (unreadable image, failed
generation) count as failures and are listed. AVG is the unweighted mean of
the task rates, as in the paper's Table 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import instructions
from .runs import MANIFEST, PREDICTIONS, atomic_write_text, read_jsonl_records, status_line
from .scoring import load_scores


def _task_order(key: str) -> tuple[int, str]:
    digits = "".join(ch for ch in key if ch.isdigit())
    return (int(digits) if digits else 10**6, key)


def score_predictions(records: list[dict]) -> dict[str, Any]:
    """Per-task and average strict/loose rates of prediction records (no files touched)."""
    tasks: dict[str, dict[str, Any]] = {}
    verdicts = []
    for rec in records:
        meta = rec.get("meta") or {}
        key = meta.get("task") or meta.get("instruction_id")
        t = tasks.setdefault(key, {"task": key, "name": meta.get("task_name", key),
                                   "instruction_id": meta.get("instruction_id"), "n": 0, "errors": 0,
                                   "strict_pass": 0, "loose_pass": 0})
        t["n"] += 1
        if rec.get("error") or rec.get("response") is None:
            t["errors"] += 1
            strict = loose = False
        else:
            strict = instructions.check(meta["instruction_id"], rec["response"], meta.get("kwargs"),
                                        prompt=meta.get("question"))
            loose = instructions.check(meta["instruction_id"], rec["response"], meta.get("kwargs"),
                                       prompt=meta.get("question"), loose=True)
        t["strict_pass"] += strict
        t["loose_pass"] += loose
        verdicts.append({"id": rec["id"], "task": key, "strict": strict, "loose": loose,
                         "error": rec.get("error")})
    ordered = [tasks[k] for k in sorted(tasks, key=_task_order)]
    for t in ordered:
        t["strict"] = t["strict_pass"] / t["n"]
        t["loose"] = t["loose_pass"] / t["n"]
    avg = (lambda k: sum(t[k] for t in ordered) / len(ordered)) if ordered else (lambda k: 0.0)
    summary = {"strict_avg": avg("strict"), "loose_avg": avg("loose"), "samples": sum(t["n"] for t in ordered),
               "errors": sum(t["errors"] for t in ordered), "tasks": len(ordered)}
    return {"tasks": ordered, "summary": summary, "verdicts": verdicts}


def score_run(run_dir: Path) -> dict[str, Any]:
    """Score a run folder: writes scores.json, verdicts.jsonl and report.md; returns the scores."""
    run_dir = Path(run_dir)
    preds = run_dir / PREDICTIONS
    if not preds.is_file():
        raise FileNotFoundError(f"{run_dir}: no {PREDICTIONS}; run `focusvlm eval if ... --out {run_dir}` first")
    manifest = json.loads((run_dir / MANIFEST).read_text()) if (run_dir / MANIFEST).is_file() else {}
    records = read_jsonl_records(preds)
    if not records:
        raise ValueError(f"{preds}: no predictions to score")
    result = score_predictions(records)
    verdicts = result.pop("verdicts")
    scores = {"benchmark": "if", "run": str(run_dir), "model": manifest.get("model"),
              "config": manifest.get("config"), "generation": manifest.get("generation"),
              "sentence_splitter": instructions.sentence_splitter(), "langdetect_seed": 0, **result}
    atomic_write_text(run_dir / "scores.json", json.dumps(scores, indent=2, sort_keys=True))
    atomic_write_text(run_dir / "verdicts.jsonl", "".join(json.dumps(v) + "\n" for v in verdicts))
    atomic_write_text(run_dir / "report.md", table1_markdown(scores))
    return scores


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _config_label(config: dict | None) -> str:
    if not config:
        return "stock"
    parts = []
    for key, value in config.items():
        if value is None:
            continue
        if key == "cmai" and isinstance(value, dict) and "gamma_max" in value:
            parts.append(f"cmai(gamma_max={value['gamma_max']})")
        else:
            parts.append(key)
    return " + ".join(parts) or "stock"


def table1_markdown(scores: dict[str, Any], title: str | None = None) -> str:
    tasks = scores["tasks"]
    keys = [t["task"] for t in tasks]
    head = "| | " + " | ".join(keys) + " | AVG |"
    sep = "|---|" + "---:|" * (len(keys) + 1)
    rows = [f"| {kind} | " + " | ".join(_pct(t[kind]) for t in tasks) + f" | {_pct(scores['summary'][kind + '_avg'])} |"
            for kind in ("strict", "loose")]
    n_row = "| samples | " + " | ".join(str(t["n"]) for t in tasks) + f" | {scores['summary']['samples']} |"
    e_row = "| errors | " + " | ".join(str(t["errors"]) for t in tasks) + f" | {scores['summary']['errors']} |"
    gen = scores.get("generation") or {}
    lines = [
        f"## {title or 'Instruction following (Table 1 layout)'}",
        "",
        f"model: `{scores.get('model')}` · config: {_config_label(scores.get('config'))} · "
        f"mode: {gen.get('mode', '?')} · max_new_tokens: {gen.get('max_new_tokens', '?')} · "
        f"sentence splitter: {scores.get('sentence_splitter')}",
        "",
        "Success rate (%) per task; errors count as failures.",
        "",
        head, sep, *rows, n_row, e_row,
        "",
        "Tasks: " + "; ".join(f"{t['task']} {t['name']} (`{t['instruction_id']}`)" for t in tasks),
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- comparisons

def _load_scores(run_dir: Path) -> dict[str, Any]:
    return load_scores(Path(run_dir))  # rescored when the predictions changed since


def _delta(x: float) -> str:
    return f"{100 * x:+.1f}"


def compare_runs(run_dirs: list[Path], out: Path | None = None, names: list[str] | None = None,
                 chart: bool = True) -> str:
    """Runs side by side (rates and deltas against the first), plus a per-task PNG bar chart."""
    all_scores = [_load_scores(d) for d in run_dirs]
    names = names or [Path(d).name for d in run_dirs]
    keys = sorted({t["task"] for s in all_scores for t in s["tasks"]}, key=_task_order)
    by_task = [{t["task"]: t for t in s["tasks"]} for s in all_scores]
    lines = ["## Instruction following: comparison (first run = baseline)", ""]
    for name, s in zip(names, all_scores):
        done = status_line(s["completeness"]) if s.get("completeness") else \
            f"{s['summary']['samples']} samples, {s['summary']['errors']} errors"
        lines.append(f"* **{name}**: `{s.get('model')}`, {_config_label(s.get('config'))}, {done}")
    for kind in ("strict", "loose"):
        lines += ["", f"### {kind}", "", "| run | " + " | ".join(keys) + " | AVG |",
                  "|---|" + "---:|" * (len(keys) + 1)]
        base = by_task[0]
        for i, (name, s, bt) in enumerate(zip(names, all_scores, by_task)):
            cells = [(_pct(bt[k][kind]) if k in bt else "–") for k in keys]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {_pct(s['summary'][kind + '_avg'])} |")
            if i > 0:
                deltas = [(_delta(bt[k][kind] - base[k][kind]) if k in bt and k in base else "–") for k in keys]
                d_avg = s["summary"][kind + "_avg"] - all_scores[0]["summary"][kind + "_avg"]
                lines.append(f"| Δ {name} | " + " | ".join(deltas) + f" | {_delta(d_avg)} |")
    text = "\n".join(lines) + "\n"
    if out is not None:
        out = Path(out)
        atomic_write_text(out / "compare.md", text)
        atomic_write_text(out / "compare.json", json.dumps(
            {"runs": [{"name": n, "dir": str(d), "summary": s["summary"], "completeness": s.get("completeness"),
                       "tasks": {t["task"]: {"strict": t["strict"], "loose": t["loose"]} for t in s["tasks"]}}
                      for n, d, s in zip(names, run_dirs, all_scores)]}, indent=2))
    if chart:
        png = (Path(out) if out is not None else Path(".")) / "compare.png"
        bar_chart(keys, names, [[bt.get(k, {}).get("strict", 0.0) for k in keys] for bt in by_task],
                  [s["summary"]["strict_avg"] for s in all_scores], png)
        text += f"\nchart: {png}\n"
    return text


def bar_chart(keys: list[str], names: list[str], values: list[list[float]], avgs: list[float], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    labels = keys + ["AVG"]
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(labels)), 4))
    for i, (name, vals, avg) in enumerate(zip(names, values, avgs)):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, [100 * v for v in vals + [avg]], width, label=name)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("strict success rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Instruction following per task")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def compare_generic(run_dirs: list[Path], out: Path | None = None, names: list[str] | None = None) -> str:
    """For benchmarks without their own comparison: the numeric ``summary`` of each scores.json."""
    names = names or [Path(d).name for d in run_dirs]
    all_scores = [load_scores(Path(d)) for d in run_dirs]
    summaries = [s.get("summary", {}) for s in all_scores]
    metrics = [k for k, v in summaries[0].items() if isinstance(v, (int, float))]
    lines = ["| metric | " + " | ".join(names) + " | " + " | ".join(f"Δ {n}" for n in names[1:]) + " |",
             "|---|" + "---:|" * (2 * len(names) - 1)]
    for m in metrics:
        vals = [s.get(m) for s in summaries]
        deltas = [f"{v - vals[0]:+.4g}" if isinstance(v, (int, float)) else "–" for v in vals[1:]]
        lines.append(f"| {m} | " + " | ".join("–" if v is None else f"{v:.4g}" for v in vals) + " | "
                     + " | ".join(deltas) + " |")
    lines += [""] + [f"* {n}: {status_line(s['completeness'])}" for n, s in zip(names, all_scores)]
    text = "\n".join(lines) + "\n"
    if out is not None:
        atomic_write_text(Path(out) / "compare.md", text)
    return text
