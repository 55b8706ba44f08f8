"""Exploration (issue 31, 2026-12-05, fifth session; kept as it ran, from the repository root): stage 2 with the LM
frozen (no LoRA; the projector alone trained, on runs/r3's short-answer mix and schedule). The LM is then the base
LM bit for bit, so the text arm is the base LM's own; the question is whether the projector alone (256 image tokens
acting as a learned prefix) teaches the frozen LM the easy-VQA answers.

    python frozen_lm_probe.py /tmp/frozen 100 1e-3     # output dir, stop step, projector rate
    python benchmarks/demo/checkpoint_probe.py /tmp/frozen/ft/checkpoint-100 --base runs/r3/base --out /tmp/frozen/p100
"""
import json, sys
from pathlib import Path
from focusvlm.config import FocusConfig
from focusvlm.demo import recipe as R
from focusvlm.train.runner import train

W, stop, lr = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
rec = R.DemoRecipe(bf16=False)
overrides = {k: v for k, v in R._stage_overrides(rec, "finetune").items() if not k.startswith("lora_")}
overrides.update({"train_lm": False, "learning_rate": lr, "projector_lr": lr, "merge_lora": False})
files = json.load(open("runs/r3/data/easyvqa_manifest.json"))["files"]
train(stage="finetune", data="runs/r3/data/stage2_mix.json", image_folder=files["image_folder"], output_dir=W / "ft",
      model="runs/r3/stock/pretrain", focus_config=FocusConfig(), overrides=overrides, lora=False, progress=False,
      resume=R._checkpoint_in(W / "ft"), stop_at_step=stop)
