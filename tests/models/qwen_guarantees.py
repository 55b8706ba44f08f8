"""The guarantees every Qwen family keeps, written once (imported by test_qwen2_5_vl.py and test_qwen3_vl.py).

A test module that imports these defines the ``preset`` fixture (its tiny preset). The CMAI
tests mirror tests/test_cmai.py for LLaVA-1.5; the VMTC tests check the merger stage
against tests/reference/qwen_positions_reference.py.
"""

from __future__ import annotations

import pytest
import torch

from focusvlm import CMAIConfig, FocusConfig, VMTCConfig, patch, patched, unpatch
from qwen_builders import make_inputs, tiny_model, visual_mask
from reference import cmai_reference

LAYOUTS = [
    [5, ("img", (4, 6)), 9],                          # the usual prompt
    [3, ("img", (6, 4)), 4, ("img", (4, 4)), 6],      # two images of different sizes, text between
    [7],                                              # text only: untouched
    [("img", (4, 4)), 12],                            # image first
]
VIDEO_LAYOUTS = [[4, ("vid", (2, 4, 4)), 6], [2, ("img", (4, 4)), 3, ("vid", (2, 4, 6)), 5]]


@pytest.fixture(scope="module")
def model(preset):
    return tiny_model(preset)


def reference_logits(model, inputs: dict, cfg: CMAIConfig) -> torch.Tensor:
    gammas = cfg.gammas(model.config.text_config.num_hidden_layers)
    ref = cmai_reference.ReferenceCMAI(gammas, cfg.focus, cfg.discount)
    ref.types = [["P" if not m else ("I" if v else "T") for v, m in zip(vrow, mrow)]
                 for vrow, mrow in zip(visual_mask(inputs).tolist(), inputs["attention_mask"].tolist())]
    undo = cmai_reference.install(model, ref)
    try:
        with torch.no_grad():
            return model(**inputs).logits
    finally:
        undo()


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


CONFIGS = [CMAIConfig(gamma_max=0.6), CMAIConfig(gamma_max=0.6, focus="discounted", discount=0.7),
           CMAIConfig(schedule=(0.0, 0.3, 0.75))]


# --------------------------------------------------------------------------- CMAI

@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.focus}-{c.schedule}")
@pytest.mark.parametrize("layouts", [LAYOUTS, VIDEO_LAYOUTS], ids=["images", "videos"])
def test_cmai_prefill_matches_reference(model, cfg, layouts):
    inputs = make_inputs(model, layouts, seed=1).inputs
    expected = reference_logits(model, inputs, cfg)
    with patched(model, FocusConfig(cmai=cfg)):
        got = logits(model, inputs)
    mask = inputs["attention_mask"].bool()
    assert (got[mask] - expected[mask]).abs().max().item() <= 1e-5
    assert (logits(model, inputs)[mask] - got[mask]).abs().max().item() > 1e-4  # it did change something


def test_cmai_gamma_zero_and_unpatch_are_bit_identical(model):
    inputs = make_inputs(model, LAYOUTS, seed=2).inputs
    stock = logits(model, inputs)
    with patched(model, FocusConfig(cmai=CMAIConfig(gamma_max=0.0))):
        zero = logits(model, inputs)
    patch(model, FocusConfig(cmai=CMAIConfig(gamma_max=0.6)))
    changed = logits(model, inputs)
    unpatch(model)
    after = logits(model, inputs)
    assert torch.equal(stock, zero) and torch.equal(stock, after)
    assert not torch.equal(stock, changed)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert "generate" not in model.__dict__ and not hasattr(model, "_focusvlm")


def test_cmai_rows_before_any_text_after_an_image_keep_stock_bits(model):
    """Image rows (and the text before the first image) run the stock kernel: identical bits up to the image's end."""
    batch = make_inputs(model, [[6, ("img", (4, 6)), 8]], seed=3)
    inputs = batch.inputs
    stock = logits(model, inputs)
    with patched(model, FocusConfig(cmai=CMAIConfig())):
        got = logits(model, inputs)
    last_image = int(visual_mask(inputs)[0].nonzero().max())
    assert torch.equal(got[0, :last_image + 1], stock[0, :last_image + 1])
    assert not torch.equal(got[0, last_image + 2:], stock[0, last_image + 2:])


