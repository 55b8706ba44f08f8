"""FastV inside the tiny LLaVA: the pruned model against a literal float64 re-statement, real removal from
the later layers' caches, left-padded batches, cached generation, identity at R = 0, and the refusals."""

import pytest
import torch

from focusvlm import hfcompat

from focusvlm import CMAIConfig, ConfigError, FastVConfig, FocusConfig, VMTCConfig, patch, unpatch
from focusvlm.methods import get_method
from focusvlm.models.factory import random_llava
from helpers import make_inputs, split_sample
from reference import peers_reference as ref

# sample 0: one image; sample 1: two images (different counts, so the later layers need fillers);
# sample 2: text only (keeps everything); lengths differ, so the batch is left-padded
LAYOUTS = [[3, "img", 4], [2, "img", 6, "img", 1], [5]]


def tiny(attn="sdpa"):
    return random_llava("tiny", attn_implementation=attn)


def positions_for(batch):
    """What generate() passes: positions that ignore left padding."""
    return (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)


def forward(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch, position_ids=positions_for(batch), **kwargs)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("k,config", [(1, dict(ratio=0.5)), (2, dict(ratio=0.75)), (1, dict(keep=20))])
def test_pruned_model_matches_reference_per_sample(attn, k, config):
    model = tiny(attn)
    batch = make_inputs(model, LAYOUTS, seed=1)
    cfg = FastVConfig(k=k, **config)
    handle = patch(model, FocusConfig(fastv=cfg))
    try:
        logits = forward(model, batch).logits
        kept = handle.llm.last_positions
    finally:
        unpatch(model)
    assert logits.shape[1] == kept.shape[1] < batch["input_ids"].shape[1]   # really removed, not masked
    for b in range(len(LAYOUTS)):
        alone = split_sample(batch, b, LAYOUTS, model)
        n = sum(seg == "img" for seg in LAYOUTS[b]) * 64
        # an absolute count: the reference at the ratio that keeps as many
        ratio = cfg.ratio if cfg.keep is None or not n else 1 - min(cfg.keep, n) / n
        want, want_pos, _ = ref.fastv_pruned_forward(model, alone["input_ids"][0], alone.get("pixel_values"), k, ratio)
        pad = int((batch["attention_mask"][b] == 0).sum())
        mine = kept[b][kept[b] >= 0]
        assert (mine - pad).tolist() == want_pos
        got = logits[b, kept[b] >= 0]
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_cached_generate_equals_full_forward_of_the_pruned_model():
    """Greedy generation with the cache against the reference forward of prompt + generated tokens, with the
    prompt's choice of image tokens (FastV chooses once, in the prefill)."""
    model, k, new = tiny(), 1, 4
    batch = make_inputs(model, LAYOUTS, seed=2)
    L = batch["input_ids"].shape[1]
    handle = patch(model, FocusConfig(fastv=FastVConfig(k=k, ratio=0.5)))
    try:
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                                 return_dict_in_generate=True, output_logits=True)
        kept = handle.llm.last_positions
        cache = hfcompat.output_cache(out)
        # real removal: layers >= K hold only the kept entries (plus the decoded tokens), layers < K everything
        held = [cache.get_seq_length(i) for i in range(len(cache.layers))]
        assert held[:k] == [L + new - 1] * k
        assert held[k:] == [kept.shape[1] + new - 1] * (len(held) - k)
    finally:
        unpatch(model)
    for b in range(len(LAYOUTS)):
        alone = split_sample(batch, b, LAYOUTS, model)
        prompt = alone["input_ids"][0]
        _, _, chosen = ref.fastv_pruned_forward(model, prompt, alone.get("pixel_values"), k, 0.5)
        full = torch.cat([prompt, out.sequences[b, L:]])
        want, _, _ = ref.fastv_pruned_forward(model, full, alone.get("pixel_values"), k, 0.5, keep_image=chosen)
        got = torch.stack([step[b] for step in out.logits]).double()
        torch.testing.assert_close(got, want[-new - 1:-1], rtol=1e-4, atol=1e-4)
        assert out.sequences[b, L:].tolist() == want[-new - 1:-1].argmax(-1).tolist()


def test_batch_equals_each_sample_alone():
    model = tiny()
    batch = make_inputs(model, LAYOUTS, seed=3)
    handle = patch(model, FocusConfig(fastv=FastVConfig(k=2, ratio=0.5)))
    try:
        together = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
        for b in range(len(LAYOUTS)):
            alone = split_sample(batch, b, LAYOUTS, model)
            single = model.generate(**alone, max_new_tokens=3, do_sample=False, pad_token_id=0)
            assert together[b, -3:].tolist() == single[0, -3:].tolist()
    finally:
        unpatch(model)


