"""easy-VQA evaluation: answer normalisation, the per-type split, the pipeline on a tiny and on the real demo model."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("easy_vqa")

from focusvlm.demo import data as D  # noqa: E402
from focusvlm.demo import evaluate as E  # noqa: E402
from focusvlm.models.demo import assemble as A  # noqa: E402
from focusvlm.models.demo import vision as V  # noqa: E402
from focusvlm.models.demo.lm import tiny_test_lm  # noqa: E402


@pytest.mark.parametrize("prediction,answer,ok", [
    ("Red.", "red", True), ("the red", "red", True), ("  yes\nbecause", "yes", True), ("Grey", "gray", True),
    ("YES!", "yes", True), ("red circle", "red", False), ("no", "yes", False), ("", "no", False),
    ("A rectangle", "rectangle", True), ("rect", "rectangle", False),
])
def test_normalised_exact_match(prediction, answer, ok):
    assert E.is_correct(prediction, answer) is ok


def _items():
    """Two questions of each type from the fixed test sample."""
    sample = D.test_items(2000, seed=0)
    return [it for t in D.QUESTION_TYPES for it in [x for x in sample if x.qtype == t][:2]]


def test_score_splits_by_type():
    rows = [{"type": "color", "correct": True}, {"type": "color", "correct": False},
            {"type": "yes/no", "correct": True}]
    n, correct, per = E.score(rows)
    assert (n, correct) == (3, 2) and per == {"color": {"n": 2, "correct": 1, "accuracy": 0.5},
                                              "yes/no": {"n": 1, "correct": 1, "accuracy": 1.0}}
    chance = E.chance_accuracy(_items())
    assert chance["color"] == 1 / 8 and chance["shape"] == 1 / 3 and chance["yes/no"] == 0.5


def test_evaluate_pipeline_on_a_tiny_model(tmp_path):
    """A tiny LM behind a random tower: the report has every question, its type split and the prompts' token count;
    a FocusConfig is applied for the run only."""
    from focusvlm import FocusConfig

    torch.manual_seed(0)
    tower = V.fresh_tower(V.tower_config())
    words = "what color is the shape ? red yes no".split()
    lm, tok = tiny_test_lm(words, seed=1)
    model, processor = A.demo_llava(tower, V.tower_image_processor(64), lm=lm, tokenizer=tok)
    model.eval()
    items = _items()
    report = E.evaluate(model, processor, items, batch_size=4, max_new_tokens=2, out_jsonl=tmp_path / "rows.jsonl")
    assert report.n == 6 and set(report.per_type) == set(D.QUESTION_TYPES)
    assert all(v["n"] == 2 for v in report.per_type.values()) and report.image_tokens == 64
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [it.qid for it in items]
    assert all(r["correct"] == E.is_correct(r["prediction"], r["answer"]) for r in rows)
    assert json.loads((tmp_path / "rows.summary.json").read_text())["n"] == 6
    focused = E.evaluate(model, processor, items[:3], focus=FocusConfig(vmtc={"target": 0.25}), max_new_tokens=2)
    assert focused.image_tokens == 16 and focused.focus["vmtc"]["target"] == 0.25
    assert not hasattr(model, "_focusvlm") or model._focusvlm is None  # unpatched after the run
    assert E.evaluate(model, processor, items[:3], max_new_tokens=2).image_tokens == 64
    with pytest.raises(ValueError, match="no questions"):
        E.evaluate(model, processor, [])


def test_evaluate_writes_rows_as_it_goes_and_resumes(tmp_path, monkeypatch):
    """A run stopped after its first batch keeps that batch's rows; the rerun asks only the rest and ends with
    the rows and summary of an uninterrupted run; a torn last line is asked again; another run's file is refused."""
    torch.manual_seed(0)
    tower = V.fresh_tower(V.tower_config())
    lm, tok = tiny_test_lm("what color is the shape ? red yes no".split(), seed=1)
    model, processor = A.demo_llava(tower, V.tower_image_processor(64), lm=lm, tokenizer=tok)
    model.eval()
    items = _items()
    whole = E.evaluate(model, processor, items, batch_size=2, max_new_tokens=2, out_jsonl=tmp_path / "whole.jsonl")
    out = tmp_path / "rows.jsonl"

    class Stop(Exception):
        pass

    def stop_after_first_batch(done, total):
        raise Stop

    with pytest.raises(Stop):
        E.evaluate(model, processor, items, batch_size=2, max_new_tokens=2, out_jsonl=out,
                   progress=stop_after_first_batch)
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in kept] == [it.qid for it in items[:2]] and not out.with_suffix(".summary.json").exists()
    with out.open("a") as f:  # a third row torn mid-write
        f.write(json.dumps(whole.rows[2])[:20])
    rec = _Recorder(monkeypatch)
    report = E.evaluate(model, processor, items, batch_size=2, max_new_tokens=2, out_jsonl=out)
    assert sum(len(c) for c in rec.calls) == 4  # the two kept rows are not asked again; the torn one is
    assert report.rows == whole.rows and (report.n, report.correct) == (whole.n, whole.correct)
    assert out.read_text() == (tmp_path / "whole.jsonl").read_text()
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["n"] == 6 and summary["image_tokens"] == whole.image_tokens == 64
    with pytest.raises(ValueError, match="mode differ"):
        E.evaluate(model, processor, items, max_new_tokens=2, out_jsonl=out, mode="given-description")
    with pytest.raises(ValueError, match="ids, questions differ"):
        E.evaluate(model, processor, items[:3], batch_size=2, max_new_tokens=2, out_jsonl=out)


