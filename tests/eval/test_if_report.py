import json
from pathlib import Path

import pytest

from focusvlm.eval.engine import GenerationSettings, build_manifest
from focusvlm.eval.ifreport import compare_runs, score_predictions, score_run


def rec(i, task, iid, response, kwargs=None, error=None):
    return {"id": f"q{i}/{task}", "response": None if error else response, "error": error,
            "meta": {"task": task, "task_name": task.lower(), "instruction_id": iid, "kwargs": kwargs or {},
                     "question": "What is it?"}}


# made-up predictions with known verdicts: T1 2/3 strict; T2 strict 1/2, loose 2/2; T3 0/2 (one error)
RECORDS = [
    rec(0, "T1", "punctuation:no_comma", "no commas"),
    rec(1, "T1", "punctuation:no_comma", "one, comma"),
    rec(2, "T1", "punctuation:no_comma", "fine"),
    rec(0, "T2", "startend:constrained_start", "My answer is yes", {"starter": "My answer"}),
    rec(1, "T2", "startend:constrained_start", "Sure!\nMy answer is no", {"starter": "My answer"}),
    rec(0, "T3", "detectable_format:title", "no title"),
    rec(1, "T3", "detectable_format:title", None, error="image: image not found: x.jpg"),
]


def test_exact_scores():
    s = score_predictions(RECORDS)
    t = {x["task"]: x for x in s["tasks"]}
    assert [x["task"] for x in s["tasks"]] == ["T1", "T2", "T3"]
    assert t["T1"]["strict"] == pytest.approx(2 / 3) and t["T1"]["loose"] == pytest.approx(2 / 3)
    assert t["T2"]["strict"] == 0.5 and t["T2"]["loose"] == 1.0
    assert t["T3"]["strict"] == 0.0 and t["T3"]["errors"] == 1 and t["T3"]["n"] == 2
    assert s["summary"]["strict_avg"] == pytest.approx((2 / 3 + 0.5 + 0) / 3)
    assert s["summary"]["loose_avg"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert s["summary"]["samples"] == 7 and s["summary"]["errors"] == 1


def write_run(d: Path, records, config):
    d.mkdir(parents=True)
    m = build_manifest(model="demo", config=config, benchmark="if", settings=GenerationSettings(max_new_tokens=8))
    (d / "manifest.json").write_text(json.dumps(m))
    (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_score_run_writes_table1_and_compare(tmp_path):
    write_run(tmp_path / "stock", RECORDS, {"cmai": None})
    better = [dict(r, response="My answer fine", error=None) if r["meta"]["task"] == "T2" else r for r in RECORDS]
    write_run(tmp_path / "cmai", better, {"cmai": {"gamma_max": 0.6}})
    scores = score_run(tmp_path / "stock")
    md = (tmp_path / "stock" / "report.md").read_text()
    assert "| | T1 | T2 | T3 | AVG |" in md
    assert "| strict | 66.7 | 50.0 | 0.0 | 38.9 |" in md
    assert "| loose | 66.7 | 100.0 | 0.0 | 55.6 |" in md
    assert "| errors | 0 | 0 | 1 | 1 |" in md
    assert scores["sentence_splitter"] in ("nltk-punkt_tab", "fallback-rules")
    assert json.loads((tmp_path / "stock" / "scores.json").read_text())["summary"]["samples"] == 7
    assert len((tmp_path / "stock" / "verdicts.jsonl").read_text().splitlines()) == 7
    text = compare_runs([tmp_path / "stock", tmp_path / "cmai"], tmp_path / "cmp")
    assert "| Δ cmai | +0.0 | +50.0 | +0.0 | +16.7 |" in text
    png = (tmp_path / "cmp" / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cmai(gamma_max=0.6)" in text


def test_score_needs_predictions(tmp_path):
    with pytest.raises(FileNotFoundError, match="no predictions.jsonl"):
        score_run(tmp_path)
