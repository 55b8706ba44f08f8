"""LLaVA-OneVision (AnyRes up to 9 crops, SigLIP without CLS, multi-image, video): CMAI and VMTC on a tiny
random model."""

from __future__ import annotations

import math

import pytest
import torch

import anyres_builders as ab
from focusvlm import CMAIConfig, FocusConfig, SPDConfig, VMTCConfig, patch, patched, unpatch
from focusvlm.compress.prumerge_method import PruMergeConfig
from focusvlm.compress.vmtc import received_importance
from focusvlm.models import UnsupportedModelError, adapter_for
from focusvlm.models.llava_next import anyres_tiles
from focusvlm.models.llava_onevision import LlavaOnevisionAdapter, random_llava_onevision

FRAMES = 3
VIDEO_TOKENS = FRAMES * math.ceil(4 / 2) ** 2 + 1   # 2x2-pooled 4x4 grid per frame + one newline


@pytest.fixture()
def model():
    return random_llava_onevision("onevision-tiny")


@pytest.fixture()
def processor():
    return ab.onevision_processor()


def video_inputs(prompts, seed=0):
    """Left-padded ids with one video per prompt ("<video>" expanded) and its frames, built by hand:
    transformers' video processor needs torchvision, which this environment lacks."""
    tok = ab.word_tokenizer()
    text = [p.replace("<video>", "<video> " * VIDEO_TOKENS) for p in prompts]
    out = dict(tok(text, return_tensors="pt", padding=True))
    gen = torch.Generator().manual_seed(seed)
    out["pixel_values_videos"] = torch.randn(len(prompts), FRAMES, 3, 56, 56, generator=gen)
    assert ((out["input_ids"] == ab.VIDEO_ID).sum(1) == VIDEO_TOKENS).all()
    return out


def test_registered_and_stock_processor_matches_stock_model(model, processor):
    assert isinstance(adapter_for(model), LlavaOnevisionAdapter)
    g = adapter_for(model).tower_geometry(model)
    assert not g.has_cls and not g.keeps_cls and g.feature_layers == (4,)
    inputs = ab.batch(processor)
    assert len(set((inputs["input_ids"] == ab.IMAGE_ID).sum(1).tolist())) == 3
    assert torch.isfinite(ab.logits(model, inputs)).all()


# --------------------------------------------------------------------------- CMAI

@pytest.mark.parametrize("cfg", [CMAIConfig(), CMAIConfig(focus="sum")], ids=["neighborhood", "sum"])
def test_cmai_matches_reference(model, processor, cfg):
    ab.assert_matches_reference(model, ab.batch(processor), cfg)


def test_cmai_multi_image_prompt_matches_reference(model, processor):
    images = ab.random_images([(50, 90), (90, 40), (70, 70)])
    inputs = processor(images=[images[:2], images[2:]], text=["w1 <image> w2 <image> w3", "w4 <image> w5"],
                       return_tensors="pt", padding=True)
    assert inputs["batch_num_images"].tolist() == [2, 1]
    ab.assert_matches_reference(model, inputs, CMAIConfig())


def test_cmai_video_frames_are_image_positions(model):
    inputs = video_inputs(["w1 <video> w2 w3 w4", "w5 w6 <video> w7"])
    ab.assert_matches_reference(model, inputs, CMAIConfig())


def test_cmai_gamma_zero_and_unpatch_bit_identical(model, processor):
    ab.assert_gamma_zero_and_unpatch_bit_identical(model, ab.batch(processor))
    ab.assert_gamma_zero_and_unpatch_bit_identical(model, video_inputs(["w1 <video> w2", "w3 w4 <video> w5 w6"]))


def test_cmai_batch_of_different_sizes_equals_each_alone(model, processor):
    ab.assert_batch_equals_single(model, processor, FocusConfig(cmai=CMAIConfig()))


def test_cmai_generate_with_cache_equals_full_forward(model, processor):
    ab.assert_generate_matches_full_forward(model, ab.batch(processor), FocusConfig(cmai=CMAIConfig()))


def test_cmai_generate_with_video_equals_full_forward(model):
    ab.assert_generate_matches_full_forward(model, video_inputs(["w1 <video> w2", "w3 w4 <video> w5 w6"]),
                                            FocusConfig(cmai=CMAIConfig()))


