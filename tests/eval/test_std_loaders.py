"""Loaders, prompts, error reports and scoring of the standard benchmarks, without a model.

Scoring goes through the real engine loop (focusvlm.eval.engine.run) with a
fake generator that answers from the prompt text, so the run-folder format is
the one `focusvlm eval` writes.
"""

import argparse
import json

import pytest

from fixtures_std import make_gqa, make_mmbench, make_mme, make_textvqa, make_vqav2
from focusvlm.eval import engine
from focusvlm.eval.benchmarks import STANDARD
from focusvlm.eval.benchmarks.common import DataError
from focusvlm.eval.benchmarks.mmbench import read_xlsx_rows, rotations

from focusvlm.eval import registry  # noqa: E402


def bench_args(name, *argv):
    bench = registry.get(name)
    p = argparse.ArgumentParser()
    bench.add_eval_args(p)
    return bench, p.parse_args([str(a) for a in argv])


class Oracle:
    """Answers by looking up a key that occurs in the prompt."""

    def __init__(self, table):
        self.table = table
        self.prompts = []

    def generate(self, prompts, images, max_new_tokens):
        out = []
        for p in prompts:
            self.prompts.append(p)
            text = next((v for k, v in self.table.items() if k in p), "I do not know")
            out.append(engine.Generation(text=text, prompt_tokens=1, new_tokens=1))
        return out


def run_and_score(name, tmp_path, table, *argv):
    bench, args = bench_args(name, *argv)
    samples = bench.load_samples(args)
    out = tmp_path / f"run_{name}"
    manifest = engine.build_manifest(model="fake", config={}, benchmark=name,
                                     settings=engine.GenerationSettings(), fingerprint=bench.fingerprint(args))
    engine.run(samples, Oracle(table), out, manifest, engine.GenerationSettings(max_new_tokens=8, batch_size=2),
               progress=False)
    return bench.score(out), out, samples


def test_all_five_are_registered():
    assert set(STANDARD) <= set(registry.names())


# --------------------------------------------------------------------------- VQAv2


def test_vqav2_samples_and_prompt(tmp_path):
    d = make_vqav2(tmp_path)
    bench, args = bench_args("vqav2", "--data", d)
    samples = bench.load_samples(args)
    assert [s.id for s in samples] == ["101", "102", "103", "104"]
    # LLaVA's files already carry the suffix: it must appear exactly once
    assert samples[1].prompt == "What animal is this?\nAnswer the question using a single word or phrase."
    assert samples[1].meta["answers"] == ["cat"] * 10
    assert samples[0].image.endswith("val2014/COCO_val2014_000000000001.jpg")
    _, args = bench_args("vqav2", "--data", d, "--prompt-suffix", "")
    assert bench.load_samples(args)[1].prompt == "What animal is this?"


def test_vqav2_scoring_and_submission(tmp_path):
    d = make_vqav2(tmp_path)
    table = {"wearing": "A suit.", "animal": "Cat", "cups": "two", "space": "yes"}
    scores, out, _ = run_and_score("vqav2", tmp_path, table, "--data", d)
    # suit: 8 matches -> 1; cat -> 1; "two" -> "2": 3 humans -> 0.9; yes: 4 humans -> 1
    assert scores["summary"]["accuracy"] == pytest.approx(100 * (1 + 1 + 0.9 + 1) / 4)
    sub = json.loads((out / "submission_vqav2.json").read_text())
    assert {"question_id": 103, "answer": "two"} in sub  # raw answer: the server normalises it
    assert len(sub) == 4
    assert json.loads((out / "scores.json").read_text())["benchmark"] == "vqav2"


def test_vqav2_test_split_without_annotations_gives_submission_only(tmp_path):
    d = make_vqav2(tmp_path, with_annotations=False)
    extra = tmp_path / "all.jsonl"
    extra.write_text("".join(json.dumps({"question_id": q}) + "\n" for q in (101, 102, 103, 104, 999)))
    bench, args = bench_args("vqav2", "--data", d)
    samples = bench.load_samples(args)
    assert "answers" not in samples[0].meta
    out = tmp_path / "run"
    engine.run(samples, Oracle({}), out, {"benchmark": "vqav2"}, engine.GenerationSettings(), progress=False)
    scores = bench.score(out, argparse.Namespace(all_questions=extra))
    assert "accuracy" not in scores["summary"]
    sub = json.loads((out / "submission_vqav2.json").read_text())
    assert len(sub) == 5 and {"question_id": 999, "answer": ""} in sub


# --------------------------------------------------------------------------- GQA / TextVQA


def test_gqa_scoring(tmp_path):
    d = make_gqa(tmp_path)
    table = {"helmet": "No.", "animal": "cat", "color": "White cup", "left or right": "Left"}
    scores, _, samples = run_and_score("gqa", tmp_path, table, "--data", d)
    assert samples[0].meta["answer"] == "no"
    assert scores["summary"]["accuracy"] == pytest.approx(75.0)  # "White cup" is not "white"


