"""Does a demo twin's yes/no answer depend on the picture? (issue 16's diagnostic)

    python benchmarks/demo/yesno_probe.py [--model demo] [--questions 240]

The first yes/no questions of the fixed test sample, answered once with their own picture and once with
another test picture chosen at random (seeded): a model that reads the picture changes many answers.
Prints the accuracy, how many answers stayed the same, and the answers per question form.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
from collections import Counter

from focusvlm.demo import data as D
from focusvlm.demo import evaluate as E
from focusvlm.runtime import load_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--questions", type=int, default=240)
    args = ap.parse_args()
    sample = D.test_items(2000, seed=0)
    items = [it for it in sample if it.qtype == "yes/no"][:args.questions]
    pictures = sorted({it.image for it in sample})
    rng = random.Random(0)
    swapped = [dataclasses.replace(it, image=rng.choice([p for p in pictures if p != it.image])) for it in items]
    model, processor = load_model(args.model, "cpu", "float32")
    own = [r["prediction"].strip().lower() for r in E.evaluate(model, processor, items, max_new_tokens=3).rows]
    other = [r["prediction"].strip().lower() for r in E.evaluate(model, processor, swapped, max_new_tokens=3).rows]
    correct = sum(E.is_correct(p, it.answer) for p, it in zip(own, items))
    same = sum(a == b for a, b in zip(own, other))
    print(f"{len(items)} yes/no questions: accuracy with their own picture {correct / len(items):.1%}; "
          f"answers unchanged with another picture: {same}/{len(items)}")
    for negated in (False, True):
        answers = Counter(p for p, it in zip(own, items) if D.is_negated(it.question) == negated)
        print(f"{'negated' if negated else 'positive'} questions: {sum(answers.values())}, answers {dict(answers)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
