"""Why the first demo twins answered easy-VQA's yes/no questions from the question's form (issue 16's diagnosis;
the twins shipped since learn them from the picture: benchmarks/RESULTS.md, "Demo model retrained").

    python benchmarks/demo/yesno_diagnosis.py text  [--steps 150]   # ~9 min on 2 cores
    python benchmarks/demo/yesno_diagnosis.py embed [--model demo]  # seconds
    python benchmarks/demo/yesno_diagnosis.py continue --data mix|yesno|tail|refresh --out DIR [--model demo|RUN/ship/stock] [--steps 150] [--lr 2e-3] [--batch 8] [--texts 1] [--yes-no-share 0.9] [--focus JSON]  # ~13-30 min
    python benchmarks/demo/yesno_diagnosis.py split [--model demo|PACKED] [--n 400] [--mode given-description] [--focus JSON]  # ~2 min

``text``: the same LM (SmolLM2-135M-Instruct with a fresh LoRA r 8 on every linear layer, the first
recipe's rank and learning rate, 4e-4) trained on the yes/no questions with the picture written out as a caption
("A red circle.\nIs there a blue shape?") instead of shown. Held-out accuracy (200 test questions,
"yes" vs "no" logit) every 25 steps: if it climbs, the comparison itself is easy for this LM once
both sides are words.

``embed``: what the shipped projector feeds the LM for a picture: the norm of each image token
against the LM's word embeddings, and each token's best cosine to any word embedding and to the
colour and shape words. Image tokens far from every word cannot be matched against the question's
words by the LM's token-matching attention, the route the ``text`` run finds.

``continue``: the shipped stock twin trained further by ``focusvlm train`` (stage 2 settings of the
recipe, a fresh LoRA) on ``mix`` (every train question with its picture, plus half as many captioned
text-only yes/no questions, so the comparison is learned in words alongside), ``yesno`` (only yes/no
questions with their picture, balanced per question form) or ``tail`` (the recipe's curriculum after its
colour/shape lead: balanced yes/no at 90 %, colour and shape at 10 %) or ``refresh`` (a warm restart's mix as the
recipe writes it, ``DemoRecipe.refresh_rounds``: short answers with yes/no at ``--yes-no-share`` and ``--texts``
of the base LM's text answers per batch; ``--texts 0``: short answers only), with ``--focus`` a FocusConfig on
while training (``{"spd": {"factor": 2}}``: 64 image tokens), then the recipe's 200-question quick check
and ``yesno_probe.swap_probe`` on 120 yes/no questions.

``split``: a twin's yes/no accuracy on the first ``--n`` yes/no questions of the fixed 2,000 sample, split by
question form (plain or negated, ``data.is_negated``) and true answer, with how often it says "no" (a twin that
answers from a bias scores near chance in every cell), and by what the question asks (colour or shape,
``data.question_attribute``); ``--mode given-description`` gives the true description instead of the picture (does
the trained LM compare words?), ``--focus`` a method at inference.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch

from focusvlm.models.demo.ship import lora_target_names
from focusvlm.demo import data as D

import yesno_probe  # the picture-swap probe, beside this script


def captioned(item: D.VQAItem, labels: dict[int, tuple[str, str]], rng: random.Random) -> str:
    color, shape = labels[item.image_id]
    return f"{D.caption(color, shape, rng)}\n{item.question}\n{D.SHORT_ANSWER}"


def cmd_text(args: argparse.Namespace) -> None:
    import peft

    from focusvlm.runtime import load_model

    torch.manual_seed(args.seed)
    model, processor = load_model(args.base, "cpu", "float32")
    tok = processor.tokenizer
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                       target_modules=lora_target_names(model)))
    train_items = D.read_split("train")
    test_sample = D.test_items(2000, seed=0)
    labels = D.image_labels(train_items)
    test_labels = D.image_labels(test_sample)
    train = [it for it in train_items if it.qtype == "yes/no"]
    test = [it for it in test_sample if it.qtype == "yes/no"][:200]
    yes_id, no_id = tok.encode("yes")[0], tok.encode("no")[0]
    rng = random.Random(args.seed)

    def prompt(text: str) -> list[int]:
        rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=False)
        return tok(rendered, add_special_tokens=False).input_ids

    def accuracy() -> float:
        model.eval()
        right, eval_rng = 0, random.Random("held-out captions")  # the same captions at every evaluation
        with torch.no_grad():
            for it in test:
                logits = model(input_ids=torch.tensor([prompt(captioned(it, test_labels, eval_rng))])).logits[0, -1]
                right += ("yes" if logits[yes_id] > logits[no_id] else "no") == it.answer
        model.train()
        return right / len(test)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    print(f"step 0: held-out yes/no {accuracy():.1%}", flush=True)
    start = time.time()
    for step in range(1, args.steps + 1):
        seqs, targets = [], []
        for it in rng.sample(train, args.batch):
            ids = prompt(captioned(it, labels, rng))
            answer = tok.encode(it.answer + "<|im_end|>")
            seqs.append(ids + answer)
            targets.append([-100] * len(ids) + answer)
        width = max(map(len, seqs))
        input_ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        label_ids = torch.tensor([t + [-100] * (width - len(t)) for t in targets])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=input_ids, attention_mask=mask, labels=label_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 25 == 0 or step == args.steps:
            print(f"step {step}: loss {loss.item():.3f}, held-out yes/no {accuracy():.1%} "
                  f"({time.time() - start:.0f} s)", flush=True)


def cmd_embed(args: argparse.Namespace) -> None:
    from focusvlm.runtime import load_image, load_model

    model, processor = load_model(args.model, "cpu", "float32")
    tok = processor.tokenizer
    words = list(D.COLORS) + list(D.SHAPES)
    word_ids = [tok.encode(w)[0] for w in words]
    table = model.get_input_embeddings().weight.detach()
    unit_table = torch.nn.functional.normalize(table, dim=-1)
    sample = D.test_items(2000, seed=0)
    labels = D.image_labels(sample)
    print(f"LM word embeddings: mean norm {table.norm(dim=-1).mean():.2f}")
    for image_id in sorted(labels)[:args.images]:
        path = D.data_root() / f"test/images/{image_id}.png"
        pixels = processor.image_processor(images=[load_image(path)], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            feats = model.get_image_features(pixel_values=pixels)
        feats = getattr(feats, "pooler_output", feats)
        tokens = (feats[0] if isinstance(feats, (list, tuple)) else feats).reshape(-1, table.shape[1])
        cos = torch.nn.functional.normalize(tokens, dim=-1) @ unit_table.T
        nearest = {tok.decode([i]) for i in cos.argmax(-1).tolist()}
        best_word = {w: round(v, 2) for w, v in zip(words, cos[:, word_ids].max(0).values.tolist())}
        print(f"{' '.join(labels[image_id]):>16}: {tokens.shape[0]} image tokens, mean norm "
              f"{tokens.norm(dim=-1).mean():.1f}; best cosine to any word {cos.max(-1).values.mean():.2f} "
              f"(nearest words {sorted(nearest)}); to colour/shape words {best_word}")


def continue_records(kind: str, seed: int = 0) -> list[dict]:
    train = D.read_split("train")
    if kind == "yesno":
        records = D.stage2_records([it for it in D.balance_yes_no(train, seed) if it.qtype == "yes/no"], seed, turns=1)
    elif kind == "tail":  # the curriculum recipe's second phase: balanced yes/no at its share, colour and shape the rest
        from focusvlm.demo.recipe import DemoRecipe

        share = DemoRecipe().yes_no_share
        balanced = D.balance_yes_no(train, seed)
        n_yes_no = sum(it.qtype == "yes/no" for it in balanced)
        records = D.stage2_records(D.curriculum(balanced, int(n_yes_no / share), 0, share, seed), seed, turns=1)
    else:
        records = D.stage2_records(train, seed, turns=1)
        labels, rng = D.image_labels(train), random.Random(f"{seed}/text")
        text = [{"id": f"text-{it.qid}", "conversations": [
                    {"from": "human", "value": captioned(it, labels, rng)}, {"from": "gpt", "value": it.answer}]}
                for it in train if it.qtype == "yes/no"]
        rng.shuffle(text)
        records += text[:len(records) // 2]
    random.Random(seed).shuffle(records)
    return records


def refresh_records(texts: int, yes_no_share: float, steps: int, text_answers: str) -> list[dict]:
    """A warm restart's records in training order, as the recipe writes them (``recipe.refresh_records``)."""
    from pathlib import Path

    from focusvlm.demo import recipe as R

    round_ = R.RefreshRound("diagnosis", "diagnosis", steps, 1e-3, 0, texts, yes_no_share)
    return R.refresh_records(R.DemoRecipe(), [round_], 0, Path(text_answers))