def test_textvqa_ocr_variants_and_scoring(tmp_path):
    d = make_textvqa(tmp_path)
    bench, args = bench_args("textvqa", "--data", d)
    keep = bench.load_samples(args)
    assert keep[0].prompt == ("what is written on the flag?\nReference OCR token: usa, nasa\n"
                              "Answer the question using a single word or phrase.")
    _, args = bench_args("textvqa", "--data", d, "--ocr-tokens", "drop")
    drop = bench.load_samples(args)
    assert drop[0].prompt == "what is written on the flag?\nAnswer the question using a single word or phrase."
    assert bench.fingerprint(args)["ocr_tokens"] == "drop"
    table = {"flag": "U.S.A.", "cat food": "purina", "cup": "2", "agency": "nasa"}
    scores, _, _ = run_and_score("textvqa", tmp_path, table, "--data", d)
    # raw answers are normalised like the prediction: USA x9 + u.s.a. -> usa x10; "two" -> "2" (10 matches)
    assert scores["summary"]["accuracy"] == pytest.approx(100.0)


def test_textvqa_matches_by_image_and_question_when_ids_differ(tmp_path):
    d = make_textvqa(tmp_path)
    lines = (d / "llava_textvqa_val_v051_ocr.jsonl").read_text().splitlines()
    rec = json.loads(lines[1])
    rec["question_id"] = 7  # not an annotation id
    lines[1] = json.dumps(rec)
    (d / "llava_textvqa_val_v051_ocr.jsonl").write_text("\n".join(lines) + "\n")
    bench, args = bench_args("textvqa", "--data", d)
    assert bench.load_samples(args)[1].meta["answers"] == ["Purina"] * 10


# --------------------------------------------------------------------------- MME


def test_mme_both_layouts_and_scoring(tmp_path):
    d = make_mme(tmp_path)
    bench, args = bench_args("mme", "--data", d)
    samples = bench.load_samples(args)
    assert len(samples) == 4
    assert {s.meta["category"] for s in samples} == {"existence", "artwork"}
    # LLaVA-1.5 replaces MME's own yes/no request with its short-answer line
    assert samples[0].prompt.endswith("painting?\nAnswer the question using a single word or phrase.")
    table = {"cat in": "Yes", "dog in": "No", "painting": "Yes", "photograph": "Yes, it is."}
    scores, out, _ = run_and_score("mme", tmp_path, table, "--data", d)
    # existence: 2/2 and image right -> 200; artwork: 1/2, image wrong -> 50
    assert scores["summary"]["perception"] == pytest.approx(250.0)
    assert "| existence | 100.00 | 100.00 | 200.00 |" in (out / "report.md").read_text()


# --------------------------------------------------------------------------- MMBench


def test_mmbench_rotations_move_the_answer():
    row = {"_index": 5, "A": "w", "B": "x", "C": "y", "D": "z", "answer": "C"}
    rots = rotations(row)
    assert [r[0] for r in rots] == [5, 1_000_005, 2_000_005, 3_000_005]
    for _, options, answer in rots:
        assert options[answer] == "y"
    assert rots[1][1] == {"A": "x", "B": "y", "C": "z", "D": "w"}


def test_mmbench_prompt_and_circular_scoring(tmp_path):
    path = make_mmbench(tmp_path)
    bench, args = bench_args("mmbench", "--data", path)
    samples = bench.load_samples(args)
    assert [s.id for s in samples] == ["0", "1000000", "1", "1000001"]
    assert samples[2].prompt == ("Look at the background.\nWhere is the person?\nA. underwater\nB. in space\n"
                                 "Answer with the option's letter from the given choices directly.")
    assert samples[0].image.size == samples[1].image.size  # the rotated copy reuses the decoded image
    # question 0 answered by content ("cat" wherever it is); question 1 always "A" (wrong once)
    table = {"A. cat": "A", "B. cat": "B.", "Where is the person": "A"}
    scores, out, _ = run_and_score("mmbench", tmp_path, table, "--data", path)
    assert scores["summary"]["single"] == pytest.approx(50.0)     # q0 right, q1 wrong in its original order
    assert scores["summary"]["circular"] == pytest.approx(50.0)   # q0 right in both orders; q1 right once only
    rows = read_xlsx_rows(out / "submission_mmbench.xlsx")
    assert rows[0][:3] == ["index", "question", "hint"] and len(rows) == 5
    assert rows[1][0] == "0" and rows[1][7] == "A"


def test_mmbench_single_pass_and_native_copies(tmp_path):
    path = make_mmbench(tmp_path, circular_copies=True)
    bench, args = bench_args("mmbench", "--data", path)
    samples = bench.load_samples(args)
    assert sorted(s.id for s in samples) == ["0", "1", "1000000", "1000001"]  # copies used, none generated
    copy = next(s for s in samples if s.id == "1000000")
    assert copy.meta["answer"] == "B" and copy.image.size == samples[0].image.size  # image taken from row 0
    _, args = bench_args("mmbench", "--data", path, "--no-circular")
    assert [s.id for s in bench.load_samples(args)] == ["0", "1"]


