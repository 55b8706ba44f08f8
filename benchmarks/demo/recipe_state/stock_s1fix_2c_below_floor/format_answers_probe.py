"""Exploration (issue 31): self-distillation of the base LM's answers to text requests that carry a formatting
request (worded here, apart from the benchmark's 16 templates), in a 100-step warm restart of runs/s1fix/ship/stock
(4 short answers + 3 formatting-request text answers + 1 plain text answer per batch); then the text arm.
Kept as it ran (2026-12-05, fourth session), from the repository root:

    python format_answers_probe.py gen /tmp/p/fmt; python format_answers_probe.py mix /tmp/p/fmt
    python picture_answers_probe.py train /tmp/p/fmt 100     # with /tmp/p/lmstyle/base copied to /tmp/p/fmt/base
    python -m focusvlm.demo.experiment --out DIR --models /tmp/p/fmt/ship --arms text   # -> text_arm_fmt.md
"""
import json, random, sys
from pathlib import Path
from focusvlm.demo import data as D, recipe as R
from focusvlm.demo.textdata import REQUESTS, TOPICS, answer_prompts, read_answers, is_good_answer
W = Path(sys.argv[2]); W.mkdir(parents=True, exist_ok=True)
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
rng = random.Random("fmt")
prompts = []
for n in range(256):
    t, r, f = rng.randrange(len(TOPICS)), rng.randrange(len(REQUESTS)), n % len(FORMATS)
    prompts.append({"key": f"f{n:03d}", "prompt": REQUESTS[r].format(topic=TOPICS[t]) + "\n" + FORMATS[f]})
step = sys.argv[1]
if step == "gen":
    from focusvlm.models.demo.assemble import DEMO_CHAT_TEMPLATE
    from focusvlm.models.demo.lm import smollm2_lm
    lm, tok = smollm2_lm()
    answer_prompts(prompts, W / "answers.jsonl", lm, tok, DEMO_CHAT_TEMPLATE, max_new_tokens=160, log=print)
elif step == "mix":
    rows = read_answers(W / "answers.jsonl")
    keep = [{"id": f"fmt-{p['key']}", "conversations": [{"from": "human", "value": p["prompt"]},
                                                        {"from": "gpt", "value": rows[p["key"]]["answer"]}]}
            for p in prompts if is_good_answer(rows[p["key"]]["answer"], rows[p["key"]]["finished"], min_words=3)]
    print(len(keep), "of", len(prompts), "kept")
    for k in keep[:6]: print(repr(k["conversations"][0]["value"][-60:]), "->", repr(k["conversations"][1]["value"][:120]))
    c2 = json.load(open("runs/r3/data/stage2c_mix.json"))
    short = [r for r in c2 if "image" in r and D.SHORT_ANSWER in r["conversations"][0]["value"]]
    texts = [r for r in c2 if "image" not in r]
    mix = D.interleave(short, 4, [keep[0::3], keep[1::3], keep[2::3], texts], 100)
    json.dump(mix, open(W / "mix.json", "w"), indent=1)
    print(len(mix), "records")
