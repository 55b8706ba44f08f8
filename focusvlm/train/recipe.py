"""The training recipe: LLaVA-1.5's settings per stage, overridable field by field.

Precedence, lowest first: the stage's defaults, the LoRA defaults (with
``lora: true``), a recipe file (``--recipe file.yaml``), command-line flags.
The resolved recipe, with the derived gradient accumulation, is written to
the output folder as ``recipe.yaml``.

Global batch = per-device batch x gradient accumulation x processes; the
accumulation is derived from the global batch and must divide exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("pretrain", "finetune")

# LLaVA-1.5's public scripts (scripts/v1_5/pretrain.sh, finetune.sh, finetune_lora.sh) and README tables
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "pretrain": dict(format="plain", learning_rate=1e-3, global_batch_size=256, per_device_batch_size=32,
                     train_lm=False, pad_to_square=False, group_by_modality_length=False),
    "finetune": dict(format="vicuna_v1", learning_rate=2e-5, global_batch_size=128, per_device_batch_size=16,
                     train_lm=True, pad_to_square=True, group_by_modality_length=True),
}
LORA_DEFAULTS: dict[str, Any] = dict(learning_rate=2e-4, projector_lr=2e-5)


class RecipeError(ValueError):
    """A recipe value is invalid; the message names the field."""


@dataclass
class Recipe:
    stage: str = "finetune"
    format: str = "vicuna_v1"               # plain | vicuna_v1 | chat_template
    learning_rate: float = 2e-5
    projector_lr: float | None = None       # own learning rate for the projector (None: learning_rate)
    global_batch_size: int = 128
    per_device_batch_size: int = 16
    epochs: float = 1.0
    max_steps: int = -1                     # > 0 overrides epochs
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_length: int = 2048
    pad_to_square: bool = True              # pad images to a square with the image mean (LLaVA-1.5 "pad")
    bf16: bool | None = None                # None: on when a CUDA GPU supports it
    tf32: bool | None = None                # None: on with CUDA
    gradient_checkpointing: bool = True
    group_by_modality_length: bool = True
    # False: each step takes the next records of the data file in its order (a curriculum written into the
    # file); TrainingArguments' sequential sampling. Excludes group_by_modality_length, which reorders
    shuffle: bool = True
    train_projector: bool = True
    train_lm: bool = True
    lora: bool = False
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    merge_lora: bool = True                 # also save the merged full model (the adapter is always saved)
    # > 0 (LoRA only): on the batch's text-only samples, add this weight x the KL divergence from the LM without
    # its adapters (the base LM) to the trained one at every supervised token, so that the LoRA learns the
    # image answers without moving what the LM does on text alone (self-distillation; the base is the same
    # weights with the adapters switched off, so it costs one no-grad forward of the text rows, no second model)
    text_distill: float = 0.0
    seed: int = 42
    save_steps: int = 500
    save_total_limit: int = 1
    logging_steps: int = 1
    dataloader_num_workers: int | None = None   # None: 4 with CUDA, 0 on CPU
    report_to: list[str] = field(default_factory=lambda: ["none"])
    deepspeed: str | None = None            # a DeepSpeed JSON config (or a shipped name: zero2, zero3)
    skip_bad: bool = False

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, stage: str, lora: bool = False, file: str | Path | dict | None = None,
              overrides: dict[str, Any] | None = None) -> "Recipe":
        if stage not in STAGES:
            raise RecipeError(f"Recipe.stage: unknown stage {stage!r}; use {' or '.join(STAGES)}")
        values: dict[str, Any] = {"stage": stage, **STAGE_DEFAULTS[stage]}
        from_file = _load(file) if file is not None else {}
        lora = bool(from_file.get("lora", lora)) if (overrides or {}).get("lora") is None else bool(overrides["lora"])
        if lora:
            values.update(LORA_DEFAULTS)
        values.update(from_file)
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        values["lora"] = lora
        if values.get("stage") != stage:
            raise RecipeError(f"Recipe.stage: the recipe file says {values.get('stage')!r} but --stage is {stage!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise RecipeError(f"Recipe: unknown field(s) {unknown}; known: {sorted(names)}")
        if isinstance(values.get("report_to"), str):
            values["report_to"] = [s.strip() for s in values["report_to"].split(",") if s.strip()]
        recipe = cls(**values)
        recipe.check()
        return recipe

    def check(self) -> None:
        from .formats import FORMATS

        def bad(name: str, problem: str) -> None:
            raise RecipeError(f"Recipe.{name}: {problem}")

        if self.format not in FORMATS:
            bad("format", f"unknown format {self.format!r}; use one of {', '.join(FORMATS)}")
        for name in ("learning_rate", "epochs"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                bad(name, f"must be a positive number, got {getattr(self, name)!r}")
        if self.projector_lr is not None and (not isinstance(self.projector_lr, (int, float)) or self.projector_lr <= 0):
            bad("projector_lr", f"must be a positive number or null, got {self.projector_lr!r}")
        for name in ("global_batch_size", "per_device_batch_size", "max_length", "lora_r", "save_steps",
                     "logging_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(name, f"must be a positive integer, got {value!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            bad("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio!r}")
        if self.weight_decay < 0:
            bad("weight_decay", f"must be >= 0, got {self.weight_decay!r}")
        if not (self.train_projector or self.train_lm or self.lora):
            bad("train_projector", "nothing to train: train_projector, train_lm and lora are all off")
        if not self.shuffle and self.group_by_modality_length:
            bad("shuffle", "in-order batches (shuffle: false) exclude group_by_modality_length, which reorders "
                           "the data; turn that off too")
        if not isinstance(self.text_distill, (int, float)) or self.text_distill < 0:
            bad("text_distill", f"must be a number >= 0, got {self.text_distill!r}")
        if self.text_distill and not self.lora:
            bad("text_distill", "the distillation's reference is the LM with its LoRA adapters switched off: it needs "
                                "lora: true")
        if self.lora and self.stage != "finetune":
            bad("lora", "LoRA is a stage-2 (finetune) option")

    # ------------------------------------------------------------------ derived values
    def gradient_accumulation(self, world_size: int) -> int:
        per_step = self.per_device_batch_size * max(1, world_size)
        if self.global_batch_size % per_step:
            raise RecipeError(
                f"Recipe.global_batch_size: {self.global_batch_size} is not a multiple of per-device batch "
                f"{self.per_device_batch_size} x {world_size} process(es) = {per_step}; change "
                "--per-device-batch-size or --global-batch-size")
        return self.global_batch_size // per_step

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        import yaml

        data = self.to_dict()
        if extra:
            data["resolved"] = extra
        Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def _load(file: str | Path | dict) -> dict[str, Any]:
    if isinstance(file, dict):
        return dict(file)
    import yaml

    path = Path(file)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())  # JSON is YAML too
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML/JSON: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: the top level must be a mapping of recipe fields")
    data.pop("resolved", None)  # a recipe.yaml written by a previous run can be reused as is
    return data
