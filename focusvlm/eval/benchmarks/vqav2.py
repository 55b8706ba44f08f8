"""VQAv2: accuracy against the official val annotations, and a test-dev submission file.

Files (users bring them): LLaVA-1.5's question JSONL (e.g.
``llava_vqav2_mscoco_test-dev2015.jsonl``, or a val-split JSONL in the same
format), the COCO image folder (``test2015/`` or ``val2014/``) and, for
local scoring, ``v2_mscoco_val2014_annotations.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .. import scorers
from . import common
from .common import DataError
from .llava_jsonl import LlavaQuestionBenchmark


class VQAv2(LlavaQuestionBenchmark):
    name = "vqav2"
    description = "VQAv2 (official VQA accuracy on val; test-dev submission file for the evaluation server)"
    question_files = ("llava_vqav2_mscoco_test-dev2015.jsonl", "llava_vqav2_mscoco_val2014.jsonl")
    image_dirs = ("test2015", "val2014", "images")
    annotation_files = ("v2_mscoco_val2014_annotations.json",)
    annotations_required = False  # test-dev has no public answers: the run then only yields a submission

    def read_annotations(self, path: Path) -> dict[str, list[str]]:
        data = common.read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
            raise DataError(path, "expected the official layout {\"annotations\": [...]}", field="annotations")
        out = {}
        for i, ann in enumerate(data["annotations"]):
            where = f"annotations[{i}]"
            if not isinstance(ann, dict) or "question_id" not in ann:
                raise DataError(path, f"{where} has no question_id", field="question_id")
            answers = ann.get("answers")
            if not isinstance(answers, list) or not answers or not all(isinstance(a, dict) and "answer" in a for a in answers):
                raise DataError(path, f"{where} (question {ann['question_id']}) needs a list of {{\"answer\": ...}}",
                                field="answers")
            out[str(ann["question_id"])] = [str(a["answer"]) for a in answers]
        return out

    def gold_for(self, gold, rec, question, qpath, line, apath) -> dict:
        qid = str(rec["question_id"])
        if qid not in gold:
            raise DataError(qpath, f"question {qid} has no answers in {apath.name}", line=line, field="question_id")
        return {"answers": gold[qid]}

    def add_score_args(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--all-questions", type=Path,
                            help="JSONL of every test2015 question (LLaVA's llava_vqav2_mscoco_test2015.jsonl): "
                                 "questions the run did not answer are added with an empty answer, as the server "
                                 "expects the full set")

    def score(self, run_dir: Path, args: argparse.Namespace | None = None) -> dict:
        recs = common.predictions(run_dir)
        # submission: the raw answers (whitespace cleaned); the server applies the official normalisation itself
        submission = {}
        for r in recs:
            qid = r["meta"]["question_id"]
            submission[str(qid)] = {"question_id": qid, "answer": " ".join(common.response_text(r).split())}
        extra = getattr(args, "all_questions", None) if args is not None else None
        if extra is not None:
            for _, q in common.read_jsonl(common.require_file(Path(extra), "question file"), {"question_id": (str, int)}):
                submission.setdefault(str(q["question_id"]), {"question_id": q["question_id"], "answer": ""})
        sub_path = Path(run_dir) / "submission_vqav2.json"
        sub_path.write_text(json.dumps(list(submission.values())))
        scored = [r for r in recs if "answers" in r["meta"]]
        errors = sum(bool(r.get("error")) for r in recs)
        summary: dict[str, Any] = {"samples": len(recs), "errors": errors}
        lines = [f"# VQAv2 — {run_dir}", "", f"submission: {sub_path.name} ({len(submission)} answers)"]
        if scored:
            accs = [scorers.vqa_accuracy(common.response_text(r), r["meta"]["answers"]) for r in scored]
            summary["accuracy"] = 100 * sum(accs) / len(accs)
            summary["scored"] = len(scored)
            lines.append(f"accuracy: {summary['accuracy']:.2f}% over {len(scored)} questions ({errors} errors)")
        else:
            lines.append("no answers in this run (test split): upload the submission file to the evaluation server")
        return common.write_scores(run_dir, self.name, summary, {"submission": sub_path.name}, lines)


BENCHMARK = VQAv2()
