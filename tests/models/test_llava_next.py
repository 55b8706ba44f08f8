"""LLaVA-NeXT (AnyRes, CLIP): CMAI exactness and VMTC / SPD / PruMerge per crop on a tiny random model."""

from __future__ import annotations

import pytest
import torch

import anyres_builders as ab
from focusvlm import CMAIConfig, ConfigError, FocusConfig, SPDConfig, VMTCConfig, patch, patched, unpatch
from focusvlm.compress.prumerge_method import PruMergeConfig
from focusvlm.models import adapter_for
from focusvlm.models.llava_next import (LlavaNextAdapter, anyres_tiles, pack_crops, packed_length,
                                        random_llava_next)

TARGETS = [VMTCConfig(target=0.5, stages=2), VMTCConfig(target=5, stages=3, cluster_frac=0.3),
           VMTCConfig(target=0.25, stages=1, importance="received")]


@pytest.fixture()
def model():
    return random_llava_next("next-tiny")


@pytest.fixture()
def processor():
    return ab.next_processor()


def test_registered_and_stock_processor_matches_stock_model(model, processor):
    assert isinstance(adapter_for(model), LlavaNextAdapter)
    inputs = ab.batch(processor)
    counts = (inputs["input_ids"] == ab.IMAGE_ID).sum(1)
    assert len(set(counts.tolist())) == 3          # three sizes, three different tile grids / unpaddings
    assert torch.isfinite(ab.logits(model, inputs)).all()


# --------------------------------------------------------------------------- CMAI

@pytest.mark.parametrize("cfg", [CMAIConfig(), CMAIConfig(focus="discounted", discount=0.7),
                                 CMAIConfig(gamma_max=0.45, schedule="constant")], ids=["neighborhood", "disc", "const"])
def test_cmai_matches_reference(model, processor, cfg):
    ab.assert_matches_reference(model, ab.batch(processor), cfg)


def test_cmai_multi_image_prompt_matches_reference(model, processor):
    inputs = ab.batch(processor, sizes=[(50, 90), (90, 40), (70, 70)], prompts=["w1 <image> w2 <image> w3", "w4 <image> w5"])
    ab.assert_matches_reference(model, inputs, CMAIConfig())


def test_cmai_gamma_zero_and_unpatch_bit_identical(model, processor):
    ab.assert_gamma_zero_and_unpatch_bit_identical(model, ab.batch(processor))


def test_cmai_batch_of_different_sizes_equals_each_alone(model, processor):
    ab.assert_batch_equals_single(model, processor, FocusConfig(cmai=CMAIConfig()))


def test_cmai_generate_with_cache_equals_full_forward(model, processor):
    ab.assert_generate_matches_full_forward(model, ab.batch(processor), FocusConfig(cmai=CMAIConfig()))


