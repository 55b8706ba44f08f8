"""Exploration (issue 31, 2026-12-06; kept as it ran, from the repository root). The last lever named in the
sixth section: train the LM (LoRA, as LLaVA-1.5 does) with a term that keeps its output distribution on
text-only records equal to the base LM's (``Recipe.text_distill``: KL from the LM with its adapters switched off,
at every supervised token of the text rows), not just its answer tokens.

The text-only records: a picture's true description told in words (worded as a person telling, not the
benchmark's description template), an easy-VQA training question, and on half of them a formatting request
written here that, like the benchmark's, carries its own example or form (one per paper16 type; none of its
templates). Answers by the base LM itself (greedy, 128 new tokens), kept when consistent with the description,
whether the request was followed or not. Text-only: no instruction-format example has a picture.

    python benchmarks/demo/recipe_state/kl/kl_probe.py gen   runs/kl       # base LM answers (~6 min)
    python benchmarks/demo/recipe_state/kl/kl_probe.py mix   runs/kl       # 5 short answers + 3 text records per batch
    python benchmarks/demo/recipe_state/kl/kl_probe.py train runs/kl 1.0 bf16   # stage 2, 900 steps, KL weight 1.0, bf16 autocast
    python benchmarks/demo/checkpoint_probe.py runs/kl/ft/checkpoint-100 --base runs/kl/base --out runs/kl/p100
    # the same data without the KL term (the ablation), stopped at step 100, into runs/kl/ft0
    python benchmarks/demo/recipe_state/kl/kl_probe.py train runs/kl 0 bf16 ft0 100
"""
import json, random, re, sys
from pathlib import Path

from focusvlm.demo import data as D, recipe as R
from focusvlm.demo.textdata import answer_prompts, read_answers

STEP, W = sys.argv[1], Path(sys.argv[2])
REQUESTS = (
    "Please write it without a single comma.",
    "Write everything in small letters, with no capital letters at all.",
    "WRITE THE WHOLE REPLY IN CAPITAL LETTERS, LIKE THIS SENTENCE.",
    "Leave at least two blanks in square brackets for me to fill in, for example [name] and [date].",
    "Add a last line that starts with P.S. and gives an afterthought.",
    "Begin with a title wrapped in double angle brackets, for example <<Shapes and colours>>.",
    "Make sure the word 'picture' appears in your reply.",
    "Mark at least two phrases with single asterisks, for example *a phrase*.",
    "Give the whole reply as JSON, for example {\"answer\": \"...\"}.",
    "Split the reply into two parts that start with PART 1 and PART 2.",
    "Reply with three bullet points, each line beginning with '* ', for example:\n* first point",
    "Use at least three sentences.",
    "Write at least 40 words.",
    "Give two different replies, separated by a line of six asterisks: ******",
    "End your reply with the exact words 'That is all.' and nothing after them.",
    "Begin your reply with the words 'My answer:'.",
)
TELLS = ("A friend tells you about a picture: {d}", "I have a picture in front of me. {d}", "Picture: {d}",
         "Someone describes an image to you: {d}")
N = 480


def prompts():
    train = D.read_split("train")
    labels = D.image_labels(train)
    rng = random.Random("kl-probe")
    items = rng.sample(D.balance_yes_no(train, 11), N)
    out = []
    for n, it in enumerate(items):
        color, shape = labels[it.image_id]
        request = "\n" + REQUESTS[(n // 2) % len(REQUESTS)] if n % 2 else ""
        out.append({"key": f"{it.qid}-{n}", "prompt": TELLS[n % len(TELLS)].format(d=D.true_description(color, shape))
                    + "\n" + it.question + request, "item": it, "labels": (color, shape)})
    return out


if STEP == "gen":
    from focusvlm.models.demo.assemble import DEMO_CHAT_TEMPLATE
    from focusvlm.models.demo.lm import smollm2_lm

    lm, tok = smollm2_lm()
    answer_prompts([{"key": p["key"], "prompt": p["prompt"]} for p in prompts()], W / "kl_answers.jsonl", lm, tok,
                   DEMO_CHAT_TEMPLATE, max_new_tokens=128, log=print)
elif STEP == "mix":
    rows = read_answers(W / "kl_answers.jsonl")
    keep = []
    for p in prompts():
        it, (color, shape), r = p["item"], p["labels"], rows[p["key"]]
        a = r["answer"]
        words = re.findall(r"[a-z]+", a.lower())
        wrong = (set(words) & set(D.COLORS)) - {color} or (set(words) & set(D.SHAPES)) - {shape}
        if r["finished"] and a.strip() and a.isascii() and not wrong and \
                not (words[:1] and words[0] in D.YES_NO and words[0] != it.answer):
            keep.append({"id": f"kl-{p['key']}", "conversations": [
                {"from": "human", "value": p["prompt"]}, {"from": "gpt", "value": a}]})
    print(len(keep), "of", N, "kept;", sum(k["conversations"][0]["value"].count("\n") == 2 for k in keep),
          "with a request")
    recipe = R.DemoRecipe(bf16=False)
    short_per_batch = recipe.finetune_batch - 3
    train = D.train_subset(D.read_split("train"), recipe.train_images, recipe.seed)
    questions = D.curriculum(D.balance_yes_no(train, recipe.seed), recipe.finetune_steps * short_per_batch,
                             recipe.lead_steps * short_per_batch, recipe.yes_no_share, recipe.seed)
    short = D.ordered_records(questions, recipe.seed)
    mix = D.interleave(short, short_per_batch, [keep[0::3], keep[1::3], keep[2::3]], recipe.finetune_steps)
    (W / "kl_mix.json").write_text(json.dumps(mix, indent=1))
    print(len(mix), "records")
elif STEP == "train":
    from focusvlm.config import FocusConfig
    from focusvlm.train.runner import train as T

    recipe = R.DemoRecipe(bf16=sys.argv[4] == "bf16", text_distill=float(sys.argv[3]))
    files = json.loads((W / "data" / "easyvqa_manifest.json").read_text())["files"]
    out = W / (sys.argv[5] if len(sys.argv) > 5 else "ft")
    T(stage="finetune", data=str(W / "kl_mix.json"), image_folder=files["image_folder"], output_dir=out,
      model=str(W / "stock" / "pretrain"), focus_config=FocusConfig(),
      overrides=R._stage_overrides(recipe, "finetune"), lora=True, progress=False, resume=R._checkpoint_in(out),
      stop_at_step=int(sys.argv[6]) if len(sys.argv) > 6 else None)
