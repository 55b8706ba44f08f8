"""Issue 10, item 1: partial runs are marked, and comparisons of unlike runs are refused.

Runs are made by the real engine with a fake generator (no model); scoring, `report` and
`compare` go through the CLI entry point as a user would call them.
"""

import json
from pathlib import Path

from focusvlm.cli import main
from focusvlm.eval.engine import Generation, GenerationSettings, Sample, build_manifest, run
from focusvlm.eval.runs import comparability_problems, run_status, status_line
from focusvlm.eval.scoring import load_scores

ASSETS = Path(__file__).resolve().parents[2] / "focusvlm" / "assets"


class Echo:
    """Lower-case answers (they pass english_lowercase); can stop like a kill after some calls."""

    def __init__(self, stop_after=None):
        self.calls, self.stop_after = 0, stop_after

    def generate(self, prompts, images, max_new_tokens):
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise KeyboardInterrupt
        self.calls += 1
        return [Generation(text=f"answer {p}", new_tokens=2) for p in prompts]


def if_samples(n):
    ids = ("change_case:english_lowercase", "change_case:english_capital")
    return [Sample(id=f"q{i // 2}/T{i % 2 + 1}", image=ASSETS / "chelsea.jpg", prompt=f"question {i}",
                   meta={"task": f"T{i % 2 + 1}", "task_name": "case", "instruction_id": ids[i % 2], "kwargs": {}})
            for i in range(n)]


def make_run(d: Path, n=8, stop_after=None, max_new_tokens=8, config=None, mode="direct"):
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=2, mode=mode)
    manifest = build_manifest(model="fake", config=config or {"cmai": None}, benchmark="if", settings=settings,
                              fingerprint={"bench": "sha256:abc"}, dtype="float32", device="cpu")
    try:
        run(if_samples(n), Echo(stop_after), d, manifest, settings, progress=False)
    except KeyboardInterrupt:
        pass
    return d