def test_cmai_keeps_sdpa_and_gqa(model):
    ab.assert_fused_kernel_kept(model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cmai_low_precision(processor, dtype):
    ab.assert_low_precision_close(lambda dtype: random_llava_next("next-tiny", dtype=dtype), processor, dtype)


# --------------------------------------------------------------------------- VMTC: packing and counts

def test_pack_crops_is_the_spec_layout():
    crops = torch.arange(3 * 2 * 1, dtype=torch.float32).view(3, 2, 1)   # base + 2 tiles of 2 tokens
    newline = torch.tensor([-1.0])
    got = pack_crops(crops, newline)[:, 0].tolist()
    assert got == [0, 1, 2, 3, -1, 4, 5, -1]                              # base, tile, nl, tile, nl
    assert pack_crops(crops[:1], newline)[:, 0].tolist() == [0, 1, -1]    # a lone crop: one newline
    assert packed_length(2, 2) == len(got) and packed_length(2, 0) == 3
    assert anyres_tiles((50, 90), [[56, 112], [112, 56]], (56, 56)) == (1, 2)


# sizes from tiny to large, every aspect ratio family the pinpoints distinguish
SIZES = [(8, 8), (56, 56), (50, 90), (90, 50), (57, 200), (200, 57), (30, 300), (300, 30), (112, 112),
         (113, 111), (168, 56), (56, 168), (500, 120), (120, 500), (77, 333), (400, 401), (1000, 1000)]
PINPOINT_SETS = [None, [[56, 56]], [[56, 112], [112, 56]], [[56 * r, 56 * c] for r in (1, 2, 3) for c in (1, 2, 3)]]


@pytest.mark.parametrize("pinpoints", PINPOINT_SETS, ids=["preset", "one-crop", "two-ways", "3x3"])
@pytest.mark.parametrize("cfg", TARGETS[:2], ids=["half", "count5"])
def test_vmtc_placeholder_count_matches_features_for_many_sizes(pinpoints, cfg):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    model = random_llava_next("next-tiny")
    if pinpoints is not None:
        model.config.image_grid_pinpoints = pinpoints
    processor = ab.next_processor(pinpoints)
    from focusvlm.compress.vmtc import anyres_budget, anyres_count

    config = FocusConfig(vmtc=cfg)
    placeholders, features, stock, inputs = ab.count_case(model, processor, config, SIZES)
    pins = model.config.image_grid_pinpoints
    for size, n_ph, n_feat, n_stock in zip(SIZES, placeholders, features, stock):
        tiles = image_size_to_num_patches(list(size), pins, 56) - 1      # the model's own crop count
        # SPEC "Per-image budget": never more than stock, even where unpadding leaves few tile rows
        assert n_ph == n_feat == anyres_count(*anyres_budget(n_stock, 16, tiles, cfg.target), tiles) <= n_stock, size
    assert sum(placeholders) < sum(stock)
    with patched(model, config, processor=processor):
        assert processor._get_num_multimodal_tokens(image_sizes=SIZES).num_image_tokens == placeholders


def test_vmtc_packing_equals_per_crop_tower_then_literal_layout(model, processor):
    """Each crop is its own tower pass; the packed features are base, tile, newline, tile, newline ..."""
    sizes = [(50, 90), (120, 60)]
    core = model.model
    with patched(model, FocusConfig(vmtc=VMTCConfig(target=0.5, stages=2)), processor=processor):
        inputs = ab.batch(processor, sizes, ab.MIXED_PROMPTS[:2])
        packed = adapter_for(model).image_features(model, inputs["pixel_values"], image_sizes=inputs["image_sizes"])
        for i, size in enumerate(sizes):
            rows, cols = anyres_tiles(size, model.config.image_grid_pinpoints, (56, 56))
            crops = inputs["pixel_values"][i, : 1 + rows * cols]
            alone = []
            with torch.no_grad():
                for crop in crops:  # one tower pass per crop, alone
                    hidden = core.vision_tower(crop[None], output_hidden_states=True).hidden_states[-2][:, 1:]
                    alone.append(core.multi_modal_projector(hidden)[0])
            expected = [alone[0]]
            for tile in alone[1:]:
                expected += [tile, core.image_newline[None]]
            expected = torch.cat(expected)
            assert packed[i].shape == expected.shape == (8 * (1 + rows * cols) + rows * cols, 64)
            torch.testing.assert_close(packed[i], expected, rtol=1e-5, atol=1e-5)


def test_vmtc_target_one_is_stock_and_unpatch_restores(model, processor):
    stock_inputs = ab.batch(processor)
    stock = ab.logits(model, stock_inputs)
    with patched(model, FocusConfig(vmtc=VMTCConfig(target=1.0, stages=2)), processor=processor):
        assert "pack_image_features" not in model.model.__dict__
        same = ab.batch(processor)
        assert torch.equal(same["input_ids"], stock_inputs["input_ids"])
        assert torch.equal(ab.logits(model, same), stock)
    before = dict(processor.__dict__)
    patch(model, FocusConfig(vmtc=VMTCConfig(target=0.5, stages=2), cmai=CMAIConfig()), processor=processor)
    assert "pack_image_features" in model.model.__dict__
    small = ab.batch(processor)
    assert small["input_ids"].shape[1] < stock_inputs["input_ids"].shape[1]
    unpatch(model, processor)
    assert processor.__dict__.keys() == before.keys()
    assert "pack_image_features" not in model.model.__dict__
    assert all(type(l).__name__ == "CLIPEncoderLayer" for l in model.model.vision_tower.encoder.layers)
    again = ab.batch(processor)
    assert torch.equal(again["input_ids"], stock_inputs["input_ids"])
    assert torch.equal(ab.logits(model, again), stock)


@pytest.mark.parametrize("cfg", TARGETS, ids=["cls", "count", "received"])
def test_vmtc_with_cmai_batch_of_different_sizes_equals_each_alone(model, processor, cfg):
    ab.assert_batch_equals_single(model, processor, FocusConfig(vmtc=cfg, cmai=CMAIConfig()), tol=1e-4)


def test_vmtc_with_cmai_generate_batch_equals_single_and_full_forward(model, processor):
    config = FocusConfig(vmtc=VMTCConfig(target=0.5, stages=2), cmai=CMAIConfig())
    with patched(model, config, processor=processor):
        inputs = ab.batch(processor)
        settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, bad_words_ids=ab.NO_PLACEHOLDERS)
        with torch.no_grad():
            both = model.generate(**inputs, **settings)[:, inputs["input_ids"].shape[1]:]
            for i in range(3):
                one = ab.alone(processor, i)
                assert torch.equal(both[i:i + 1], model.generate(**one, **settings)[:, one["input_ids"].shape[1]:])
        compressed = ab.batch(processor)
    ab.assert_generate_matches_full_forward(model, compressed, config, tol=1e-4)


