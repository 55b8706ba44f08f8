import json
import shutil
from pathlib import Path

import pytest

from focusvlm.eval import ifbench
from focusvlm.eval.instructions import ALL_IDS, check

ASSETS = Path(__file__).resolve().parents[2] / "focusvlm" / "assets"


def generic(tmp_path, n=3):
    for name in ("astronaut", "chelsea", "coffee"):
        shutil.copy(ASSETS / f"{name}.jpg", tmp_path / f"{name}.jpg")
    names = ["astronaut", "chelsea", "coffee"]
    rows = [{"id": f"q{i}", "image": f"{names[i % 3]}.jpg", "question": f"Question {i}?"} for i in range(n)]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_paper16_every_question_gets_16_tasks_and_is_deterministic(tmp_path):
    src = generic(tmp_path)
    a = ifbench.build(src, "paper16", 0, tmp_path / "a.jsonl")
    b = ifbench.build(src, "paper16", 0, tmp_path / "b.jsonl")
    c = ifbench.build(src, "paper16", 1, tmp_path / "c.jsonl")
    assert len(a) == 48 and [r["task"] for r in a[:16]] == [f"T{i}" for i in range(1, 17)]
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert [r["kwargs"] for r in a] != [r["kwargs"] for r in c]  # the seed matters
    # a question's rows do not depend on the other questions
    only_last = tmp_path / "only_q2.jsonl"
    only_last.write_text(src.read_text().splitlines()[2] + "\n")
    rows = ifbench.build(only_last, "paper16", 0, tmp_path / "x.jsonl")
    assert {r["question_id"] for r in rows} == {"q2"}
    assert [r["kwargs"] for r in rows if r["question_id"] == "q2"] == [r["kwargs"] for r in a if r["question_id"] == "q2"]
    r7 = next(r for r in a if r["task"] == "T7")
    assert r7["instruction_id"] == "keywords:existence" and len(r7["kwargs"]["keywords"]) == 2
    assert r7["prompt"] == f"{r7['question']}\n{r7['instruction']}"
    assert all(w in r7["instruction"] for w in r7["kwargs"]["keywords"])
    # stored arguments are valid for the checker, and the bench reads back with absolute images
    for r in ifbench.read_bench(tmp_path / "a.jsonl"):
        check(r["instruction_id"], "some answer", r["kwargs"], prompt=r["question"])
        assert Path(r["image"]).is_file()


def test_ifeval_all_and_yaml_suite(tmp_path):
    src = generic(tmp_path, n=1)
    rows = ifbench.build(src, "ifeval-all", 0, tmp_path / "all.jsonl")
    assert sorted(r["instruction_id"] for r in rows) == sorted(ALL_IDS)
    suite = tmp_path / "s.yaml"
    suite.write_text("name: mine\ntasks:\n  - id: punctuation:no_comma\n    name: Commas\n"
                     "  - id: keywords:existence\n    kwargs: {keywords: [dog]}\n    instruction: 'Say {keywords}.'\n")
    rows = ifbench.build(src, str(suite), 0, tmp_path / "mine.jsonl")
    assert [r["task_name"] for r in rows] == ["Commas", "keywords:existence"]
    assert rows[1]["instruction"] == "Say ['dog']." and rows[1]["suite"] == "mine"
    suite.write_text("tasks:\n  - id: punctuation:no_comma\n  - id: made:up\n")
    with pytest.raises(ValueError, match=r"s.yaml: task 2: unknown instruction id 'made:up'"):
        ifbench.build(src, str(suite), 0, tmp_path / "x.jsonl")


def test_mmvet_and_llava_bench_sources(tmp_path):
    mm = tmp_path / "mmvet"
    (mm / "images").mkdir(parents=True)
    shutil.copy(ASSETS / "coffee.jpg", mm / "images" / "v1_0.jpg")
    (mm / "mm-vet.json").write_text(json.dumps({"v1_0": {"imagename": "v1_0.jpg", "question": "What?", "answer": "x"}}))
    rows = ifbench.build(mm, "paper16", 0, tmp_path / "mm.jsonl")
    assert len(rows) == 16 and rows[0]["image"] == "mmvet/images/v1_0.jpg"
    lb = tmp_path / "llava"
    (lb / "images").mkdir(parents=True)
    shutil.copy(ASSETS / "chelsea.jpg", lb / "images" / "001.jpg")
    (lb / "questions.jsonl").write_text(json.dumps({"question_id": 0, "image": "001.jpg", "text": "Cat?"}) + "\n")
    rows = ifbench.build(lb, "paper16", 0, tmp_path / "lb.jsonl")
    assert rows[0]["question_id"] == "0" and rows[0]["question"] == "Cat?"


def test_bad_input_names_file_and_line(tmp_path):
    src = generic(tmp_path, n=2)
    text = src.read_text().splitlines()
    src.write_text(text[0] + "\n{broken\n")
    with pytest.raises(ValueError, match=r"q.jsonl:2: not valid JSON"):
        ifbench.build(src, "paper16", 0, tmp_path / "o.jsonl")
    src.write_text(text[0] + "\n" + json.dumps({"id": "z", "image": "gone.jpg", "question": "?"}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"q.jsonl:2: image not found"):
        ifbench.build(src, "paper16", 0, tmp_path / "o.jsonl")
    src.write_text(json.dumps({"id": "z", "question": "?"}) + "\n")
    with pytest.raises(ValueError, match=r"q.jsonl:1: missing field\(s\) image"):
        ifbench.build(src, "paper16", 0, tmp_path / "o.jsonl")
    with pytest.raises(ValueError, match="unknown suite"):
        ifbench.build(generic(tmp_path), "paper17", 0, tmp_path / "o.jsonl")
    bench = tmp_path / "bench.jsonl"
    ifbench.build(generic(tmp_path, n=1), "paper16", 0, bench)
    lines = bench.read_text().splitlines()
    row = json.loads(lines[3])
    row["instruction_id"] = "nope:nope"
    bench.write_text("\n".join(lines[:3] + [json.dumps(row)]) + "\n")
    with pytest.raises(ValueError, match=r"bench.jsonl:4: unknown instruction id 'nope:nope'"):
        ifbench.read_bench(bench)
