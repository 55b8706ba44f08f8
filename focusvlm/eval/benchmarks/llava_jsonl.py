"""Base of the benchmarks that use LLaVA-1.5's question-file layout (VQAv2, GQA, TextVQA):

    <data>/<questions>.jsonl   one {"question_id", "image", "text"} per line
    <data>/<images>/           the images the "image" field names
    <data>/<annotations>       the official answers file (format per benchmark)

Subclasses name their default files, parse the answers file and score.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..registry import Benchmark
from ..samples import Sample
from . import common
from .common import DataError


class LlavaQuestionBenchmark(Benchmark):
    # LLaVA-1.5's eval limit; short-answer prompts stop after a few tokens, so the cap only bounds rambling
    default_max_new_tokens = 128
    question_files: tuple[str, ...] = ()
    image_dirs: tuple[str, ...] = ("images",)
    annotation_files: tuple[str, ...] = ()
    annotations_required = True
    suffixes: tuple[str, ...] = (common.SHORT_ANSWER,)

    # -- arguments -------------------------------------------------------------
    def add_eval_args(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--data", type=Path, required=True,
                            help=f"{self.name} folder (LLaVA-1.5 eval layout) or the question JSONL itself")
        parser.add_argument("--questions", type=Path, help="question JSONL (default: found in --data)")
        parser.add_argument("--images", type=Path,
                            help=f"image folder (default: --data/{' or '.join(self.image_dirs)})")
        parser.add_argument("--annotations", type=Path,
                            help=f"official answers file (default: --data/{' or '.join(self.annotation_files)})")
        common.add_prompt_arg(parser, common.SHORT_ANSWER)

    # -- files -----------------------------------------------------------------
    def files(self, args: argparse.Namespace) -> tuple[Path, Path, Path | None]:
        data = Path(args.data)
        if not data.exists():
            raise DataError(data, "--data does not exist")
        folder = data if data.is_dir() else data.parent
        questions = common.single_jsonl(data, self.question_files, "question file", getattr(args, "questions", None))
        images = common.pick(folder, getattr(args, "images", None), self.image_dirs, "image", folder=True)
        annotations = common.pick(folder, getattr(args, "annotations", None), self.annotation_files,
                                  "answers file", required=self.annotations_required)
        return questions, images, annotations

    def fingerprint(self, args: argparse.Namespace) -> Any:
        questions, _, annotations = self.files(args)
        return {"files": common.fingerprint_files(questions, annotations), "prompt_suffix": args.prompt_suffix,
                **self.extra_fingerprint(args)}

    def extra_fingerprint(self, args: argparse.Namespace) -> dict:
        return {}

    # -- samples ---------------------------------------------------------------
    def load_samples(self, args: argparse.Namespace) -> list[Sample]:
        questions, images, annotations = self.files(args)
        gold = self.read_annotations(annotations) if annotations is not None else None
        samples, lines = [], {}
        for n, rec in common.read_jsonl(questions, {"question_id": (str, int), "image": str, "text": str}):
            qid = str(rec["question_id"])
            if qid in lines:
                raise DataError(questions, f"question_id {qid} repeats line {lines[qid]}", line=n, field="question_id")
            lines[qid] = n
            question = self.question_text(rec["text"], args)
            meta: dict[str, Any] = {"question_id": rec["question_id"], "image": rec["image"]}
            if gold is not None:
                meta.update(self.gold_for(gold, rec, question, questions, n, annotations))
            samples.append(Sample(id=qid, image=str(images / rec["image"]),
                                  prompt=common.with_suffix(question, args.prompt_suffix), meta=meta))
        if not samples:
            raise DataError(questions, "holds no questions")
        common.check_images(samples, images, questions, lines)
        return samples

    def question_text(self, text: str, args: argparse.Namespace) -> str:
        return common.bare_question(text, self.suffixes)

    # -- per benchmark ---------------------------------------------------------
    def read_annotations(self, path: Path) -> Any:
        raise NotImplementedError

    def gold_for(self, gold: Any, rec: dict, question: str, qpath: Path, line: int, apath: Path) -> dict:
        raise NotImplementedError