def test_vmtc_received_importance_on_clip_is_selectable_and_differs(model, processor):
    inputs = ab.batch(processor)
    out = {}
    for importance in ("cls", "received"):
        with patched(model, FocusConfig(vmtc=VMTCConfig(target=0.5, stages=1, prune_only=True,
                                                        importance=importance))) as handle:
            handle.vision.record = True
            feats = adapter_for(model).image_features(model, inputs["pixel_values"], image_sizes=inputs["image_sizes"])
            out[importance] = (feats, handle.vision.records[0].primary)
    assert out["cls"][0][0].shape == out["received"][0][0].shape
    assert not torch.equal(out["cls"][1], out["received"][1])   # another ranking, another kept set


# --------------------------------------------------------------------------- baselines per crop

@pytest.mark.parametrize("config,per_crop", [(FocusConfig(spd=SPDConfig(factor=2)), 4),
                                             (FocusConfig(spd=SPDConfig(factor=3)), 4),
                                             (FocusConfig(prumerge=PruMergeConfig(budget=6, neighbours=8)), 6),
                                             (FocusConfig(prumerge=PruMergeConfig(budget=0.25, plus=True, neighbours=8)), 9)],
                         ids=["spd2", "spd3", "prumerge6", "prumerge+quarter"])
def test_baselines_per_crop_counts_match(model, processor, config, per_crop):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    sizes = SIZES[:9]
    placeholders, features, stock, _ = ab.count_case(model, processor, config, sizes)
    for size, n_ph, n_feat in zip(sizes, placeholders, features):
        tiles = image_size_to_num_patches(list(size), model.config.image_grid_pinpoints, 56) - 1
        assert n_ph == n_feat == per_crop * (1 + tiles) + tiles, size