def load_twin(name: str):
    from pathlib import Path

    if (Path(name) / "demo.json").is_file():  # a packed twin: a recipe run's ship/<twin>, or recipe_state's packed/
        from focusvlm.models.demo.load import load_demo
        return load_demo(name)
    from focusvlm.runtime import load_model
    return load_model(name, "cpu", "float32")


def cmd_split(args: argparse.Namespace) -> None:
    import collections
    import json

    from focusvlm.config import FocusConfig
    from focusvlm.demo import evaluate as E

    model, processor = load_twin(args.model)
    focus = FocusConfig.from_dict(json.loads(args.focus)) if args.focus else None
    items = [it for it in D.test_items(2000, seed=0) if it.qtype == "yes/no"][:args.n]
    report = E.evaluate(model, processor, items, focus=focus, batch_size=16, max_new_tokens=3, mode=args.mode)
    cells = collections.Counter(("negated" if D.is_negated(r["question"]) else "plain", r["answer"], r["correct"])
                                for r in report.rows)
    says_no = sum(E.normalize_answer(r["prediction"]) == "no" for r in report.rows) / report.n
    print(f"{args.model} ({args.mode}, focus {args.focus or 'none'}, {report.image_tokens:.0f} image tokens): yes/no "
          f"{report.accuracy:.1%} of {report.n}, says no to {says_no:.0%}")
    for form in ("plain", "negated"):
        for answer in ("yes", "no"):
            right, wrong = cells[(form, answer, True)], cells[(form, answer, False)]
            if right + wrong:
                print(f"  {form:>7}, answer {answer:>3}: {right / (right + wrong):.1%} of {right + wrong}")
    # a twin that reads colour but not shape off the picture answers the colour questions and guesses the others
    by_attribute = collections.Counter((D.question_attribute(r["question"]), r["correct"]) for r in report.rows)
    for attribute in ("color", "shape"):
        right, wrong = by_attribute[(attribute, True)], by_attribute[(attribute, False)]
        if right + wrong:
            print(f"  asks the {attribute:>5}: {right / (right + wrong):.1%} of {right + wrong}")


