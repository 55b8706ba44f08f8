"""Exploration (issue 31, 2026-12-06, second session; kept as it ran, from the repository root). The last lever
left by recipe_state/kl: a lower LoRA rate with the distillation term (weight 1, at the answer tokens as
``Recipe.text_distill`` takes it). Same stage 1 (runs/kl/stock/pretrain), same mixed data (runs/kl/kl_mix.json,
made by ../kl/kl_probe.py mix), same recipe settings as kl_probe.py train except the LM's LoRA rate.

    python benchmarks/demo/recipe_state/kl_all/kl_lowlr_probe.py runs/kl 5e-4 ftlow 300
"""
import json, sys
from dataclasses import replace
from pathlib import Path

from focusvlm.config import FocusConfig
from focusvlm.demo import recipe as R
from focusvlm.train import runner

W, LR = Path(sys.argv[1]), float(sys.argv[2])
OUT = W / (sys.argv[3] if len(sys.argv) > 3 else "ftlow")
STOP = int(sys.argv[4]) if len(sys.argv) > 4 else None
recipe = replace(R.DemoRecipe(bf16=True, text_distill=1.0), finetune_lr=LR)
files = json.loads((W / "data" / "easyvqa_manifest.json").read_text())["files"]
runner.train(stage="finetune", data=str(W / "kl_mix.json"), image_folder=files["image_folder"], output_dir=OUT,
             model=str(W / "stock" / "pretrain"), focus_config=FocusConfig(),
             overrides=R._stage_overrides(recipe, "finetune"), lora=True, progress=False,
             resume=R._checkpoint_in(OUT), stop_at_step=STOP)
