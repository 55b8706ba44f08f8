"""The demo LLaVA builder: deterministic composition, LoRA merge vs peft, pack/load round trips, budget, methods apply."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from focusvlm.models.demo import assemble as A
from focusvlm.models.demo import load as L
from focusvlm.models.demo import ship as S
from focusvlm.models.demo import vision as V
from focusvlm.models.demo.lm import tiny_test_lm

WORDS = "what color is the shape ? answer question using a single word or phrase red circle yes no".split()


def tiny_lm():
    return tiny_test_lm(WORDS, seed=3)


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tower")
    torch.manual_seed(11)
    tower = V.fresh_tower(V.tower_config())
    V.save_tower(tower, V.tower_image_processor(64), folder)
    return folder


def _inputs(processor, n=2, seed=0):
    rs = np.random.RandomState(seed)
    images = [rs.randint(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(n)]
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
              "text": "what color is the shape ?" if i % 2 == 0 else "red circle yes"}]}], add_generation_prompt=True)
             for i in range(n)]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_build_is_deterministic_and_wired_like_llava(tower_dir):
    a, pa = A.build_trainable(tower_dir, lm_factory=tiny_lm)
    b, _ = A.build_trainable(tower_dir, lm_factory=tiny_lm)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    tower, _ = V.load_tower(tower_dir)
    assert all(torch.equal(v, sa[f"model.vision_tower.{k}"]) for k, v in tower.state_dict().items())
    assert a.config.vision_feature_layer == -2 and a.config.vision_feature_select_strategy == "default"
    batch = _inputs(pa)
    image_id = a.config.image_token_id
    assert ((batch["input_ids"] == image_id).sum(1) == 64).all()  # 64 patch tokens, CLS dropped
    assert torch.equal(a.get_input_embeddings().weight[image_id], torch.zeros(a.config.text_config.hidden_size))
    assert torch.isfinite(_logits(a, batch)).all()
    c, _ = A.build_trainable(tower_dir, seed=1, lm_factory=tiny_lm)
    assert not torch.equal(c.model.multi_modal_projector.linear_1.weight, a.model.multi_modal_projector.linear_1.weight)


def test_lora_delta_against_a_loop():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, generator=g), torch.randn(4, 3, generator=g)
    delta = L.lora_delta(a, b, 0.7)
    for i in range(4):
        for j in range(5):
            assert delta[i, j].item() == pytest.approx(0.7 * sum(b[i, k].item() * a[k, j].item() for k in range(3)),
                                                       rel=1e-6, abs=1e-9)
    with pytest.raises(S.DemoWeightsError, match="do not chain"):
        L.lora_delta(a, b.T, 1.0)


def test_merge_lora_is_the_fp64_formula_bit_for_bit():
    """merge_lora works in one reused fp64 buffer; its result is exactly (W.double() + lora_delta).to(W.dtype)."""
    g = torch.Generator().manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 9), torch.nn.Linear(9, 3))
    pairs = {name: (torch.randn(2, m.in_features, generator=g).half(), torch.randn(m.out_features, 2, generator=g))
             for name, m in model.named_children()}
    want = {name: (m.weight.double() + L.lora_delta(pairs[name][0].float(), pairs[name][1].float(), 0.3)).float()
            for name, m in model.named_children()}
    L.merge_lora(model, pairs, 0.3)
    for name, m in model.named_children():
        assert torch.equal(m.weight.detach(), want[name]), name
    with pytest.raises(S.DemoWeightsError, match="do not chain"):
        L.merge_lora(model, {"0": (torch.zeros(2, 7), torch.zeros(5, 3))}, 1.0)
    with pytest.raises(S.DemoWeightsError, match="does not fit"):
        L.merge_lora(model, {"0": (torch.zeros(2, 5), torch.zeros(5, 2))}, 1.0)
    with pytest.raises(S.DemoWeightsError, match="not have as a linear layer"):
        L.merge_lora(model, {"nope": (torch.zeros(2, 7), torch.zeros(5, 2))}, 1.0)


def test_loading_skips_random_init_and_gives_the_same_model(tower_dir, tmp_path):
    """load_demo composes without random initialisation (every weight is loaded next); the result equals the
    initialised composition, buffers and tying included."""
    model, _ = A.build_trainable(tower_dir, lm_factory=tiny_lm)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a projector unlike a fresh one, as a trained one is
        for p in model.model.multi_modal_projector.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    S.pack_demo(model, tmp_path / "ship")
    threads = torch.get_num_threads()
    loaded, _ = L.load_demo(tmp_path / "ship", lm_factory=tiny_lm)
    assert torch.get_num_threads() == threads  # loading runs on one intra-op thread, then gives the setting back
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    want_buffers, got_buffers = dict(model.named_buffers()), dict(loaded.named_buffers())
    assert want_buffers.keys() == got_buffers.keys()
    assert all(torch.equal(want_buffers[k], got_buffers[k]) for k in want_buffers)
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight


def _peft_model(tower_dir, r=4, alpha=8, rslora=False):
    peft = pytest.importorskip("peft")
    model, processor = A.build_trainable(tower_dir, lm_factory=tiny_lm)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=S.lora_target_names(model), lora_dropout=0.0,
                             use_rslora=rslora, modules_to_save=["multi_modal_projector"])
    wrapped = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # stand in for training: non-zero B (peft starts it at 0) and a changed projector
        for name, p in wrapped.named_parameters():
            if "lora_B" in name or ("modules_to_save" in name and "multi_modal_projector" in name):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return wrapped.eval(), processor


@pytest.mark.parametrize("rslora", [False, True])
def test_pack_then_load_reproduces_the_peft_model(tower_dir, tmp_path, rslora):
    wrapped, processor = _peft_model(tower_dir, rslora=rslora)
    batch = _inputs(processor)
    want = _logits(wrapped, batch)
    path = S.pack_from_peft(wrapped, tmp_path / "ship", info={"note": "test"})
    loaded, lp = L.load_demo(tmp_path / "ship", lm_factory=tiny_lm)
    got = _logits(loaded, _inputs(lp))
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    base, _ = A.build_trainable(tower_dir, lm_factory=tiny_lm)
    assert not torch.allclose(_logits(base, batch), want, atol=1e-3)  # the shipped parts matter
    meta = json.loads((tmp_path / "ship" / S.META_FILE).read_text())
    assert meta["bytes"] == sum(v.numel() * 4 for v in __import__("safetensors.torch").torch.load_file(str(path)).values())
    assert meta["lora"]["layers"] == 2 * 7 and meta["info"] == {"note": "test"}
    # fp16 LoRA factors: half the LoRA bytes, the same model up to fp16 rounding of A and B
    half = S.pack_from_peft(wrapped, tmp_path / "ship16", lora_dtype=torch.float16)
    assert half.stat().st_size < path.stat().st_size
    loaded16, lp16 = L.load_demo(tmp_path / "ship16", lm_factory=tiny_lm)
    got16 = _logits(loaded16, _inputs(lp16))
    assert torch.allclose(got16, want, atol=1e-2) and not torch.equal(got16, got)


def test_peft_adapter_folder_packs_to_the_same_model(tower_dir, tmp_path):
    wrapped, processor = _peft_model(tower_dir)
    wrapped.save_pretrained(tmp_path / "adapter")
    pairs, scale, projector = S.read_peft_adapter(tmp_path / "adapter")
    assert scale == 2.0 and set(projector) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    base, _ = A.build_trainable(tower_dir, lm_factory=tiny_lm)
    S.pack_demo(base, tmp_path / "ship", lora=pairs, lora_scale=scale, projector=projector)
    loaded, lp = L.load_demo(tmp_path / "ship", lm_factory=tiny_lm)
    assert torch.allclose(_logits(loaded, _inputs(lp)), _logits(wrapped, _inputs(processor)), atol=1e-5, rtol=1e-5)


def test_budget_and_broken_folders_fail_with_one_line(tower_dir, tmp_path):
    model, _ = A.build_trainable(tower_dir, lm_factory=tiny_lm)
    sizes = S.shipped_bytes(model, r=4)
    with pytest.raises(S.DemoWeightsError, match="over the 0.1 MB budget"):
        S.pack_demo(model, tmp_path / "big", budget=100_000)
    assert sizes["tower"] == 4 * sum(p.numel() for p in model.model.vision_tower.parameters())
    with pytest.raises(S.DemoWeightsError, match="not a packed demo model"):
        L.load_demo(tmp_path / "nothing-here")
    a = torch.zeros(2, 3)
    with pytest.raises(S.DemoWeightsError, match="not a linear layer"):
        S.pack_demo(model, tmp_path / "x", lora={"model.language_model.nope": (a, torch.zeros(3, 2))})


def test_focus_methods_apply_to_the_demo_geometry(tower_dir):
    """VMTC (4 stages in the 6-layer tower) and CMAI run on the composed model; the processor emits fewer tokens."""
    from focusvlm import FocusConfig, patched
    from focusvlm.runtime import HFGenerator

    model, processor = A.build_trainable(tower_dir, lm_factory=tiny_lm)
    model.eval()
    cfg = FocusConfig(vmtc={"target": 0.5}, cmai={"gamma_max": 0.6})
    stock = HFGenerator(model, processor).generate(["what color is the shape ?"], [np.zeros((64, 64, 3), np.uint8)], 3)
    with patched(model, cfg, processor):
        out = HFGenerator(model, processor).generate(["what color is the shape ?"],
                                                     [np.zeros((64, 64, 3), np.uint8)], 3)
    assert stock[0].image_tokens == 64 and out[0].image_tokens == 32
