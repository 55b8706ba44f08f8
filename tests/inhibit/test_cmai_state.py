"""The per-call plan: which rows CMAI redoes, where their facts go, what a decode step precomputes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from focusvlm.inhibit import state as state_module
from focusvlm.inhibit.state import CallPlan, CMAIState, CMAIStateError


def _image_mask(layout: str) -> torch.Tensor:
    return torch.tensor([[c == "I" for c in layout]])


def test_prefill_plan_rows_positions_ranks():
    layout = "TTIIITTIITT"           # text between two images ranks only the first
    state = CMAIState("discounted", 0.5, gammas=[0.0, 0.5])
    plan = state.begin_call(_image_mask(layout), None, 0)
    assert isinstance(plan, CallPlan) and dataclasses.is_dataclass(plan)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.q_len = 3                # one immutable object per call
    text_after_first_image = [5, 6, 9, 10]
    assert plan.query.pos[0].tolist() == text_after_first_image
    assert plan.query.rank[0].tolist() == [2, 3, 4, 5]      # text before the image counts in the rank
    assert plan.store.length == 4 and plan.store.pos[0, :4].tolist() == text_after_first_image
    # chunks cover every row once; no row sees a key at or beyond its chunk's key_stop
    covered = [i for c in plan.chunks for i in range(c.start, c.stop)]
    assert covered == list(range(4))
    assert all(c.key_stop == int(plan.query.pos[0, c.start:c.stop].max()) + 1 for c in plan.chunks)
    # visible image keys differ between the rows before and after the second image: no uniform count
    assert plan.chunks[0].visible_count is None
    # discounted relation: lambda^(rank gap) on rows up to and including the row itself
    rel = plan.relation[0]
    assert rel[1, 1] == 1.0 and rel[1, 0] == 0.5 and rel[1, 2] == 0.0


def test_decode_plan_is_lean_and_consistent():
    state = CMAIState("discounted", 0.5, gammas=[0.0, 0.5, 0.5])
    state.begin_call(_image_mask("TIIIT"), None, 0)
    store = state.store
    plan = state.begin_call(torch.zeros(1, 1, dtype=torch.bool), None, 5)
    assert plan.decode is not None and plan.slot is None
    assert plan.query.pos.tolist() == [[5]] and plan.query.rank.tolist() == [[2]]
    slot = int(plan.decode.write_index)
    assert slot == 1 and store.pos[0, slot] == 5 and store.rank[0, slot] == 2 and store.valid[0, slot]
    rel = plan.relation.view(-1)
    assert rel[slot] == 1.0 and rel[0] == 0.5          # the new row itself (gap 0), the prompt's text row (gap 1)
    # thresholds fixed per layer at the prefill: selection positions, not a sort
    assert set(plan.decode.constants.thresholds) == {1, 2}
    assert isinstance(plan.decode.constants.thresholds[1].lo, int)
    # a second step moves the counters on without touching the first step's plan
    state.begin_call(torch.zeros(1, 1, dtype=torch.bool), None, 6)
    assert plan.query.rank.tolist() == [[2]] and store.rank[0, 2] == 3 and store.length == 3


def test_training_calls_keep_no_rows_and_text_only_batches_plan_nothing():
    state = CMAIState("neighborhood", 0.9, gammas=[0.0, 0.5])
    plan = state.begin_call(_image_mask("TIIITT"), None, 0, keep_rows=False)
    assert not plan.keep_rows and plan.store.length == 0
    assert state.begin_call(_image_mask("TTTT"), None, 0) is None


def test_chunks_respect_the_memory_budget(monkeypatch):
    monkeypatch.setitem(state_module.CHUNK_ELEMENTS, "cpu", 16 * 4 * 40)   # rows * heads * keys
    monkeypatch.setattr(state_module, "MIN_CHUNK_ROWS", 1)
    state = CMAIState("neighborhood", 0.9, gammas=[0.0, 0.5], num_heads=4)
    plan = state.begin_call(_image_mask("T" + "I" * 9 + "T" * 30), None, 0)
    sizes = [c.stop - c.start for c in plan.chunks]
    assert max(sizes) == 16 and sum(sizes) == 30
    assert all(c.visible_count == 9 for c in plan.chunks)
    assert [c.key_first_hidden for c in plan.chunks] == [int(plan.query.pos[0, c.start]) + 1 for c in plan.chunks]


def test_a_cache_of_another_length_is_refused():
    state = CMAIState("neighborhood", 0.9, gammas=[0.0, 0.5])
    state.begin_call(_image_mask("TIIT"), None, 0)
    with pytest.raises(CMAIStateError, match="cache of 9 positions but tracked 4"):
        state.begin_call(torch.zeros(1, 1, dtype=torch.bool), None, 9)
