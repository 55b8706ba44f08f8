"""Issue 10, item 7: `ifbench build` from an empty question file fails in one line and writes nothing."""

import json

from focusvlm.cli import main


def test_empty_question_file(tmp_path, capsys):
    src, out = tmp_path / "questions.jsonl", tmp_path / "bench" / "if.jsonl"
    src.write_text("")
    assert main(["ifbench", "build", "--questions", str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"focusvlm ifbench: error: {src}: no questions in it (the file is empty); nothing to build, "
                   f"{out} not written")
    assert not out.exists() and not list(tmp_path.rglob("*.tmp"))


def test_empty_mmvet_file(tmp_path, capsys):
    (tmp_path / "mm-vet.json").write_text("{}")
    out = tmp_path / "if.jsonl"
    assert main(["ifbench", "build", "--questions", str(tmp_path), "-o", str(out)]) == 2
    assert "no questions in it" in capsys.readouterr().err and not out.exists()


def test_a_failed_rebuild_keeps_the_previous_bench_file(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"x")
    src = tmp_path / "q.jsonl"
    src.write_text(json.dumps({"id": "1", "image": "a.jpg", "question": "What?"}) + "\n")
    out = tmp_path / "if.jsonl"
    assert main(["ifbench", "build", "--questions", str(src), "-o", str(out)]) == 0
    before = out.read_bytes()
    assert len(before.splitlines()) == 16
    src.write_text("")
    assert main(["ifbench", "build", "--questions", str(src), "-o", str(out)]) == 2
    assert out.read_bytes() == before  # written by temp file + rename only after every row is built
