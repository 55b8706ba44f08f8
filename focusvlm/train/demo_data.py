"""A tiny LLaVA-format data set from the bundled photos, for the CPU end-to-end run on the demo model.

``write_demo_data(folder)`` writes ``images/`` (the three bundled photos),
``captions.json`` (stage 1: image + caption), ``instruct.json`` (stage 2:
multi-turn image conversations plus text-only ones) and ``questions.jsonl``
(for ``focusvlm ifbench build``). It exercises every code path; it teaches
the model nothing worth measuring.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"

CAPTIONS = {
    "astronaut.jpg": ["An astronaut in a white suit stands in front of an American flag.",
                      "A smiling astronaut poses for an official portrait.",
                      "A woman in a spacesuit holds her helmet next to a flag."],
    "chelsea.jpg": ["A tabby cat looks to the side.", "Close-up of a striped cat with green eyes.",
                    "A brown and grey cat sits indoors."],
    "coffee.jpg": ["A cup of coffee with latte art on a saucer.", "A white cup of cappuccino seen from above.",
                   "Coffee with a heart drawn in the milk foam."],
}

QA = {
    "astronaut.jpg": [("What is the person wearing?", "A white spacesuit with mission patches."),
                      ("What is behind the person?", "An American flag.")],
    "chelsea.jpg": [("What animal is this?", "A cat."), ("What colour are its eyes?", "They look green.")],
    "coffee.jpg": [("What drink is shown?", "A cup of coffee, probably a cappuccino."),
                   ("What is drawn in the foam?", "A heart-shaped pattern.")],
}

TEXT_ONLY = [("Write one sentence about the sea.", "The sea stretches to the horizon, grey and restless."),
             ("What is two plus three?", "Two plus three is five."),
             ("Answer in lowercase: what colour is the sky?", "the sky is blue on a clear day.")]


def write_demo_data(folder: str | Path) -> dict[str, Path]:
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for name in CAPTIONS:
        shutil.copy(ASSETS / name, folder / "images" / name)
    captions = []
    for name, caps in CAPTIONS.items():
        for k, cap in enumerate(caps):
            captions.append({"id": f"cap-{name[:-4]}-{k}", "image": name,
                             "conversations": [{"from": "human", "value": "<image>\nDescribe the image briefly."},
                                               {"from": "gpt", "value": cap}]})
    instruct = []
    for name, pairs in QA.items():
        (q1, a1), (q2, a2) = pairs
        instruct.append({"id": f"qa-{name[:-4]}", "image": name,
                         "conversations": [{"from": "human", "value": f"<image>\n{q1}"}, {"from": "gpt", "value": a1},
                                           {"from": "human", "value": q2}, {"from": "gpt", "value": a2}]})
        instruct.append({"id": f"cap-{name[:-4]}", "image": name,
                         "conversations": [{"from": "human", "value": f"{q2}\n<image>"},
                                           {"from": "gpt", "value": CAPTIONS[name][0]}]})
    for k, (q, a) in enumerate(TEXT_ONLY):
        instruct.append({"id": f"text-{k}", "conversations": [{"from": "human", "value": q},
                                                               {"from": "gpt", "value": a}]})
    paths = {"captions": folder / "captions.json", "instruct": folder / "instruct.json",
             "questions": folder / "questions.jsonl", "images": folder / "images"}
    paths["captions"].write_text(json.dumps(captions, indent=1))
    paths["instruct"].write_text(json.dumps(instruct, indent=1))
    paths["questions"].write_text("".join(
        json.dumps({"id": name[:-4], "image": f"images/{name}", "question": QA[name][0][0]}) + "\n" for name in QA))
    return paths
