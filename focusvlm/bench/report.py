"""Benchmark report as a Markdown table (screen and RESULTS.md), JSON and a PNG plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .targets import check_targets

_COLUMNS = (  # (field, header, scale, unit format)
    ("visual_tokens", "vis tok", 1, "{:.0f}"),
    ("vision_s", "vision ms", 1e3, "{:.1f}"),
    ("ttft_s", "TTFT ms", 1e3, "{:.1f}"),
    ("decode_s_per_token", "decode ms/tok", 1e3, "{:.2f}"),
    ("throughput_tok_s", "tok/s", 1, "{:.1f}"),
    ("peak_mem_bytes", "peak mem MiB", 1 / 2 ** 20, "{:.0f}"),
    ("prefill_flops", "prefill GFLOPs", 1e-9, "{:.4g}"),
)


# the ratio shown is the median of back-to-back pairs; when it strays this far from the ratio of the two
# medians in the same table, the load changed during the run and the reader must be told
RATIO_DISAGREEMENT = 0.10


def _cell(value: Any, ratio: Any, scale: float, fmt: str, reference: Any = None) -> tuple[str, str | None]:
    """(cell text, note) — a note when the paired ratio disagrees with value / reference."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a", None
    text = fmt.format(value * scale)
    if ratio is None:
        return text, None
    of_medians = value / reference if isinstance(reference, (int, float)) and reference else None
    if of_medians is not None and ratio and abs(of_medians / ratio - 1) > RATIO_DISAGREEMENT:
        return (f"{text} ({ratio:.2f}x*)",
                f"{ratio:.2f}x (median of back-to-back pairs) vs {of_medians:.2f}x (ratio of the medians shown)")
    return f"{text} ({ratio:.2f}x)", None


# shown when the run counted them (focusvlm bench --count-ops)
_OPS_COLUMNS = (
    ("vision_ops", "ops/vision path", 1, "{:.0f}"),
    ("extra_vision_ops_per_stage", "extra ops/stage", 1, "{:.1f}"),
    ("prefill_ops", "ops/prefill", 1, "{:.0f}"),
    ("extra_prefill_ops_per_layer", "extra prefill ops/layer", 1, "{:.2f}"),
    ("prefill_host_reads", "host reads/prefill", 1, "{:.0f}"),
    ("decode_ops", "ops/decode step", 1, "{:.0f}"),
    ("extra_decode_ops_per_layer", "extra decode ops/layer", 1, "{:.2f}"),
    ("vision_kernels", "compiled vision kernels", 1, "{:.0f}"),
    ("extra_vision_kernels_per_stage", "extra compiled kernels/stage", 1, "{:.1f}"),
    ("extra_prefill_kernels_per_layer", "extra compiled prefill kernels/layer", 1, "{:.2f}"),
    ("decode_kernels", "compiled decode kernels", 1, "{:.0f}"),
    ("extra_decode_kernels_per_layer", "extra compiled decode kernels/layer", 1, "{:.2f}"),
)


def markdown_tables(report: dict[str, Any]) -> str:
    """One table per batch size (and prompt length): absolute figures with the ratio to stock in brackets."""
    meta = report["meta"]
    lines = []
    for run in report["runs"]:
        lines += _run_table(meta, run)
    for run in report["runs"]:
        lines += _profile_tables(meta, run)
    lines += _targets_table(report)
    return "\n".join(lines)


