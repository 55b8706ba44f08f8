"""Seconds per optimizer step of ``focusvlm train`` with logits at the supervised positions only (what it
does: ``runner.supervised_logits_only``) against logits at every position (transformers' default; the
helper switched off for the comparison), in one run, on the demo model with the demo recipe's stage 2
(LoRA r 8 + projector, bf16 autocast, batch 8 single easy-VQA questions).

    python benchmarks/train_step.py [--steps 12] [--rounds 2]     # ~4 min on 2 CPU cores

Each round trains both ways on the same records (order alternates between rounds); the per-step times
come from each run's metrics.jsonl, the first two steps of a run dropped as warm-up. Prints the median
seconds per step of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path


def step_seconds(run_dir: Path) -> list[float]:
    times = [json.loads(line)["time"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    return [b - a for a, b in zip(times, times[1:])][2:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    from focusvlm import FocusConfig
    from focusvlm.demo import data as D
    from focusvlm.demo.recipe import DemoRecipe, _stage_overrides
    from focusvlm.train import runner

    recipe = DemoRecipe()
    overrides = {**_stage_overrides(recipe, "finetune"), "max_steps": args.steps, "shuffle": True}
    supervised_only = runner.supervised_logits_only
    seconds: dict[str, list[float]] = {"supervised only": [], "all positions": []}
    with tempfile.TemporaryDirectory() as tmp:
        files = D.write_easyvqa(Path(tmp) / "data", turns=1, train_images=400, test_sample=10)
        for r in range(args.rounds):
            names = list(seconds) if r % 2 == 0 else list(reversed(seconds))
            for name in names:
                runner.supervised_logits_only = supervised_only if name == "supervised only" else (lambda x: x)
                out = Path(tmp) / f"{name.replace(' ', '-')}-{r}"
                runner.train(stage="finetune", data=files.instruct, image_folder=files.image_folder, model="demo",
                             output_dir=out, focus_config=FocusConfig(), overrides=overrides, lora=True,
                             progress=False)
                seconds[name] += step_seconds(out)
        runner.supervised_logits_only = supervised_only
    print(f"focusvlm train, demo model, stage 2 (LoRA r{recipe.lora_r} + projector, batch {recipe.finetune_batch}, "
          f"bf16 autocast), {args.rounds} rounds x {args.steps} steps each way")
    for name, values in seconds.items():
        print(f"  {name:>15}: {statistics.median(values):.3f} s/step (n={len(values)}, min {min(values):.3f})")
    ratio = statistics.median(seconds["supervised only"]) / statistics.median(seconds["all positions"])
    print(f"  supervised only / all positions: {ratio:.2f}x the time per step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
