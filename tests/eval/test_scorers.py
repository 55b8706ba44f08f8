"""Parity cases for the standard-benchmark scorers.

Every expected value below was worked out by hand from the official
evaluators' rules (VQA vqaEval.py, LLaVA's GQA conversion + GQA eval, MME
calculation.py, MMBench's rule-based matcher + circular rule).
"""

import math

import pytest

from focusvlm.eval.scorers import (gqa_correct, mmbench_accuracy, mmbench_extract, mme_parse, mme_scores,
                                   vqa_accuracy, vqa_normalize, vqa_process_punctuation)

# --------------------------------------------------------------------------- VQA normalisation


@pytest.mark.parametrize("raw, expected", [
    ("two", "2"), ("Ten", "10"), ("none", "0"), ("eleven", "eleven"),   # number words up to ten only
    ("a dog", "dog"), ("The Dog", "dog"), ("an apple", "apple"),        # articles dropped, lowercased
    ("dont", "don't"), ("isnt", "isn't"), ("Im", "im"),                 # capitalised keys never match after lowercasing
    ("yes.", "yes"), ("2.5", "2.5"), ("3.", "3"),                       # period kept only before a digit
    ("black-and-white", "black and white"),                            # mark not touching a space -> space
    ("t - shirt", "t shirt"),                                          # mark touching a space -> removed; split() re-joins
    ("1,000", "1000"),                                                 # digit,digit: every mark removed
    ("hello, world", "hello world"),                                   # ", " touches a space -> removed
    ("yes!", "yes"), ("what?", "what"),                                 # end marks: replaced by a space, stripped by split
    ("  yes \n", "yes"), ("left\tside", "left side"),
    ("man's", "man's"),                                                 # apostrophes are not punctuation
])
def test_vqa_normalize(raw, expected):
    assert vqa_normalize(raw) == expected


def test_punctuation_condition_reads_the_original_string():
    # "@" does not touch a space but "," does ("a, b"), so "," is removed and "@" becomes a space
    assert vqa_process_punctuation("x@y a, b") == "x y a b"
    # any digit-comma-digit anywhere switches EVERY mark to removal
    assert vqa_process_punctuation("x@y 1,5") == "xy 15"


def test_period_strip_stops_after_32_like_the_official_call():
    text = "." * 40
    assert vqa_process_punctuation(text) == "." * 8


# --------------------------------------------------------------------------- VQA accuracy


def test_vqa_accuracy_leave_one_out():
    # 3 of 10 humans said "2": each left-out subset containing all three scores 1 (7 subsets),
    # each subset missing one of them has 2 matches -> 2/3 (3 subsets) => (7 + 3 * 2/3) / 10 = 0.9
    answers = ["2"] * 3 + ["3"] * 7
    assert vqa_accuracy("two", answers) == pytest.approx(0.9)
    assert vqa_accuracy("3", answers) == pytest.approx(1.0)
    # 1 match: every subset has <= 1 -> (9 * 1/3 + 0) / 10
    assert vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)
    # 2 matches: 8 subsets with 2 (2/3) and 2 with 1 (1/3)
    assert vqa_accuracy("cat", ["cat"] * 2 + ["dog"] * 8) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    # 4 matches: all subsets have >= 3
    assert vqa_accuracy("cat", ["cat"] * 4 + ["dog"] * 6) == pytest.approx(1.0)
    assert vqa_accuracy("bird", ["cat"] * 10) == 0.0


def test_vqa_accuracy_normalises_the_prediction():
    answers = ["dog"] * 10
    for pred in ("Dog", "a dog", "The dog.", " dog\n"):
        assert vqa_accuracy(pred, answers) == 1.0
    assert vqa_accuracy("dont", ["don't"] * 10) == 1.0
    assert vqa_accuracy("dogs", answers) == 0.0


def test_vqa_accuracy_official_gt_quirks():
    # unanimous human answers are compared raw: "two" in the annotation never matches
    # (the prediction becomes "2"); released annotations are already normalised
    assert vqa_accuracy("two", ["two"] * 10) == 0.0
    # disagreeing answers get the punctuation step only (no article/number step)
    assert vqa_accuracy("black and white", ["black-and-white"] * 5 + ["gray"] * 5) == 1.0
    assert vqa_accuracy("dog", ["a dog"] * 5 + ["cat"] * 5) == 0.0


def test_vqa_accuracy_rejects_bad_answers():
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])
    with pytest.raises(ValueError):
        vqa_accuracy("x", "yes")


# --------------------------------------------------------------------------- GQA


@pytest.mark.parametrize("pred, gold, ok", [
    ("yes", "yes", True), ("Yes.", "yes", True), ("Yes..", "yes", True), ("  no \n", "no", True),
    ("left", "left", True), ("Left side", "left", False),
    ("a dog", "dog", False),       # no article stripping in GQA
    ("yes .", "yes", False),       # only trailing periods go; the space stays
    ("yes, it is", "yes", False), ("2", "two", False),
])
def test_gqa_correct(pred, gold, ok):
    assert gqa_correct(pred, gold) is ok


# --------------------------------------------------------------------------- MME


@pytest.mark.parametrize("pred, label", [
    ("yes", "yes"), ("No", "no"), ("Yes, there is a dog.", "yes"), ("No.", "no"),
    ("not sure", "no"),              # "no" within the first four characters
    ("None of them", "no"),
    ("The answer is yes", "other"),  # only the first four characters are looked at
    ("maybe", "other"), ("", "other"),
    ("eyes", "yes"),                 # the official rule is a substring test: "eyes"[:4] contains "yes"
])
def test_mme_parse(pred, label):
    assert mme_parse(pred) == label


