"""Paired IF strict differences (points, arm minus reference) on the same prompts, with a task-stratified 95 %
bootstrap interval over prompts (issue 31; the experiment's table carries the same against the stock twin):
python paired_if.py REF_DIR NAME=ARM_DIR ..."""
import sys
from pathlib import Path

from focusvlm.demo.experiment import ExperimentSettings, paired_if_difference, signed_points

print("| arm | IF strict minus reference, points [95 % CI] |\n|---|---|")
for arg in sys.argv[2:]:
    name, folder = arg.split("=", 1)
    print(f"| {name} | {signed_points(paired_if_difference(Path(folder), Path(sys.argv[1]), ExperimentSettings()))} |")
