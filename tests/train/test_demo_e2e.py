"""The documented CPU run on the demo model, shortened: pretrain -> finetune -> eval if."""

import json

import pytest

from focusvlm.cli import main as cli


@pytest.mark.slow
def test_demo_two_stages_then_if_bench(demo, tmp_path):
    cfg = tmp_path / "focus.yaml"
    cfg.write_text("vmtc: {target: 0.5}\ncmai: {gamma_max: 0.6}\n")
    data = tmp_path / "demo-data"
    assert cli(["train", "--make-demo-data", str(data)]) == 0
    small = ["--global-batch-size", "2", "--per-device-batch-size", "2", "--max-steps", "1",
             "--no-gradient-checkpointing", "--no-progress", "--config", str(cfg)]
    assert cli(["train", "--stage", "pretrain", "--model", "demo-random", "--data", str(data / "captions.json"),
                "--image-folder", str(data / "images"), "--output-dir", str(tmp_path / "pt"), *small]) == 0
    assert cli(["train", "--stage", "finetune", "--model", str(tmp_path / "pt"), "--format", "chat_template",
                "--data", str(data / "instruct.json"), "--image-folder", str(data / "images"),
                "--output-dir", str(tmp_path / "ft"), *small]) == 0
    recipe = (tmp_path / "ft" / "recipe.yaml").read_text()
    assert "image_tokens_per_image: 288" in recipe  # VMTC's count reached the training batches
    bench = tmp_path / "bench.jsonl"
    assert cli(["ifbench", "build", "--questions", str(data / "questions.jsonl"), "--suite", "paper16",
                "-o", str(bench)]) == 0
    assert cli(["eval", "if", "--model", str(tmp_path / "ft"), "--config", str(tmp_path / "ft" / "focus_config.yaml"),
                "--bench", str(bench), "--out", str(tmp_path / "if"), "--max-new-tokens", "2", "--batch-size", "4",
                "--limit", "4",
                "--no-progress"]) == 0
    recs = [json.loads(l) for l in (tmp_path / "if" / "predictions.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and not any(r["error"] for r in recs)
    assert all(r["image_tokens"] == 288 for r in recs)