def _mme_rows():
    rows = []
    # existence: img a both right; img b one right -> acc 3/4, acc+ 1/2 -> 75 + 50 = 125
    rows += [dict(category="existence", image="a.jpg", answer="Yes", prediction="Yes"),
             dict(category="existence", image="a.jpg", answer="No", prediction="No, there is not."),
             dict(category="existence", image="b.jpg", answer="Yes", prediction="yes"),
             dict(category="existence", image="b.jpg", answer="No", prediction="I think so")]
    # count: everything right -> 200
    rows += [dict(category="count", image="a.jpg", answer="yes", prediction="Yes"),
             dict(category="count", image="a.jpg", answer="no", prediction="no")]
    # code_reasoning (cognition): wrong and 'other' -> 0
    rows += [dict(category="code_reasoning", image="c.png", answer="yes", prediction="The output is 3"),
             dict(category="code_reasoning", image="c.png", answer="no", prediction="yes")]
    return rows


def test_mme_scores():
    s = mme_scores(_mme_rows())
    assert s["subtasks"]["existence"]["acc"] == pytest.approx(75.0)
    assert s["subtasks"]["existence"]["acc_plus"] == pytest.approx(50.0)
    assert s["subtasks"]["existence"]["score"] == pytest.approx(125.0)
    assert s["subtasks"]["count"]["score"] == pytest.approx(200.0)
    assert s["subtasks"]["code_reasoning"]["score"] == 0.0
    assert s["perception"] == pytest.approx(325.0)
    assert s["cognition"] == 0.0
    assert "OCR" in s["missing_subtasks"] and "count" not in s["missing_subtasks"]


def test_mme_same_image_name_in_two_subtasks_is_two_images():
    rows = [dict(category="color", image="x.jpg", answer="yes", prediction="yes"),
            dict(category="color", image="x.jpg", answer="no", prediction="no"),
            dict(category="OCR", image="x.jpg", answer="yes", prediction="no"),
            dict(category="OCR", image="x.jpg", answer="no", prediction="no")]
    s = mme_scores(rows)
    assert s["subtasks"]["color"]["score"] == 200.0
    assert s["subtasks"]["OCR"]["score"] == 50.0
    assert s["perception"] == 250.0


def test_mme_rejects_non_yes_no_gold():
    with pytest.raises(ValueError, match="row 0 field 'answer'"):
        mme_scores([dict(category="count", image="a", answer="maybe", prediction="yes")])


# --------------------------------------------------------------------------- MMBench

OPTS = {"A": "cat", "B": "dog", "C": "horse", "D": "bird"}


@pytest.mark.parametrize("pred, letter", [
    ("A", "A"), ("B.", "B"), ("(C)", "C"), ("The answer is D.", "D"), ("[B]", "B"), ("**C**", "C"),
    ("a", None),                  # letters are case-sensitive; "a" is not an option text either
    ("A or B", None),             # two letters named and no single option text: undecided
    ("It is a dog", "B"),         # no letter -> option text
    ("dog or cat", None),         # two option texts
    ("Cannot determine the answer", "Z"), ("Z", "Z"),
    ("Answer: C, the horse", "C"),
    ("A dog", "A"),               # the article "A" is a lone letter word, so the letter rule wins (official pitfall)
])
def test_mmbench_extract(pred, letter):
    assert mmbench_extract(pred, OPTS) == letter


def test_mmbench_extract_only_offered_letters():
    assert mmbench_extract("C", {"A": "yes", "B": "no"}) is None
    assert mmbench_extract("no", {"A": "yes", "B": "no"}) == "B"


def _rot(index, k, pred, answer):
    return {"index": index + k * 1_000_000, "prediction": pred, "answer": answer, **OPTS}


def test_mmbench_circular_rule():
    rows = [
        # question 1: all three copies right -> counts
        _rot(1, 0, "A", "A"), _rot(1, 1, "B", "B"), _rot(1, 2, "The answer is C", "C"),
        # question 2: one rotation wrong -> the whole question is wrong in circular mode
        _rot(2, 0, "B", "B"), _rot(2, 1, "B", "C"),
        # question 3: original copy wrong, rotation right
        _rot(3, 0, "D", "A"), _rot(3, 1, "B", "B"),
    ]
    assert mmbench_accuracy(rows, circular=True) == pytest.approx(1 / 3)
    # single pass looks at the original copies only: q1 right, q2 right, q3 wrong
    assert mmbench_accuracy(rows, circular=False) == pytest.approx(2 / 3)


def test_mmbench_missing_options_are_skipped_and_nan_counts_as_missing():
    row = {"index": 5, "prediction": "C", "answer": "C", "A": "x", "B": "y", "C": float("nan"), "D": None}
    assert mmbench_accuracy([row]) == 0.0  # C is not an offered option
    row2 = {"index": 6, "prediction": "y", "answer": "B", "options": {"A": "x", "B": "y"}}
    assert mmbench_accuracy([row2]) == 1.0


def test_mmbench_errors_name_the_row():
    with pytest.raises(ValueError, match="row 0 has no field 'answer'"):
        mmbench_accuracy([{"index": 1, "prediction": "A", **OPTS}])
    assert not math.isnan(mmbench_accuracy([]))
