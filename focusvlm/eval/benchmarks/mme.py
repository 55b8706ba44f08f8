"""MME from its release folder, scored like MME's eval_tool/calculation.py.

Layout (``MME_Benchmark_release_version/``): one folder per subtask; each
image has a ``.txt`` with one ``question<TAB>Yes|No`` line per question (two
per image), either next to the image or as ``questions_answers_YN/<stem>.txt``
with the image in ``images/``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import scorers
from ..registry import Benchmark
from ..samples import Sample
from . import common
from .common import DataError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


def _find_image(folder: Path, stem: str) -> Path | None:
    for ext in IMAGE_EXTS:
        if (folder / (stem + ext)).is_file():
            return folder / (stem + ext)
    return None


def read_mme(root: Path) -> list[tuple[str, Path, int, str, str, Path]]:
    """(subtask, image, line, question, answer, txt file) for every question, checked."""
    if not root.is_dir():
        raise DataError(root, "MME release folder not found")
    tasks = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "eval_tool")))
    if not tasks:
        raise DataError(root, "holds no subtask folders (existence/, count/, ...)")
    out = []
    for task in tasks:
        if (task / "questions_answers_YN").is_dir():
            txts, image_dir = sorted((task / "questions_answers_YN").glob("*.txt")), task / "images"
        else:
            txts, image_dir = sorted(task.glob("*.txt")), task
        if not txts:
            raise DataError(task, "subtask folder holds no question files (*.txt)")
        for txt in txts:
            image = _find_image(image_dir, txt.stem)
            if image is None:
                raise DataError(txt, f"no image {txt.stem}.jpg/.png in {image_dir}")
            count = 0
            for n, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.rstrip("\r\n").split("\t")
                if len(parts) != 2:
                    raise DataError(txt, f"expected 'question<TAB>answer', found {len(parts)} tab-separated parts",
                                    line=n)
                question, answer = parts[0].strip(), parts[1].strip()
                if not question:
                    raise DataError(txt, "is empty", line=n, field="question")
                if answer.lower() not in ("yes", "no"):
                    raise DataError(txt, f"must be Yes or No, got {answer!r}", line=n, field="answer")
                out.append((task.name, image, n, question, answer, txt))
                count += 1
            if count == 0:
                raise DataError(txt, "holds no questions")
    return out


class MME(Benchmark):
    name = "mme"
    description = "MME (perception and cognition scores: 100*acc + 100*acc+ per subtask)"
    default_max_new_tokens = 128

    def add_eval_args(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--data", type=Path, required=True, help="MME_Benchmark_release_version folder")
        common.add_prompt_arg(parser, common.SHORT_ANSWER)

    def fingerprint(self, args: argparse.Namespace) -> Any:
        import hashlib

        h = hashlib.sha256()
        for task, image, n, q, a, _ in read_mme(Path(args.data)):
            h.update(f"{task}\t{image.name}\t{n}\t{q}\t{a}\n".encode())
        return {"questions": "sha256:" + h.hexdigest(), "prompt_suffix": args.prompt_suffix}

    def load_samples(self, args: argparse.Namespace) -> list[Sample]:
        samples = []
        for task, image, n, question, answer, txt in read_mme(Path(args.data)):
            # LLaVA-1.5 swaps MME's own " Please answer yes or no." for its short-answer line
            q = question.replace(common.MME_YES_NO, "") if args.prompt_suffix else question
            samples.append(Sample(id=f"{task}/{image.name}/{n}", image=str(image),
                                  prompt=common.with_suffix(q, args.prompt_suffix),
                                  meta={"category": task, "image": image.name, "answer": answer,
                                        "question": question}))
        return samples

    def score(self, run_dir: Path, args: argparse.Namespace | None = None) -> dict:
        recs = common.predictions(run_dir)
        rows = [{**r["meta"], "prediction": common.response_text(r)} for r in recs]
        s = scorers.mme_scores(rows)
        errors = sum(bool(r.get("error")) for r in recs)
        summary = {"perception": s["perception"], "cognition": s["cognition"], "total": s["total"],
                   "samples": len(recs), "errors": errors}
        lines = [f"# MME — {run_dir}", "", f"perception: {s['perception']:.2f} (score, max 2000)  cognition: {s['cognition']:.2f} (score, "
                 f"max 800)  ({len(recs)} questions, {errors} errors)", "",
                 "| subtask | acc (%) | acc+ (%) | score (acc + acc+, max 200) |", "|---|---|---|---|"]
        for task, d in s["subtasks"].items():
            lines.append(f"| {task} | {d['acc']:.2f} | {d['acc_plus']:.2f} | {d['score']:.2f} |")
        if s["missing_subtasks"]:
            lines += ["", f"missing subtasks (not in the totals): {', '.join(s['missing_subtasks'])}"]
        return common.write_scores(run_dir, self.name, summary,
                                   {"subtasks": s["subtasks"], "missing_subtasks": s["missing_subtasks"]}, lines)


BENCHMARK = MME()
