"""Tiny datasets in the official layouts of the standard benchmarks, written to a temp folder.

Each builder writes 4 questions over the bundled photos (focusvlm/assets) and
returns the folder (or file) to pass as ``--data``. Formats follow the real
files: LLaVA-1.5's question JSONLs, the official answer files, MME's release
folder, MMBench's base64 TSV.
"""

from __future__ import annotations

import base64
import csv
import json
import shutil
from pathlib import Path

from focusvlm.models.factory import demo_image_path

PHOTOS = ("astronaut", "chelsea", "coffee")
SUFFIX = "\nAnswer the question using a single word or phrase."


def _copy(name: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(demo_image_path(name), dest)


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_vqav2(root: Path, with_annotations: bool = True) -> Path:
    d = root / "vqav2"
    images = [f"COCO_val2014_{i:012d}.jpg" for i in (1, 2, 3)]
    for img, photo in zip(images, PHOTOS):
        _copy(photo, d / "val2014" / img)
    qs = [(101, images[0], "What is the person wearing?", ["suit"] * 8 + ["space suit"] * 2),
          (102, images[1], "What animal is this?", ["cat"] * 10),
          (103, images[2], "How many cups are there?", ["1"] * 7 + ["2"] * 3),
          (104, images[0], "Is this person in space?", ["no"] * 6 + ["yes"] * 4)]
    _jsonl(d / "llava_vqav2_mscoco_val2014.jsonl",
           [{"question_id": q, "image": img, "text": text + SUFFIX, "category": "default"} for q, img, text, _ in qs])
    if with_annotations:
        anns = [{"question_id": q, "image_id": int(img[-16:-4]), "question_type": "what", "answer_type": "other",
                 "multiple_choice_answer": a[0],
                 "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": k + 1} for k, x in enumerate(a)]}
                for q, img, _, a in qs]
        (d / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": anns}))
    return d


def make_gqa(root: Path) -> Path:
    d = root / "gqa"
    for i, photo in enumerate(PHOTOS):
        _copy(photo, d / "images" / f"n{i}.jpg")
    qs = [("201", "n0", "Is the person wearing a helmet?", "no"),
          ("202", "n1", "What animal is it?", "cat"),
          ("203", "n2", "What color is the cup?", "white"),
          ("204", "n1", "Is the cat on the left or right?", "left")]
    _jsonl(d / "llava_gqa_testdev_balanced.jsonl",
           [{"question_id": q, "image": f"{img}.jpg", "text": t + SUFFIX, "category": "default"} for q, img, t, _ in qs])
    (d / "testdev_balanced_questions.json").write_text(json.dumps(
        {q: {"imageId": img, "question": t, "answer": a, "fullAnswer": a} for q, img, t, a in qs}))
    return d


def make_textvqa(root: Path) -> Path:
    d = root / "textvqa"
    ids = ["003a8ae2ef43b901", "0054c91397f2fe05", "00685bc495504d61"]
    for img, photo in zip(ids, PHOTOS):
        _copy(photo, d / "train_images" / f"{img}.jpg")
    qs = [(34602, ids[0], "what is written on the flag?", "usa, nasa", ["USA"] * 9 + ["u.s.a."]),
          (34603, ids[1], "what brand is the cat food?", "purina", ["Purina"] * 10),
          (34604, ids[2], "what is the number on the cup?", "2, 3", ["2"] * 5 + ["two"] * 5),
          (34605, ids[0], "what agency is this?", "nasa", ["NASA"] * 10)]
    _jsonl(d / "llava_textvqa_val_v051_ocr.jsonl",
           [{"question_id": q, "image": f"{img}.jpg",
             "text": f"{t}\nReference OCR token: {ocr}{SUFFIX}"} for q, img, t, ocr, _ in qs])
    (d / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_name": "textvqa", "dataset_version": "0.5.1",
        "data": [{"question_id": q, "image_id": img, "question": t, "answers": a} for q, img, t, _, a in qs]}))
    return d


def make_mme(root: Path) -> Path:
    d = root / "MME_Benchmark_release_version"
    # layout 1: image and question file side by side
    _copy("chelsea", d / "existence" / "000000001.jpg")
    (d / "existence" / "000000001.txt").write_text(
        "Is there a cat in this image? Please answer yes or no.\tYes\n"
        "Is there a dog in this image? Please answer yes or no.\tNo\n")
    # layout 2: images/ + questions_answers_YN/
    _copy("astronaut", d / "artwork" / "images" / "10002.jpg")
    qa = d / "artwork" / "questions_answers_YN"
    qa.mkdir(parents=True)
    (qa / "10002.txt").write_text(
        "Is this artwork a painting? Please answer yes or no.\tNo\n"
        "Is this artwork a photograph? Please answer yes or no.\tYes\n")
    return d


def _b64(photo: str) -> str:
    return base64.b64encode(demo_image_path(photo).read_bytes()).decode()


def make_mmbench(root: Path, with_answers: bool = True, circular_copies: bool = False) -> Path:
    """Two 2-option questions: with generated rotations that is 4 samples."""
    d = root / "mmbench"
    d.mkdir(parents=True, exist_ok=True)
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "split", "image"]
    if not with_answers:
        header.remove("answer")
    rows = [
        {"index": 0, "question": "What animal is shown?", "hint": "nan", "A": "cat", "B": "dog", "C": "nan",
         "D": "nan", "answer": "A", "category": "image_topic", "l2-category": "coarse_perception", "split": "dev",
         "image": _b64("chelsea")},
        {"index": 1, "question": "Where is the person?", "hint": "Look at the background.", "A": "underwater",
         "B": "in space", "C": "nan", "D": "nan", "answer": "B", "category": "image_scene",
         "l2-category": "coarse_perception", "split": "dev", "image": _b64("astronaut")},
    ]
    if circular_copies:  # the official circular TSVs: copies point at the original's image
        rows += [dict(rows[0], index=1_000_000, A="dog", B="cat", answer="B", image="0"),
                 dict(rows[1], index=1_000_001, A="in space", B="underwater", answer="A", image="1")]
    path = d / ("mmbench_dev_20230712.tsv" if with_answers else "mmbench_test_en_20231003.tsv")
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=header, delimiter="\t", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


BUILDERS = {"vqav2": make_vqav2, "gqa": make_gqa, "textvqa": make_textvqa, "mme": make_mme, "mmbench": make_mmbench}
