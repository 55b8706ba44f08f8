"""Exploration (issue 31, 2026-12-05, fifth session; kept as it ran, from the repository root): does the LM keep its
instruction following when stage 2 moves the projector more and the LM less? runs/r3's stage 2 (short answers, its
own mix and 900-step cosine schedule) with LoRA at 2e-4 instead of 2e-3 and the projector at 1e-3 instead of 1e-4,
stopped at step 100 (the default lost the LM's IF by step 75: checkpoint_probe.py on r3's checkpoint-75).

    python low_lora_lr_probe.py /tmp/lowlr 100
    python benchmarks/demo/checkpoint_probe.py /tmp/lowlr/ft/checkpoint-100 --base runs/r3/base --out /tmp/lowlr/p100
"""
import json, sys
from pathlib import Path
from focusvlm.config import FocusConfig
from focusvlm.demo import recipe as R
from focusvlm.train.runner import train

W = Path(sys.argv[1])
rec = R.DemoRecipe(bf16=False, finetune_lr=2e-4, projector_lr=1e-3)
files = json.load(open("runs/r3/data/easyvqa_manifest.json"))["files"]
train(stage="finetune", data="runs/r3/data/stage2_mix.json", image_folder=files["image_folder"], output_dir=W / "ft",
      model="runs/r3/stock/pretrain", focus_config=FocusConfig(), overrides=R._stage_overrides(rec, "finetune"),
      lora=True, progress=False, resume=R._checkpoint_in(W / "ft"), stop_at_step=int(sys.argv[2]))
