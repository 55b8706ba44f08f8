"""A plain torch training loop for the demo LLaVA: ONLY for timing and a sanity check (the recipe runs
through `focusvlm train`). Assistant-only labels, ChatML as the demo's chat template renders it.

    PYTHONPATH=. python benchmarks/demo/plain_loop.py time   --tower DIR            # seconds per step
    PYTHONPATH=. python benchmarks/demo/plain_loop.py sanity --tower DIR --samples 320 --eval 150
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from focusvlm.demo import build as B
from focusvlm.demo import data as D
from focusvlm.demo import evaluate as E
from focusvlm.runtime import load_image

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n"


def segments(record: dict, image_tokens: int) -> list[tuple[str, bool]]:
    """(text, supervised) pieces of one conversation in the demo's ChatML rendering; <image> expanded."""
    out = [(SYSTEM, False)]
    for turn in record["conversations"]:
        value = turn["value"].replace(D.IMAGE_TOKEN, D.IMAGE_TOKEN * image_tokens)
        if turn["from"] == "human":
            out.append((f"<|im_start|>user\n{value}<|im_end|>\n<|im_start|>assistant\n", False))
        else:
            out += [(f"{value}<|im_end|>", True), ("\n", False)]
    return out


def collate(records: list[dict], processor, image_tokens: int) -> dict[str, torch.Tensor]:
    tok = processor.tokenizer
    rows, labels = [], []
    for r in records:
        ids, lab = [], []
        for text, supervised in segments(r, image_tokens):
            piece = tok(text, add_special_tokens=False)["input_ids"]
            ids += piece
            lab += piece if supervised else [-100] * len(piece)
        rows.append(ids)
        labels.append(lab)
    width = max(map(len, rows))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    # right padding for training (no generation here); the mask hides it
    input_ids = torch.full((len(rows), width), pad)
    label_t = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(rows, labels)):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        label_t[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(ids)] = 1
    images = [load_image(D.data_root() / r["image"]) for r in records]
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_t, "pixel_values": pixels}


def wrap_lora(model, r: int, alpha: int):
    import peft

    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=B.lora_target_names(model),
                             modules_to_save=["multi_modal_projector"])
    return peft.get_peft_model(model, config)


def trainable(model, projector_only: bool):
    if projector_only:
        for n, p in model.named_parameters():
            p.requires_grad_("multi_modal_projector" in n)
    return [p for p in model.parameters() if p.requires_grad]


def image_tokens_of(model) -> int:
    handle = getattr(model, "_focusvlm", None)
    return handle.image_tokens() if handle is not None else 64


def step_seconds(model, processor, records, batch: int, steps: int, lr: float, projector_only=False) -> dict:
    params = trainable(model, projector_only)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    times, lengths, supervised = [], [], []
    for s in range(steps + 1):
        b = collate(records[s * batch:(s + 1) * batch], processor, image_tokens_of(model))
        t = time.time()
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if s:  # the first step warms up allocators and kernels
            times.append(time.time() - t)
        lengths.append(int(b["attention_mask"].sum(1).float().mean()))
        supervised.append(int((b["labels"] != -100).sum()))
    return {"seconds_per_step": round(sum(times) / len(times), 2), "min": round(min(times), 2),
            "mean_tokens": sum(lengths) / len(lengths), "supervised_tokens_per_batch": sum(supervised) / len(supervised),
            "trainable": sum(p.numel() for p in params)}


