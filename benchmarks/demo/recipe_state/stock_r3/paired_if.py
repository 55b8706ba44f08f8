"""Paired IF strict differences (points, arm minus reference) on the same prompts, with a task-stratified 95 %
bootstrap interval over prompts (issue 31; the experiment's table carries the same against the stock twin):
python paired_if.py REF_DIR NAME=ARM_DIR ..."""
import sys
from pathlib import Path

from focusvlm.demo.experiment import ExperimentSettings, paired_if_difference, strict_by_prompt

reference = strict_by_prompt(Path(sys.argv[1]))
print("| arm | IF strict minus reference, points [95 % CI] |\n|---|---|")
for arg in sys.argv[2:]:
    name, folder = arg.split("=", 1)
    gap = paired_if_difference(strict_by_prompt(Path(folder)), reference, ExperimentSettings())
    print(f"| {name} | {gap.signed_points()} |")
