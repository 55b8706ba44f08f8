"""easy-VQA test accuracy of a model, overall and per question type (colour / shape / yes-no).

    report = evaluate(model, processor, data.test_items(2000), focus=None)

Each question is asked as in training (``data.SHORT_ANSWER`` appended), answered by
``runtime.HFGenerator`` (batched, greedy, the model's chat template) and scored by normalised
exact match against the one-word answer (``normalize_answer``). With ``focus`` the model is
patched for the run and unpatched after.
"""

from __future__ import annotations

import json
import string
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import data as D

_ARTICLES = {"a", "an", "the"}
# easy-VQA spells it "gray"; a model that learned English elsewhere may say "grey"
_SYNONYMS = {"grey": "gray"}


def normalize_answer(text: str) -> str:
    """Lowercase, first line only, punctuation removed, articles dropped, spaces collapsed, grey -> gray."""
    lines = text.strip().splitlines()
    first = lines[0] if lines else ""
    words = first.lower().translate(str.maketrans({c: " " for c in string.punctuation})).split()
    return " ".join(_SYNONYMS.get(w, w) for w in words if w not in _ARTICLES)


def is_correct(prediction: str, answer: str) -> bool:
    """Normalised exact match: "Red." and "the red" match "red"; "red circle" does not."""
    return normalize_answer(prediction) == normalize_answer(answer)


def prompt_for(question: str) -> str:
    return f"{question}\n{D.SHORT_ANSWER}"


@dataclass
class EvalReport:
    n: int
    correct: int
    accuracy: float
    per_type: dict[str, dict[str, float]]
    seconds: float
    image_tokens: float               # mean <image> tokens per prompt the LM received
    focus: dict[str, Any] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"{'type':<8} {'n':>6} {'accuracy':>9}"]
        for t, v in self.per_type.items():
            lines.append(f"{t:<8} {int(v['n']):>6} {v['accuracy']:>9.3f}")
        lines.append(f"{'all':<8} {self.n:>6} {self.accuracy:>9.3f}")
        return "\n".join(lines)


def score(rows: list[dict[str, Any]]) -> tuple[int, int, dict[str, dict[str, float]]]:
    """(n, correct, per-type {"n", "correct", "accuracy"}) of rows holding "type" and "correct"."""
    per: dict[str, dict[str, float]] = {}
    for t in D.QUESTION_TYPES:
        hits = [r["correct"] for r in rows if r["type"] == t]
        if hits:
            per[t] = {"n": len(hits), "correct": sum(hits), "accuracy": sum(hits) / len(hits)}
    correct = sum(r["correct"] for r in rows)
    return len(rows), correct, per


