"""Training runs: model set-up, the transformers Trainer, saving.

``train(...)`` runs one LLaVA-1.5 stage with focusvlm's methods switched on:
the FocusConfig is applied with ``focusvlm.patch`` before training (so the
trained parts see what VMTC and CMAI change, and the processor emits the
compressed placeholder count), the transformers ``Trainer`` (with
accelerate; DeepSpeed/FSDP through the usual launch configs) trains, and the
output folder receives a stock, ``from_pretrained``-loadable model and
processor (saved unpatched) with ``focus_config.yaml`` beside them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import FocusConfig, patch, unpatch
from ..runtime import DEMO_NAMES
from .callbacks import LOSS_PNG, METRICS_FILE, MetricsCallback, ProgressCallback, StopAtStep, read_metrics
from .data import Collator, ModalityGroupedSampler, SupervisedDataset
from .formats import IGNORE_INDEX
from .recipe import Recipe, RecipeError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
FOCUS_CONFIG_FILE = "focus_config.yaml"
RECIPE_FILE = "recipe.yaml"
ADAPTER_DIR = "adapter"


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    samples: int
    skipped: int
    bad: int
    losses: list[float] = field(default_factory=list)
    runtime_s: float = 0.0


# --------------------------------------------------------------------------- model set-up

def load_model(model: str | None, vision: str | None, lm: str | None, dtype: torch.dtype, seed: int):
    """(model, processor), stock: the demo, a LLaVA checkpoint (hub id or folder), or vision + LM composed."""
    if model is not None and (vision or lm):
        raise ValueError("give either --model or --vision with --lm, not both")
    if model is None:
        if not (vision and lm):
            raise ValueError("stage 1 from scratch needs --vision and --lm (or --model to start from a LLaVA model)")
        from ..models.compose import compose_llava

        return compose_llava(vision, lm, dtype=dtype, seed=seed)
    if model in DEMO_NAMES:
        from ..models.demo.load import load_named_demo

        m, processor = load_named_demo(model)
        return _plain_weights(m.to(dtype)), processor
    from ..runtime import load_model

    m, processor = load_model(model, "cpu", dtype)  # the Trainer / accelerate place it afterwards
    return _plain_weights(m.train()), processor


def _plain_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Drop the GGUF marker a model keeps when its LM came from a GGUF file (the demo): transformers
    dequantizes GGUF weights on load, so they are ordinary float tensors, but the marker makes the Trainer
    refuse to train and would be saved into the trained model's config."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or str(getattr(method, "value", method)) != "gguf":
        return model
    model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None and hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
    return model


def parts(model: torch.nn.Module) -> dict[str, list[torch.nn.Module]]:
    """The LLaVA parts by role (projector, language model incl. lm_head, vision tower)."""
    core = model.model
    return {"projector": [core.multi_modal_projector], "lm": [core.language_model, model.lm_head],
            "vision": [core.vision_tower]}


def set_trainable(model: torch.nn.Module, projector: bool, lm: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    groups = parts(model)
    for name, on in (("projector", projector), ("lm", lm)):
        if on:
            for module in groups[name]:
                for p in module.parameters():
                    p.requires_grad_(True)


def lora_targets(model: torch.nn.Module) -> list[str]:
    """Full names of every Linear layer of the language model (LLaVA's LoRA targets; not the projector,
    the vision tower or lm_head)."""
    prefix = "model.language_model."
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefix)]
    if not names:
        raise RuntimeError("no Linear layer found in the language model for LoRA")
    return names


def wrap_lora(model: torch.nn.Module, recipe: Recipe):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("--lora needs peft: pip install 'focusvlm[train]'") from exc
    config = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                        target_modules=lora_targets(model), bias="none", task_type="CAUSAL_LM",
                        modules_to_save=["multi_modal_projector"] if recipe.train_projector else None)
    return get_peft_model(model, config)


def base_llava(model: torch.nn.Module) -> torch.nn.Module:
    """The LlavaForConditionalGeneration inside a PEFT / DDP / DeepSpeed wrapper."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


