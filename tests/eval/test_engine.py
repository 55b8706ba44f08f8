import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from focusvlm.eval.engine import (Generation, GenerationSettings, ManifestMismatch, Sample, build_manifest,
                                  read_jsonl_records, run)

ASSETS = Path(__file__).resolve().parents[2] / "focusvlm" / "assets"


class FakeGenerator:
    """Echoes the prompt; can stop (like a kill) after a number of calls, or fail on a marker."""

    def __init__(self, stop_after=None, fail_on=None):
        self.calls = []
        self.stop_after = stop_after
        self.fail_on = fail_on

    def generate(self, prompts, images, max_new_tokens):
        if self.stop_after is not None and len(self.calls) >= self.stop_after:
            raise KeyboardInterrupt  # not an Exception: escapes the per-sample error handling, like a kill
        self.calls.append(list(prompts))
        if self.fail_on and any(self.fail_on in str(p) for p in prompts):
            raise RuntimeError("boom")
        return [Generation(text=f"answer to {p} ({'img' if im is not None else 'txt'})", prompt_tokens=7,
                           new_tokens=3) for p, im in zip(prompts, images)]


def samples(n=10, image=ASSETS / "chelsea.jpg"):
    return [Sample(id=f"s{i}", image=image, prompt=f"q{i}", meta={"k": i}) for i in range(n)]


def manifest(**over):
    base = dict(model="fake", config={"cmai": None}, benchmark="unit", settings=GenerationSettings(max_new_tokens=8))
    base.update(over)
    return build_manifest(**base)


def test_writes_one_line_per_sample_in_order(tmp_path):
    settings = GenerationSettings(max_new_tokens=8, batch_size=3)
    result = run(samples(7), FakeGenerator(), tmp_path, manifest(), settings, progress=False)
    recs = read_jsonl_records(tmp_path / "predictions.jsonl")
    assert [r["id"] for r in recs] == [f"s{i}" for i in range(7)]
    assert recs[2]["response"] == "answer to q2 (img)" and recs[2]["meta"] == {"k": 2}
    assert recs[0]["prompt_tokens"] == 7 and recs[0]["new_tokens"] == 3 and recs[0]["error"] is None
    assert result.generated == 7 and result.errors == 0
    assert json.loads((tmp_path / "manifest.json").read_text())["model"] == "fake"