class _Recorder:
    """Wraps a generator's generate to record (prompt, has image) per call."""

    def __init__(self, monkeypatch):
        from focusvlm import runtime

        self.calls = []
        real = runtime.HFGenerator.generate

        def generate(gen, prompts, images, max_new_tokens):
            self.calls.append([(p, im is not None) for p, im in zip(prompts, images)])
            return real(gen, prompts, images, max_new_tokens)

        monkeypatch.setattr(runtime.HFGenerator, "generate", generate)


def test_evaluate_modes_answer_from_a_description(monkeypatch):
    """given-description: no picture, the true description in the prompt; describe-then-answer: the model's own
    description first (with the picture), then the question text-only; an unknown mode is named."""
    torch.manual_seed(0)
    tower = V.fresh_tower(V.tower_config())
    lm, tok = tiny_test_lm("what color is the shape ? red yes no".split(), seed=1)
    model, processor = A.demo_llava(tower, V.tower_image_processor(64), lm=lm, tokenizer=tok)
    model.eval()
    items = _items()[:2]
    labels = D.image_labels(D.read_split("test"))
    rec = _Recorder(monkeypatch)
    report = E.evaluate(model, processor, items, max_new_tokens=2, mode="given-description")
    assert len(rec.calls) == 1 and not any(has for _, has in rec.calls[0])
    for (prompt, _), it, row in zip(rec.calls[0], items, report.rows):
        truth = D.true_description(*labels[it.image_id])
        assert truth in prompt and E.prompt_for(it.question) in prompt and row["description"] == truth
    assert report.image_tokens == 0
    rec.calls.clear()
    # a third question about the first picture: described once, both its questions answered from that description
    same = next(it for it in D.read_split("test") if it.image_id == items[0].image_id and it.qid != items[0].qid)
    report = E.evaluate(model, processor, items + [same], max_new_tokens=2, mode="describe-then-answer")
    assert [has for _, has in rec.calls[0]] == [True, True] and [has for _, has in rec.calls[1]] == [False] * 3
    assert all(row["description"] in prompt for (prompt, _), row in zip(rec.calls[1], report.rows))
    assert report.rows[2]["description"] == report.rows[0]["description"]
    with pytest.raises(ValueError, match="mode 'upside-down'"):
        E.evaluate(model, processor, items, mode="upside-down")


@pytest.mark.slow
def test_random_vision_demo_model_runs_the_pipeline(demo):
    """The shipped random-vision demo: the pipeline runs end to end on the real LM (accuracy near chance expected)."""
    model, processor = demo
    items = _items()
    report = E.evaluate(model, processor, items, batch_size=6, max_new_tokens=4)
    assert report.n == 6 and set(report.per_type) == set(D.QUESTION_TYPES)
    assert all(r["prediction"] for r in report.rows)  # the real LM answers something
    assert 0.0 <= report.accuracy <= 1.0
