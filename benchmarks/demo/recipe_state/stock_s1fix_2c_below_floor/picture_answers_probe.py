"""Exploration (issue 31, 2026-12-05 fourth session; kept as it ran, run from the repository root): picture
questions asked without the short-answer instruction, answered by the base LM from the picture's true description
(LLaVA-Instruct's construction: a text-only model writes the answers from captions), mixed into a warm restart
(fresh LoRA, cosine from 1e-3) of runs/s1fix/ship/stock; then the text arm (text_arm_*.md) and probes.

    python picture_answers_probe.py gen /tmp/p/lmstyle; ... mix /tmp/p/lmstyle; ... train /tmp/p/lmstyle   # 100 steps, 4 short + 2 text + 2 picture answers
    cp /tmp/p/lmstyle/answers.jsonl /tmp/p/lm2/; ... mix /tmp/p/lm2 200; ... train /tmp/p/lm2 200     # 3 short + 2 text + 3 picture answers
    ... mix2 /tmp/p/lm3 200; ... train /tmp/p/lm3 200        # lm2's mix, a neutral second line on half the text and picture prompts
    python -m focusvlm.demo.experiment --out DIR --models /tmp/p/lm3/ship --arms text   # DIR holding a copy of the lm-text arm
"""
import json, random, re, sys
from pathlib import Path
import torch
from focusvlm.demo import data as D, recipe as R
from focusvlm.demo.textdata import answer_prompts, read_answers
from focusvlm.eval.samples import default_answer_from_description
W = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/p/lmstyle"); W.mkdir(parents=True, exist_ok=True)
step = sys.argv[1]
train = D.train_subset(D.read_split("train"), None, 0)
labels = D.image_labels(train)
rng = random.Random("lmstyle")
items = rng.sample(D.balance_yes_no(train, 7), 600)
def colour_shape_words(text):
    words = set(re.findall(r"[a-z]+", text.lower()))
    return (words & set(D.COLORS)) | (words & (set(D.SHAPES) | {s + "s" for s in D.SHAPES}))
if step == "gen":
    from focusvlm.models.demo.assemble import DEMO_CHAT_TEMPLATE
    from focusvlm.models.demo.lm import smollm2_lm
    lm, tok = smollm2_lm()
    prompts = [{"key": it.qid, "prompt": default_answer_from_description(it.question, D.true_description(*labels[it.image_id]))}
               for it in items]
    answer_prompts(prompts, W / "answers.jsonl", lm, tok, DEMO_CHAT_TEMPLATE, max_new_tokens=64, log=print)
elif step == "mix":
    rows = read_answers(W / "answers.jsonl")
    keep = []
    for it in items:
        r = rows[it.qid]; color, shape = labels[it.image_id]
        a = r["answer"]
        first = re.findall(r"[a-z]+", a.lower())[:1]
        other_shapes = set(re.findall(r"[a-z]+", a.lower())) & {"square", "squares", "oval", "star", "hexagon", "diamond", "pentagon", "ellipse", "line"}
        ok = (r["finished"] and len(a.split()) >= 4 and a.isascii() and colour_shape_words(a) <= {color, shape, shape + "s"}
              and (color in a.lower() or shape in a.lower()) and not other_shapes
              and (first[0] == it.answer if first and first[0] in ("yes", "no") else True))
        if ok:
            keep.append({"id": f"lmstyle-{it.qid}", "image": it.image, "conversations": [
                {"from": "human", "value": f"{D.IMAGE_TOKEN}\n{it.question}"}, {"from": "gpt", "value": a}]})
    print(len(keep), "of", len(items), "kept;", sum(1 for k in keep if k["conversations"][1]["value"]) )
    for k in keep[:12]: print(" ", k["conversations"][0]["value"][8:], "->", k["conversations"][1]["value"])
    c2 = json.load(open("runs/r3/data/stage2c_mix.json"))
    short = [r for r in c2 if "image" in r and D.SHORT_ANSWER in r["conversations"][0]["value"]]
    texts = [r for r in c2 if "image" not in r]
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 100
    if steps == 100:
        mix = D.interleave(short, 4, [texts[0::2], texts[1::2], keep[0::2], keep[1::2]], steps)
    else:  # 3 short, 2 text, 3 picture answers per batch
        c2b = json.load(open("runs/r3/data/stage2b_mix.json"))
        short += [r for r in c2b if "image" in r]
        texts += [r for r in c2b if "image" not in r]
        mix = D.interleave(short, 3, [texts[0::2], texts[1::2], keep[0::3], keep[1::3], keep[2::3]], steps)
    json.dump(mix, open(W / "mix.json", "w"), indent=1)
    print(len(mix), "records")
elif step == "mix2":  # as mix at 200 steps, with a neutral second line on half the picture and text prompts
    import copy
    CUES = ("Please answer.", "Thank you!", "I am curious.", "Take your time.", "Any thoughts?")
    src = json.load(open("/tmp/p/lm2/mix.json"))
    cue_rng = random.Random("cues")
    out = []
    for n, r in enumerate(src):
        r = copy.deepcopy(r)
        human = r["conversations"][0]
        if (r["id"].startswith("lmstyle-") or r["id"].startswith("text-")) and cue_rng.random() < 0.5:
            human["value"] = human["value"] + "\n" + cue_rng.choice(CUES)
        out.append(r)
    json.dump(out, open(W / "mix.json", "w"), indent=1)
    print([r["conversations"][0]["value"][-40:] for r in out[:8]])
elif step == "train":
    from focusvlm.config import FocusConfig
    from focusvlm.train.runner import train as T
    rec = R.DemoRecipe(bf16=False)
    base = W / "base"
    if not (base / "config.json").is_file():
        R._unpack_trainable(Path("runs/s1fix/ship/stock"), base)
    files = json.load(open("runs/r3/data/easyvqa_manifest.json"))["files"]
    rnd = R.RefreshRound("lm", "cont", int(sys.argv[3]) if len(sys.argv) > 3 else 100, 1e-3, 0, 4, 0.7)
    T(stage="finetune", data=str(W / "mix.json"), image_folder=files["image_folder"], output_dir=W / "cont",
      model=str(base), focus_config=FocusConfig(), overrides=R._round_overrides(rec, rnd), lora=True, progress=False,
      resume=R._checkpoint_in(W / "cont"))
    R._pack_refreshed(Path("runs/s1fix/base"), Path("runs/s1fix/ship/stock"), W / "cont",
                      W / "ship" / "stock", "cont")
