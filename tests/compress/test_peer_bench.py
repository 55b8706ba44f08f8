"""The peers in `focusvlm bench` at equal budgets on the tiny preset (structure, token counts, FLOPs; not
timings), and the FLOP count of FastV's shorter later layers."""

import pytest

from focusvlm.bench import flops
from focusvlm.bench.arms import parse_arms
from focusvlm.bench.harness import run_bench
from focusvlm.bench.report import markdown_tables, plot
from focusvlm.bench.setup import BenchOptions
from focusvlm.models.factory import llava_config
from focusvlm.inhibit.fastv_method import FastVConfig, layer_positions

EQUAL = "stock,vmtc:16,visionzip:16,prumerge:16,divprune:16,fastv:16,prumerge"


@pytest.fixture(scope="module")
def report():
    opts = BenchOptions(preset="tiny", methods=parse_arms(EQUAL), batches=[2], prompt_tokens=8, new_tokens=3,
                        repeats=1, warmup=0, progress=False)
    return run_bench(opts)


def test_equal_budget_run(report, tmp_path):
    rows = report["runs"][0]["methods"]
    assert list(rows) == EQUAL.split(",")
    for name in ("vmtc:16", "visionzip:16", "prumerge:16", "divprune:16"):
        assert rows[name]["visual_tokens"] == 16, name
        assert rows[name]["ratio"]["prefill_flops"] < 1
        assert rows[name]["decode_s_per_token"] > 0
    # FastV: every image token enters the LLM, 16 of 64 stay after layer K = 2 of 3
    fv = rows["fastv:16"]
    assert fv["visual_tokens"] == 64
    assert rows["stock"]["flops"]["llm"] > fv["flops"]["llm"] > rows["visionzip:16"]["flops"]["llm"]
    # bare prumerge is the official adaptive path: measured on the batch, whatever count it chose
    assert 1 <= rows["prumerge"]["visual_tokens"] <= 65
    text = markdown_tables(report)
    assert "| fastv:16 |" in text and "| divprune:16 |" in text
    plot(report, tmp_path / "ratios.png")
    assert (tmp_path / "ratios.png").stat().st_size > 1000


def test_fastv_layer_positions_and_flops():
    cfg = FastVConfig(k=2, ratio=0.5)
    assert layer_positions(cfg, 4, 10, 576) == [586, 586, 298, 298]
    assert layer_positions(FastVConfig(k=1, keep=192), 3, 10, 576) == [586, 202, 202]
    t = flops.TextShape.from_config(llava_config("tiny").text_config)
    full = flops.llm_prefill_flops(t, 74)
    assert flops.llm_prefill_flops(t, 74, [74, 74, 74]) == full
    assert flops.llm_prefill_flops(t, 74, [74, 42, 42]) == \
        full - 2 * (flops.llm_layer_flops(t, 74) - flops.llm_layer_flops(t, 42))
    with pytest.raises(ValueError, match="the LLM has 3"):
        flops.llm_prefill_flops(t, 74, [74])
