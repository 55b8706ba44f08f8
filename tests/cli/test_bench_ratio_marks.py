"""Issue 10, item 10: a `bench` ratio that disagrees with its own row's cells is marked and explained."""

from focusvlm.bench.report import markdown_tables


def report(paired_ttft):
    meta = {"model": None, "preset": "tiny", "vision_only": False, "dtype": "float32", "prompt_tokens": 8,
            "new_tokens": 4, "repeats": 3, "device": "cpu"}
    stock = {"visual_tokens": 64, "ttft_s": 0.100, "ratio": {}}
    # the medians say 80 ms / 100 ms = 0.80x; the paired ratio is what the harness measured back to back
    vmtc = {"visual_tokens": 16, "ttft_s": 0.080, "ratio": {"visual_tokens": 0.25, "ttft_s": paired_ttft}}
    run = {"batch": 1, "reference": "stock", "interleave": "step", "memory_source": "n/a",
           "methods": {"stock": stock, "vmtc": vmtc}}
    return {"meta": meta, "runs": [run]}


def test_agreeing_ratio_is_plain():
    text = markdown_tables(report(0.78))
    row = next(line for line in text.splitlines() if line.startswith("| vmtc |"))
    assert "80.0 (0.78x)" in row and "*" not in text.split("| vmtc |")[1].splitlines()[0]
    assert "load on the machine changed" not in text


def test_disagreeing_ratio_is_marked_with_both_figures():
    text = markdown_tables(report(0.50))
    row = next(line for line in text.splitlines() if line.startswith("| vmtc |"))
    assert "80.0 (0.50x*)" in row and "16 (0.25x)" in row
    note = next(line for line in text.splitlines() if "load on the machine changed" in line)
    assert "vmtc TTFT ms: 0.50x (median of back-to-back pairs) vs 0.80x (ratio of the medians shown)" in note
