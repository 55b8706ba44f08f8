"""Exploration (issue 31, 2026-12-06, second session; kept as it ran, from the repository root). The first lever
left by recipe_state/kl: the distillation term at *every* position of the text-only records (the prompt's
tokens too: the description, the question, the formatting request), not only at their answer tokens.

Same stage 1 (runs/kl/stock/pretrain), the same mixed data (runs/kl/kl_mix.json, made by kl_probe.py mix) and the
same recipe settings as kl_probe.py train; the only change: for a text-only row the trainer projects every
attended position onto the vocabulary (its task loss still counts only the answer tokens: the other positions'
targets are ignored), so ``Recipe.text_distill``'s KL covers the whole record.

    python benchmarks/demo/recipe_state/kl_all/kl_all_probe.py runs/kl 1.0 ftall 300
"""
import json, sys
from pathlib import Path

import torch

from focusvlm.config import FocusConfig
from focusvlm.demo import recipe as R
from focusvlm.train import runner

W, WEIGHT = Path(sys.argv[1]), float(sys.argv[2])
OUT = W / (sys.argv[3] if len(sys.argv) > 3 else "ftall")
STOP = int(sys.argv[4]) if len(sys.argv) > 4 else None
IMAGE_TOKEN = json.loads((W / "stock" / "pretrain" / "config.json").read_text())["image_token_index"]
answers_only = runner.supervised_logits_only


def every_text_position(inputs):
    """runner.supervised_logits_only, but a text-only row keeps every attended position (targets ignored where
    unsupervised), so the distillation term sees the whole record."""
    out = answers_only(inputs)
    if "shift_labels" not in out or "logits_to_keep" in inputs:
        return out
    labels = inputs["labels"]
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    text = ~(inputs["input_ids"] == IMAGE_TOKEN).any(dim=1)
    keep = shifted != -100
    keep |= text[:, None] & inputs["attention_mask"].bool()
    return {**out, "logits_to_keep": keep, "shift_labels": shifted[keep]}


runner.supervised_logits_only = every_text_position
recipe = R.DemoRecipe(bf16=True, text_distill=WEIGHT)
files = json.loads((W / "data" / "easyvqa_manifest.json").read_text())["files"]
runner.train(stage="finetune", data=str(W / "kl_mix.json"), image_folder=files["image_folder"], output_dir=OUT,
             model=str(W / "stock" / "pretrain"), focus_config=FocusConfig(),
             overrides=R._stage_overrides(recipe, "finetune"), lora=True, progress=False,
             resume=R._checkpoint_in(OUT), stop_at_step=STOP)
