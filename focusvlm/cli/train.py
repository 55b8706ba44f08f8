"""`focusvlm train`: LLaVA-1.5's two training stages with VMTC / CMAI switched on; `--validate` scans data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BOOL = argparse.BooleanOptionalAction
# --recipe names that run focusvlm.demo.recipe (any other --recipe is a file of recipe fields)
DEMO_RECIPES = ("demo", "demo-frozen-lm")

# flag -> recipe field (every one of them overrides the stage default and the --recipe file)
RECIPE_FLAGS = {
    "format": "format", "lr": "learning_rate", "projector_lr": "projector_lr",
    "global_batch_size": "global_batch_size", "per_device_batch_size": "per_device_batch_size",
    "epochs": "epochs", "max_steps": "max_steps", "lr_scheduler": "lr_scheduler", "warmup_ratio": "warmup_ratio",
    "weight_decay": "weight_decay", "max_length": "max_length", "pad_to_square": "pad_to_square", "bf16": "bf16",
    "gradient_checkpointing": "gradient_checkpointing", "group_by_modality_length": "group_by_modality_length",
    "shuffle": "shuffle",
    "train_lm": "train_lm", "lora_r": "lora_r", "lora_alpha": "lora_alpha", "merge_lora": "merge_lora",
    "text_distill": "text_distill",
    "seed": "seed", "save_steps": "save_steps", "num_workers": "dataloader_num_workers",
    "report_to": "report_to", "deepspeed": "deepspeed", "skip_bad": "skip_bad",
}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train LLaVA-1.5 (stage 1 pretrain / stage 2 finetune) with VMTC/CMAI on",
        description="Run one of LLaVA-1.5's training stages with focusvlm's methods switched on (--config). "
                    "Defaults are LLaVA-1.5's recipe for the stage; every value can be overridden by a flag or a "
                    "--recipe file. Multi-GPU: accelerate launch --config_file <shipped config> -m focusvlm train "
                    "... (see docs/training.md).")
    p.add_argument("--stage", choices=["pretrain", "finetune"], help="LLaVA-1.5 stage 1 or 2")
    src = p.add_argument_group("model")
    src.add_argument("--model", help="start from a LLaVA checkpoint (hub id or folder, e.g. a stage-1 output) or "
                                     "'demo' (the embedded model)")
    src.add_argument("--vision", help="stage 1 from scratch: the CLIP vision tower (hub id or folder)")
    src.add_argument("--lm", help="stage 1 from scratch: the language model (hub id or folder)")
    src.add_argument("--config", type=Path, help="FocusConfig (YAML/JSON) applied before training and saved with "
                                                 "the model as focus_config.yaml")
    data = p.add_argument_group("data")
    data.add_argument("--data", type=Path, help="LLaVA JSON (list) or JSONL file")
    data.add_argument("--image-folder", type=Path, help="folder the records' image paths are relative to")
    data.add_argument("--skip-bad", action="store_true", default=None,
                      help="skip bad samples instead of stopping; each one is listed in OUTPUT/skipped.jsonl")
    data.add_argument("--validate", action="store_true",
                      help="only scan --data (every record and image; tokens too with --model) and write a report")
    data.add_argument("--report", type=Path, help="--validate: report file (default OUTPUT/validate_report.json "
                                                  "or ./validate_report.json)")
    r = p.add_argument_group("recipe (defaults: LLaVA-1.5's for the stage)")
    r.add_argument("--recipe", type=Path, help="YAML/JSON file of recipe fields (a previous run's recipe.yaml works); "
                                               "'demo': the whole demo-model recipe (tower pretraining, both stages "
                                               "of both twins on easy-VQA, packing; resumable) into --output-dir "
                                               "(default runs/demo-model); 'demo-frozen-lm': the same with "
                                               "the LM frozen in stage 2 (the projector alone learns)")
    r.add_argument("--lora", action="store_true", default=None,
                   help="stage 2 with LoRA (r 128, alpha 256, lr 2e-4, projector lr 2e-5, projector fully trained)")
    r.add_argument("--format", choices=["plain", "vicuna_v1", "chat_template"],
                   help="conversation format (default: plain for pretrain, vicuna_v1 for finetune; "
                        "chat_template = the processor's own, e.g. for --model demo)")
    r.add_argument("--lr", type=float, help="learning rate")
    r.add_argument("--projector-lr", type=float, help="own learning rate for the projector")
    r.add_argument("--global-batch-size", type=int, help="samples per optimizer step, all processes together")
    r.add_argument("--per-device-batch-size", type=int, help="samples per forward on one process "
                                                             "(gradient accumulation is derived)")
    r.add_argument("--epochs", type=float)
    r.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    r.add_argument("--lr-scheduler", help="cosine (default), linear, constant, ...")
    r.add_argument("--warmup-ratio", type=float)
    r.add_argument("--weight-decay", type=float)
    r.add_argument("--max-length", type=int, help="tokens per sample incl. image tokens; longer text is truncated")
    r.add_argument("--pad-to-square", action=BOOL, help="pad images to a square with the image mean")
    r.add_argument("--bf16", action=BOOL, help="bf16 mixed precision (default: on with a CUDA GPU)")
    r.add_argument("--gradient-checkpointing", action=BOOL)
    r.add_argument("--group-by-modality-length", action=BOOL, help="image-only / text-only optimizer steps")
    r.add_argument("--shuffle", action=BOOL, help="--no-shuffle: batches follow the data file's order (a curriculum)")
    r.add_argument("--train-lm", action=BOOL, help="train the language model too (default: stage 2 only)")
    r.add_argument("--lora-r", type=int)
    r.add_argument("--lora-alpha", type=int)
    r.add_argument("--text-distill", type=float, metavar="WEIGHT",
                   help="with --lora: add WEIGHT x the KL divergence from the LM without its adapters on the text-only "
                        "samples (keeps the LM's own behaviour on text; default 0, off)")
    r.add_argument("--merge-lora-weights", dest="merge_lora", action=BOOL,
                   help="with --lora, also save the merged full model (default on)")
    r.add_argument("--seed", type=int)
    r.add_argument("--save-steps", type=int, help="checkpoint every N optimizer steps (the last one is kept)")
    r.add_argument("--num-workers", type=int, help="data loader workers (default: 4 with CUDA, 0 on CPU)")
    r.add_argument("--report-to", help="tensorboard, wandb, ... (comma-separated; default none)")
    r.add_argument("--deepspeed", help="DeepSpeed config: zero2, zero3, zero3_offload (shipped) or a JSON file")
    run = p.add_argument_group("run")
    run.add_argument("--output-dir", type=Path, help="where the model, processor, focus_config.yaml, recipe.yaml, "
                                                     "metrics.jsonl, loss.png and checkpoints go")
    run.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                     help="continue from the newest checkpoint in --output-dir (or the one given)")
    run.add_argument("--merge-lora", type=Path, metavar="ADAPTER",
                     help="only merge a saved LoRA adapter (OUTPUT/adapter) into --model and save to --output-dir")
    run.add_argument("--make-demo-data", type=Path, metavar="DIR",
                     help="only write a tiny LLaVA-format data set from the bundled photos (captions.json, "
                          "instruct.json, questions.jsonl, images/) for the CPU end-to-end run")
    run.add_argument("--copy-configs", type=Path, metavar="DIR",
                     help="only copy the shipped accelerate / DeepSpeed / FSDP configs to DIR (launch from DIR's "
                          "parent: the accelerate files name configs/zero*.json)")
    run.add_argument("--ship", action="store_true",
                     help="with --recipe demo: copy the packed weights into the package (what --model demo loads)")
    run.add_argument("--demo-quick", action="store_true", help=argparse.SUPPRESS)  # a few steps of each (tests)
    run.add_argument("--stop-at-step", type=int, help=argparse.SUPPRESS)
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.make_demo_data:
        from ..train.demo_data import write_demo_data

        for name, path in write_demo_data(args.make_demo_data).items():
            print(f"{name}: {path}")
        return 0
    if args.copy_configs:
        import shutil

        from ..train.runner import CONFIG_DIR

        shutil.copytree(CONFIG_DIR, args.copy_configs, dirs_exist_ok=True)
        for f in sorted(Path(args.copy_configs).iterdir()):
            print(f)
        return 0
    if args.recipe is not None and str(args.recipe) in DEMO_RECIPES:
        return _demo_recipe(args)
    if args.validate:
        return _validate(args)
    if args.merge_lora:
        from ..train import merge_lora

        if not (args.model and args.output_dir):
            raise ValueError("--merge-lora needs --model (the base) and --output-dir")
        out = merge_lora(args.model, args.merge_lora, args.output_dir)
        print(f"merged model written to {out}", file=sys.stderr)
        return 0
    missing = [flag for flag, value in (("--stage", args.stage), ("--data", args.data),
                                         ("--output-dir", args.output_dir)) if value is None]
    if missing:
        raise ValueError(f"training needs {', '.join(missing)}")
    from ..train import train

    overrides = {field: getattr(args, flag) for flag, field in RECIPE_FLAGS.items() if getattr(args, flag) is not None}
    if args.lora:
        overrides["lora"] = True
    result = train(stage=args.stage, data=args.data, image_folder=args.image_folder, output_dir=args.output_dir,
                   model=args.model, vision=args.vision, lm=args.lm, focus_config=args.config,
                   recipe_file=args.recipe, overrides=overrides, resume=args.resume,
                   progress=not args.no_progress, stop_at_step=args.stop_at_step)
    final = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
    print(f"trained {result.steps} steps on {result.samples} samples ({result.skipped} skipped) in "
          f"{result.runtime_s:.0f} s; final loss {final}; output in {result.output_dir}", file=sys.stderr)
    return 0


def _demo_recipe(args: argparse.Namespace) -> int:
    from ..demo import recipe as R

    if args.stage or args.data:
        raise ValueError(f"--recipe {args.recipe} runs every stage on easy-VQA itself; drop --stage / --data")
    out = args.output_dir or Path("runs/demo-model")
    recipe = R.DemoRecipe.quick() if args.demo_quick else R.DemoRecipe()
    if str(args.recipe) == "demo-frozen-lm":
        recipe = recipe.with_frozen_lm()
    if args.bf16 is not None:   # else the recipe's own choice (measured on this CPU)
        recipe.bf16 = args.bf16
    times = R.run(out, recipe, ship_to=R.PACKAGE_DIR if args.ship else None, progress=not args.no_progress)
    print(f"demo model recipe finished in {times['total']:.0f} s (steps: {out / 'times.json'}); packed weights in "
          f"{out / 'ship'}" + ("" if args.ship else "; add --ship to install them as --model demo"), file=sys.stderr)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from ..train.validate import summary_lines, validate_data, write_report

    if args.data is None:
        raise ValueError("--validate needs --data")
    processor, image_token_id, fmt = None, None, args.format
    if args.model:
        from ..runtime import load_model

        model, processor = load_model(args.model, "cpu")
        image_token_id = model.config.image_token_id
        if args.config:
            # the placeholder count the vision method gives: patching adjusts the processor
            from .. import FocusConfig, patch

            config = FocusConfig.load(args.config)
            if config.vision is not None:
                patch(model, config, processor=processor)
    if fmt is None:
        fmt = "plain" if args.stage == "pretrain" else "vicuna_v1"
    max_length = args.max_length or 2048
    report = validate_data(args.data, args.image_folder, processor=processor, fmt=fmt, max_length=max_length,
                           image_token_id=image_token_id, progress=not args.no_progress)
    path = args.report or ((args.output_dir or Path(".")) / "validate_report.json")
    write_report(report, path)
    for line in summary_lines(report):
        print(line)
    print(f"report: {path}")
    return 1 if report["problems_by_kind"] else 0
