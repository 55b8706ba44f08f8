"""Diagnostic (issue 31): how far a stage-2 checkpoint has moved the LM, before the stage ends. Packs a
Trainer checkpoint of `focusvlm train --lora` (LoRA + projector) onto the recipe's base model as a stock twin (or a
checkpoint of the whole model, when stage 2 trained the projector alone),
then runs the experiment's `text` arm (the VLM given the picture's true description as text, the same 400
paper16 prompts as the base LM's `lm-text` row; `--arms text,stock` adds the picture) and a quick easy-VQA check
(colour / shape / yes/no).

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

    state = json.loads((checkpoint / "trainer_state.json").read_text())
    info = {"twin": "stock", "probe_of": str(checkpoint), "step": state["global_step"]}
    model, _ = load_model(str(base), "cpu", torch.float32)
    if not (checkpoint / "adapter_config.json").is_file():  # no LoRA: the checkpoint is the whole model (LM frozen)
        from safetensors.torch import load_file

        state = load_file(str(checkpoint / "model.safetensors"))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any("multi_modal_projector" in k for k in missing):
            raise SystemExit(f"{checkpoint}: not this model's weights ({len(unexpected)} unexpected, missing {missing[:3]})")
        pack_demo(model, out, info=info)
        return
    pairs, scale, projector = read_peft_adapter(checkpoint)
    pack_demo(model, out, lora=pairs, lora_scale=scale, projector=projector, lora_dtype=torch.float16, info=info)


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
    ap.add_argument("--no-text", action="store_true", help="the quick check alone (no arm)")
    ap.add_argument("--arms", default="text", help="the experiment's arms to run on the pack (text: the LM kept?; "
                                                   "stock: the picture; comma-separated)")
    args = ap.parse_args()
    ship = args.out / "models" / "stock"
    if not (ship / META_FILE).is_file():
        pack(args.checkpoint, args.base, ship)
    if args.check:
        result = quick_check(ship, args.check)
        (args.out / "quick.json").write_text(json.dumps(result, indent=1))
        print("quick check:", json.dumps(result))
    if args.no_text:
        return 0
    arms = args.out / "arms"
    arms.mkdir(parents=True, exist_ok=True)
    # the prompts are rebuilt there (the same seeded 400, with image paths relative to that folder); the settings and
    # the base LM's finished row are the experiment's
    shutil.copy2(EXPERIMENT / "settings.json", arms / "settings.json")
    if not (arms / "lm-text").exists():
        shutil.copytree(EXPERIMENT / "lm-text", arms / "lm-text")
    return subprocess.call([sys.executable, "-m", "focusvlm.demo.experiment", "--out", str(arms),
                            "--models", str(args.out / "models"), "--arms", args.arms, "--no-progress"])


if __name__ == "__main__":
    sys.exit(main())
