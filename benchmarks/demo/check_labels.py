"""Check the easy-VQA image labels: pixel reading vs every label the questions decide (both splits).

    PYTHONPATH=. python benchmarks/demo/check_labels.py > benchmarks/demo/check_labels.log
"""
import collections
import time

from focusvlm.demo import data as d

start = time.time()
for split in d.SPLITS:
    items = d.read_split(split)
    facts = d.question_facts(items)
    checked, wrong, undecided = collections.Counter(), collections.Counter(), collections.Counter()
    for image_id, per in facts.items():
        seen = d.pixel_labels(d.data_root() / f"{split}/images/{image_id}.png")
        for k, (kind, vocab) in enumerate((("color", d.COLORS), ("shape", d.SHAPES))):
            truth = d.decided(*per[kind], vocab)
            if truth is None:
                undecided[kind] += 1
                continue
            checked[kind] += 1
            if seen[k] != truth:
                wrong[kind] += 1
                print(f"  {split} image {image_id}: {kind} {truth} by questions, {seen[k]} by pixels")
    labels = d.image_labels(items)  # raises on any contradiction
    print(f"{split}: {len(facts)} images; labels decided by the questions and checked against the pixels: "
          f"{dict(checked)}, disagreements: {dict(wrong) or 0}; left to the pixels: {dict(undecided)}; "
          f"label counts: {sorted(collections.Counter(labels.values()).items())[:3]} ...")
print(f"{time.time() - start:.1f} s")
