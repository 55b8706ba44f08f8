"""Exploration (issue 31, 2026-12-05, fifth session; kept as it ran, from the repository root). The checkpoint probe
(benchmarks/demo/checkpoint_probe.py) found the LM's instruction following gone after 75 steps of the short-answer
stage 2 (text arm 13.5 %, 1.0 word per answer): a switch, not a slow drift. The twin learns "easy-VQA question ->
one word" whatever follows the question. Counter-examples here are text-only (no picture: issue 31 forbids
instruction-format examples with images): a picture's true description and a training question, without the
short-answer line, half of them followed by a formatting request (worded here: format_answers_probe's list, one
per paper16 type, none of its templates), answered by the base LM itself (greedy), kept when consistent with the
description. The description is worded as a person telling about a picture, not as the benchmark's
"Here is a description of an image" template.

    python domain_text_probe.py gen  /tmp/dt     # base LM answers (~? min)
    python domain_text_probe.py mix  /tmp/dt     # 4 short + 3 domain text + 1 generic text per batch of 8
    python domain_text_probe.py train /tmp/dt 100   # stage 2 from runs/r3's stage 1, its schedule (900-step cosine), stopped at 100
    python benchmarks/demo/checkpoint_probe.py /tmp/dt/ft/checkpoint-100 --base runs/r3/base --out /tmp/dt/p100

Second run, FRAME=template (the same steps into /tmp/dt2): the description and question framed by the project's
describe-then-answer prompt (eval.samples.default_answer_from_description, which the experiment's text arms use),
because on the first framing the base LM itself ignored the requests (its answers taught the twin to ignore them).
"""
import json, os, random, re, sys
from pathlib import Path
from focusvlm.demo import data as D, recipe as R
from focusvlm.demo.textdata import answer_prompts, read_answers

W = Path(sys.argv[2]); W.mkdir(parents=True, exist_ok=True)
step = sys.argv[1]
FORMATS = ("Put a short title above your answer, inside double angle brackets.",
           "Write your answer as a markdown list with a '* ' at the start of each item.",
           "Organise your reply into parts headed SECTION 1, SECTION 2 and so on.",
           "Leave a few blanks in square brackets, like [place], for me to fill in.",
           "After your answer, add a note that begins with P.P.S",
           "Mark a couple of phrases in your answer with single asterisks, like *this*.",
           "Use the words \"river\" and \"light\" somewhere in your reply.",
           "Reply using only capital letters.",
           "Reply using only lowercase letters.",
           "Return your reply as a JSON object.",
           "End your reply with the words: That is my answer.",
           "Start your reply with the words \"In short\".",
           "Avoid commas entirely in your reply.",
           "Give me two alternative answers separated by a line of six asterisks.",
           "Keep your reply under 50 words.",
           "Use no more than two sentences.")
TELLS = ("A friend tells you about a picture: {d}", "I have a picture in front of me. {d}", "Picture: {d}",
         "Someone describes an image to you: {d}")
train = D.read_split("train")
labels = D.image_labels(train)
rng = random.Random("domain-text")
items = rng.sample(D.balance_yes_no(train, 11), 480)


FRAME = os.environ.get("FRAME", "tell")


def prompt_of(n, it):
    color, shape = labels[it.image_id]
    question = it.question + ("\n" + FORMATS[(n // 2) % len(FORMATS)] if n % 2 else "")
    if FRAME == "template":
        from focusvlm.eval.samples import default_answer_from_description
        return default_answer_from_description(question, D.true_description(color, shape))
    return TELLS[n % len(TELLS)].format(d=D.true_description(color, shape)) + "\n" + question


prompts = [{"key": f"{it.qid}-{n}", "prompt": prompt_of(n, it)} for n, it in enumerate(items)]
if step == "gen":
    from focusvlm.models.demo.assemble import DEMO_CHAT_TEMPLATE
    from focusvlm.models.demo.lm import smollm2_lm
    lm, tok = smollm2_lm()
    answer_prompts(prompts, W / "answers.jsonl", lm, tok, DEMO_CHAT_TEMPLATE, max_new_tokens=96, log=print)
elif step == "mix":
    rows = read_answers(W / "answers.jsonl")
    keep = []
    for p, it in zip(prompts, items):
        r, (color, shape) = rows[p["key"]], labels[it.image_id]
        a = r["answer"]
        words = set(re.findall(r"[a-z]+", a.lower()))
        wrong = (words & set(D.COLORS)) - {color} or (words & set(D.SHAPES)) - {shape}
        first = re.findall(r"[a-z]+", a.lower())[:1]
        if r["finished"] and a.strip() and a.isascii() and not wrong and \
                not (first and first[0] in D.YES_NO and first[0] != it.answer):
            keep.append({"id": f"domain-{p['key']}", "conversations": [
                {"from": "human", "value": p["prompt"]}, {"from": "gpt", "value": a}]})
    print(len(keep), "of", len(prompts), "kept;", sum("\n" in k["conversations"][0]["value"].split("\n", 2)[-1] for k in keep), "with a request")
    for k in keep[:10]: print(repr(k["conversations"][0]["value"]), "->", repr(k["conversations"][1]["value"][:150]))
    s2 = json.load(open("runs/r3/data/stage2_mix.json"))
    b2 = json.load(open("runs/r3/data/stage2b_mix.json"))
    texts = [r for r in b2 if "image" not in r]
    steps = 150
    mix = D.interleave(s2, 4, [keep[0::3], keep[1::3], keep[2::3], texts], steps)
    json.dump(mix, open(W / "mix.json", "w"), indent=1)
    print(len(mix), "records")
elif step == "train":
    from focusvlm.config import FocusConfig
    from focusvlm.train.runner import train as T
    rec = R.DemoRecipe(bf16=False)
    files = json.load(open("runs/r3/data/easyvqa_manifest.json"))["files"]
    T(stage="finetune", data=str(W / "mix.json"), image_folder=files["image_folder"], output_dir=W / "ft",
      model="runs/r3/stock/pretrain", focus_config=FocusConfig(), overrides=R._stage_overrides(rec, "finetune"),
      lora=True, progress=False, resume=R._checkpoint_in(W / "ft"), stop_at_step=int(sys.argv[3]))
