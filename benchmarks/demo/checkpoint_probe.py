"""Diagnostic (issue 31): how far a stage-2 checkpoint has moved the LM, before the stage ends. Packs a
Trainer checkpoint of `focusvlm train --lora` (LoRA + projector) onto the recipe's base model as a stock twin,
then runs the experiment's `text` arm (the VLM given the picture's true description as text, the same 400
paper16 prompts as the base LM's `lm-text` row) and a quick easy-VQA check (colour / shape / yes/no).

    python benchmarks/demo/checkpoint_probe.py RUN/stock/finetune/checkpoint-100 --base RUN/base --out DIR
    # ~5 min on 2 cores: DIR/stock (the pack), DIR/arms (the text arm, its table), DIR/quick.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from focusvlm.models.demo.ship import META_FILE

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = ROOT / "benchmarks" / "results" / "if_experiment"  # the base LM's row and the fixed prompts


def pack(checkpoint: Path, base: Path, out: Path) -> None:
    from focusvlm.models.demo.ship import pack_demo, read_peft_adapter
    from focusvlm.runtime import load_model

    model, _ = load_model(str(base), "cpu", torch.float32)
    pairs, scale, projector = read_peft_adapter(checkpoint)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    pack_demo(model, out, lora=pairs, lora_scale=scale, projector=projector, lora_dtype=torch.float16,
              info={"twin": "stock", "probe_of": str(checkpoint), "step": state["global_step"]})


def quick_check(ship: Path, n: int) -> dict:
    from focusvlm.demo import data as D
    from focusvlm.demo.evaluate import evaluate
    from focusvlm.models.demo.load import load_demo

    model, processor = load_demo(ship)
    report = evaluate(model, processor, D.test_items(n, seed=1), batch_size=16, max_new_tokens=3)  # the recipe's check
    return {"n": report.n, "accuracy": report.accuracy,
            "per_type": {t: v["accuracy"] for t, v in report.per_type.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--base", type=Path, required=True, help="the run's untrained base model folder (RUN/base)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--check", type=int, default=200, help="easy-VQA questions of the quick check (0: none)")
    args = ap.parse_args()
    ship = args.out / "models" / "stock"
    if not (ship / META_FILE).is_file():
        pack(args.checkpoint, args.base, ship)
    if args.check:
        result = quick_check(ship, args.check)
        (args.out / "quick.json").write_text(json.dumps(result, indent=1))
        print("quick check:", json.dumps(result))
    arms = args.out / "arms"
    arms.mkdir(parents=True, exist_ok=True)
    for name in ("bench.jsonl", "if_questions.jsonl", "settings.json"):
        shutil.copy2(EXPERIMENT / name, arms / name)
    if not (arms / "lm-text").exists():
        shutil.copytree(EXPERIMENT / "lm-text", arms / "lm-text")
    return subprocess.call([sys.executable, "-m", "focusvlm.demo.experiment", "--out", str(arms),
                            "--models", str(args.out / "models"), "--arms", "text", "--no-progress"])


if __name__ == "__main__":
    sys.exit(main())