def test_resume_after_interrupt_skips_done(tmp_path):
    settings = GenerationSettings(max_new_tokens=8, batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        run(samples(9), FakeGenerator(stop_after=2), tmp_path, manifest(), settings, progress=False)
    assert len(read_jsonl_records(tmp_path / "predictions.jsonl")) == 4  # two flushed batches survive
    # a torn line from a kill mid-write is dropped, not fatal
    with open(tmp_path / "predictions.jsonl", "a") as f:
        f.write('{"id": "s4", "resp')
    gen = FakeGenerator()
    result = run(samples(9), gen, tmp_path, manifest(), GenerationSettings(max_new_tokens=8, batch_size=4),
                 progress=False)
    assert result.skipped == 4 and result.generated == 5
    assert [p for call in gen.calls for p in call] == ["q4", "q5", "q6", "q7", "q8"]
    recs = read_jsonl_records(tmp_path / "predictions.jsonl")
    assert [r["id"] for r in recs] == [f"s{i}" for i in range(9)]


def test_refuses_a_different_run(tmp_path):
    run(samples(2), FakeGenerator(), tmp_path, manifest(), GenerationSettings(max_new_tokens=8), progress=False)
    with pytest.raises(ManifestMismatch, match="config"):
        run(samples(2), FakeGenerator(), tmp_path, manifest(config={"cmai": {"gamma_max": 0.6}}),
            GenerationSettings(max_new_tokens=8), progress=False)
    with pytest.raises(ManifestMismatch, match="model"):
        run(samples(2), FakeGenerator(), tmp_path, manifest(model="other"), GenerationSettings(max_new_tokens=8),
            progress=False)
    with pytest.raises(ManifestMismatch, match="generation"):
        run(samples(2), FakeGenerator(), tmp_path, manifest(settings=GenerationSettings(max_new_tokens=9)),
            GenerationSettings(max_new_tokens=9), progress=False)
    # batch size is not part of the identity: resuming with another one is fine
    run(samples(3), FakeGenerator(), tmp_path, manifest(), GenerationSettings(max_new_tokens=8, batch_size=5),
        progress=False)


def test_bad_images_and_failing_samples_become_errors(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    s = samples(4)
    s[1] = Sample(id="missing", image=tmp_path / "nope.jpg", prompt="q")
    s[2] = Sample(id="broken", image=broken, prompt="q")
    s.append(Sample(id="bad-gen", image=None, prompt="please BOOM"))
    s.append(Sample(id="text", image=None, prompt="text only"))
    out = tmp_path / "run"
    result = run(s, FakeGenerator(fail_on="BOOM"), out, manifest(), GenerationSettings(max_new_tokens=8, batch_size=6),
                 progress=False)
    recs = {r["id"]: r for r in read_jsonl_records(out / "predictions.jsonl")}
    assert "image not found" in recs["missing"]["error"] and "nope.jpg" in recs["missing"]["error"]
    assert "unreadable image" in recs["broken"]["error"]
    assert recs["bad-gen"]["error"].startswith("generate: RuntimeError")
    assert recs["text"]["response"] == "answer to text only (txt)"  # its batch-mate's failure did not sink it
    assert recs["s0"]["response"] == "answer to q0 (img)"
    assert result.errors == 3
    # --retry-errors redoes only the error records
    gen = FakeGenerator()
    run(s, gen, out, manifest(), GenerationSettings(max_new_tokens=8), progress=False, retry_errors=True)
    # image errors fail again before reaching the model; only the generation failure is retried
    assert [p for c in gen.calls for p in c] == ["please BOOM"]


def test_describe_then_answer_is_text_only_second_step(tmp_path):
    gen = FakeGenerator()
    settings = GenerationSettings(max_new_tokens=8, batch_size=2, mode="describe-then-answer",
                                  describe_prompt="DESCRIBE")
    run(samples(2), gen, tmp_path, manifest(settings=settings), settings, progress=False,
        answer_from_description=lambda p, d: f"[{d}] {p}")
    assert gen.calls[0] == ["DESCRIBE"]  # both samples show the same picture: described once
    assert gen.calls[1] == ["[answer to DESCRIBE (img)] q0", "[answer to DESCRIBE (img)] q1"]
    rec = read_jsonl_records(tmp_path / "predictions.jsonl")[0]
    assert rec["response"] == "answer to [answer to DESCRIBE (img)] q0 (txt)"
    assert rec["description"] == "answer to DESCRIBE (img)" and rec["mode"] == "describe-then-answer"


def test_describe_then_answer_describes_each_picture_once_per_run_and_after_a_resume(tmp_path):
    """Prompts about the same picture share its one description (the 16 IF prompts of a test picture): a picture
    is described the first time it comes up, in whichever batch, and a resumed run reuses the stored description."""
    other = ASSETS / "coffee.jpg"
    s = [Sample(id=f"s{i}", image=ASSETS / "chelsea.jpg" if i % 2 == 0 else other, prompt=f"q{i}") for i in range(6)]
    s.append(Sample(id="text", image=None, prompt="no picture"))
    settings = GenerationSettings(max_new_tokens=8, batch_size=3, mode="describe-then-answer", describe_prompt="DESCRIBE")
    gen = FakeGenerator(stop_after=2)  # batch 1: describe 2 pictures + answer 3; then stopped
    with pytest.raises(KeyboardInterrupt):
        run(s, gen, tmp_path, manifest(settings=settings), settings, progress=False,
            answer_from_description=lambda p, d: f"[{d}] {p}")
    assert gen.calls[0] == ["DESCRIBE", "DESCRIBE"]
    gen = FakeGenerator()
    run(s, gen, tmp_path, manifest(settings=settings), settings, progress=False,
        answer_from_description=lambda p, d: f"[{d}] {p}")
    assert not any(p == "DESCRIBE" for call in gen.calls for p in call)  # both pictures described before the stop
    recs = read_jsonl_records(tmp_path / "predictions.jsonl")
    assert [r["description"] for r in recs] == ["answer to DESCRIBE (img)"] * 6 + [""]
    assert recs[-1]["response"] == "answer to [] no picture (txt)"


def test_duplicate_ids_rejected(tmp_path):
    with pytest.raises(ValueError, match="duplicate sample id 's0'"):
        run(samples(2) + samples(1), FakeGenerator(), tmp_path, manifest(), GenerationSettings(), progress=False)


SHARD_SCRIPT = textwrap.dedent("""
    import sys
    from accelerate import PartialState
    sys.path.insert(0, {tests!r})
    from test_engine import FakeGenerator, samples, manifest
    from focusvlm.eval.engine import GenerationSettings, run
    state = PartialState(cpu=True)
    stop = int(sys.argv[2])
    gen = FakeGenerator(stop_after=stop if stop >= 0 else None)
    try:
        r = run(samples(11), gen, sys.argv[1], manifest(), GenerationSettings(max_new_tokens=8, batch_size=2),
                process_index=state.process_index, num_processes=state.num_processes,
                barrier=state.wait_for_everyone, progress=False)
    except KeyboardInterrupt:
        msg = "stopped"
    else:
        msg = f"generated {{r.generated}} skipped {{r.skipped}}"
    # stdout of non-main ranks is not reliably relayed by the launcher; leave a file per rank
    with open(f"{{sys.argv[1]}}.rank{{state.process_index}}", "w") as f:
        f.write(msg)
""")


def _launch(script, out, stop):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    # `accelerate launch --cpu` starts a single process unless given an MPI hostfile; torchrun gives
    # the same PartialState world (gloo) that `accelerate launch` gives on GPUs
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(script), str(out), str(stop)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return [Path(f"{out}.rank{i}").read_text() for i in (0, 1)]


def test_two_process_sharding_resume_and_merge(tmp_path):
    script = tmp_path / "shard.py"
    script.write_text(SHARD_SCRIPT.format(tests=str(Path(__file__).resolve().parent)))
    out = tmp_path / "run"
    # first launch: each rank stops after one batch of 2 -> shard files hold 2 + 2 records, no merge
    assert _launch(script, out, 1) == ["stopped", "stopped"]
    shards = sorted(p.name for p in out.glob("predictions.shard*.jsonl"))
    assert shards == ["predictions.shard0.jsonl", "predictions.shard1.jsonl"]
    shard0 = read_jsonl_records(out / "predictions.shard0.jsonl")
    assert [r["id"] for r in shard0] == ["s0", "s2"] and {r["shard"] for r in shard0} == {0}
    # second launch resumes: 11 samples, 4 done; rank 0 owns 6 (2 done), rank 1 owns 5 (2 done)
    assert _launch(script, out, -1) == ["generated 4 skipped 2", "generated 3 skipped 2"]
    assert not list(out.glob("predictions.shard*.jsonl"))
    recs = read_jsonl_records(out / "predictions.jsonl")
    assert [r["id"] for r in recs] == [f"s{i}" for i in range(11)]
    assert {r["shard"] for r in recs} == {0, 1}
    # a later single-process run finds everything done
    r = run(samples(11), FakeGenerator(stop_after=0), out, manifest(), GenerationSettings(max_new_tokens=8),
            progress=False)
    assert r.generated == 0 and r.skipped == 11


def test_given_description_answers_from_the_samples_description_without_the_picture(tmp_path):
    gen = FakeGenerator()
    settings = GenerationSettings(max_new_tokens=8, batch_size=2, mode="given-description")
    items = [Sample(id=f"s{i}", image=tmp_path / "missing.png", prompt=f"q{i}", meta={"description": f"d{i}"})
             for i in range(3)]
    run(items, gen, tmp_path / "run", manifest(settings=settings), settings, progress=False,
        answer_from_description=lambda p, d: f"[{d}] {p}")
    assert gen.calls == [["[d0] q0", "[d1] q1"], ["[d2] q2"]]  # one text-only step, the (missing) image unread
    recs = read_jsonl_records(tmp_path / "run" / "predictions.jsonl")
    assert [r["response"] for r in recs] == [f"answer to [d{i}] q{i} (txt)" for i in range(3)]
    assert all(r["error"] is None and r["mode"] == "given-description" for r in recs)


def test_given_description_without_a_description_is_an_error_naming_it(tmp_path):
    settings = GenerationSettings(max_new_tokens=8, mode="given-description")
    run(samples(1), FakeGenerator(), tmp_path, manifest(settings=settings), settings, progress=False)
    rec = read_jsonl_records(tmp_path / "predictions.jsonl")[0]
    assert rec["response"] is None and "sample s0 carries no description" in rec["error"]