def cmd_continue(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    import peft

    from focusvlm.config import FocusConfig
    from focusvlm.demo import evaluate as E
    from focusvlm.demo.recipe import DemoRecipe, _stage_overrides
    from focusvlm.train.runner import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    twin, processor = load_twin(args.model)
    twin.save_pretrained(out / "twin")
    processor.save_pretrained(out / "twin")
    data = out / f"{args.data}.json"
    records = (refresh_records(args.texts, args.yes_no_share, args.steps, args.text_answers) if args.data == "refresh"
               else continue_records(args.data))
    data.write_text(json.dumps(records))
    overrides = {**_stage_overrides(DemoRecipe(), "finetune"), "max_steps": args.steps, "projector_lr": args.projector_lr}
    if args.lr is not None:
        overrides["learning_rate"] = args.lr
    if args.batch is not None:
        overrides["per_device_batch_size"] = overrides["global_batch_size"] = args.batch
    train(stage="finetune", data=str(data), image_folder=str(D.data_root()), output_dir=out / "finetune",
          model=str(out / "twin"), focus_config=FocusConfig.from_dict(json.loads(args.focus)) if args.focus else FocusConfig(),
          overrides=overrides, lora=True, progress=False)
    model = peft.PeftModel.from_pretrained(twin, out / "finetune" / "adapter").merge_and_unload().eval()
    check = E.evaluate(model, processor, D.test_items(200, seed=1), batch_size=16, max_new_tokens=3)
    print(f"quick check: {check.accuracy:.1%} " + ", ".join(f"{t} {v['accuracy']:.1%}" for t, v in check.per_type.items()))
    print("probe: " + yesno_probe.summary(*yesno_probe.swap_probe(model, processor, 120)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("text", help="LoRA-train the LM on captioned yes/no questions (no picture)")
    t.add_argument("--base", default="runs/demo-model/base", help="the recipe's untrained demo LLaVA (base/)")
    t.add_argument("--steps", type=int, default=150)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--lr", type=float, default=4e-4)
    t.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("embed", help="image tokens against the LM's word embeddings")
    e.add_argument("--model", default="demo")
    e.add_argument("--images", type=int, default=4)
    c = sub.add_parser("continue", help="train the shipped stock twin further, then check and probe it")
    c.add_argument("--data", choices=("mix", "yesno", "tail", "refresh"), required=True)
    c.add_argument("--texts", type=int, default=1, help="refresh: base-LM text answers per batch")
    c.add_argument("--yes-no-share", type=float, default=0.9, help="refresh: yes/no share of the short answers")
    c.add_argument("--text-answers", default="benchmarks/demo/recipe_state/data/text_answers.jsonl",
                   help="refresh: the recipe's text answers (data/text_answers.jsonl)")
    c.add_argument("--focus", help='a FocusConfig as JSON, on while training (e.g. \'{"spd": {"factor": 2}}\')')
    c.add_argument("--out", required=True)
    c.add_argument("--model", default="demo")
    c.add_argument("--steps", type=int, default=150)
    c.add_argument("--projector-lr", type=float, default=1e-4)
    c.add_argument("--batch", type=int, help="batch size (default: the recipe's stage 2 batch)")
    c.add_argument("--lr", type=float, help="LoRA learning rate (default: the recipe's stage 2 rate)")
    sp = sub.add_parser("split", help="yes/no accuracy by question form and true answer")
    sp.add_argument("--model", default="demo")
    sp.add_argument("--n", type=int, default=400, help="the first n yes/no questions of the fixed 2,000 sample")
    sp.add_argument("--mode", default="direct", choices=("direct", "given-description", "describe-then-answer"))
    sp.add_argument("--focus", help="a FocusConfig as JSON, on at inference")
    args = ap.parse_args()
    {"text": cmd_text, "embed": cmd_embed, "continue": cmd_continue, "split": cmd_split}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