@pytest.mark.parametrize("layouts", [LAYOUTS, VIDEO_LAYOUTS], ids=["images", "videos"])
def test_cmai_left_padded_batch_equals_each_sample_alone(model, layouts):
    batch = make_inputs(model, layouts, seed=4)
    with patched(model, FocusConfig(cmai=CMAIConfig())):
        batched = logits(model, batch.inputs)
        for i in range(len(layouts)):
            single = logits(model, batch.sample(i))[0]
            got = batched[i][batch.inputs["attention_mask"][i].bool()]
            assert (got - single).abs().max().item() <= 1e-5, i


def _generate_matches_full_forward(model, batch, cfg: FocusConfig, new: int = 5) -> None:
    inputs = batch.inputs
    n = inputs["input_ids"].shape[0]
    prompt_len = inputs["input_ids"].shape[1]
    with patched(model, cfg), torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        full = dict(inputs)
        full["input_ids"] = gen.sequences
        full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(n, new, dtype=torch.long)], dim=1)
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(n, new, dtype=torch.long)],
                                              dim=1)
        whole = model(**full, use_cache=False).logits
    for step, step_logits in enumerate(gen.logits):
        diff = (step_logits - whole[:, prompt_len - 1 + step]).abs().max().item()
        assert diff <= 1e-5, (step, diff)


