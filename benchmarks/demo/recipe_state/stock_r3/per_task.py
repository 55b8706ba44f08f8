"""Per-task IF strict rates (%) of text-arm runs side by side (issue 31 probes): python per_task.py NAME=ARM_DIR ..."""
import sys
from collections import defaultdict
from pathlib import Path
from focusvlm.eval.ifreport import score_predictions
from focusvlm.eval.runs import PREDICTIONS, read_jsonl_records

cols = {}
for arg in sys.argv[1:]:
    name, folder = arg.split("=", 1)
    rates = defaultdict(list)
    for v in score_predictions(read_jsonl_records(Path(folder) / "if" / PREDICTIONS))["verdicts"]:
        rates[v["task"]].append(float(v["strict"]))
    cols[name] = {t: 100 * sum(r) / len(r) for t, r in rates.items()}
tasks = sorted(next(iter(cols.values())), key=lambda t: int(t[1:]))
print("| task | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
for t in tasks:
    print(f"| {t} | " + " | ".join(f"{c[t]:.0f}" for c in cols.values()) + " |")
