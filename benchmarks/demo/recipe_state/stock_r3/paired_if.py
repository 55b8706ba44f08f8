"""Paired IF strict differences (points, arm minus reference) on the same prompts, with a task-stratified 95 %
bootstrap interval over prompts (issue 31): python paired_if.py REF_DIR NAME=ARM_DIR ..."""
import sys
from collections import defaultdict
from pathlib import Path

from focusvlm.eval.intervals import stratified_bootstrap
from focusvlm.eval.ifreport import score_predictions
from focusvlm.eval.runs import PREDICTIONS, read_jsonl_records


def strict_by_prompt(folder: str) -> dict[str, tuple[str, float]]:
    verdicts = score_predictions(read_jsonl_records(Path(folder) / "if" / PREDICTIONS))["verdicts"]
    return {v["id"]: (v["task"], float(v["strict"])) for v in verdicts}


reference = strict_by_prompt(sys.argv[1])
print("| arm | IF strict minus reference, points [95 % CI] |\n|---|---|")
for arg in sys.argv[2:]:
    name, folder = arg.split("=", 1)
    arm = strict_by_prompt(folder)
    if arm.keys() != reference.keys():
        sys.exit(f"paired_if: {folder} does not hold the reference's prompts")
    by_task = defaultdict(list)
    for key, (task, strict) in arm.items():
        by_task[task].append(strict - reference[key][1])
    print(f"| {name} | {stratified_bootstrap(list(by_task.values())).pct()} |")