@pytest.mark.parametrize("layouts", [LAYOUTS[:2], VIDEO_LAYOUTS], ids=["images", "videos"])
def test_cmai_generate_with_cache_matches_full_forward(model, layouts):
    _generate_matches_full_forward(model, make_inputs(model, layouts, seed=5), FocusConfig(cmai=CMAIConfig()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cmai_low_precision_stays_close(preset, dtype):
    model = tiny_model(preset)
    inputs = make_inputs(model, LAYOUTS[:2], seed=6).inputs
    cfg = CMAIConfig()
    expected = reference_logits(model, inputs, cfg)
    model.to(dtype)
    low = {k: (v.to(dtype) if k.startswith("pixel") else v) for k, v in inputs.items()}
    with patched(model, FocusConfig(cmai=cfg)):
        got = logits(model, low)
    mask = inputs["attention_mask"].bool()
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert (got[mask].float() - expected[mask]).abs().max().item() < 0.1


def test_cmai_eager_base_matches_reference(preset):
    model = tiny_model(preset, attn_implementation="eager")
    inputs = make_inputs(model, LAYOUTS[:2], seed=7).inputs
    expected = reference_logits(model, inputs, CMAIConfig())
    with patched(model, FocusConfig(cmai=CMAIConfig())):
        got = logits(model, inputs)
    assert model.config.text_config._attn_implementation == "eager"
    mask = inputs["attention_mask"].bool()
    assert (got[mask] - expected[mask]).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------- VMTC after the merger

from focusvlm.compress import vmtc_merged  # noqa: E402
from qwen_builders import IMAGE, PRESETS, VIDEO, random_images, tiny_processor  # noqa: E402
from reference import qwen_positions_reference as posref  # noqa: E402

FAMILY = {v: k for k, v in PRESETS.items()}
SIZES = [(56, 56), (60, 90), (100, 130), (130, 100), (64, 200), (200, 64), (90, 90), (150, 150), (33, 170),
         (170, 40), (120, 60), (77, 133)]


def vmtc_counts(model, cfg: VMTCConfig):
    """tokens_per_frame(h, w) of the patched model, for make_inputs (grids in patches)."""
    from focusvlm.compress.vmtc_method import VMTC

    method = VMTC.__new__(VMTC)
    method.config, method.merged = cfg, True
    return lambda h, w: method.output_patches((h // 2, w // 2))


class Recorder:
    """Captures what every compress_frames call saw and decided (importance, selection, clusters)."""

    def __init__(self, monkeypatch):
        self.calls = []
        stock = vmtc_merged.compress_frames

        def spy(features, importance, extras, stage, *args, **kwargs):
            out = stock(features, importance, extras, stage, *args, **kwargs)
            self.calls.append((stage, out[2], features.detach().clone(), [e.detach().clone() for e in extras]))
            return out

        monkeypatch.setattr(vmtc_merged, "compress_frames", spy)


def test_vmtc_target_one_and_unpatch_are_bit_identical(model, preset):
    p = tiny_processor(FAMILY[preset])
    images = random_images(SIZES[:2])
    texts = ["w1 <|vision_start|> <|image_pad|> <|vision_end|> w2", "<|vision_start|> <|image_pad|> <|vision_end|> w3"]
    batch = p(images=images, text=texts, return_tensors="pt", padding=True)
    stock = logits(model, batch)
    with patched(model, FocusConfig(vmtc=VMTCConfig(target=1.0)), processor=p):
        same = p(images=images, text=texts, return_tensors="pt", padding=True)
        assert torch.equal(same["input_ids"], batch["input_ids"])
        assert torch.equal(logits(model, same), stock)
    before = dict(p.__dict__)
    patch(model, FocusConfig(vmtc=VMTCConfig(target=0.5)), processor=p)
    small = p(images=images, text=texts, return_tensors="pt", padding=True)
    assert (small["input_ids"] == IMAGE).sum() < (batch["input_ids"] == IMAGE).sum()
    logits(model, small)
    unpatch(model, p)
    assert p.__dict__.keys() == before.keys()
    assert torch.equal(p(images=images, text=texts, return_tensors="pt", padding=True)["input_ids"], batch["input_ids"])
    assert torch.equal(logits(model, batch), stock)
    core = model.model
    assert not {"get_image_features", "get_video_features", "get_rope_index"} & core.__dict__.keys()
    assert "_prepare_position_ids_for_generation" not in model.__dict__


@pytest.mark.parametrize("target", [0.5, 0.3, 7])
def test_vmtc_processor_count_equals_features_for_many_sizes(model, preset, target):
    p = tiny_processor(FAMILY[preset])
    images = random_images(SIZES, seed=1)
    with patched(model, FocusConfig(vmtc=VMTCConfig(target=target)), processor=p) as handle:
        batch = p(images=images, text=["<|vision_start|> <|image_pad|> <|vision_end|> w1"] * len(SIZES),
                  return_tensors="pt", padding=True)
        emitted = (batch["input_ids"] == IMAGE).sum(1).tolist()
        with torch.no_grad():
            feats = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
        produced = [f.shape[0] for f in feats.pooler_output]
        assert emitted == produced
        # a function of image_grid_thw and the target only, and what vLLM-style callers are told
        from focusvlm.compress.vmtc import resolve_target

        for (t, h, w), n in zip(batch["image_grid_thw"].tolist(), emitted):
            stock = (h // 2) * (w // 2)
            expected = min(target, stock) if isinstance(target, int) else resolve_target(stock, target)
            assert n == t * expected == handle.vision.output_patches((h // 2, w // 2))
        sizes = [img.shape[:2] for img in images]
        assert p._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens == emitted
        assert len({tuple(g) for g in batch["image_grid_thw"].tolist()}) > 6  # the sizes really differ


def test_vmtc_video_placeholders_follow_the_frame_count(model, preset):
    import types

    p = tiny_processor(FAMILY[preset])
    p.video_processor = types.SimpleNamespace(merge_size=2, temporal_patch_size=2)  # the facts the count reads
    grid = torch.tensor([[3, 8, 12]])               # 3 frames of 4 x 6 merged tokens
    video = {"video_grid_thw": grid, "video_metadata": [types.SimpleNamespace(fps=2.0, frames_indices=list(range(6)))]}
    stock = p.replace_video_token(video, 0)
    with patched(model, FocusConfig(vmtc=VMTCConfig(target=0.5)), processor=p):
        small = p.replace_video_token(video, 0)
    assert stock.count("<|video_pad|>") == 3 * 24
    assert small.count("<|video_pad|>") == 3 * 12
    assert small.replace("<|video_pad|>", "") == stock.replace("<|video_pad|>", "")  # timestamps etc. untouched


def _runs_from_records(recorder, batch, model):
    """(image_runs, video_runs) for the reference, from what each compress_frames call decided."""
    per_frame = model.config.model_type == "qwen3_vl"
    interval = float(getattr(model.config.vision_config, "tokens_per_second", 1))
    out = {"image": [], "video": []}
    calls = iter(recorder.calls)
    for kind, grid_key in (("image", "image_grid_thw"), ("video", "video_grid_thw")):
        if grid_key not in batch:
            continue
        for t, h, w in batch[grid_key].tolist():
            hm, wm = h // 2, w // 2
            stage, record, _, _ = next(calls)
            frames = [posref.frame_sources(record.importance[f].tolist(), stage.keep, record.redundant[f].tolist(),
                                           record.labels[f].tolist()) for f in range(t)]
            if kind == "video" and per_frame:
                out[kind] += [((1, hm, wm), src, interval) for src in frames]
            else:
                joined = [f * hm * wm + s for f, src in enumerate(frames) for s in src]
                out[kind].append(((t, hm, wm), joined, interval) if kind == "video" else ((t, hm, wm), joined))
    return out["image"], out["video"]


def check_positions_against_reference(model, batch: dict, monkeypatch, video_seconds=None) -> None:
    """Forward ``batch`` with VMTC 0.5; the 3-D positions the LLM receives and the rope deltas must be the
    literal oracle's, built from what each compress_frames call decided."""
    recorder = Recorder(monkeypatch)
    seen = {}

    def grab(module, args, kwargs):
        seen["positions"] = kwargs["position_ids"]

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with patched(model, FocusConfig(vmtc=VMTCConfig(target=0.5))):
            logits(model, batch)
    finally:
        handle.remove()
    image_runs, video_runs = _runs_from_records(recorder, batch, model)
    if video_seconds is not None:  # Qwen2.5: frames are tokens_per_second * seconds per grid apart
        per_second = model.config.vision_config.tokens_per_second
        video_runs = [(g, s, per_second * sec) for (g, s, _), sec in zip(video_runs, video_seconds)]
    expected, deltas = posref.compressed_positions(batch["input_ids"], batch["mm_token_type_ids"],
                                                   batch["attention_mask"], image_runs, video_runs)
    got = seen["positions"]
    got = got[1:] if got.shape[0] == 4 else got
    valid = batch["attention_mask"].bool()
    assert torch.equal(got[:, valid], expected[:, valid])
    assert torch.equal(model.model.rope_deltas.cpu(), deltas)
    # the kept tokens really are chosen by importance, not the first ones
    assert any(rec.sources[:, 0].gt(0).any() or rec.sources.diff().gt(1).any() for _, rec, _, _ in recorder.calls)


@pytest.mark.parametrize("layouts", [LAYOUTS, VIDEO_LAYOUTS], ids=["images", "videos"])
def test_vmtc_positions_and_rope_deltas_match_reference(model, layouts, monkeypatch):
    batch = make_inputs(model, layouts, seed=8, tokens_per_frame=vmtc_counts(model, VMTCConfig(target=0.5))).inputs
    check_positions_against_reference(model, batch, monkeypatch)


def test_vmtc_importance_matches_attention_weights_reference(preset, monkeypatch):
    import sys

    model = tiny_model(preset)
    model.set_attn_implementation({"vision_config": "eager"})
    visual = model.model.visual
    adapter_block = visual.blocks[-1] if not hasattr(visual, "fullatt_block_indexes") else \
        visual.blocks[visual.fullatt_block_indexes[-1]]
    module = sys.modules[type(adapter_block.attn).__module__]
    stock_eager = module.eager_attention_forward
    weights = []

    def recording(mod, query, key, value, attention_mask, **kwargs):
        out, w = stock_eager(mod, query, key, value, attention_mask, **kwargs)
        if mod is adapter_block.attn:
            weights.append(w[0].detach().double())
        return out, w

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    recorder = Recorder(monkeypatch)
    grids = torch.tensor([[1, 6, 8], [1, 4, 4], [2, 4, 6]])
    rows = int(grids.prod(-1).sum())
    vc = model.config.vision_config
    pixels = torch.randn(rows, vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2,
                         generator=torch.Generator().manual_seed(3))
    with patched(model, FocusConfig(vmtc=VMTCConfig(target=0.5))), torch.no_grad():
        model.model.get_image_features(pixels, grids, return_dict=True)
    order = []
    offset = 0
    for t, h, w in grids.tolist():
        hm, wm = h // 2, w // 2
        if hasattr(visual, "fullatt_block_indexes"):
            side = visual.window_size // visual.spatial_merge_size // visual.patch_size
            order += [offset + i for i in posref.window_order(t, hm, wm, side)]
        else:
            order += list(range(offset, offset + t * hm * wm))
        offset += t * hm * wm
    expected = posref.importance_from_weights(weights, order, 4)
    got = torch.cat([rec.importance.reshape(-1) for _, rec, _, _ in recorder.calls]).double()
    assert len(weights) == 4  # one attention segment per frame
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6), (got - expected).abs().max()


@pytest.mark.parametrize("layouts", [LAYOUTS, VIDEO_LAYOUTS], ids=["images", "videos"])
def test_vmtc_left_padded_batch_equals_each_sample_alone(model, layouts):
    cfg = VMTCConfig(target=0.5)
    batch = make_inputs(model, layouts, seed=9, tokens_per_frame=vmtc_counts(model, cfg))
    with patched(model, FocusConfig(vmtc=cfg, cmai=CMAIConfig())):
        batched = logits(model, batch.inputs)
        for i in range(len(layouts)):
            single = logits(model, batch.sample(i))[0]
            got = batched[i][batch.inputs["attention_mask"][i].bool()]
            assert (got - single).abs().max().item() <= 1e-5, i


@pytest.mark.parametrize("layouts", [LAYOUTS[:2], VIDEO_LAYOUTS], ids=["images", "videos"])
def test_vmtc_generate_with_cache_matches_full_forward(model, layouts):
    cfg = VMTCConfig(target=0.5)
    batch = make_inputs(model, layouts, seed=10, tokens_per_frame=vmtc_counts(model, cfg))
    _generate_matches_full_forward(model, batch, FocusConfig(vmtc=cfg, cmai=CMAIConfig()))


def test_vmtc_generate_runs_the_tower_once(model):
    cfg = VMTCConfig(target=0.5)
    batch = make_inputs(model, LAYOUTS[:2], seed=12, tokens_per_frame=vmtc_counts(model, cfg)).inputs
    calls = []
    handle = model.model.visual.register_forward_hook(lambda *a: calls.append(1))
    try:
        with patched(model, FocusConfig(vmtc=cfg)), torch.no_grad():
            model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_vmtc_prune_only_and_sum_merge_run(model):
    for cfg in (VMTCConfig(target=0.4, prune_only=True), VMTCConfig(target=0.6, merge="sum", cluster_frac=0.3)):
        batch = make_inputs(model, LAYOUTS[:2], seed=13, tokens_per_frame=vmtc_counts(model, cfg)).inputs
        with patched(model, FocusConfig(vmtc=cfg)):
            assert torch.isfinite(logits(model, batch)).all()


def test_vmtc_refuses_layers(model):
    from focusvlm import ConfigError

    with pytest.raises(ConfigError, match="after its patch merger"):
        patch(model, FocusConfig(vmtc=VMTCConfig(layers=(1,))))
    assert not hasattr(model, "_focusvlm")


# --------------------------------------------------------------------------- runtime and bench

def test_generator_answers_with_vmtc_and_cmai(model, preset):
    from focusvlm.runtime import HFGenerator

    p = tiny_processor(FAMILY[preset])
    images = random_images([(100, 130), (60, 90)], seed=5)
    with patched(model, FocusConfig(vmtc=VMTCConfig(target=0.5), cmai=CMAIConfig()), processor=p) as handle:
        answers = HFGenerator(model, p).generate(["w1 w2", "w3", "w4 w5 w6"], [images[0], images[1], None], 3)
        grids = p.image_processor(images=images, return_tensors="pt")["image_grid_thw"].tolist()
        expected = [handle.vision.output_patches((h // 2, w // 2)) for _, h, w in grids]
    assert [a.image_tokens for a in answers] == expected + [0]
    assert all(a.new_tokens >= 1 for a in answers)


def test_bench_reports_ratios_and_flops(preset):
    from focusvlm.bench.arms import parse_arms
    from focusvlm.bench.harness import run_bench
    from focusvlm.bench.setup import BenchOptions

    opts = BenchOptions(preset=preset, methods=parse_arms("stock,vmtc,cmai"), new_tokens=2, repeats=1, warmup=0,
                        progress=False, interleave="round")
    run = run_bench(opts)["runs"][0]["methods"]
    assert run["vmtc"]["ratio"]["visual_tokens"] == 0.5
    flops = {name: row["flops"] for name, row in run.items()}
    assert flops["vmtc"]["llm"] < flops["stock"]["llm"] and flops["vmtc"]["vision"] > flops["stock"]["vision"]
    assert flops["cmai"]["cmai"] > 0 and flops["stock"]["projector"] == 0
    assert all(row["ttft_s"] > 0 and row["vision_s"] > 0 for row in run.values())


def test_load_goes_through_the_family_adapter(model, tmp_path):
    import importlib.util

    from focusvlm.models import UnsupportedModelError
    from focusvlm.runtime import load_model

    model.save_pretrained(tmp_path)
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(UnsupportedModelError, match="torchvision"):
            load_model(str(tmp_path), device="cpu")
    else:  # pragma: no cover - environments with torchvision have no processor files here either
        with pytest.raises(Exception):
            load_model(str(tmp_path), device="cpu")
    from focusvlm.models import adapter_for, adapter_for_type

    assert adapter_for_type(model.config.model_type) is adapter_for(model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_vmtc_low_precision_runs_and_generates(preset, dtype):
    model = tiny_model(preset, dtype=dtype)
    cfg = VMTCConfig(target=0.5)
    batch = make_inputs(model, LAYOUTS[:2] + VIDEO_LAYOUTS[:1], seed=14, tokens_per_frame=vmtc_counts(model, cfg)).inputs
    low = {k: (v.to(dtype) if k.startswith("pixel") else v) for k, v in batch.items()}
    with patched(model, FocusConfig(vmtc=cfg, cmai=CMAIConfig())), torch.no_grad():
        out = logits(model, low)
        seq = model.generate(**low, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.dtype == dtype and torch.isfinite(out).all() and seq.shape[1] == low["input_ids"].shape[1] + 2


def test_in_tower_methods_refuse_with_the_reason(model):
    from focusvlm import SPDConfig
    from focusvlm.models import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="no fixed grid"):
        patch(model, FocusConfig(spd=SPDConfig()))
    assert not hasattr(model, "_focusvlm")


@pytest.mark.parametrize("methods", [None, FocusConfig(vmtc=VMTCConfig(target=0.5), cmai=CMAIConfig(gamma_max=0.6))],
                         ids=["stock", "vmtc+cmai"])
def test_training_loss_from_supervised_positions_only_equals_the_full_logits_loss(preset, methods):
    """The trainer's supervised_logits_only: the same loss and gradients as logits at every position."""
    from focusvlm.train.runner import supervised_logits_only

    model = tiny_model(preset)
    model.train()
    inputs = dict(make_inputs(model, LAYOUTS).inputs)
    if methods is not None:
        patch(model, methods)
        inputs = dict(make_inputs(model, LAYOUTS, tokens_per_frame=vmtc_counts(model, methods.vmtc)).inputs)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -3:] = inputs["input_ids"][:, -3:]  # the answer: each left-padded row's last 3 tokens
    inputs["labels"] = labels

    def loss_and_grads(batch):
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, full_grads = loss_and_grads(inputs)
    fast, fast_grads = loss_and_grads(supervised_logits_only(inputs))
    assert fast.logits.shape[0] == 3 * len(LAYOUTS)  # only the positions that predict a supervised token
    assert torch.allclose(fast.loss, full.loss, rtol=1e-6, atol=0)
    assert full_grads.keys() == fast_grads.keys() and len(full_grads) > 10
    for name, grad in full_grads.items():
        assert torch.allclose(fast_grads[name], grad, rtol=1e-5, atol=1e-7), name
