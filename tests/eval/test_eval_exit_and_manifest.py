"""Issue 10, items 6 and 8: `focusvlm eval` exits non-zero when samples failed (naming them and the
retry), a resume reports the error rows it kept; the manifest records device, resolved dtype and
library versions, and a resume in another dtype or on another device type is refused.

A GQA-layout folder with one corrupt image, on the tiny saved LLaVA (seconds on a CPU)."""

import json
import shutil
from pathlib import Path

import pytest

from focusvlm.cli import main

ASSETS = Path(__file__).resolve().parents[2] / "focusvlm" / "assets"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_llava_folder import save_tiny_llava

    return str(save_tiny_llava(tmp_path_factory.mktemp("tiny") / "m"))


@pytest.fixture()
def gqa(tmp_path):
    data = tmp_path / "gqa"
    (data / "images").mkdir(parents=True)
    shutil.copy(ASSETS / "chelsea.jpg", data / "images" / "a.jpg")
    (data / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    qs = [{"question_id": f"q{i}", "image": "broken.jpg" if i == 1 else "a.jpg", "text": f"w{i} w2"} for i in range(3)]
    (data / "llava_gqa_testdev_balanced.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    (data / "testdev_balanced_questions.json").write_text(json.dumps({q["question_id"]: {"answer": "w1"} for q in qs}))
    return data


def argv(tiny, data, out, *extra):
    return ["eval", "gqa", "--model", tiny, "--data", str(data), "--out", str(out), "--max-new-tokens", "2",
            "--device", "cpu", "--no-progress", *extra]


def evaluate(capsys, tiny, data, out, *extra):
    capsys.readouterr()
    code = main(argv(tiny, data, out, *extra))
    return code, capsys.readouterr().err


def test_failed_samples_give_a_nonzero_exit_and_the_retry(tmp_path, capsys, tiny, gqa):
    out = tmp_path / "run"
    code, err = evaluate(capsys, tiny, gqa, out)
    assert code == 1
    failed = [line for line in err.splitlines() if line.startswith("FAILED:")]
    assert len(failed) == 1
    assert failed[0].startswith("FAILED: 1 of 3 samples have no answer (q1; first error: q1: image: unreadable image")
    assert failed[0].endswith("they score as wrong. Retry them with: focusvlm " + " ".join(argv(tiny, gqa, out))
                              + " --retry-errors")
    # a plain resume keeps the error row and says so, and still exits non-zero
    code, err = evaluate(capsys, tiny, gqa, out)
    assert code == 1
    assert "resumed: kept 1 error row(s) from an earlier run (q1); they are not retried without --retry-errors" in err
    assert "(skipped 3 already done, 0 new errors)" in err
    # fixed image + --retry-errors: all answered, exit 0
    shutil.copy(ASSETS / "chelsea.jpg", gqa / "images" / "broken.jpg")
    code, err = evaluate(capsys, tiny, gqa, out, "--retry-errors")
    assert code == 0 and "FAILED" not in err and "generated 1 now" in err


def test_manifest_records_resolved_dtype_device_and_versions(tmp_path, capsys, tiny, gqa):
    shutil.copy(ASSETS / "chelsea.jpg", gqa / "images" / "broken.jpg")
    out = tmp_path / "run"
    code, err = evaluate(capsys, tiny, gqa, out, "--limit", "1")
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["dtype"] == "float32" and m["device_type"] == "cpu"
    env = m["environment"]
    assert env["device"] == "cpu" and env["torch"] and env["transformers"] and env["focusvlm"]
    assert m["samples"]["expected"] == 1 and m["samples"]["ids_sha256"].startswith("sha256:")
    # the same run in bfloat16 is refused before the model loads, with the way out named
    code, err = evaluate(capsys, tiny, gqa, out, "--limit", "1", "--dtype", "bfloat16")
    assert code == 2
    assert err.strip() == (f"focusvlm eval: error: {out} was run in float32 on cpu; this run would use bfloat16 on "
                           "cpu, and mixing them would mix results. Resume with --dtype float32 --device cpu, or use "
                           "another --out folder.")


def test_manifest_mismatch_on_device_type():
    from focusvlm.eval.engine import GenerationSettings, ManifestMismatch, build_manifest, check_manifest

    settings = GenerationSettings(max_new_tokens=4)
    cpu = build_manifest(model="m", config={}, benchmark="b", settings=settings, dtype="bfloat16", device="cpu")
    gpu = build_manifest(model="m", config={}, benchmark="b", settings=settings, dtype="bfloat16", device="cuda:1")
    assert gpu["device_type"] == "cuda" and gpu["environment"]["device"] == "cuda:1"
    with pytest.raises(ValueError, match="resolved dtype"):
        build_manifest(model="m", config={}, benchmark="b", settings=settings, dtype="auto", device="cpu")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "manifest.json").write_text(json.dumps(cpu))
        with pytest.raises(ManifestMismatch, match="was run in bfloat16 on cpu; this run would use bfloat16 on cuda"):
            check_manifest(Path(d), gpu)
        # library versions differ between machines: informational, not a mismatch
        other_env = dict(cpu, environment={**cpu["environment"], "torch": "0.0"})
        assert check_manifest(Path(d), other_env) is True