def test_mmbench_test_split_has_no_rotations(tmp_path):
    path = make_mmbench(tmp_path, with_answers=False)
    bench, args = bench_args("mmbench", "--data", path)
    samples = bench.load_samples(args)
    assert [s.id for s in samples] == ["0", "1"] and samples[0].meta["answer"] is None


# --------------------------------------------------------------------------- error reports


def _rewrite_line(path, lineno, fn):
    lines = path.read_text().splitlines()
    lines[lineno - 1] = fn(lines[lineno - 1])
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("edit, message", [
    (lambda l: l[:-3], r"llava_gqa_testdev_balanced.jsonl:3: not valid JSON"),
    (lambda l: json.dumps({k: v for k, v in json.loads(l).items() if k != "text"}),
     r"llava_gqa_testdev_balanced.jsonl:3: field 'text' is missing"),
    (lambda l: json.dumps({**json.loads(l), "image": 5}),
     r"llava_gqa_testdev_balanced.jsonl:3: field 'image' must be str"),
    (lambda l: json.dumps({**json.loads(l), "image": "nope.jpg"}),
     r"llava_gqa_testdev_balanced.jsonl:3: field 'image' image 'nope.jpg' not found"),
    (lambda l: json.dumps({**json.loads(l), "question_id": "999"}),
     r"llava_gqa_testdev_balanced.jsonl:3: field 'question_id' question 999 is not in testdev_balanced_questions.json"),
    (lambda l: json.dumps({**json.loads(l), "question_id": "201"}),
     r"llava_gqa_testdev_balanced.jsonl:3: field 'question_id' question_id 201 repeats line 1"),
])
def test_question_file_errors_name_file_line_field(tmp_path, edit, message):
    d = make_gqa(tmp_path)
    _rewrite_line(d / "llava_gqa_testdev_balanced.jsonl", 3, edit)
    bench, args = bench_args("gqa", "--data", d)
    with pytest.raises(DataError, match=message):
        bench.load_samples(args)


def test_missing_files_are_named(tmp_path):
    d = make_gqa(tmp_path)
    (d / "testdev_balanced_questions.json").unlink()
    bench, args = bench_args("gqa", "--data", d)
    with pytest.raises(DataError, match="no answers file found; looked for testdev_balanced_questions.json"):
        bench.load_samples(args)
    bench, args = bench_args("vqav2", "--data", tmp_path / "absent")
    with pytest.raises(DataError, match="absent: --data does not exist"):
        bench.load_samples(args)
    d = make_vqav2(tmp_path)
    (d / "v2_mscoco_val2014_annotations.json").write_text('{"annotations": [{"question_id": 101}]}')
    bench, args = bench_args("vqav2", "--data", d)
    with pytest.raises(DataError, match=r"annotations\[0\] \(question 101\) needs a list"):
        bench.load_samples(args)


def test_mme_errors(tmp_path):
    d = make_mme(tmp_path)
    txt = d / "existence" / "000000001.txt"
    txt.write_text("Is there a cat?\tYes\nIs there a dog?\tMaybe\n")
    bench, args = bench_args("mme", "--data", d)
    with pytest.raises(DataError, match=r"000000001.txt:2: field 'answer' must be Yes or No, got 'Maybe'"):
        bench.load_samples(args)
    txt.write_text("Is there a cat? Yes\n")
    with pytest.raises(DataError, match=r"000000001.txt:1: expected 'question<TAB>answer'"):
        bench.load_samples(args)
    txt.write_text("q\tYes\n")
    (d / "existence" / "000000001.jpg").unlink()
    with pytest.raises(DataError, match=r"000000001.txt: no image 000000001.jpg/.png"):
        bench.load_samples(args)


def test_mmbench_errors(tmp_path):
    path = make_mmbench(tmp_path)
    bench, args = bench_args("mmbench", "--data", path)
    text = path.read_text().splitlines()
    cols = text[2].split("\t")
    cols[-1] = "not*base64"
    path.write_text("\n".join([text[0], text[1], "\t".join(cols)]) + "\n")
    with pytest.raises(DataError, match=r"mmbench_dev_20230712.tsv:3: field 'image' is not valid base64"):
        bench.load_samples(args)
    cols[-1] = base64_of(b"hello, not an image")
    path.write_text("\n".join([text[0], text[1], "\t".join(cols)]) + "\n")
    with pytest.raises(DataError, match=r":3: field 'image' decodes to bytes that are not an image"):
        bench.load_samples(args)
    cols = text[1].split("\t")
    cols[7] = "C"  # answer names an option the row does not have
    path.write_text("\n".join([text[0], "\t".join(cols)]) + "\n")
    with pytest.raises(DataError, match=r":2: field 'answer' 'C' is not one of the options \['A', 'B'\]"):
        bench.load_samples(args)
    path.write_text("index\tquestion\n1\tq\n")
    with pytest.raises(DataError, match=r":1: header lacks column\(s\) A, B, image"):
        bench.load_samples(args)


def base64_of(raw):
    import base64

    return base64.b64encode(raw).decode()
