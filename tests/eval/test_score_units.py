"""Issue 10, item 10: accuracies print as percentages with the unit, MME as a score with its maximum."""

from focusvlm.eval.benchmarks import common
from focusvlm.eval.table2 import markdown


def test_accuracy_line_says_percent(tmp_path):
    recs = [{"id": "a", "response": "x", "error": None}, {"id": "b", "response": None, "error": "image: bad"}]
    scores = common.write_accuracy(tmp_path, "gqa", "GQA", recs, [1.0, 0.0])
    assert scores["summary"]["accuracy"] == 50.0
    assert "accuracy: 50.00% over 2 questions (1 errors)" in (tmp_path / "report.md").read_text()


def test_zero_accuracy_is_not_ambiguous(tmp_path):
    common.write_accuracy(tmp_path, "gqa", "GQA", [{"id": "a", "response": "x"}], [0.0])
    assert "accuracy: 0.00% over 1 questions" in (tmp_path / "report.md").read_text()


def test_table2_headers_carry_units():
    text = markdown({"columns": ["IF", "GQA", "MME"], "rows": [], "skipped": []})
    assert text.splitlines()[0] == "| model | method | IF (%) | GQA (%) | MME (score) |"
