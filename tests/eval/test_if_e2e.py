import argparse
import json
import shutil
from pathlib import Path

import pytest

ASSETS = Path(__file__).resolve().parents[2] / "focusvlm" / "assets"


@pytest.mark.slow
def test_demo_model_stock_vs_cmai(tmp_path, demo):
    """One question x 16 tasks on the embedded demo model, stock and CMAI, scored and compared."""
    from focusvlm.cli import compare, evaluate, ifbench

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    for m in (ifbench, evaluate, compare):  # this feature's subcommands, as the full CLI registers them
        m.register(sub)

    def cli(*argv):
        args = parser.parse_args([str(a) for a in argv])
        assert args.func(args) == 0

    shutil.copy(ASSETS / "astronaut.jpg", tmp_path / "astronaut.jpg")
    (tmp_path / "q.jsonl").write_text(json.dumps({"id": "a", "image": "astronaut.jpg",
                                                  "question": "What is in the picture?"}) + "\n")
    bench = tmp_path / "bench.jsonl"
    cli("ifbench", "build", "--questions", tmp_path / "q.jsonl", "--suite", "paper16", "-o", bench)
    common = ["--model", "demo-random", "--bench", bench, "--batch-size", 16, "--max-new-tokens", 4, "--no-progress"]
    cli("eval", "if", "--out", tmp_path / "stock", *common)
    cli("eval", "if", "--out", tmp_path / "cmai", "--cmai", 0.6, *common)
    cli("score", "if", tmp_path / "stock")
    cli("score", "if", tmp_path / "cmai")
    for run in ("stock", "cmai"):
        recs = [json.loads(x) for x in (tmp_path / run / "predictions.jsonl").read_text().splitlines()]
        assert len(recs) == 16 and not any(r["error"] for r in recs)
        assert all(0 < r["new_tokens"] <= 4 and r["prompt_tokens"] > 576 and r["image_tokens"] == 576 for r in recs)
        scores = json.loads((tmp_path / run / "scores.json").read_text())
        assert scores["summary"]["samples"] == 16 and len(scores["tasks"]) == 16
    assert json.loads((tmp_path / "cmai" / "manifest.json").read_text())["config"]["cmai"]["gamma_max"] == 0.6
    # resuming the finished run generates nothing; another config into the same folder is refused
    cli("eval", "if", "--out", tmp_path / "stock", *common)
    with pytest.raises(RuntimeError, match="different run"):
        cli("eval", "if", "--out", tmp_path / "stock", "--cmai", 0.3, *common)
    cli("compare", tmp_path / "stock", tmp_path / "cmai", "-o", tmp_path / "cmp")
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