# --------------------------------------------------------------------------- trainer

def _trainer_class():
    from transformers import Trainer

    class FocusTrainer(Trainer):
        """Trainer with LLaVA-1.5's sampler (grouped by modality), a projector learning rate, and the
        vision path kept in every step's graph: a text-only batch runs the tower and projector on a blank
        image with weight 0 (as LLaVA-1.5 does), so the projector gets a zero gradient instead of none.
        Without it, one process's text-only batch would leave DDP / ZeRO-3 waiting for a gradient, and
        AdamW would skip the projector on text-only steps in 1 process but not in N."""

        def __init__(self, *args, recipe: Recipe, **kwargs):
            super().__init__(*args, **kwargs)
            self.recipe = recipe

        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if self.recipe.group_by_modality_length and isinstance(dataset, SupervisedDataset):
                group = self.args.train_batch_size * self.args.gradient_accumulation_steps * max(1, self.args.world_size)
                seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
                return ModalityGroupedSampler(dataset.lengths, dataset.has_image, group, seed)
            return super()._get_train_sampler(train_dataset)

        def create_optimizer(self, model=None):
            if self.recipe.projector_lr is None or self.optimizer is not None:
                return super().create_optimizer(model)
            opt_model = self.model if model is None else model
            param_groups = projector_param_groups(opt_model, set(self.get_decay_parameter_names(opt_model)),
                                                  self.args.weight_decay, self.recipe.projector_lr)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
            return self.optimizer

        def _save(self, output_dir=None, state_dict=None):
            """Checkpoints keep the module names as they are (save_original_format=False): transformers
            5.23 writes LLaVA weights under their legacy names by default, which the Trainer's own resume
            (a plain load_state_dict) does not map back, so a resumed run would silently keep its initial
            weights. The final model (``final_save``) is written in the default, legacy-compatible layout."""
            from transformers import PreTrainedModel

            model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            if getattr(self, "final_save", False) or not isinstance(model, PreTrainedModel):
                return super()._save(output_dir, state_dict)
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            if not self.args.should_save:
                return
            os.makedirs(output_dir, exist_ok=True)
            model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=True, save_original_format=False)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training and not return_outputs and self.label_smoother is None and self.compute_loss_func is None:
                inputs = supervised_logits_only(inputs)
            text = self._distilled_rows(model, inputs, return_outputs)
            if text is None:
                return self._task_loss(model, inputs, return_outputs, num_items_in_batch)
            loss, outputs = self._task_loss(model, inputs, True, num_items_in_batch)
            return loss + self.recipe.text_distill * self._text_distillation(model, inputs, text, outputs.logits,
                                                                              num_items_in_batch)

        def _distilled_rows(self, model, inputs, return_outputs) -> torch.Tensor | None:
            """The batch rows the distillation term covers (text-only samples), or None when it has none."""
            if not (self.recipe.text_distill and model.training and not return_outputs and "logits_to_keep" in inputs):
                return None
            text = ~(inputs["input_ids"] == self.train_dataset.image_token_id).any(dim=1)
            text &= inputs["logits_to_keep"].any(dim=1)
            return text if bool(text.any()) else None

        def _text_distillation(self, model, inputs, text, logits, num_items_in_batch) -> torch.Tensor:
            """KL(base LM || trained) summed over the text rows' supervised tokens, normalised as the Trainer
            normalises the task loss (by the supervised tokens of the whole optimizer step, when it counts them)."""
            keep = inputs["logits_to_keep"]
            student = logits[text[:, None].expand_as(keep)[keep]]  # the flat (token, vocab) logits, text rows only
            # through the wrapped model, as the task loss's forward: a sharding wrapper gathers what it shards
            # there (FSDP: its root unit's embeddings); disable_adapter only flips flags on the LoRA layers
            with torch.no_grad(), self.accelerator.unwrap_model(model).disable_adapter():
                reference = model(input_ids=inputs["input_ids"][text], attention_mask=inputs["attention_mask"][text],
                                  logits_to_keep=keep[text]).logits
            kl = distillation_kl(student, reference)
            if num_items_in_batch is None:
                return kl / keep.sum()
            scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            return kl * scale / num_items_in_batch

        def _task_loss(self, model, inputs, return_outputs, num_items_in_batch):
            if "pixel_values" in inputs:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            # text-only batch: the keep-alive term is added by a forward hook, i.e. inside the wrapped
            # model's forward. FSDP gathers the root unit's parameters (the vision embeddings, the
            # projector) only there; a tower call after the forward saw its flat 1-D shards
            # ("weight should have at least three dimensions")
            hook = base_llava(model).register_forward_hook(_add_vision_keepalive)
            try:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            finally:
                hook.remove()

    return FocusTrainer


