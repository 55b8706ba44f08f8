"""End to end on the embedded demo model: `focusvlm eval/score/report` for each of the
five standard benchmarks on 4-sample fixtures, resume, and a 2-process
`accelerate launch` run. The demo's vision weights are random, so the scores
are not meaningful; what is checked is that every stage runs and agrees.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures_std import BUILDERS

pytestmark = pytest.mark.slow

NAMES = ("vqav2", "gqa", "textvqa", "mme", "mmbench")
COMMON = ["--model", "demo-random", "--max-new-tokens", "3", "--batch-size", "2", "--no-progress", "--device", "cpu"]


def cli(*argv):
    from focusvlm.cli import main

    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo):  # `demo` builds/caches the model once for the session
    root = tmp_path_factory.mktemp("std")
    out = {}
    for name in NAMES:
        data = BUILDERS[name](root / "data")
        out[name] = root / f"run_{name}"
        assert cli("eval", name, "--data", data, "--out", out[name], *COMMON) == 0
    return root, out


def test_each_benchmark_runs_and_scores(runs, capsys):
    _, out = runs
    for name in NAMES:
        recs = [json.loads(l) for l in (out[name] / "predictions.jsonl").read_text().splitlines()]
        assert len(recs) == 4, name
        assert all(r["error"] is None and isinstance(r["response"], str) for r in recs), name
        assert all(0 < r["new_tokens"] <= 3 for r in recs), name
        assert cli("score", name, out[name]) == 0
        scores = json.loads((out[name] / "scores.json").read_text())
        assert scores["benchmark"] == name and scores["summary"]["samples"] == 4
    mme = json.loads((out["mme"] / "scores.json").read_text())["summary"]
    assert 0 <= mme["perception"] <= 400  # two perception subtasks in the fixture
    assert (out["vqav2"] / "submission_vqav2.json").is_file()
    assert (out["mmbench"] / "submission_mmbench.xlsx").is_file()


def test_resume_generates_nothing_new(runs, capsys):
    _, out = runs
    before = (out["gqa"] / "predictions.jsonl").read_text()
    data = runs[0] / "data" / "gqa"
    assert cli("eval", "gqa", "--data", data, "--out", out["gqa"], *COMMON) == 0
    assert "generated 0 now" in capsys.readouterr().err
    assert (out["gqa"] / "predictions.jsonl").read_text() == before


def test_bad_data_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import focusvlm.cli.common as common

    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("model loaded despite bad data"))
    d = BUILDERS["gqa"](tmp_path)
    (d / "llava_gqa_testdev_balanced.jsonl").write_text('{"question_id": "201", "image": "n0.jpg"}\n')
    assert cli("eval", "gqa", "--data", d, "--out", tmp_path / "run", *COMMON) == 2
    assert "llava_gqa_testdev_balanced.jsonl:1: field 'text' is missing" in capsys.readouterr().err


def test_report_builds_table2(runs, capsys, tmp_path):
    _, out = runs
    assert cli("report", *[out[n] for n in NAMES], "--out", tmp_path) == 0
    text = capsys.readouterr().out
    header = text.splitlines()[0]
    assert header == "| model | method | IF (%) | VQAv2 (%) | GQA (%) | TextVQA (%) | MME (score) | MMBench (%) |"
    table = json.loads((tmp_path / "table2.json").read_text())
    assert len(table["rows"]) == 1  # same model + config: one row
    cells = table["rows"][0]["cells"]
    assert set(cells) == {"VQAv2", "GQA", "TextVQA", "MME", "MMBench"}
    assert cells["MME"] == json.loads((out["mme"] / "scores.json").read_text())["summary"]["perception"]
    (tmp_path / "table2.md").read_text().startswith("| model |")


def test_accelerate_two_cpu_processes(demo, tmp_path):
    """`accelerate launch` with 2 CPU processes shards the samples and merges one predictions file."""
    pytest.importorskip("accelerate")
    data = BUILDERS["mme"](tmp_path / "data")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # --cpu would pick accelerate's single-process launcher; --multi_gpu starts torchrun, which on a
    # machine without CUDA gives a 2-process gloo (MULTI_CPU) group
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "focusvlm",
           "eval", "mme", "--data", str(data), "--out", str(out), "--model", "demo-random", "--max-new-tokens", "2",
           "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in recs] == [0, 1, 2, 3]
    assert {r["shard"] for r in recs} == {0, 1}
    assert not list(out.glob("predictions.shard*.jsonl"))
    assert all(r["error"] is None for r in recs)
