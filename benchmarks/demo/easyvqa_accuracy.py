"""easy-VQA test accuracy of the shipped demo twins (issue 16's three-model table).

    python benchmarks/demo/easyvqa_accuracy.py --out runs/demo-acc [--sample 2000]

Rows: (a) the stock-trained twin (``--model demo``), (b) the twin trained with VMTC + CMAI, run as
trained (``--model demo-focus`` + its focus_config.yaml), (c) the stock twin with the same VMTC + CMAI
switched on at inference only. The fixed test sample is ``focusvlm.demo.data.test_items(sample, seed 0)``,
the one the recipe writes into data/. Each model's rows go to ``<out>/<name>.jsonl`` with a
``.summary.json`` beside it; a model whose summary exists is not rerun. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from focusvlm.config import FocusConfig
from focusvlm.demo import data as D
from focusvlm.demo import evaluate as E
from focusvlm.models.demo import demo_focus_config_path
from focusvlm.runtime import load_model

ROWS = (("stock twin", "demo", False), ("VMTC+CMAI-trained twin", "demo-focus", True),
        ("stock twin + VMTC+CMAI at inference", "demo", True))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sample", type=int, default=2000, help="test questions (0 = all 9,673)")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    items = D.test_items(args.sample or None, seed=0)
    from focusvlm.compress.vmtc_method import VMTCConfig
    from focusvlm.inhibit.cmai_method import CMAIConfig

    trained_twin = demo_focus_config_path().is_file()
    # the recipe's focus setting; the trained twin's own file where it is shipped
    focus = (FocusConfig.load(demo_focus_config_path()) if trained_twin
             else FocusConfig(vmtc=VMTCConfig(target=0.5), cmai=CMAIConfig(gamma_max=0.6)))
    summaries = {}
    loaded: dict[str, tuple] = {}
    for title, name, with_focus in ROWS:
        if name == "demo-focus" and not trained_twin:
            print(f"{title}: not shipped, skipped", file=sys.stderr)
            continue
        slug = title.split(" ")[0].lower().replace("+", "") + ("-inference" if name == "demo" and with_focus else "")
        path = args.out / f"{slug}.jsonl"
        summary_path = path.with_suffix(".summary.json")
        if summary_path.is_file():
            summaries[title] = json.loads(summary_path.read_text())
            print(f"{title}: done before ({summary_path})", file=sys.stderr)
            continue
        if name not in loaded:
            loaded.clear()  # one model in memory at a time
            loaded[name] = load_model(name, "cpu", "float32")
        model, processor = loaded[name]
        report = E.evaluate(model, processor, items, focus=focus if with_focus else None, batch_size=args.batch_size,
                            max_new_tokens=3, out_jsonl=path,
                            progress=lambda done, total: print(f"\r{title}: {done}/{total}", end="", file=sys.stderr))
        print(f"\n{title}: {report.accuracy:.1%} in {report.seconds:.0f} s", file=sys.stderr)
        summaries[title] = json.loads(summary_path.read_text())
    types = D.QUESTION_TYPES
    n_by_type = {t: int(next(iter(summaries.values()))["per_type"][t]["n"]) for t in types}
    print(f"| model | image tokens | all (n={len(items)}) | " + " | ".join(f"{t} (n={n_by_type[t]})" for t in types)
          + " | seconds |")
    print("|---|---|---|" + "---|" * len(types) + "---|")
    for title, s in summaries.items():
        cells = " | ".join(f"{100 * s['per_type'][t]['accuracy']:.1f}" for t in types)
        print(f"| {title} | {s['image_tokens']:.0f} | {100 * s['accuracy']:.1f} | {cells} | {s['seconds']:.0f} |")
    (args.out / "table.json").write_text(json.dumps(summaries, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