def projector_param_groups(model: torch.nn.Module, decay: set[str], weight_decay: float,
                           projector_lr: float) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: (projector or not) x (decayed or not), the projector's at its own
    learning rate (LLaVA-1.5's ``mm_projector_lr``); frozen parameters left out."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(("multi_modal_projector" in name, name in decay), []).append(p)
    param_groups = []
    for (is_projector, decays), params in groups.items():
        group = {"params": params, "weight_decay": weight_decay if decays else 0.0}
        if is_projector:
            group["lr"] = projector_lr
        param_groups.append(group)
    return param_groups


def distillation_kl(student_logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """sum over positions of KL(p_reference || p_student), each p the softmax of a (positions, vocab) row, in
    float32; no gradient flows into the reference."""
    reference = torch.log_softmax(reference_logits.detach().float(), dim=-1)
    student = torch.log_softmax(student_logits.float(), dim=-1)
    return torch.nn.functional.kl_div(student, reference, log_target=True, reduction="sum")


def supervised_logits_only(inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` plus what makes the model project only the supervised positions onto the vocabulary.

    A VLM training sample is mostly image and prompt tokens (576+ image tokens per LLaVA-1.5 image) with
    a short supervised answer, yet the stock forward computes logits at every position: a
    (batch x length x vocab) tensor, its float copy for the loss and their gradients. transformers' own
    arguments avoid that: ``logits_to_keep`` as a boolean (batch, length) mask projects only the positions
    whose next token is supervised, and ``shift_labels`` (flat, in the same order) are their targets, so
    the causal-LM loss is the same sum over the same tokens and divisor (``num_items_in_batch`` untouched)
    and so are the gradients; only the ignored positions' logits are not computed.
    """
    labels = inputs.get("labels")
    if labels is None or "logits_to_keep" in inputs:
        return inputs
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    keep = shifted != IGNORE_INDEX
    if not bool(keep.any()):  # nothing supervised: the stock path gives its usual (nan) loss
        return inputs
    return {**inputs, "logits_to_keep": keep, "shift_labels": shifted[keep]}


def _add_vision_keepalive(module: torch.nn.Module, args: Any, output: Any) -> Any:
    """Forward hook on the LLaVA model for a text-only batch: its loss plus 0 x the vision path."""
    loss = getattr(output, "loss", None)
    if loss is not None:
        output.loss = loss + 0.0 * _vision_keepalive(module, loss.device)
    return output


def _vision_keepalive(model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """The vision path on one blank image, summed: a zero-weight term that gives every process the
    same graph (and the projector a zero gradient) when its batch has no image."""
    core = model.model
    vc = core.config.vision_config
    dtype = next(core.vision_tower.parameters()).dtype
    pixels = torch.zeros(1, 3, vc.image_size, vc.image_size, device=device, dtype=dtype)
    out = core.get_image_features(pixel_values=pixels)
    feats = getattr(out, "pooler_output", out)
    if isinstance(feats, (list, tuple)):
        return sum(f.float().sum() for f in feats)
    return feats.float().sum()


def _deepspeed_path(value: str | None) -> str | None:
    if not value:
        return None
    shipped = CONFIG_DIR / f"{value}.json"
    if shipped.is_file():
        return str(shipped)
    if not Path(value).is_file():
        raise RecipeError(f"Recipe.deepspeed: no such file {value!r} (shipped: zero2, zero3, zero3_offload)")
    return value


def _fsdp_renames_modules(trainer) -> bool:
    """Whether the run's FSDP wraps modules under new names: FSDP1's units, FSDP's activation checkpointing."""
    if not trainer.is_fsdp_enabled:
        return False
    plugin = trainer.accelerator.state.fsdp_plugin
    return int(getattr(plugin, "fsdp_version", 1) or 1) == 1 or bool(getattr(plugin, "activation_checkpointing", False))


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _fsdp_launch() -> bool:
    """Launched by ``accelerate launch`` with an FSDP config (the flag accelerate's own FSDP plugin reads)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def training_arguments(recipe: Recipe, output_dir: Path, cuda: bool, world_size: int):
    from transformers import TrainingArguments

    bf16 = recipe.bf16 if recipe.bf16 is not None else bool(cuda and torch.cuda.is_bf16_supported())
    tf32 = recipe.tf32 if recipe.tf32 is not None else (True if cuda else None)
    workers = recipe.dataloader_num_workers if recipe.dataloader_num_workers is not None else (4 if cuda else 0)
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=recipe.per_device_batch_size,
        gradient_accumulation_steps=recipe.gradient_accumulation(world_size),
        learning_rate=recipe.learning_rate,
        num_train_epochs=recipe.epochs,
        max_steps=recipe.max_steps,
        lr_scheduler_type=recipe.lr_scheduler,
        warmup_steps=recipe.warmup_ratio,
        weight_decay=recipe.weight_decay,
        bf16=bf16,
        tf32=tf32,
        activation_checkpointing=recipe.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if recipe.gradient_checkpointing else None,
        logging_steps=recipe.logging_steps,
        save_strategy="steps",
        save_steps=recipe.save_steps,
        save_total_limit=recipe.save_total_limit,
        seed=recipe.seed,
        train_sampling_strategy="random" if recipe.shuffle else "sequential",
        report_to=recipe.report_to,
        deepspeed=_deepspeed_path(recipe.deepspeed),
        dataloader_num_workers=workers,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        use_cpu=not cuda,
        ddp_find_unused_parameters=False,
    )


# --------------------------------------------------------------------------- the run

def train(*, stage: str, data: str | Path, output_dir: str | Path, image_folder: str | Path | None = None,
          model: str | None = None, vision: str | None = None, lm: str | None = None,
          focus_config: FocusConfig | str | Path | None = None, recipe: Recipe | None = None,
          recipe_file: str | Path | None = None, overrides: dict[str, Any] | None = None, lora: bool = False,
          resume: str | bool | None = None, callbacks: Sequence[Any] = (), progress: bool = True,
          stop_at_step: int | None = None) -> TrainResult:
    """Run one training stage; see ``focusvlm train --help`` and docs/training.md.

    ``resume``: a checkpoint folder, or True for the newest checkpoint in ``output_dir``.
    """
    started = time.perf_counter()
    output_dir = Path(output_dir)
    if recipe is None:
        recipe = Recipe.build(stage, lora=lora, file=recipe_file, overrides=overrides)
    elif recipe.stage != stage:
        raise RecipeError(f"Recipe.stage is {recipe.stage!r} but stage is {stage!r}")
    if isinstance(focus_config, (str, Path)):
        focus_config = FocusConfig.load(focus_config)
    focus_config = focus_config or FocusConfig()
    world = _world_size()
    args = training_arguments(recipe, output_dir, torch.cuda.is_available(), world)  # fails early on a bad batch split
    output_dir.mkdir(parents=True, exist_ok=True)

    net, processor = _trainable_model(model, vision, lm, recipe, args)
    image_token_id = net.config.image_token_id
    handle = None if focus_config.is_stock else patch(net, focus_config, processor=processor)
    if recipe.lora:
        # peft draws the adapters' initial weights from torch's global generator, which nothing had seeded
        # yet: without this, two runs of one recipe (or two ranks of one run) started from different adapters
        torch.manual_seed(recipe.seed)
    trained = wrap_lora(net, recipe) if recipe.lora else net

    dataset = SupervisedDataset(data, image_folder, processor, image_token_id, recipe.format, recipe.max_length,
                                pad_square=recipe.pad_to_square, skip_bad=recipe.skip_bad,
                                progress=progress and _is_main(), skipped_log=output_dir / "skipped.jsonl")
    if _is_main():
        _write_run_record(output_dir, recipe, focus_config, args, world, dataset, trained,
                          {"model": model, "vision": vision, "lm": lm, "data": str(data),
                           "image_folder": str(image_folder) if image_folder else None})

    trainer = _make_trainer(trained, args, dataset, processor.tokenizer, recipe, output_dir, progress, stop_at_step,
                            callbacks)
    if recipe.lora and _fsdp_renames_modules(trainer):
        # peft 0.21 picks the adapter's tensors by module name, and these wrappers put `_fsdp_wrapped_module.` or
        # `_checkpoint_wrapped_module.` into the names (the Trainer wraps every LoRA layer): the adapter such a run
        # saved held the projector and no LoRA weight (measured, 2 CPU processes). Refused before training.
        raise RecipeError("LoRA under FSDP needs fsdp_version 2 with fsdp_activation_checkpointing false (use "
                          "--gradient-checkpointing instead): FSDP1 and FSDP's activation checkpointing rename the "
                          "modules, and the adapter is then saved without its LoRA weights; DeepSpeed and DDP work too")
    if resume is True:
        resume = _latest_checkpoint(output_dir)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    stopped_early = stop_at_step is not None and trainer.state.global_step < trainer.state.max_steps
    if not stopped_early:
        save_final(trainer, net, processor, handle, recipe, output_dir)
    return _finish(trainer, dataset, output_dir, started, stopped_early)


def _trainable_model(model: str | None, vision: str | None, lm: str | None, recipe: Recipe, args: Any):
    """(model, processor) loaded in the run's dtype, its trainable parts chosen (and in fp32 where they need it)."""
    # weights: bf16 when training in bf16 on a GPU; trainable parts in fp32 unless DeepSpeed or FSDP keeps
    # master copies. FSDP (accelerate launch with an FSDP config) must get one dtype: it flattens frozen and
    # trainable weights of a unit together ("Must flatten tensors with uniform dtype but got torch.bfloat16
    # and torch.float32") and accelerate upcasts the flat shards to fp32 itself
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    net, processor = load_model(model, vision, lm, dtype, recipe.seed)
    set_trainable(net, projector=recipe.train_projector, lm=recipe.train_lm and not recipe.lora)
    if dtype != torch.float32 and not args.deepspeed and not _fsdp_launch():
        for p in net.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    tokenizer = processor.tokenizer  # the collator pads on the right itself; the saved processor is left as it was
    if tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", "<image>")) != net.config.image_token_id:
        raise ValueError("the processor's image token does not match the model's image_token_id")
    return net, processor


def _write_run_record(output_dir: Path, recipe: Recipe, focus_config: FocusConfig, args: Any, world: int,
                      dataset: SupervisedDataset, trained: torch.nn.Module, sources: dict[str, Any]) -> None:
    """The skipped records, the recipe as run (with what it ran on) and the focus config; a one-line summary."""
    dataset.skipped.write(output_dir)
    recipe.save(output_dir / RECIPE_FILE, extra={
        "world_size": world, "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "bf16": args.bf16, "deepspeed": args.deepspeed, **sources,
        "image_tokens_per_image": dataset.per_image, "samples": len(dataset),
        "skipped_bad": dataset.bad, "skipped_unsupervised": dataset.unsupervised})
    focus_config.save(output_dir / FOCUS_CONFIG_FILE)
    print(f"focusvlm train: {len(dataset)} samples, {dataset.bad} bad skipped, {dataset.unsupervised} without "
          f"a supervised token skipped (listed in {output_dir / 'skipped.jsonl'}); {dataset.per_image} "
          f"tokens per image; trainable parameters: {_count_trainable(trained):,}", file=sys.stderr)


def _make_trainer(trained: torch.nn.Module, args: Any, dataset: SupervisedDataset, tokenizer: Any, recipe: Recipe,
                  output_dir: Path, progress: bool, stop_at_step: int | None, callbacks: Sequence[Any]):
    from transformers import PrinterCallback

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = _trainer_class()(model=trained, args=args, train_dataset=dataset, data_collator=Collator(pad_id),
                               recipe=recipe)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(MetricsCallback(output_dir))
    trainer.add_callback(ProgressCallback(enabled=progress))
    if stop_at_step:
        trainer.add_callback(StopAtStep(stop_at_step))
    for cb in callbacks:
        trainer.add_callback(cb)
    return trainer


def _finish(trainer: Any, dataset: SupervisedDataset, output_dir: Path, started: float,
            stopped_early: bool) -> TrainResult:
    """The run's TrainResult, also written as ``train_summary.json`` (by the main process)."""
    metrics = read_metrics(output_dir / METRICS_FILE) if (output_dir / METRICS_FILE).is_file() else []
    result = TrainResult(output_dir, trainer.state.global_step, len(dataset), dataset.bad + dataset.unsupervised,
                         dataset.bad, [m["loss"] for m in metrics], time.perf_counter() - started)
    if _is_main():
        (output_dir / "train_summary.json").write_text(json.dumps({
            "steps": result.steps, "samples": result.samples, "skipped": result.skipped, "bad": result.bad,
            "final_loss": result.losses[-1] if result.losses else None, "runtime_s": round(result.runtime_s, 1),
            "complete": not stopped_early, "loss_curve": LOSS_PNG}, indent=2))
    return result


def save_final(trainer, net, processor, handle, recipe: Recipe, output_dir: Path) -> None:
    """The stock model (unpatched) and processor, plus the adapter with LoRA."""
    if handle is not None:
        unpatch(net, processor)
    trainer.final_save = True
    if recipe.lora:
        trainer.save_model(str(output_dir / ADAPTER_DIR))  # the adapter (+ the fully trained projector)
        if recipe.merge_lora:
            zero3 = trainer.is_deepspeed_enabled and getattr(trainer.args, "hf_deepspeed_config", None) and \
                trainer.args.hf_deepspeed_config.is_zero3()
            if zero3 or trainer.is_fsdp_enabled:  # the weights are sharded: merge from the saved adapter instead
                if trainer.is_world_process_zero():
                    print(f"focusvlm train: LoRA under {'ZeRO-3' if zero3 else 'FSDP'}: merge the adapter with "
                          "`focusvlm train --merge-lora` after training", file=sys.stderr)
            else:
                merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
                if trainer.is_world_process_zero():
                    merged.save_pretrained(str(output_dir))
    else:
        trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        processor.save_pretrained(str(output_dir))


def merge_lora(base: str, adapter: str | Path, output_dir: str | Path) -> Path:
    """Merge a saved adapter into its base model and save the full model + processor."""
    from peft import PeftModel

    net, processor = load_model(base, None, None, torch.float32, 0)
    merged = PeftModel.from_pretrained(net, str(adapter)).merge_and_unload()
    out = Path(output_dir)
    merged.save_pretrained(out)
    processor.save_pretrained(out)
    src = Path(adapter).parent / FOCUS_CONFIG_FILE
    if src.is_file() and not (out / FOCUS_CONFIG_FILE).is_file():
        (out / FOCUS_CONFIG_FILE).write_text(src.read_text())
    return out


def _latest_checkpoint(output_dir: Path) -> Path | None:
    from ..hfcompat import last_checkpoint

    last = last_checkpoint(output_dir) if output_dir.is_dir() else None
    if last is None:
        raise FileNotFoundError(f"--resume: no checkpoint-* folder in {output_dir}")
    return Path(last)


def _count_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
