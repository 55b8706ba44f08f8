"""The equal-budget AnyRes table (issue 30) from a `focusvlm bench --json` report: one row per method and budget,
grouped by the share of stock image tokens each arm was set to (benchmarks/gpu/anyres_arms.txt).

    python benchmarks/anyres_table.py benchmarks/results/cpu_next_clip_l_anyres.json
"""

import json
import sys

from focusvlm.bench.arms import parse_arm
from focusvlm.methods import SelectionShape

# the nominal share of stock tokens each arm's setting aims at (SPD's factors give 1/4, 1/9, 1/16 of each crop)
BUDGETS = {"20 %": ("vmtc:0.2", "hired:0.2", "globalcom2:0.2", "divprune:0.2", "visionzip:117", "prumerge:117",
                    "spd:2", "fastv:0.8"),
           "10 %": ("vmtc:0.1", "hired:0.1", "globalcom2:0.1", "divprune:0.1", "visionzip:58", "prumerge:58",
                    "spd:3", "fastv:0.9"),
           "5 %": ("vmtc:0.05", "hired:0.05", "globalcom2:0.05", "divprune:0.05", "visionzip:29", "prumerge:29",
                   "spd:4", "fastv:0.95")}


def _x(value) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _with_selection(rows: dict, stock: dict, prompt: int, crops: int, patches: int, width: int, llm_width: int):
    """Reports written before the FLOP model counted each method's selection work get it added, from the same
    analytic formulas the bench now uses (``Method.selection_flops``); FLOPs do not depend on the run."""
    for name, row in rows.items():
        if "selection" in row["flops"]:
            continue
        shape = SelectionShape(crops=crops, patches=patches, vision_width=width, llm_width=llm_width,
                               stock_tokens=stock["visual_tokens"], kept_tokens=row["visual_tokens"],
                               sequence=prompt + stock["visual_tokens"])
        extra = parse_arm(name).selection_flops(shape)
        row["prefill_flops"] += extra
        row["flops"]["selection"] = extra
    for row in rows.values():
        row["ratio"]["prefill_flops"] = row["prefill_flops"] / stock["prefill_flops"]


def main(path: str) -> None:
    report = json.load(open(path))
    run = report["runs"][0]
    rows = run["methods"]
    stock = rows[run["reference"]]
    # next-clip-l: 5 crops (2 x 2 tiles + base) of 576 patches, CLIP-L width 1024, an LM of width 1024
    _with_selection(rows, stock, run.get("prompt_tokens", report["meta"]["prompt_tokens"]), 5, 576, 1024, 1024)
    print(f"stock: {stock['visual_tokens']} image tokens, prefill {stock['prefill_flops'] / 1e12:.3f} TFLOPs, "
          f"vision {stock['vision_s'] * 1e3:.0f} ms, TTFT {stock['ttft_s'] * 1e3:.0f} ms "
          f"({report['meta']['clock']} clock, {report['meta']['dtype']}, batch {run['batch']})\n")
    print("| budget | method | image tokens (share) | prefill TFLOPs (ratio) | of which selection GFLOPs | vision | TTFT |")
    print("|---|---|---|---|---|---|---|")
    for budget, names in BUDGETS.items():
        for name in names:
            row = rows.get(name)
            if row is None:
                continue
            r = row["ratio"]
            # FastV keeps every image token into layer K, then its share: what reaches the LLM's later layers
            tokens = row["visual_tokens"]
            print(f"| {budget} | {name} | {tokens} ({tokens / stock['visual_tokens']:.1%}) | "
                  f"{row['prefill_flops'] / 1e12:.3f} ({_x(r.get('prefill_flops'))}) | "
                  f"{row['flops']['selection'] / 1e9:.2f} | {_x(r.get('vision_s'))} | "
                  f"{_x(r.get('ttft_s'))} |")


if __name__ == "__main__":
    main(sys.argv[1])
