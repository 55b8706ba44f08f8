"""CMAI's per-call plan on the paths the other tests take rarely: rows in several chunks, a second prompt on a
dynamic cache, a store that grows during decoding, padded image slots with the sum-type focus scores, and layers
the plan was not made for. Each is checked against the literal reference or against one full forward (C13)."""

from __future__ import annotations

import pytest
import torch

from focusvlm import CMAIConfig, FocusConfig, hfcompat, patched
from focusvlm.inhibit import state as state_module
from focusvlm.models.factory import random_llava
from helpers import make_inputs
from test_cmai import _reference_logits

# two images with text between them (rows that see only the first image, image keys beyond a chunk's last row),
# a sample with fewer images (padded image slots), a text-only sample (padded rows)
LAYOUTS = [[3, "img", 4, "img", 9], [5, "img", 12], [7]]


@pytest.fixture(scope="module")
def model():
    return random_llava("tiny", seed=0)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("focus", ["neighborhood", "sum"])
def test_rows_in_several_chunks_match_the_reference(monkeypatch, implementation, focus):
    """Chunks of 4 rows: the plan reads each chunk's key range back (its second read) and clamps image keys
    beyond a chunk; the result is the reference's, and the one-chunk plan's."""
    model = random_llava("tiny", seed=0, attn_implementation=implementation)
    inputs = make_inputs(model, LAYOUTS, seed=3)
    cfg = CMAIConfig(focus=focus)
    with patched(model, FocusConfig(cmai=cfg)), torch.no_grad():
        one_chunk = model(**inputs).logits
        monkeypatch.setitem(state_module.CHUNK_ELEMENTS, "cpu", 1)
        monkeypatch.setattr(state_module, "MIN_CHUNK_ROWS", 4)
        chunked = model(**inputs).logits
    expected = _reference_logits(model, inputs, cfg)
    valid = inputs["attention_mask"].bool()
    assert (chunked[valid] - expected[valid]).abs().max().item() <= 1e-5
    assert (chunked[valid] - one_chunk[valid]).abs().max().item() <= 1e-5


def test_chunk_plan_facts(monkeypatch, model):
    monkeypatch.setitem(state_module.CHUNK_ELEMENTS, "cpu", 1)
    monkeypatch.setattr(state_module, "MIN_CHUNK_ROWS", 4)
    inputs = make_inputs(model, LAYOUTS, seed=3)
    with patched(model, FocusConfig(cmai=CMAIConfig())) as handle, torch.no_grad():
        model(**inputs)
        plan = handle.cmai.state.plan
    assert len(plan.chunks) == 4    # 13 text rows after the first image in sample 0, in chunks of 4
    query = plan.query
    for chunk in plan.chunks:
        pos = query.pos[:, chunk.start:chunk.stop][query.valid[:, chunk.start:chunk.stop]]
        assert chunk.key_stop == int(pos.max()) + 1
        assert chunk.key_first_hidden == int(pos.min()) + 1
        assert chunk.visible_count is None     # samples see different numbers of image keys
    assert plan.images.last == int(plan.images.pos.max())


@pytest.mark.parametrize("focus,layouts,more_mask", [
    ("neighborhood", [[5, "img", 7], [2, "img", 3]], None),
    ("discounted", [[5, "img", 7], [2, "img", 3]], None),
    # padding inside the second prompt and a text-only sample: padded row slots of a continuation
    ("neighborhood", [[5, "img", 7], [2, "img", 3], [9]], [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 1, 1, 1]]),
], ids=["neighborhood", "discounted", "padded-continuation"])
def test_second_prompt_on_a_dynamic_cache_matches_one_full_forward(model, focus, layouts, more_mask):
    """A prefill that continues a dynamic cache (after decode steps) sees every earlier row, decoded ones included."""
    inputs = make_inputs(model, layouts, seed=4)
    batch, prompt = inputs["input_ids"].shape
    more = torch.randint(1, 400, (batch, 5), generator=torch.Generator().manual_seed(1))
    more_mask = torch.ones(batch, 5, dtype=torch.long) if more_mask is None else torch.tensor(more_mask)
    with patched(model, FocusConfig(cmai=CMAIConfig(focus=focus, discount=0.8))), torch.no_grad():
        out = model(**inputs, use_cache=True)
        cache, mask = hfcompat.output_cache(out), inputs["attention_mask"]
        ids = [inputs["input_ids"]]
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(3):
            ids.append(token)
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            out = model(input_ids=token, attention_mask=mask, **hfcompat.cache_kwargs(cache), use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        ids.append(more)
        mask = torch.cat([mask, more_mask], dim=1)
        second = model(input_ids=more, attention_mask=mask, **hfcompat.cache_kwargs(cache), use_cache=True).logits
        full = model(input_ids=torch.cat(ids, dim=1), attention_mask=mask, pixel_values=inputs["pixel_values"],
                     use_cache=False).logits
    real = more_mask.bool()
    assert (second[real] - full[:, -5:][real]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("focus", ["neighborhood", "sum", "discounted", "tia"])
def test_decoding_with_padded_image_slots_matches_one_full_forward(model, focus):
    """Samples with different image counts: padded image slots rank last and are never inhibited, whatever the
    focus score (the sum-type scores once ranked them by the rows' values at the spare key)."""
    inputs = make_inputs(model, [[3, "img", 4, "img", 6], [2, "img", 8]], seed=5)
    _generate_matches_full_forward(model, inputs, CMAIConfig(focus=focus, discount=0.8), steps=6)


def test_a_growing_store_keeps_every_row(model):
    """50 prompt rows: the dynamic store (64 slots) grows during the 20 decode steps."""
    inputs = make_inputs(model, [[5, "img", 50]], seed=6)
    _generate_matches_full_forward(model, inputs, CMAIConfig(), steps=20)


@pytest.mark.parametrize("layouts", [[[5, "img", 7], [2, "img", 3]], [[5, "img"]]],
                         ids=["rows-in-the-prompt", "first-rows-decoded"])
def test_layers_the_plan_was_not_made_for(model, layouts):
    """A state that does not know the model's gammas (layers call in with their own): same outputs, also when a
    layer first meets CMAI in a decode step (a prompt that ends with its image)."""
    inputs = make_inputs(model, layouts, seed=7)
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                    return_dict_in_generate=True, pad_token_id=0)
    with patched(model, FocusConfig(cmai=CMAIConfig())) as handle, torch.no_grad():
        known = torch.stack(model.generate(**inputs, **settings).logits)
        handle.cmai.state.gammas = None
        late = torch.stack(model.generate(**inputs, **settings).logits)
    assert (known - late).abs().max().item() <= 1e-5


def _generate_matches_full_forward(model, inputs, cfg, steps):
    batch, prompt = inputs["input_ids"].shape
    settings = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
                    return_dict_in_generate=True, pad_token_id=0)
    with patched(model, FocusConfig(cmai=cfg)), torch.no_grad():
        gen = model.generate(**inputs, **settings)
        mask = torch.cat([inputs["attention_mask"], torch.ones(batch, steps, dtype=torch.long)], dim=1)
        full = model(input_ids=gen.sequences, attention_mask=mask, pixel_values=inputs["pixel_values"],
                     use_cache=False).logits
    for step, logits in enumerate(gen.logits):
        assert (logits - full[:, prompt - 1 + step]).abs().max().item() <= 1e-5, step
