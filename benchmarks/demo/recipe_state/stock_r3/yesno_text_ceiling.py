"""Exploration (issue 31, 2026-12-05, sixth session; from the repository root): can the frozen base LM make easy-VQA's
yes/no comparison at all when it is told the picture's true description in words? With the LM frozen in stage 2 the
projector cannot see the question (the picture comes first), so the comparison has to be made by the frozen LM; this
measures its level with the best possible "picture tokens", the words themselves.

For every yes/no question of the fixed 2,000-question test sample (data/easyvqa_test_questions.jsonl of a recipe run)
the base LM gets the description and the question in one user turn (two framings) and the margin
log P(yes) - log P(no) at the first answer token (either case) is read. Reported: accuracy at margin 0, and at the
best single threshold over the margins (the most any constant bias, e.g. one a projector could learn, could add),
for plain and negated questions, with 95 % bootstrap intervals.

    python benchmarks/demo/recipe_state/stock_r3/yesno_text_ceiling.py runs/r3 > yesno_text_ceiling.json   # ~20 min alone
"""
import json, random, sys
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from focusvlm.demo.data import SHORT_ANSWER, is_negated

run = Path(sys.argv[1])
model = LlavaForConditionalGeneration.from_pretrained(run / "base").eval()
tok = AutoProcessor.from_pretrained(run / "base").tokenizer
rows = [json.loads(line) for line in open(run / "data" / "easyvqa_test_questions.jsonl")]
rows = [r for r in rows if r["type"] == "yes/no"]
first = lambda words: [tok.encode(w, add_special_tokens=False)[0] for w in words]
yes, no = first(("yes", "Yes")), first(("no", "No"))
FRAMINGS = {"training prompt, description in place of the picture": "{d}\n{q}\n" + SHORT_ANSWER,
            "told, yes or no": "Here is a description of a picture: {d}\nQuestion: {q}\nAnswer yes or no."}


def interval(hits: list[bool], n: int = 2000) -> list[float]:
    rng = random.Random(0)
    means = sorted(sum(rng.choices(hits, k=len(hits))) / len(hits) for _ in range(n))
    return [round(means[int(0.025 * n)], 3), round(means[int(0.975 * n)], 3)]


report = {"questions": len(rows), "share_yes": sum(r["answer"] == "yes" for r in rows) / len(rows), "framings": {}}
for name, framing in FRAMINGS.items():
    margins = []
    for r in rows:
        ids = tok.apply_chat_template([{"role": "user", "content": framing.format(d=r["description"], q=r["question"])}],
                                      add_generation_prompt=True, return_tensors="pt")
        ids = ids if torch.is_tensor(ids) else ids["input_ids"]
        with torch.no_grad():
            lp = model(input_ids=ids).logits[0, -1].log_softmax(-1)
        margins.append((torch.logsumexp(lp[yes], 0) - torch.logsumexp(lp[no], 0)).item())
    truth = [r["answer"] == "yes" for r in rows]
    best = max(set(margins) | {float("-inf")}, key=lambda t: sum((m > t) == y for m, y in zip(margins, truth)))
    out = {}
    for part, keep in (("all", lambda r: True), ("plain", lambda r: not is_negated(r["question"])),
                       ("negated", lambda r: is_negated(r["question"]))):
        idx = [i for i, r in enumerate(rows) if keep(r)]
        at0 = [(margins[i] > 0) == truth[i] for i in idx]
        atb = [(margins[i] > best) == truth[i] for i in idx]
        out[part] = {"n": len(idx), "accuracy_at_0": round(sum(at0) / len(idx), 3), "interval_at_0": interval(at0),
                     "accuracy_best_threshold": round(sum(atb) / len(idx), 3), "interval_best": interval(atb),
                     "says_yes_at_0": round(sum(margins[i] > 0 for i in idx) / len(idx), 3)}
    report["framings"][name] = {"best_threshold": best, **out}
print(json.dumps(report, indent=1))