def _run_table(meta: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """The table of one run: its heading, one row per arm, and a note where a paired ratio disagrees."""
    what = meta.get("model") or f"preset {meta.get('preset')}"
    extras = []
    if meta.get("compile"):
        tower = "vision tower (CUDA graphs)" if meta.get("tower_graphs") else "vision tower"
        extras.append(f"compiled: {tower}, CMAI prefill math, decode steps (static cache, fullgraph)")
    if meta.get("clock") == "cpu":
        extras.append("times are process CPU time")
    rows = run["methods"].values()
    columns = _COLUMNS + tuple(c for c in _OPS_COLUMNS if any(c[0] in r for r in rows))   # what was counted
    lines = [f"**{what}{' (vision tower only)' if meta.get('vision_only') else ''}, {meta['dtype']}, "
             f"batch {run['batch']}, {run.get('prompt_tokens', meta['prompt_tokens'])} prompt tokens"
             f"{'' if meta.get('vision_only') else ', ' + str(meta['new_tokens']) + ' new tokens'}"
             f"{''.join(', ' + e for e in extras)}** "
             f"(medians of {meta['repeats']} rounds; ratio to {run['reference']} = median of back-to-back pairs, "
             f"{run.get('interleave', 'round')} interleave; memory: {run['memory_source']})"]
    lines.append("")
    lines.append("| method | " + " | ".join(c[1] for c in columns) + " |")
    lines.append("|---|" + "---|" * len(columns))
    ref_row = run["methods"].get(run["reference"], {})
    notes = []
    for name, row in run["methods"].items():
        cells = []
        for f, header, s, fmt in columns:
            text, note = _cell(row.get(f), row["ratio"].get(f) if name != run["reference"] else None, s, fmt,
                               ref_row.get(f))
            cells.append(text)
            if note:
                notes.append(f"{name} {header}: {note}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    if notes:
        lines.append("\\* the load on the machine changed during the run: these paired ratios differ by more "
                     f"than {RATIO_DISAGREEMENT:.0%} from the ratio of the medians in the same row (rerun with "
                     "more --repeats or on a quiet machine): " + "; ".join(notes))
        lines.append("")
    return lines


def _profile_tables(meta: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """Where each arm's extra prefill time goes (``--profile``), one table per arm; none without a profile."""
    prof = run.get("profile")
    if not prof:
        return []
    lines = []
    for name, top in prof["top"].items():
        lines.append(f"Where {name}'s extra prefill time goes (batch {run['batch']}, "
                     f"{run.get('prompt_tokens', meta['prompt_tokens'])} prompt tokens; {prof['unit']}; "
                     f"totals: {name} {prof['total'][name]:.0f}, {run['reference']} "
                     f"{prof['total'][run['reference']]:.0f}):")
        lines.append("")
        lines.append(f"| op | {name} | {run['reference']} | extra |")
        lines.append("|---|---|---|---|")
        for row in top:
            lines.append(f"| {row['op']} | {row['method_ms']:.1f} | {row['stock_ms']:.1f} | {row['extra_ms']:+.1f} |")
        lines.append("")
    return lines


def _targets_table(report: dict[str, Any]) -> list[str]:
    """The verdict of every speed target that applies to the report; none when no target does."""
    verdicts = check_targets(report)
    if not verdicts:
        return []
    lines = ["| target | batch | prompt tokens | measured | limit | met |", "|---|---|---|---|---|---|"]
    for v in verdicts:
        unit = "" if v.get("absolute") else "x"
        measured = "n/a" if v["ratio"] is None else f"{v['ratio']:.3f}{unit}"
        lines.append(f"| {v['target']} | {v['batch']} | {v.get('prompt_tokens', '')} | {measured} | "
                     f"<= {v['limit']:.2f}{unit} | {'yes' if v['met'] else 'NO'} |")
    lines.append("")
    return lines


def environment_line(report: dict[str, Any]) -> str:
    m = report["meta"]
    return (f"device {m.get('device_name')} ({m.get('device')}, {m.get('cpu_threads')} torch threads), "
            f"torch {m['torch']}, transformers {m['transformers']}, python {m['python']}, {m['date']}")


def write_json(report: dict[str, Any], path: str | Path) -> None:
    data = dict(report, targets=check_targets(report))
    Path(path).write_text(json.dumps(data, indent=2, default=str))


def plot(report: dict[str, Any], path: str | Path) -> None:
    """Grouped bars of each method's ratio to stock, one panel per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = [c for c in _COLUMNS if c[0] not in ("visual_tokens",)]
    runs = report["runs"]
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 3.6 * len(runs)), squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        names = [n for n in run["methods"] if n != run["reference"]]
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            ratios = [run["methods"][name]["ratio"].get(f[0]) for f in fields]
            xs = [j + i * width for j in range(len(fields))]
            ax.bar(xs, [r if r is not None else 0.0 for r in ratios], width, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(fields))])
        ax.set_xticklabels([f[1] for f in fields])
        ax.set_ylabel(f"ratio to {run['reference']}")
        meta = report["meta"]
        ax.set_title(f"{meta.get('model') or meta.get('preset')} {meta['dtype']} batch {run['batch']} "
                     f"on {meta.get('device_name')}")
        ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
