"""The benchmark harness works end to end on the tiny preset (structure, not timings),
and the analytic FLOPs formulas match a hand count."""

import argparse
import json

import pytest
import torch

from focusvlm.bench import flops
from focusvlm.bench.arms import parse_arm, parse_arms
from focusvlm.bench.harness import run_bench
from focusvlm.bench.report import markdown_tables, write_json
from focusvlm.bench.setup import BenchOptions
from focusvlm.bench.targets import check_targets
from focusvlm.models.factory import llava_config


@pytest.fixture(scope="module")
def tiny_report():
    opts = BenchOptions(preset="tiny", methods=parse_arms("stock,cmai"), batches=[2], prompt_tokens=8,
                        new_tokens=3, repeats=1, warmup=0, progress=False)
    return run_bench(opts)


def test_report_structure(tiny_report, tmp_path):
    run = tiny_report["runs"][0]
    assert run["batch"] == 2 and run["reference"] == "stock" and run["interleave"] == "step"   # CPU default
    assert list(run["methods"]) == ["stock", "cmai"]
    for name, row in run["methods"].items():
        assert row["visual_tokens"] == 64          # 112 px / 14 px patches, CLS dropped
        for key in ("vision_s", "ttft_s", "generate_s", "decode_s_per_token", "throughput_tok_s"):
            assert row[key] is not None and row[key] >= 0, (name, key)
        assert set(row["ratio"]) >= {"vision_s", "ttft_s", "decode_s_per_token", "peak_mem_bytes", "prefill_flops"}
    stock, cmai = run["methods"]["stock"], run["methods"]["cmai"]
    assert stock["ratio"]["ttft_s"] == pytest.approx(1.0)
    # CMAI adds text-row work in the two inhibited layers (layer 0 has gamma 0) and changes nothing else
    assert cmai["flops"]["cmai"] > 0 and stock["flops"]["cmai"] == 0
    assert cmai["flops"]["llm"] == stock["flops"]["llm"]
    assert cmai["ratio"]["visual_tokens"] == 1.0
    text = markdown_tables(tiny_report)
    assert "| cmai |" in text and "x)" in text
    write_json(tiny_report, tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["meta"]["preset"] == "tiny" and data["targets"] == []   # no target is stated for tiny


def test_round_interleave_measures_generate_and_memory():
    opts = BenchOptions(preset="tiny", methods=parse_arms("stock,eager"), batches=[1], prompt_tokens=8,
                        new_tokens=3, repeats=1, warmup=0, progress=False, interleave="round")
    run = run_bench(opts)["runs"][0]
    assert run["interleave"] == "round"
    row = run["methods"]["eager"]
    assert row["generate_s"] > 0 and row["peak_mem_bytes"] > 0 and row["ratio"]["generate_s"] is not None


def test_vision_only_vmtc_changes_token_count():
    opts = BenchOptions(preset="tiny", methods=parse_arms("stock,vmtc"), batches=[1], repeats=1, warmup=0,
                        vision_only=True, progress=False)
    run = run_bench(opts)["runs"][0]
    vm = run["methods"]["vmtc"]
    assert vm["visual_tokens"] == 32 and vm["ttft_s"] is None
    assert vm["ratio"]["prefill_flops"] < 1.0


def test_cli_parses_and_registers():
    from focusvlm.cli import bench

    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--preset", "tiny", "--methods", "stock,vmtc:0.25+cmai:0.5", "--batch", "1,16"])
    assert args.batch == [1, 16]
    m = parse_arms(args.methods)[1]
    assert m.config.vmtc.target == 0.25 and m.config.cmai.gamma_max == 0.5
    with pytest.raises(ValueError, match="unknown benchmark method"):
        parse_arm("tome")


def test_flops_hand_count_tiny():
    cfg = llava_config("tiny")
    v = flops.VisionShape.from_config(cfg.vision_config)
    t = flops.TextShape.from_config(cfg.text_config)
    # vision: 112/14 = 8x8 = 64 patches, 65 tokens with CLS, d=32, mlp 64, 4 layers
    embed = 2 * 64 * (3 * 14 * 14) * 32                 # 2,408,448
    layer = 2 * 65 * 32 * 32 * 4 + 2 * 65 * 65 * 32 * 2 + 2 * 65 * 32 * 64 * 2   # 532,480 + 540,800 + 532,480
    assert flops.vision_flops(v) == embed + 4 * layer == 8_831_488
    # projector: 64 tokens, 32 -> 64 -> 64
    assert flops.projector_flops(v, t, 64) == 2 * 64 * 32 * 64 + 2 * 64 * 64 * 64 == 786_432
    # LLM: 12 text + 64 image = 76 positions; d=64, 4 heads of 16, 2 kv heads (width 32), mlp 128, 3 layers
    proj = 2 * 76 * 64 * (64 + 64 + 32 + 32)            # q, o, k, v
    attn = 76 * 76 * 64 * 2                              # causal halves of QK^T and AV
    mlp = 2 * 76 * 64 * 128 * 3
    assert flops.llm_prefill_flops(t, 76) == 3 * (proj + attn + mlp) + 2 * 64 * 512 == 19_093_504
    # CMAI (issue 12: one fused call replaces the stock one): the 12 text rows' scores against the keys each
    # sees (64 before them, then causal: 12*13/2) over d=64, and the focus product (12*11/2 earlier-row pairs
    # by 64 image columns), two layers
    assert flops.cmai_flops(t, 76, 12, 64, 2) == 2 * (2 * 64 * (12 * 64 + 78) + 2 * 64 * 66) == 233_472
    total = flops.prefill_flops(v, t, prompt_tokens=12, visual_tokens=64, batch=2, cmai_layers=2)
    assert total.total == 2 * (8_831_488 + 786_432 + 19_093_504 + 233_472)


def test_flops_vmtc_layer_shrinks_mlp_only():
    # a compressing layer: attention on its 65 input tokens, MLP on its 33 output tokens
    assert flops.vit_layer_flops(32, 64, 65, 33) == 2 * 65 * 32 * 32 * 4 + 2 * 65 * 65 * 32 * 2 + 2 * 33 * 32 * 64 * 2
    # stage overhead: importance (q of CLS, k of all, CLS row) + 10 k-means iterations over 64-1-28... tokens
    extra = flops.vmtc_stage_flops(32, 65, keep=28, clusters=4, iters=10)
    redundant = 65 - 1 - 28
    assert extra == (2 * 32 * 32 + 2 * 65 * 32 * 32 + 2 * 65 * 32) + 10 * (2 * redundant * 4 * 32 + 2 * redundant * 32) \
        + 2 * redundant * 32


def test_targets_apply_only_to_matching_runs(tiny_report):
    assert check_targets(tiny_report) == []
    fake = {"meta": {"device": "cpu", "preset": "mid", "vision_only": False, "dtype": "float32"},
            "runs": [{"batch": 1, "methods": {"cmai": {"ratio": {"ttft_s": 1.1, "generate_s": 1.3}}}}]}
    verdicts = {v["field"]: v["met"] for v in check_targets(fake)}
    assert verdicts == {"ttft_s": True, "generate_s": False}


def test_prompt_inputs_give_each_sample_its_own_image_count():
    """HiRED, GlobalCom2 and DivPrune on AnyRes give each image its own count: each row carries its image's
    placeholders, shorter rows left-padded and masked, text order kept."""
    from focusvlm.bench.setup import PROMPT_PREFIX, prompt_inputs

    text = torch.arange(1, 1 + 2 * 9).view(2, 9)
    ids, mask = prompt_inputs(text, {"visual_tokens": 5, "visual_tokens_per_sample": [5, 3]}, image_token_id=99)
    assert ids.shape == mask.shape == (2, 9 + 5)
    assert (ids == 99).sum(1).tolist() == [5, 3] and mask.sum(1).tolist() == [14, 12]
    assert mask[1, :2].tolist() == [0, 0] and ids[1, :2].tolist() == [0, 0]
    for row in range(2):
        kept = ids[row][mask[row].bool()]
        text_part = kept[kept != 99]
        assert text_part.tolist() == text[row].tolist()
        assert (kept[PROMPT_PREFIX:PROMPT_PREFIX + [5, 3][row]] == 99).all()
    same, ones = prompt_inputs(text, {"visual_tokens": 4, "visual_tokens_per_sample": None}, 99)
    assert bool(ones.all()) and (same == 99).sum(1).tolist() == [4, 4]


def test_bench_runs_a_batch_whose_images_get_different_counts():
    from focusvlm.bench.arms import parse_arms
    from focusvlm.bench.harness import run_bench
    from focusvlm.bench.setup import BenchOptions

    report = run_bench(BenchOptions(preset="next-tiny", methods=parse_arms("stock,hired:0.3"), batches=[4],
                                    prompt_tokens=8, new_tokens=2, repeats=1, warmup=0, progress=False))
    row = report["runs"][0]["methods"]["hired:0.3"]
    assert row["ttft_s"] > 0 and row["visual_tokens"] < report["runs"][0]["methods"]["stock"]["visual_tokens"]


@pytest.mark.parametrize("preset", ["qwen2.5-vl-tiny", "tiny"])
def test_hand_written_decode_steps_match_generate(preset):
    """bench's decode loop (prefill, then one token per call with the adapter's step_inputs) computes what generate
    does: Qwen's 3-D positions need the prompt's rope deltas (without them every position was numbered again)."""
    from focusvlm import hfcompat
    from focusvlm.bench.arms import parse_arm
    from focusvlm.bench.setup import BenchOptions, bench_inputs, build_model, probe_vision, prompt_inputs
    from focusvlm.models import adapter_for

    model = build_model(BenchOptions(preset=preset), torch.device("cpu"), torch.float32)
    adapter = adapter_for(model)
    vision, text = bench_inputs(model, 1, 8, torch.Generator().manual_seed(0), "cpu", torch.float32)
    ids, mask = prompt_inputs(text, probe_vision(model, parse_arm("stock"), vision), model.config.image_token_id)
    inputs = {"input_ids": ids, "attention_mask": mask, **vision, **adapter.prompt_inputs(model, ids)}
    with torch.inference_mode():
        want = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0)
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        cache, token, logits = hfcompat.output_cache(out), out.logits[:, -1:].argmax(-1), [out.logits[:, -1]]
        for _ in range(3):
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            out = model(input_ids=token, attention_mask=mask, **hfcompat.cache_kwargs(cache), use_cache=True,
                        logits_to_keep=1, **adapter.step_inputs(model, mask))
            cache, token = hfcompat.output_cache(out), out.logits[:, -1:].argmax(-1)
            logits.append(out.logits[:, -1])
    for got, expected in zip(logits, want.logits):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_prefill_flops_count_each_methods_own_selection_work():
    """The FLOP model adds what each peer computes to choose its tokens (Method.selection_flops): DivPrune's
    pairwise similarities of the image's stock tokens dominate it; VMTC's and CMAI's work is in their own terms."""
    from focusvlm.bench.arms import parse_arms
    from focusvlm.bench.harness import run_bench
    from focusvlm.bench.setup import BenchOptions

    arms = "stock,vmtc,cmai,divprune:0.3,hired:0.3,globalcom2,visionzip,spd,fastv"
    report = run_bench(BenchOptions(preset="next-tiny", methods=parse_arms(arms), batches=[1], prompt_tokens=8,
                                    new_tokens=0, repeats=1, warmup=0, progress=False))
    rows = report["runs"][0]["methods"]
    selection = {name: row["flops"]["selection"] for name, row in rows.items()}
    assert selection["stock"] == selection["vmtc"] == selection["cmai"] == 0
    assert all(selection[name] > 0 for name in ("divprune:0.3", "hired:0.3", "globalcom2", "visionzip", "spd",
                                                "fastv"))
    for row in rows.values():
        f = row["flops"]
        assert f["total"] == f["vision"] + f["projector"] + f["llm"] + f["cmai"] + f["selection"]
    # DivPrune over the packed sequence: 2 L^2 D + 3 L D + 2 k L with L = the stock count, D = the LM width
    n, d, k = rows["stock"]["visual_tokens"], 64, rows["divprune:0.3"]["visual_tokens"]
    assert selection["divprune:0.3"] == 2 * n * n * d + 3 * n * d + 2 * k * n
    tiny = run_bench(BenchOptions(preset="tiny", methods=parse_arms("stock,prumerge:4"), batches=[1], prompt_tokens=8,
                                  new_tokens=0, repeats=1, warmup=0, progress=False))["runs"][0]["methods"]
    assert tiny["prumerge:4"]["flops"]["selection"] > 0 == tiny["stock"]["flops"]["selection"]