def test_cmai_keeps_sdpa_and_gqa(model):
    ab.assert_fused_kernel_kept(model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cmai_low_precision(processor, dtype):
    ab.assert_low_precision_close(lambda dtype: random_llava_onevision("onevision-tiny", dtype=dtype), processor, dtype)


# --------------------------------------------------------------------------- VMTC: importance without CLS

def test_received_importance_matches_explicit_loops():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 4)
    for prefix in (0, 1):
        got = received_importance(q, k, 0.5, prefix)
        want = torch.zeros(2, 7)
        for b in range(2):
            for h in range(3):
                for i in range(7):  # query row i's softmax over every key
                    want[b] += torch.softmax(torch.stack([q[b, h, i] @ k[b, h, j] * 0.5 for j in range(7)]), 0)
        torch.testing.assert_close(got, (want / 21)[:, prefix:])


def test_siglip_stage_matches_manual_tower_with_full_attention_matrix(model):
    """One received-importance pruning stage in layer 1, redone by hand from the stock layers."""
    px = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    with torch.no_grad():
        h = tower.embeddings(px)
        h = layers[0](h, None)
        lay = layers[1]
        normed = lay.layer_norm1(h)
        z = h + lay.self_attn(normed)[0]
        a = lay.self_attn
        q = a.q_proj(normed).view(2, -1, a.num_heads, a.head_dim).transpose(1, 2)
        k = a.k_proj(normed).view(2, -1, a.num_heads, a.head_dim).transpose(1, 2)
        received = ((q @ k.transpose(-1, -2)) * a.scale).softmax(-1).mean(dim=(1, 2))   # (2, 16): no CLS
        rows = []
        for b in range(2):
            keep = sorted(torch.argsort(received[b], descending=True)[:6].tolist())
            rows.append(z[b, keep])
        z = torch.stack(rows)
        z = z + lay.mlp(lay.layer_norm2(z))
        want = layers[3](layers[2](z, None), None)
    with patched(model, FocusConfig(vmtc=VMTCConfig(target=6, layers=(1,), prune_only=True))) as handle:
        assert handle.vision.importance == "received" and handle.vision.prefix == 0
        with torch.no_grad():
            got = tower(px, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cls_importance_is_refused_with_a_clear_error(model):
    with pytest.raises(UnsupportedModelError, match="importance='received'"):
        patch(model, FocusConfig(vmtc=VMTCConfig(importance="cls", stages=2)))
    assert not hasattr(model, "_focusvlm")
    assert all(type(l).__name__ == "SiglipEncoderLayer" for l in model.model.vision_tower.encoder.layers)


# --------------------------------------------------------------------------- VMTC: counts and packing

SIZES = [(8, 8), (56, 56), (50, 90), (90, 50), (57, 200), (200, 57), (30, 300), (300, 30), (112, 112),
         (113, 111), (168, 56), (500, 120), (120, 500), (77, 333), (400, 401), (1000, 1000), (2000, 300)]
PINPOINT_SETS = [None, [[56, 56]], [[56, 112], [112, 56], [112, 112]]]


def stock_unscaled(size, pinpoints):
    """Stock placeholders without OneVision's downscale step (base + unpadded grid + row newlines)."""
    rows, cols = anyres_tiles(size, pinpoints, (56, 56))
    h, w, (oh, ow) = 4 * rows, 4 * cols, size
    if ow / oh > w / h:
        h -= 2 * ((h - int(round(oh * (w / ow), 7))) // 2)
    else:
        w -= 2 * ((w - int(round(ow * (h / oh), 7))) // 2)
    return 16 + h * w + h


@pytest.mark.parametrize("pinpoints", PINPOINT_SETS, ids=["preset", "one-crop", "2x2"])
@pytest.mark.parametrize("cfg", [VMTCConfig(target=0.5, stages=2), VMTCConfig(target=3, stages=4, cluster_frac=0.5)],
                         ids=["half", "count3"])
def test_vmtc_placeholder_count_matches_features_for_many_sizes(pinpoints, cfg):
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    model = random_llava_onevision("onevision-tiny")
    if pinpoints is not None:
        model.config.image_grid_pinpoints = pinpoints
    processor = ab.onevision_processor(pinpoints)
    from focusvlm.compress.vmtc import anyres_budget, anyres_count

    placeholders, features, stock, _ = ab.count_case(model, processor, FocusConfig(vmtc=cfg), SIZES)
    pins = model.config.image_grid_pinpoints
    for size, n_ph, n_feat, n_stock in zip(SIZES, placeholders, features, stock):
        tiles = image_size_to_num_patches(list(size), pins, 56) - 1
        # SPEC "Per-image budget": never more than stock, the downscaled many-tile images included
        assert n_ph == n_feat == anyres_count(*anyres_budget(n_stock, 16, tiles, cfg.target), tiles) <= n_stock, size
    if pinpoints is None:  # the preset's 6x6 pinpoints: large images take the stock downscale path
        downscaled = [s for s, n in zip(SIZES, stock) if n < stock_unscaled(s, pins)]
        assert (1000, 1000) in downscaled and (400, 401) in downscaled
    with patched(model, FocusConfig(vmtc=cfg), processor=processor):
        assert processor._get_num_multimodal_tokens(image_sizes=SIZES).num_image_tokens == placeholders


def test_vmtc_multi_image_prompts_count_one_crop_within_budget(model, processor):
    from focusvlm.compress.vmtc import anyres_budget, anyres_count

    images = ab.random_images([(50, 90), (300, 60), (70, 70), (1000, 1000)])
    text = ["w1 <image> w2 <image>", "<image> w3", "w4 <image>"]
    grouped = [images[:2], images[2:3], images[3:]]
    with patched(model, FocusConfig(vmtc=VMTCConfig(target=0.5, stages=2), cmai=CMAIConfig()), processor=processor):
        inputs = processor(images=grouped, text=text, return_tensors="pt", padding=True)
        counts = (inputs["input_ids"] == ab.IMAGE_ID).sum(1).tolist()
        tiles = [anyres_tiles(s, model.config.image_grid_pinpoints, (56, 56)) for s in [(70, 70), (1000, 1000)]]
        stock = type(processor)._get_num_multimodal_tokens(processor, image_sizes=[(70, 70), (1000, 1000)])
        # a crop of a multi-image sample has no tiles: stock 16 + 1 newline, B = 9, the crop alone keeps 8
        assert counts == [2 * 8] + [anyres_count(*anyres_budget(n, 16, r * c, 0.5), r * c)
                                    for n, (r, c) in zip(stock.num_image_tokens, tiles)]
        assert torch.isfinite(ab.logits(model, inputs)).all()   # the model's own count check passes


def test_vmtc_packing_equals_per_crop_tower_then_literal_layout(model, processor):
    # images whose budget keeps whole tiles (t = b); tiles cut to fewer tokens: tests/models/test_vmtc_budget.py
    sizes = [(50, 90), (170, 90)]
    core = model.model
    with patched(model, FocusConfig(vmtc=VMTCConfig(target=0.5, stages=2)), processor=processor):
        inputs = ab.batch(processor, sizes, ab.MIXED_PROMPTS[:2])
        packed = adapter_for(model).image_features(model, inputs["pixel_values"], image_sizes=inputs["image_sizes"])
        for i, size in enumerate(sizes):
            rows, cols = anyres_tiles(size, model.config.image_grid_pinpoints, (56, 56))
            with torch.no_grad():
                alone = [core.multi_modal_projector(core.vision_tower(crop[None], output_hidden_states=True)
                                                    .hidden_states[-1])[0]
                         for crop in inputs["pixel_values"][i, : 1 + rows * cols]]
            expected = torch.cat([alone[0]] + [torch.cat([t, core.image_newline[None]]) for t in alone[1:]])
            assert packed[i].shape[0] == 8 * (1 + rows * cols) + rows * cols
            torch.testing.assert_close(packed[i], expected, rtol=1e-5, atol=1e-5)


def test_vmtc_leaves_video_frames_stock(model):
    inputs = video_inputs(["w1 <video> w2", "w3 w4 <video> w5"])
    with torch.no_grad():
        stock = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output
    with patched(model, FocusConfig(vmtc=VMTCConfig(target=0.5, stages=2), cmai=CMAIConfig())) as handle:
        handle.vision.record = True
        with torch.no_grad():
            got = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output
            assert torch.isfinite(ab.logits(model, inputs)).all()   # video placeholder count still stock
        assert handle.vision.records == []   # no stage ran on a frame
    assert torch.equal(got, stock)
    assert "get_video_features" not in model.model.__dict__


def test_vmtc_target_one_is_stock_and_unpatch_restores(model, processor):
    stock_inputs = ab.batch(processor)
    stock = ab.logits(model, stock_inputs)
    with patched(model, FocusConfig(vmtc=VMTCConfig(target=1.0, stages=2)), processor=processor):
        same = ab.batch(processor)
        assert torch.equal(same["input_ids"], stock_inputs["input_ids"])
        assert torch.equal(ab.logits(model, same), stock)
    before = dict(processor.__dict__)
    patch(model, FocusConfig(vmtc=VMTCConfig(target=0.5, stages=2), cmai=CMAIConfig()), processor=processor)
    assert ab.batch(processor)["input_ids"].shape[1] < stock_inputs["input_ids"].shape[1]
    unpatch(model, processor)
    assert processor.__dict__.keys() == before.keys()
    assert not {"pack_image_features", "get_video_features", "_focusvlm_video_guard"} & model.model.__dict__.keys()
    assert all(type(l).__name__ == "SiglipEncoderLayer" for l in model.model.vision_tower.encoder.layers)
    assert torch.equal(ab.logits(model, ab.batch(processor)), stock)


@pytest.mark.parametrize("cfg", [VMTCConfig(target=0.5, stages=2), VMTCConfig(target=4, stages=3, merge="sum")],
                         ids=["half", "count-sum"])
def test_vmtc_with_cmai_batch_of_different_sizes_equals_each_alone(model, processor, cfg):
    ab.assert_batch_equals_single(model, processor, FocusConfig(vmtc=cfg, cmai=CMAIConfig()), tol=1e-4)


def test_vmtc_with_cmai_generate_equals_full_forward(model, processor):
    config = FocusConfig(vmtc=VMTCConfig(target=0.5, stages=2), cmai=CMAIConfig())
    with patched(model, config, processor=processor):
        inputs = ab.batch(processor)
    ab.assert_generate_matches_full_forward(model, inputs, config, tol=1e-4)


# --------------------------------------------------------------------------- baselines

def test_spd_per_crop_counts_and_prumerge_refused(model, processor):
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    sizes = SIZES[:8]
    placeholders, features, _, _ = ab.count_case(model, processor, FocusConfig(spd=SPDConfig(factor=2)), sizes)
    for size, n_ph, n_feat in zip(sizes, placeholders, features):
        tiles = image_size_to_num_patches(list(size), model.config.image_grid_pinpoints, 56) - 1
        assert n_ph == n_feat == 4 * (1 + tiles) + tiles
    inputs = video_inputs(["w1 <video> w2"])
    with patched(model, FocusConfig(spd=SPDConfig(factor=2))):   # videos keep their stock pooling
        assert torch.isfinite(ab.logits(model, inputs)).all()
    with pytest.raises(UnsupportedModelError, match="CLS"):
        patch(model, FocusConfig(prumerge=PruMergeConfig(budget=6)), processor=processor)
    assert not hasattr(model, "_focusvlm") and "pack_image_features" not in model.model.__dict__


# --------------------------------------------------------------------------- loading and generation

def test_load_from_folder_generates_with_the_chat_template(tmp_path, model, processor, monkeypatch):
    import transformers
    from PIL import Image

    from focusvlm import load
    from focusvlm.runtime import HFGenerator

    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 3
    model.save_pretrained(tmp_path)
    # AutoProcessor would also build OneVision's video processor, which needs torchvision (absent here):
    # the model comes from the folder through the adapter, the processor from the offline builder
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", staticmethod(lambda *a, **k: processor))
    loaded, proc = load(str(tmp_path), FocusConfig(vmtc=VMTCConfig(target=0.5, stages=2), cmai=CMAIConfig()),
                        torch_dtype="float32")
    assert type(loaded).__name__ == "LlavaOnevisionForConditionalGeneration"
    prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w1"}]}],
                                      add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|> user <image>") and prompt.endswith("<|im_start|> assistant")
    from focusvlm.compress.vmtc import anyres_budget, anyres_count

    images = [Image.fromarray(x) for x in ab.random_images([(50, 90), (300, 60)])]
    out = HFGenerator(loaded, proc).generate(["w1 w2", "w3"], images, 3)
    sizes = [(im.height, im.width) for im in images]
    tiles = [anyres_tiles(size, loaded.config.image_grid_pinpoints, (56, 56)) for size in sizes]
    stock = type(proc)._get_num_multimodal_tokens(proc, image_sizes=sizes).num_image_tokens
    assert [o.image_tokens for o in out] == [anyres_count(*anyres_budget(n, 16, r * c, 0.5), r * c)
                                             for n, (r, c) in zip(stock, tiles)]


def test_bench_runs_the_onevision_preset():
    from focusvlm.bench.arms import parse_arms
    from focusvlm.bench.harness import run_bench
    from focusvlm.bench.setup import BenchOptions

    opts = BenchOptions(preset="onevision-tiny", methods=parse_arms("stock,vmtc+cmai"), batches=[1],
                        prompt_tokens=8, new_tokens=2, repeats=1, warmup=0, progress=False)
    rows = run_bench(opts)["runs"][0]["methods"]
    assert rows["stock"]["visual_tokens"] == 88 and rows["vmtc+cmai"]["visual_tokens"] == 44
    assert rows["vmtc+cmai"]["ratio"]["ttft_s"] is not None
