"""Does a demo twin's yes/no answer depend on the picture? (issue 16's diagnostic)

    python benchmarks/demo/yesno_probe.py

The first 240 yes/no questions of the fixed test sample, answered once with their own picture and once
with another test picture chosen at random: a model that reads the picture changes many answers.
Prints the accuracy, how many answers stayed the same, and the answers per question form.
"""
import random
from focusvlm import load
from focusvlm.demo import data as D
from focusvlm.demo.evaluate import prompt_for, is_correct
from focusvlm.runtime import HFGenerator, load_image
items = [it for it in D.test_items(2000, seed=0) if it.qtype == "yes/no"][:240]
root = D.data_root()
pics = sorted({it.image for it in D.test_items(2000, seed=0)})
rng = random.Random(0)
model, proc = load("demo")
gen = HFGenerator(model, proc)
def run(paths):
    out = []
    for i in range(0, len(items), 16):
        chunk = items[i:i+16]
        out += [g.text.strip().lower() for g in gen.generate([prompt_for(it.question) for it in chunk],
                                                             [load_image(root / p) for p in paths[i:i+16]], 3)]
    return out
own = run([it.image for it in items])
other = run([rng.choice([p for p in pics if p != it.image]) for it in items])
same = sum(a == b for a, b in zip(own, other))
acc = sum(is_correct(a, it.answer) for a, it in zip(own, items))
neg = [D.is_negated(it.question) for it in items]
print(f"{len(items)} yes/no questions: accuracy with own picture {acc/len(items):.1%}; "
      f"answer unchanged with another picture: {same}/{len(items)}")
for flag in (False, True):
    ans = [a for a, n in zip(own, neg) if n == flag]
    print("negated" if flag else "positive", len(ans), {w: ans.count(w) for w in set(ans)})
