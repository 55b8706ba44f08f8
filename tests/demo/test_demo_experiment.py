"""Issue 31's experiment runner: held-out questions, arms, resumable partial runs, the table and its intervals."""

import json

import pytest

pytest.importorskip("easy_vqa")

from focusvlm.demo import data as D  # noqa: E402
from focusvlm.demo import experiment as X  # noqa: E402


def test_if_questions_are_held_out_one_per_picture_and_carry_the_truth():
    rows = X.if_question_rows(25, seed=0)
    assert rows == X.if_question_rows(25, seed=0) and len({r["image_id"] for r in rows}) == 25
    test_ids = {it.qid for it in D.read_split("test")}
    assert all(r["id"] in test_ids for r in rows)  # test split: pictures the twins never trained on
    labels = D.image_labels(D.read_split("test"))
    assert all(r["description"] == D.true_description(*labels[r["image_id"]]) for r in rows)


def test_arm_configs():
    s = X.ExperimentSettings()
    arms = {a.key: a for a in X.ARMS}
    assert X.focus_config(arms["stock"], s, None) is None
    assert X.focus_config(arms["spd4"], s, None).to_dict()["spd"]["factor"] == 4
    assert X.focus_config(arms["cmai"], s, None).to_dict()["cmai"]["gamma_max"] == 0.6
    assert X.focus_config(arms["vmtc"], s, None).to_dict()["vmtc"]["target"] == 0.5
    assert X.focus_config(arms["focus"], s, None) is None  # no trained twin: the arm is skipped


def test_unknown_arm_is_named(capsys):
    with pytest.raises(SystemExit):
        X.main(["--out", "unused", "--arms", "stock,nope"])
    assert "unknown arm 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_experiment_runs_arms_resumes_and_reports_partial(tmp_path):
    out = tmp_path / "exp"
    settings = X.ExperimentSettings.quick()
    arms = tuple(a for a in X.ARMS if a.key in ("lm-text", "stock"))
    results = X.run(out, settings, arms=arms[:1], progress=False)
    assert list(results) == ["lm-text"] and "if_strict_vs_stock" not in results["lm-text"]  # no stock yet
    table = (out / "table.md").read_text()
    assert table.startswith("**PARTIAL: not run yet:") and "stock VLM, picture" in table.split("\n")[0]
    results = X.run(out, settings, arms=arms, progress=False)  # lm-text found done, stock added
    assert list(results) == ["lm-text", "stock"]
    stock = results["stock"]
    assert stock["prompts"] == 16 and stock["vqa_n"] == 8 and stock["image_tokens"] > 0
    assert results["lm-text"]["image_tokens"] == 0
    times = json.loads((out / "times.json").read_text())  # the resumed call adds stock's, keeps lm-text's
    assert set(times) == {"lm-text", "stock"} and all(t["if"] > 0 and t["vqa"] > 0 for t in times.values())
    assert all(r["seconds"] == times[k] for k, r in results.items())
    for r in results.values():
        for key in ("if_strict_ci", "if_loose_ci", "vqa_ci"):
            ci = r[key]
            assert ci["low"] <= ci["value"] <= ci["high"]
    # the paired difference: its value is the difference of the two averages of task rates (same prompts per
    # task), its interval holds it; the reference row says it is the reference
    assert stock["if_strict_vs_stock"] == "0 (the reference)"
    paired, lm = results["lm-text"]["if_strict_vs_stock_ci"], results["lm-text"]["if_strict_ci"]
    assert paired["value"] == pytest.approx(lm["value"] - stock["if_strict_ci"]["value"], abs=1e-12)
    assert paired["low"] <= paired["value"] <= paired["high"]
    assert results["lm-text"]["if_strict_vs_stock"] in (out / "table.md").read_text()
    assert json.loads((out / "results.json").read_text()) == results
    assert (out / "if_vs_tokens.png").stat().st_size > 1000
    summary = json.loads((out / X.SHIPPED_SUMMARY).read_text())
    assert not summary["complete"] and set(summary["arms"]) == {"lm-text", "stock"}
    assert summary["arms"]["stock"]["if_strict"] == stock["if_strict"]
    with pytest.raises(ValueError, match="not complete"):
        X.ship_summary(out, tmp_path / "package")
    with pytest.raises(ValueError, match="other settings"):
        X.run(out, X.ExperimentSettings(), arms=arms, progress=False)


