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


def swap_probe(model, processor, questions: int) -> tuple[list, list[str], list[str]]:
    """(items, answers with their own picture, answers with another random test picture) for the first
    ``questions`` yes/no questions of the fixed test sample (seeded: the same pictures every run)."""
    sample = D.test_items(2000, seed=0)
    items = [it for it in sample if it.qtype == "yes/no"][:questions]
    pictures = sorted({it.image for it in sample})
    rng = random.Random(0)
    swapped = [dataclasses.replace(it, image=rng.choice([p for p in pictures if p != it.image])) for it in items]
    own = [r["prediction"].strip().lower() for r in E.evaluate(model, processor, items, max_new_tokens=3).rows]
    other = [r["prediction"].strip().lower() for r in E.evaluate(model, processor, swapped, max_new_tokens=3).rows]
    return items, own, other


def summary(items, own: list[str], other: list[str]) -> str:
    correct = sum(E.is_correct(p, it.answer) for p, it in zip(own, items))
    same = sum(a == b for a, b in zip(own, other))
    return (f"{len(items)} yes/no questions: accuracy with their own picture {correct / len(items):.1%}; "
            f"answers unchanged with another picture: {same}/{len(items)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--questions", type=int, default=240)
    args = ap.parse_args()
    model, processor = load_model(args.model, "cpu", "float32")
    items, own, other = swap_probe(model, processor, args.questions)
    print(summary(items, own, other))
    for negated in (False, True):
        answers = Counter(p for p, it in zip(own, items) if D.is_negated(it.question) == negated)
        print(f"{'negated' if negated else 'positive'} questions: {sum(answers.values())}, answers {dict(answers)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