def test_partial_run_is_scored_as_incomplete(tmp_path, capsys):
    d = make_run(tmp_path / "partial", n=8, stop_after=1)  # killed after one batch of 2
    status = run_status(d)
    assert (status["predicted"], status["expected"], status["complete"]) == (2, 8, False)
    assert main(["score", "if", str(d)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("INCOMPLETE: 2 of 8 samples (25.0%)")
    scores = json.loads((d / "scores.json").read_text())
    assert scores["completeness"]["complete"] is False and scores["completeness"]["expected"] == 8
    assert scores["generation"]["max_new_tokens"] == 8 and scores["benchmark_fingerprint"] == {"bench": "sha256:abc"}


def test_complete_run_says_so(tmp_path, capsys):
    d = make_run(tmp_path / "full", n=4)
    assert main(["score", "if", str(d)]) == 0
    assert capsys.readouterr().out.startswith("complete: 4 of 4 samples, 0 errors")


def test_stale_scores_are_rescored(tmp_path):
    d = make_run(tmp_path / "r", n=6, stop_after=1)
    assert load_scores(d)["completeness"]["predicted"] == 2
    make_run(d, n=6)  # the resume finishes the run; scores.json now describes 2 of 6
    assert load_scores(d)["completeness"]["complete"] is True


def test_compare_refuses_different_sample_sets_and_settings(tmp_path, capsys):
    full = make_run(tmp_path / "full", n=8, max_new_tokens=32)
    partial = make_run(tmp_path / "partial", n=8, stop_after=1, max_new_tokens=8, config={"cmai": {"gamma_max": 0.6}})
    assert main(["compare", str(full), str(partial), "-o", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("focusvlm compare: error: these runs are not like for like")
    assert "generation settings differ" in err and "max_new_tokens=32" in err and "max_new_tokens=8" in err
    assert "sample sets differ" in err and "partial is incomplete (2 of 8 samples)" in err
    assert not (tmp_path / "cmp" / "compare.md").exists()
    # on request it prints, marked loudly, with each run's completeness
    assert main(["compare", str(full), str(partial), "--allow-mismatch", "-o", str(tmp_path / "cmp")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("**WARNING: NOT LIKE FOR LIKE**")
    assert "INCOMPLETE: 2 of 8 samples" in text
    assert (tmp_path / "cmp" / "compare.md").read_text().startswith("**WARNING: NOT LIKE FOR LIKE**")


def test_compare_of_like_runs_has_no_warning(tmp_path, capsys):
    a = make_run(tmp_path / "a", n=4)
    b = make_run(tmp_path / "b", n=4, config={"cmai": {"gamma_max": 0.6}})
    assert main(["compare", str(a), str(b), "-o", str(tmp_path / "cmp")]) == 0
    text = capsys.readouterr().out
    assert "WARNING" not in text and "complete: 4 of 4 samples" in text


def test_comparability_names_benchmark_data_differences():
    base = {"benchmark": "if", "benchmark_fingerprint": {"f": 1}, "generation": {"max_new_tokens": 8},
            "ids_sha256": "x", "predicted": 4, "expected": 4, "complete": True}
    other = dict(base, benchmark_fingerprint={"f": 2})
    problems = comparability_problems([base, other], ["a", "b"])
    assert problems == ['benchmark data (fingerprints) differ: a has {"f": 1}, b has {"f": 2}']
    assert comparability_problems([base, dict(base)], ["a", "b"]) == []


def test_report_marks_incomplete_cells_and_skips_compare_folders(tmp_path, capsys):
    runs = tmp_path / "runs"
    make_run(runs / "stock", n=8, stop_after=1)
    make_run(runs / "cmai", n=8, config={"cmai": {"gamma_max": 0.6}})
    (runs / "cmp").mkdir()  # what `focusvlm compare ... -o runs/cmp` leaves next to the runs
    (runs / "cmp" / "compare.md").write_text("x")
    assert main(["report", *sorted(str(p) for p in runs.iterdir())]) == 0  # `focusvlm report runs/*`
    text = capsys.readouterr().out
    assert "| IF (%) |" in text
    stock_row = next(line for line in text.splitlines() if "| stock |" in line)
    assert "INCOMPLETE 2/8" in stock_row
    assert "**WARNING: incomplete runs**" in text
    assert f"skipped: {runs / 'cmp'} (no manifest.json" in text
    assert "† column IF compares runs that are not like for like" in text  # 2 answered vs 8 answered


def test_report_gives_describe_then_answer_its_own_row(tmp_path, capsys):
    make_run(tmp_path / "stock", n=4)
    make_run(tmp_path / "dta", n=4, mode="describe-then-answer")
    assert main(["report", str(tmp_path / "stock"), str(tmp_path / "dta")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| fake |")]
    assert [r.split("|")[2].strip() for r in rows] == ["stock", "stock (describe-then-answer)"]


def test_report_with_no_run_folder_is_one_line_error(tmp_path, capsys):
    (tmp_path / "cmp").mkdir()
    assert main(["report", str(tmp_path / "cmp")]) == 2
    assert "no run folders among the arguments" in capsys.readouterr().err


def test_status_line_of_old_runs_says_unknown():
    st = {"predicted": 3, "expected": None, "errors": 0, "complete": None}
    assert "completeness unknown" in status_line(st)


def test_score_refuses_the_wrong_benchmark_name(tmp_path, capsys):
    d = make_run(tmp_path / "r", n=2)
    assert main(["score", "gqa", str(d)]) == 2
    assert "holds a 'if' run, not 'gqa'" in capsys.readouterr().err


def test_resume_with_another_limit_updates_the_expected_set(tmp_path):
    d = make_run(tmp_path / "r", n=2)
    assert run_status(d)["complete"] is True
    make_run(d, n=6, stop_after=1)  # resumed with a larger --limit and killed: 4 of 6
    assert (run_status(d)["predicted"], run_status(d)["expected"], run_status(d)["complete"]) == (4, 6, False)