def _twins(folder, content):
    from focusvlm.models.demo.ship import WEIGHTS_FILE

    for twin in ("stock", "focus"):
        (folder / twin).mkdir(parents=True, exist_ok=True)
        (folder / twin / WEIGHTS_FILE).write_bytes(content + twin.encode())
    return folder


def test_summary_ships_only_complete_and_only_with_the_weights_it_was_measured_on(tmp_path):
    from focusvlm import FocusConfig

    measured = _twins(tmp_path / "measured", b"weights ")
    results = {"stock": {"title": "stock VLM, picture", "model": "stock", "mode": "direct", "prompts": 400,
                         "if_strict": "16.0 [13.0, 19.0]", "if_strict_ci": {}, "vqa": "98.0 [97.0, 99.0]",
                         "image_tokens": 256.0}}
    summary = X.demo_summary(results, X.ExperimentSettings(), measured, X.twin_fingerprints(measured), complete=True)
    assert summary["arms"]["stock"]["config"] == FocusConfig().to_dict()
    assert summary["twins"] == X.twin_fingerprints(measured) and len(summary["twins"]) == 2
    out = tmp_path / "exp"
    out.mkdir()
    (out / X.SHIPPED_SUMMARY).write_text(json.dumps(summary))
    other = _twins(tmp_path / "other", b"retrained ")
    with pytest.raises(ValueError, match="other twins"):
        X.ship_summary(out, other)
    assert X.shipped_summary(measured) is None  # nothing shipped yet
    X.ship_summary(out, measured)
    assert X.shipped_summary(measured) == summary
    _twins(measured, b"retrained ")  # the twins change after the experiment: its figures no longer apply
    assert X.shipped_summary(measured) is None


def test_pictures_are_found_in_this_installation_whatever_path_the_bench_recorded():
    here = X.installed_picture("/elsewhere/venv/lib/python3.9/site-packages/easy_vqa/data/test/images/7.png")
    assert here == D.data_root() / "test" / "images" / "7.png" and here.is_file()
    assert X.installed_picture("/photos/cat.jpg") == X.Path("/photos/cat.jpg")  # not an easy-VQA picture: as given


def test_an_arm_measured_on_other_weights_is_refused_and_left_out(tmp_path):
    """A twin retrained after some arms were measured: those arms are neither continued nor reported."""
    twins = _twins(tmp_path / "twins", b"first ")
    arm = X.ARM_BY_KEY["stock"]
    folder = tmp_path / "exp" / "stock"
    def check(folder, arm, twins):
        X.check_weights(folder, arm, twins, X.twin_fingerprints(twins))

    check(folder, arm, twins)
    first = X.twin_fingerprints(twins)
    assert X.measured_on(folder) == X.arm_weights(arm, first) == first["stock"]
    check(folder, arm, twins)  # the same weights: carries on
    _twins(twins, b"retrained ")
    with pytest.raises(ValueError, match="other stock weights"):
        check(folder, arm, twins)
    assert X.measured_on(folder) != X.arm_weights(arm, X.twin_fingerprints(twins))  # what run() checks to report
    with pytest.raises(ValueError, match="no packed focus twin"):
        check(tmp_path / "exp" / "focus", X.ARM_BY_KEY["focus"], tmp_path / "nothing")
    check(tmp_path / "exp" / "lm-text", X.ARM_BY_KEY["lm-text"], tmp_path / "nothing")  # the base LM


def test_paired_difference_needs_the_same_prompts(tmp_path):
    for name, ids in (("a", ("q1/T1", "q2/T1")), ("b", ("q1/T1", "q3/T1"))):
        (tmp_path / name / "if").mkdir(parents=True)
        rows = [{"id": i, "index": n, "prompt": "Answer in lowercase.", "response": "yes", "error": None,
                 "meta": {"task": "T1", "instruction_id": "change_case:english_lowercase", "kwargs": {}}}
                for n, i in enumerate(ids)]
        (tmp_path / name / "if" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = X.ExperimentSettings.quick()
    same = X.paired_if_difference(X.strict_by_prompt(tmp_path / "a"), X.strict_by_prompt(tmp_path / "a"), settings)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same IF prompts"):
        X.paired_if_difference(X.strict_by_prompt(tmp_path / "a"), X.strict_by_prompt(tmp_path / "b"), settings)
