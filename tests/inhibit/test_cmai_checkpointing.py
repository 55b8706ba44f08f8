"""CMAI under gradient checkpointing: a recomputed layer reads its own call's plan and changes no cached state."""

from __future__ import annotations

import pytest
import torch

from focusvlm import hfcompat

from focusvlm import CMAIConfig, FocusConfig, patched
from focusvlm.models.factory import random_llava
from helpers import make_inputs

LAYOUTS_A = [[5, "img", 9], [3, "img", 4, "img", 6]]
LAYOUTS_B = [[2, "img", 12]]   # another batch size and layout: a stale plan would not even fit


def _batch(model, layouts, seed):
    inputs = make_inputs(model, layouts, seed=seed)
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return inputs


def _losses_and_grads(checkpointing: bool, reentrant: bool, interleave: bool):
    """Losses of two batches and the gradients they leave, run as forward A, forward B, then the backwards."""
    model = random_llava("tiny", seed=0)
    model.train()
    if checkpointing:
        hfcompat.enable_checkpointing(model, checkpoint_kwargs={"use_reentrant": reentrant})
    a, b = _batch(model, LAYOUTS_A, seed=1), _batch(model, LAYOUTS_B, seed=2)
    with patched(model, FocusConfig(cmai=CMAIConfig())) as handle:
        state = handle.cmai.state
        if interleave:   # B's forward replaces the latest plan before A's layers are recomputed
            loss_a = model(**a).loss
            loss_b = model(**b).loss
            loss_b.backward()
            loss_a.backward()
        else:
            loss_a = model(**a).loss
            loss_a.backward()
            loss_b = model(**b).loss
            loss_b.backward()
        stored = 0 if state.store is None else state.store.length
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return (loss_a.item(), loss_b.item()), grads, stored


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("interleave", [False, True], ids=["forward-backward", "two-forwards-then-backwards"])
def test_checkpointed_training_equals_plain_training(reentrant, interleave):
    plain_loss, plain_grads, _ = _losses_and_grads(False, reentrant, interleave)
    ckpt_loss, ckpt_grads, stored = _losses_and_grads(True, reentrant, interleave)
    assert plain_loss == pytest.approx(ckpt_loss, abs=1e-6)
    assert plain_grads.keys() == ckpt_grads.keys()
    assert any("language_model" in n for n in plain_grads), "no gradient reached the language model"
    for name in plain_grads:
        diff = (plain_grads[name] - ckpt_grads[name]).abs().max().item()
        assert diff <= 1e-6, (name, diff)
    assert stored == 0   # training calls leave no text rows behind (no cache continues them)


def test_cmai_changes_the_training_loss():
    """The comparison above means something only if CMAI acts during training."""
    model = random_llava("tiny", seed=0)
    model.train()
    batch = _batch(model, LAYOUTS_A, seed=1)
    stock = model(**batch).loss.item()
    with patched(model, FocusConfig(cmai=CMAIConfig())):
        inhibited = model(**batch).loss.item()
    assert abs(stock - inhibited) > 1e-5


def test_recomputing_a_layer_writes_its_rows_in_place():
    """A layer run again with its call's plan (what a recomputation does) leaves the row store as it was."""
    model = random_llava("tiny", seed=0)
    inputs = make_inputs(model, LAYOUTS_A, seed=3)
    layer = model.model.language_model.layers[2].self_attn
    seen = {}

    def grab(module, args, kwargs):
        seen.update(args=args, kwargs=dict(kwargs))

    with torch.no_grad(), patched(model, FocusConfig(cmai=CMAIConfig())) as handle:
        handle_hook = layer.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            model(**inputs, use_cache=True)
        finally:
            handle_hook.remove()
        store = handle.cmai.state.store
        length, rows = store.length, store.rows[2].clone()
        out_first = layer(*seen["args"], **{**seen["kwargs"], hfcompat.CACHE_ARG: None})[0]
        out_again = layer(*seen["args"], **{**seen["kwargs"], hfcompat.CACHE_ARG: None})[0]
        assert store.length == length > 0
        assert torch.equal(store.rows[2], rows)
        assert torch.equal(out_first, out_again)