def test_ratio_zero_is_stock_exactly_and_unpatch_restores():
    model = tiny()
    batch = make_inputs(model, LAYOUTS, seed=4)
    stock = forward(model, batch).logits
    stock_gen = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    handle = patch(model, FocusConfig(fastv=FastVConfig(k=1, ratio=0.0)))
    try:
        assert torch.equal(forward(model, batch).logits, stock)
        assert torch.equal(model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0), stock_gen)
        assert handle.llm.last_positions is None
    finally:
        unpatch(model)
    patch(model, FocusConfig(fastv=FastVConfig(k=1, ratio=0.5)))
    assert forward(model, batch).logits.shape != stock.shape
    unpatch(model)
    assert "generate" not in model.__dict__
    assert torch.equal(forward(model, batch).logits, stock)
    assert all(not layer._forward_pre_hooks for layer in model.model.language_model.layers)


def test_with_a_vision_method_and_parsing():
    model = tiny()
    cfg = FocusConfig(vmtc=VMTCConfig(target=16, stages=2), fastv=FastVConfig(k=1, keep=5))
    handle = patch(model, cfg)
    try:
        batch = make_inputs(model, LAYOUTS[:2], seed=5, image_tokens=handle.image_tokens())
        logits = forward(model, batch).logits
        assert handle.llm.last_selection.counts.tolist() == [5, 5]
        assert torch.isfinite(logits).all()
    finally:
        unpatch(model)
    fastv = get_method("fastv")
    assert fastv.parse("0.75") == FastVConfig(ratio=0.75) and fastv.parse("192") == FastVConfig(keep=192)
    assert fastv.parse(None) == FastVConfig(k=2, ratio=0.5)
    with pytest.raises(ConfigError, match="count of kept image tokens"):
        fastv.parse("2.5")
    with pytest.raises(ConfigError, match="only one language-model method"):
        FocusConfig(cmai=CMAIConfig(), fastv=FastVConfig())


@pytest.mark.parametrize("kwargs,field", [(dict(k=0), "k"), (dict(ratio=1.5), "ratio"), (dict(keep=-1), "keep"),
                                          (dict(k=True), "k")])
def test_config_errors(kwargs, field):
    with pytest.raises(ConfigError, match=f"FastVConfig.{field}"):
        FastVConfig(**kwargs)


def test_refusals():
    model = tiny()
    batch = make_inputs(model, LAYOUTS[:2], seed=6)
    with pytest.raises(ConfigError, match="3 decoder layers"):
        patch(model, FocusConfig(fastv=FastVConfig(k=3)))
    assert getattr(model, "_focusvlm", None) is None
    patch(model, FocusConfig(fastv=FastVConfig(k=1)))
    try:
        with pytest.raises(NotImplementedError, match="output_hidden_states"):
            forward(model, batch, output_hidden_states=True)
        with pytest.raises(NotImplementedError, match="labels"):
            forward(model, batch, labels=batch["input_ids"])
        with pytest.raises(NotImplementedError, match="beam search"):
            model.generate(**batch, max_new_tokens=2, num_beams=2, pad_token_id=0)
        with pytest.raises(NotImplementedError, match="cache_implementation"):
            model.generate(**batch, max_new_tokens=2, cache_implementation="static", pad_token_id=0)
        with pytest.raises(NotImplementedError, match="chunked"):
            model.generate(**batch, max_new_tokens=2, prefill_chunk_size=4, pad_token_id=0)
        out = forward(model, batch, use_cache=True)
        more = {"input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"],
                "attention_mask": torch.cat([batch["attention_mask"]] * 2, dim=1)}
        with pytest.raises(NotImplementedError, match="prefill only"):
            with torch.no_grad():
                model(**more, **hfcompat.cache_kwargs(hfcompat.output_cache(out)))
        hfcompat.output_cache(out).crop(-1)   # drops one entry of every layer: no longer the record FastV kept
        step = {"input_ids": batch["input_ids"][:, -1:], "attention_mask": batch["attention_mask"]}
        with pytest.raises(RuntimeError, match="cropped"):
            with torch.no_grad():
                model(**step, **hfcompat.cache_kwargs(hfcompat.output_cache(out)))
    finally:
        unpatch(model)
    model.config.text_config._attn_implementation = "flex_attention"
    from focusvlm.models import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="'sdpa' and 'eager'"):
        patch(model, FocusConfig(fastv=FastVConfig(k=1)))