def evaluate(model: Any, processor: Any, items: list[D.VQAItem], focus: Any = None, batch_size: int = 16,
             max_new_tokens: int = 5, out_jsonl: str | Path | None = None,
             progress: Callable[[int, int], None] | None = None, mode: str = "direct") -> EvalReport:
    """Accuracy of ``model`` on ``items`` (``data.test_items``); ``focus``: a FocusConfig applied for the run.

    ``mode`` as ``focusvlm eval --mode``: ``direct`` (picture + question), ``describe-then-answer`` (the
    model describes the picture, then answers from its description, text only), ``given-description`` (no
    picture: the question answered from the picture's true description, ``data.true_description``).
    ``out_jsonl``: one row per question (id, type, question, answer, prediction, correct, image_tokens),
    appended batch by batch and resumed: a stopped run's rows are kept and only the rest is asked (the
    side file ``<out>.run.json`` names the run's questions and settings, and a different run is refused);
    when every question is answered the rows are rewritten in question order and ``<out>.summary.json``
    is written. ``seconds`` is this call's time.
    """
    import contextlib

    from ..api import patched
    from ..eval.engine import MODES, GenerationSettings, describe_pictures
    from ..eval.runs import append_records, atomic_write_text
    from ..eval.samples import default_answer_from_description
    from ..runtime import HFGenerator, load_image

    if not items:
        raise ValueError("evaluate: no questions given")
    if mode not in MODES:
        raise ValueError(f"evaluate: mode {mode!r}: choose one of {', '.join(MODES)}")
    root = D.data_root()
    labels = D.image_labels(items, root) if mode == "given-description" else {}
    describe = GenerationSettings(mode=mode)  # describe-then-answer: the IF benchmark's describe step, its settings
    start = time.time()
    focus_dict = focus.to_dict() if focus is not None and hasattr(focus, "to_dict") else None
    path = Path(out_jsonl) if out_jsonl is not None else None
    done = _resume(path, items, {"mode": mode, "focus": focus_dict, "max_new_tokens": max_new_tokens}) if path else {}
    todo = [it for it in items if it.qid not in done]
    # describe-then-answer: each picture described once (questions about the same picture share it), kept on resume
    described = {r["image"]: r["description"] for r in done.values() if r.get("description") is not None}
    context = patched(model, focus, processor) if focus is not None and todo else contextlib.nullcontext()
    with context, (path.open("a", encoding="utf-8") if path else contextlib.nullcontext()) as sink:
        generator = HFGenerator(model, processor)
        for k in range(0, len(todo), batch_size):
            chunk = todo[k:k + batch_size]
            prompts = [prompt_for(it.question) for it in chunk]
            if mode == "direct":
                outs = generator.generate(prompts, [load_image(root / it.image) for it in chunk], max_new_tokens)
                descriptions = [None] * len(chunk)
            else:
                if mode == "given-description":
                    descriptions = [D.true_description(*labels[it.image_id]) for it in chunk]
                else:  # describe-then-answer: the model's own description of the picture first
                    descriptions = describe_pictures(generator, describe, [it.image for it in chunk],
                                                     lambda image: load_image(root / image), described)
                outs = generator.generate([default_answer_from_description(p, d) for p, d in zip(prompts, descriptions)],
                                          [None] * len(chunk), max_new_tokens)
            batch_rows = [{"id": it.qid, "type": it.qtype, "image": it.image, "question": it.question,
                           "answer": it.answer, "prediction": out.text, "correct": is_correct(out.text, it.answer),
                           "image_tokens": out.image_tokens, **({} if desc is None else {"description": desc})}
                          for it, out, desc in zip(chunk, outs, descriptions)]
            done.update((r["id"], r) for r in batch_rows)
            if sink is not None:
                append_records(sink, batch_rows)
            if progress is not None:
                progress(len(done), len(items))
    rows = [done[it.qid] for it in items]
    n, correct, per = score(rows)
    report = EvalReport(n=n, correct=correct, accuracy=correct / n, per_type=per, seconds=round(time.time() - start, 1),
                        image_tokens=sum(r["image_tokens"] for r in rows) / n, focus=focus_dict, rows=rows)
    if path is not None:
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        summary = {k: v for k, v in asdict(report).items() if k != "rows"}
        atomic_write_text(path.with_suffix(".summary.json"), json.dumps(summary, indent=1))
    return report


def _resume(path: Path, items: list[D.VQAItem], settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The rows a stopped run of the same questions and settings left in ``path`` (id -> row), after the side
    file that names them is checked (or written, for a new run)."""
    from ..eval.runs import atomic_write_text, drop_torn_tail, ids_digest, read_jsonl_records

    run = {**settings, "questions": len(items), "ids": ids_digest(it.qid for it in items)}
    side = path.with_name(path.name + ".run.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    if side.is_file():
        before = json.loads(side.read_text())
        if before != run:
            changed = sorted(k for k in run if before.get(k) != run[k])
            raise ValueError(f"{path} holds another evaluation ({', '.join(changed)} differ, see {side}); "
                             f"use another output file or delete it")
    elif path.is_file() and path.stat().st_size:
        raise ValueError(f"{path} exists without {side.name}: not a resumable evaluation; use another output file")
    else:
        atomic_write_text(side, json.dumps(run, indent=1))
    drop_torn_tail(path)  # a row torn by a stop mid-write: its question is asked again
    return {r["id"]: r for r in read_jsonl_records(path)}


def chance_accuracy(items: list[D.VQAItem]) -> dict[str, float]:
    """Accuracy of guessing uniformly within each question's answer set (1/8, 1/3, 1/2), per type and overall."""
    sizes = {"color": len(D.COLORS), "shape": len(D.SHAPES), "yes/no": 2}
    per = {t: 1 / sizes[t] for t in D.QUESTION_TYPES if any(it.qtype == t for it in items)}
    return {**per, "all": sum(1 / sizes[it.qtype] for it in items) / len(items)}