def test_spd_per_crop_pools_each_crop_grid(model, processor):
    from focusvlm.compress.spd import spd_pool

    inputs = ab.batch(processor, [(50, 90)], ["<image> w1"])
    core = model.model
    with patched(model, FocusConfig(spd=SPDConfig(factor=2))):
        packed = adapter_for(model).image_features(model, inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    with torch.no_grad():
        crops = inputs["pixel_values"][0]
        hidden = core.vision_tower(crops, output_hidden_states=True).hidden_states[-2][:, 1:]
        pooled = core.multi_modal_projector(spd_pool(hidden, (4, 4), 2))
    expected = torch.cat([pooled[0]] + [torch.cat([t, core.image_newline[None]]) for t in pooled[1:]])
    torch.testing.assert_close(packed[0], expected, rtol=1e-5, atol=1e-5)


def test_prumerge_adaptive_budget_refuses_a_processor(model, processor):
    with pytest.raises(ConfigError, match="adaptive"):
        patch(model, FocusConfig(prumerge=PruMergeConfig()), processor=processor)
    assert "pack_image_features" not in model.model.__dict__ and not hasattr(model, "_focusvlm")


# --------------------------------------------------------------------------- loading and generation

def test_load_from_folder_generates_with_the_chat_template(tmp_path, model, processor):
    from PIL import Image

    from focusvlm import load
    from focusvlm.runtime import HFGenerator

    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 3
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, proc = load(str(tmp_path), FocusConfig(vmtc=VMTCConfig(target=0.5, stages=2), cmai=CMAIConfig()),
                        torch_dtype="float32")
    assert type(loaded).__name__ == "LlavaNextForConditionalGeneration"
    assert loaded._focusvlm.vision is not None and loaded._focusvlm.cmai is not None
    prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w1"}]}],
                                      add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("USER : <image>") and prompt.endswith("ASSISTANT :")
    images = [Image.fromarray(x) for x in ab.random_images([(50, 90), (120, 60)])]
    out = HFGenerator(loaded, proc).generate(["w1 w2", "w3"], images, 3)
    tiles = [anyres_tiles((im.height, im.width), loaded.config.image_grid_pinpoints, (56, 56)) for im in images]
    assert [o.image_tokens for o in out] == [8 * (1 + r * c) + r * c for r, c in tiles]
    assert all(o.new_tokens == 3 for o in out)


def test_bench_runs_the_anyres_preset_with_crops_counted():
    from focusvlm.bench.arms import parse_arms
    from focusvlm.bench.harness import run_bench
    from focusvlm.bench.setup import BenchOptions

    opts = BenchOptions(preset="next-tiny", methods=parse_arms("stock,vmtc,cmai"), batches=[2], prompt_tokens=8,
                        new_tokens=2, repeats=1, warmup=0, progress=False)
    rows = run_bench(opts)["runs"][0]["methods"]
    # one 112 px image = base crop + 2x2 tiles of 4x4 patches: 16 + 8x8 + 8 newlines stock, 8 x 5 + 4 with VMTC
    assert rows["stock"]["visual_tokens"] == 88 and rows["vmtc"]["visual_tokens"] == 44
    assert rows["cmai"]["ratio"]["decode_s_per_token"] is not None
    from focusvlm.bench.flops import VisionShape, vision_flops

    one_crop = vision_flops(VisionShape.from_config(random_llava_next("next-tiny").config.vision_config))
    assert rows["stock"]["flops"]["vision"] == 2 * 5 * one_crop   # two images, five tower passes each


def test_show_draws_one_token_map_per_crop(tmp_path, model, processor, capsys):
    import argparse

    from PIL import Image

    from focusvlm.cli import show
    from focusvlm.models.factory import demo_image_path

    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    ap = argparse.ArgumentParser()
    show.register(ap.add_subparsers(dest="command"))
    single = None
    for method in (["--method", "vmtc", "--target", "0.5", "--stages", "2"], ["--method", "spd"]):
        out = tmp_path / f"{method[1]}.png"
        args = ap.parse_args(["show", "--image", str(demo_image_path("chelsea")), "--model", str(tmp_path / "m"),
                              "--device", "cpu", "-o", str(out)] + method)
        assert args.func(args) == 0
        image = Image.open(demo_image_path("chelsea"))
        rows, cols = anyres_tiles((image.height, image.width), model.config.image_grid_pinpoints, (56, 56))
        tokens = 4 * (1 + rows * cols) + rows * cols
        if method[1] == "vmtc":  # SPEC "Per-image budget", from the stock processor's own count
            from focusvlm.compress.vmtc import anyres_budget, anyres_count

            stock = processor._get_num_multimodal_tokens(image_sizes=[(image.height, image.width)]).num_image_tokens[0]
            tokens = anyres_count(*anyres_budget(stock, 16, rows * cols, 0.5), rows * cols)
        text = capsys.readouterr().out
        assert f"({tokens} image tokens, {1 + rows * cols} crops)" in text
        picture = Image.open(out)
        single = single or picture.height // (1 + rows * cols)
        assert picture.height == (1 + rows * cols) * single     # one strip per crop, base crop first
