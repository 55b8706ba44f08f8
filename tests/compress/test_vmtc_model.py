"""VMTC inside a real (tiny, random) LLaVA-1.5: wiring, processor counts, identity, batching, CMAI."""

import numpy as np
import pytest
import torch

from focusvlm import CMAIConfig, ConfigError, FocusConfig, VMTCConfig, patch, unpatch
from focusvlm.compress import vmtc
from focusvlm.models.factory import random_llava
from focusvlm.models.llava import UnsupportedModelError
from focusvlm.models.llava import StagedCLIPEncoderLayer

IMAGE_ID = 511


def tiny_processor(strategy="default"):
    """A LlavaProcessor for random_llava('tiny'): word-level tokenizer (ids < 42, <image> = 511), 112 px."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>"] + [f"w{i}" for i in range(40)])}
    vocab["<image>"] = IMAGE_ID
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=["<image>"])
    fast.padding_side = "left"
    images = CLIPImageProcessorPil(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112})
    return LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=14,
                          vision_feature_select_strategy=strategy, num_additional_image_tokens=1)


def images(n=2, seed=0):
    rs = np.random.RandomState(seed)
    return [rs.randint(0, 255, (100 + 10 * i, 130, 3), dtype=np.uint8) for i in range(n)]


PROMPTS = ["<image> w1 w2", "w3 w9 <image> w4 w5 w6 w7"]


def inputs(processor, n=2):
    return processor(images=images(n), text=PROMPTS[:n], return_tensors="pt", padding=True)


def run(model, batch):
    """Logits with position ids that ignore left padding, so batch and single runs line up."""
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return model(**batch, position_ids=pos).logits


@pytest.fixture()
def model():
    return random_llava("tiny")


def image_features(model, px):
    with torch.no_grad():
        out = model.model.get_image_features(px, vision_feature_layer=-2, vision_feature_select_strategy="default")
    return torch.stack(list(out.pooler_output))


def test_target_one_is_stock_exactly(model):
    p = tiny_processor()
    batch = inputs(p)
    stock = run(model, batch)
    handle = patch(model, FocusConfig(vmtc=VMTCConfig(target=1.0, stages=3)), processor=p)
    assert not any(isinstance(l, StagedCLIPEncoderLayer) for l in model.model.vision_tower.encoder.layers)
    batch2 = inputs(p)
    assert torch.equal(batch2["input_ids"], batch["input_ids"])
    assert torch.equal(run(model, batch2), stock)
    assert handle.vision.image_tokens() == 64


def test_unpatch_restores_model_and_processor(model):
    p = tiny_processor()
    batch = inputs(p)
    stock = run(model, batch)
    before = dict(p.__dict__)
    patch(model, FocusConfig(vmtc=VMTCConfig(target=0.5, stages=2)), processor=p)
    small = inputs(p)
    assert (small["input_ids"] == IMAGE_ID).sum().item() == 2 * 32
    assert p._get_num_multimodal_tokens(image_sizes=[[50, 60]]).num_image_tokens == [32]
    assert not torch.equal(run(model, small)[:, -1], stock[:, -1])
    unpatch(model, p)
    assert p.__dict__.keys() == before.keys()
    assert all(type(l).__name__ == "CLIPEncoderLayer" for l in model.model.vision_tower.encoder.layers)
    assert not any(hasattr(l, "_focusvlm_vmtc") for l in model.model.vision_tower.encoder.layers)
    again = inputs(p)
    assert torch.equal(again["input_ids"], batch["input_ids"])
    assert torch.equal(run(model, again), stock)


@pytest.mark.parametrize("target,stages,want", [(0.5, 3, 32), (10, 2, 10), (0.25, 1, 16)])
def test_feature_count_and_placeholders(model, target, stages, want):
    p = tiny_processor()
    handle = patch(model, FocusConfig(vmtc=VMTCConfig(target=target, stages=stages)), processor=p)
    batch = inputs(p)
    assert ((batch["input_ids"] == IMAGE_ID).sum(1) == want).all()
    feats = image_features(model, batch["pixel_values"])
    assert feats.shape[:2] == (2, want)
    with torch.no_grad():
        hs = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states
    assert hs[-2].shape[1] == 1 + want  # the layer the LLM reads carries the compressed set
    assert handle.vision.image_tokens() == want
    assert torch.isfinite(run(model, batch)).all()


def test_wiring_matches_manual_tower_with_full_attention_matrix(model):
    """One pruning stage in layer 1, recomputed by hand from the stock layers and an explicit attention matrix."""
    px = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(3))
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    with torch.no_grad():
        h = tower.pre_layrnorm(tower.embeddings(px))
        h = layers[0](h, None)
        lay = layers[1]
        normed = lay.layer_norm1(h)
        z = h + lay.self_attn(normed)[0]
        a = lay.self_attn
        q = a.q_proj(normed).view(1, -1, a.num_heads, a.head_dim).transpose(1, 2)
        k = a.k_proj(normed).view(1, -1, a.num_heads, a.head_dim).transpose(1, 2)
        ips = ((q @ k.transpose(-1, -2)) * a.scale).softmax(-1).mean(1)[0, 0, 1:]
        keep = sorted(torch.argsort(ips, descending=True)[:20].tolist())
        z = torch.cat([z[:, :1], z[:, 1:][:, keep]], dim=1)
        z = z + lay.mlp(lay.layer_norm2(z))
        want = layers[2](z, None)[:, 1:]
    patch(model, FocusConfig(vmtc=VMTCConfig(target=20, layers=(1,), prune_only=True)))
    got = image_features(model, px)
    unpatch(model)
    proj = model.model.multi_modal_projector
    with torch.no_grad():
        torch.testing.assert_close(got[0], proj(want)[0], rtol=1e-5, atol=1e-5)


def test_batch_equals_single_images(model):
    px = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(4))
    patch(model, FocusConfig(vmtc=VMTCConfig(target=0.4, stages=3, cluster_frac=0.3)))
    handle = model._focusvlm
    handle.vision.record = True
    batch = image_features(model, px)
    labels = [r.labels for r in handle.vision.records]
    for b in range(3):
        single = image_features(model, px[b:b + 1])
        torch.testing.assert_close(batch[b:b + 1], single, rtol=1e-5, atol=1e-5)
        for s, rec in enumerate(handle.vision.records):
            assert torch.equal(labels[s][b:b + 1], rec.labels)


def test_generation_batch_with_left_padding_matches_single(model):
    p = tiny_processor()
    patch(model, FocusConfig(vmtc=VMTCConfig(target=0.5, stages=2), cmai=CMAIConfig(gamma_max=0.5)), processor=p)
    batch = inputs(p)
    assert batch["attention_mask"][0, 0] == 0  # the first prompt is left padded
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        both = model.generate(**batch, **gen)[:, batch["input_ids"].shape[1]:]
        for i in range(2):
            one = p(images=images(2)[i:i + 1], text=PROMPTS[i:i + 1], return_tensors="pt")
            single = model.generate(**one, **gen)[:, one["input_ids"].shape[1]:]
            assert torch.equal(both[i:i + 1], single)
    full = run(model, batch)
    for i in range(2):
        one = p(images=images(2)[i:i + 1], text=PROMPTS[i:i + 1], return_tensors="pt")
        torch.testing.assert_close(full[i, -1], run(model, one)[0, -1], rtol=1e-4, atol=1e-4)


def test_vmtc_with_cmai_changes_output_and_unpatches(model):
    p = tiny_processor()
    batch = inputs(p)
    stock = run(model, batch)
    patch(model, FocusConfig(vmtc=VMTCConfig(target=0.5, stages=2)), processor=p)
    vmtc_only = run(model, inputs(p))
    unpatch(model, p)
    patch(model, FocusConfig(vmtc=VMTCConfig(target=0.5, stages=2), cmai=CMAIConfig(gamma_max=0.5)), processor=p)
    both = run(model, inputs(p))
    assert both.shape == vmtc_only.shape and not torch.allclose(both[:, -1], vmtc_only[:, -1])
    unpatch(model, p)
    assert torch.equal(run(model, inputs(p)), stock)


def test_full_strategy_keeps_cls(model):
    model.config.vision_feature_select_strategy = "full"
    model.model.config.vision_feature_select_strategy = "full"
    p = tiny_processor("full")
    assert (inputs(p)["input_ids"] == IMAGE_ID).sum().item() == 2 * 65
    handle = patch(model, FocusConfig(vmtc=VMTCConfig(target=16, stages=2)), processor=p)
    batch = inputs(p)
    assert ((batch["input_ids"] == IMAGE_ID).sum(1) == 17).all()
    assert handle.vision.image_tokens() == 17
    assert torch.isfinite(run(model, batch)).all()


def test_bf16_forward():
    model = random_llava("tiny", dtype=torch.bfloat16)
    p = tiny_processor()
    patch(model, FocusConfig(vmtc=VMTCConfig(target=0.5, stages=3)), processor=p)
    batch = inputs(p)
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    logits = run(model, batch)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_clear_errors(model):
    with pytest.raises(ConfigError, match="at or after the feature layer"):
        patch(model, FocusConfig(vmtc=VMTCConfig(layers=(1, 3))))
    with pytest.raises(ConfigError, match="stages=4"):
        patch(model, FocusConfig(vmtc=VMTCConfig(stages=4)))
    with pytest.raises(ConfigError, match="leaves no token"):
        patch(model, FocusConfig(vmtc=VMTCConfig(target=0.001, stages=2)))
    with pytest.raises(ConfigError, match="exceeds"):
        patch(model, FocusConfig(vmtc=VMTCConfig(target=100, stages=2)))
    assert getattr(model, "_focusvlm", None) is None
    assert all(type(l).__name__ == "CLIPEncoderLayer" for l in model.model.vision_tower.encoder.layers)
    model.model.vision_tower.embeddings._parameters["class_embedding"] = None  # a SigLIP-like tower: no CLS
    with pytest.raises(UnsupportedModelError, match="CLS"):  # no CLS query to rank by (SPEC: use "received")
        patch(model, FocusConfig(vmtc=VMTCConfig(stages=2, importance="cls")))


def test_records_trace_every_patch(model):
    px = torch.randn(1, 3, 112, 112)
    handle = patch(model, FocusConfig(vmtc=VMTCConfig(target=0.3, stages=3)))
    handle.vision.record = True
    feats = image_features(model, px)
    recs = handle.vision.records
    assert len(recs) == 3
    owner = torch.arange(64).unsqueeze(0)
    for r in recs:
        owner = vmtc.owners_after(owner, r)
    # merging keeps every patch somewhere; the owners cover every output token
    assert owner.min() >= 0 and sorted(set(owner[0].tolist())) == list(range(feats.shape[1]))