def cmd_time(args) -> None:
    from focusvlm import FocusConfig, patch, unpatch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train = D.train_subset(D.read_split("train"), 200, seed=0)
    caps = D.stage1_records(train)
    one = D.stage2_records(train, turns=1)
    four = D.stage2_records(train, turns=4)
    allq = D.stage2_records(train, turns=0)
    for rs in (one, four, allq):
        random.Random(0).shuffle(rs)
    results = {}
    model, processor = B.build_trainable(args.tower)
    base_params = {n: p.detach().clone() for n, p in model.named_parameters() if "multi_modal_projector" in n}
    results["stage1 caption, projector only"] = step_seconds(model, processor, caps, args.batch, args.steps, 1e-3,
                                                             projector_only=True)
    print(json.dumps(results, indent=1), flush=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in base_params:
                p.copy_(base_params[n])
    lora = wrap_lora(model, args.r, 2 * args.r)
    results[f"stage2 1 question, projector + LoRA r{args.r}"] = step_seconds(lora, processor, one, args.batch, args.steps, 2e-4)
    print(json.dumps(results, indent=1), flush=True)
    results[f"stage2 4 questions, projector + LoRA r{args.r}"] = step_seconds(lora, processor, four, args.batch, args.steps, 2e-4)
    print(json.dumps(results, indent=1), flush=True)
    results[f"stage2 all questions (~9.6), projector + LoRA r{args.r}"] = step_seconds(lora, processor, allq, args.batch,
                                                                                      args.steps, 2e-4)
    print(json.dumps(results, indent=1), flush=True)
    base = lora.get_base_model()
    patch(base, FocusConfig(vmtc={"target": 0.5}, cmai={"gamma_max": 0.6}), processor)
    results[f"stage2 4 questions, VMTC 0.5 + CMAI 0.6, projector + LoRA r{args.r}"] = step_seconds(
        lora, processor, four, args.batch, args.steps, 2e-4)
    unpatch(base, processor)
    out = {"threads": args.threads, "batch": args.batch, "timed_steps": args.steps, "results": results}
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


def cmd_sanity(args) -> None:
    """Optional stage 1 (projector on captions), then projector + LoRA on a few hundred conversations:
    loss and accuracy before/after."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train = D.train_subset(D.read_split("train"), args.images, seed=0)
    records = D.stage2_records(train, turns=args.turns)
    random.Random(0).shuffle(records)
    records = records[:args.samples]
    items = D.test_items(2000, seed=0)[:args.eval]
    model, processor = B.build_trainable(args.tower)
    model.eval()
    t = time.time()
    before = E.evaluate(model, processor, items, batch_size=16, max_new_tokens=4)
    print(f"before: {before.accuracy:.3f} {json.dumps(before.per_type)} ({time.time() - t:.0f} s); "
          f"chance {E.chance_accuracy(items)}", flush=True)
    stage1_s, stage1_losses = 0.0, []
    if args.stage1:
        # stage 1: the projector alone learns to caption (LM frozen), LLaVA's alignment stage
        caps = D.stage1_records(train)
        random.Random(1).shuffle(caps)
        params1 = trainable(model, projector_only=True)
        opt1 = torch.optim.AdamW(params1, lr=args.stage1_lr, weight_decay=0.0)
        model.train()
        t = time.time()
        for s in range(args.stage1):
            for g in opt1.param_groups:
                g["lr"] = args.stage1_lr * min(1.0, (s + 1) / 3) * 0.5 * (1 + math.cos(math.pi * s / args.stage1))
            b = collate(caps[s * args.batch:(s + 1) * args.batch], processor, 64)
            loss = model(**b).loss
            loss.backward()
            opt1.step()
            opt1.zero_grad()
            stage1_losses.append(loss.item())
            print(f"stage1 step {s + 1}/{args.stage1} loss {stage1_losses[-1]:.4f} ({time.time() - t:.0f} s)", flush=True)
        stage1_s = time.time() - t
        for p in model.parameters():
            p.requires_grad_(True)
    lora = wrap_lora(model, args.r, 2 * args.r)
    params = trainable(lora, False)
    proj = [p for n, p in lora.named_parameters() if p.requires_grad and "multi_modal_projector" in n]
    rest = [p for n, p in lora.named_parameters() if p.requires_grad and "multi_modal_projector" not in n]
    opt = torch.optim.AdamW([{"params": proj, "lr": args.projector_lr}, {"params": rest, "lr": args.lr}], weight_decay=0.0)
    base_lrs = [g["lr"] for g in opt.param_groups]
    steps = math.ceil(len(records) / args.batch)
    warm = max(1, steps // 10)
    losses = []
    t = time.time()
    lora.train()
    for s in range(steps):
        factor = (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * factor
        b = collate(records[s * args.batch:(s + 1) * args.batch], processor, 64)
        loss = lora(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        print(f"step {s + 1}/{steps} loss {losses[-1]:.4f} ({time.time() - t:.0f} s)", flush=True)
    train_s = time.time() - t
    lora.eval()
    t = time.time()
    after = E.evaluate(lora, processor, items, batch_size=16, max_new_tokens=4)
    print(f"after: {after.accuracy:.3f} {json.dumps(after.per_type)} ({time.time() - t:.0f} s)", flush=True)
    wrong = [r for r in after.rows if not r["correct"]][:10]
    out = {"label": "SANITY CHECK (plain loop, a few hundred samples, not the recipe)",
           "stage1_steps": args.stage1, "stage1_seconds": round(stage1_s), "stage1_loss_first3": stage1_losses[:3],
           "stage1_loss_last3": stage1_losses[-3:], "samples": len(records),
           "turns": args.turns, "batch": args.batch, "steps": steps, "lr": args.lr, "projector_lr": args.projector_lr,
           "lora_r": args.r, "train_seconds": round(train_s), "loss_first5": losses[:5], "loss_last5": losses[-5:],
           "eval_questions": len(items), "chance": E.chance_accuracy(items),
           "before": {"accuracy": before.accuracy, "per_type": before.per_type},
           "after": {"accuracy": after.accuracy, "per_type": after.per_type}, "wrong_examples": wrong,
           "threads": args.threads}
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    if args.pack:
        B.pack_from_peft(lora, args.pack, info={"note": "sanity check only, not the recipe", **{
            k: out[k] for k in ("samples", "turns", "steps", "lr", "lora_r")}, "after": out["after"]})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["time", "sanity"])
    ap.add_argument("--tower", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--samples", type=int, default=320)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--eval", type=int, default=150)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--projector-lr", type=float, default=1e-3)
    ap.add_argument("--stage1", type=int, default=0, help="stage-1 caption steps (projector only) first")
    ap.add_argument("--stage1-lr", type=float, default=1e-3)
    ap.add_argument("--out")
    ap.add_argument("--pack")
    args = ap.parse_args(argv)
    (cmd_time if args.mode == "time" else cmd_sanity)(args)


if __name__ == "__main__":
    main(sys.argv[1:])
