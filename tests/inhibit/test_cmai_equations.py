"""CMAI's pure functions against the literal oracles in tests/reference/cmai_reference.py."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_is_torch_quantile

from focusvlm.inhibit.attention import head_mean_attention
from focusvlm.inhibit.focus import (FOCUS_VARIANTS, FocusInputs, FocusScore, TextPositions, focus_score,
                                    inhibition_mask, masked_quantile, register_focus, sorted_rows, uniform_quantile)
from focusvlm.inhibit.cmai_method import CMAIConfig
from focusvlm.config import ConfigError
from reference import cmai_reference

# one sample per string: T text, I image (positions are string indices)
SAMPLES = ["TTIIIITTTT", "TIITIIITTTTT", "TTTIIITT"]


def _sample(types: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    text = [i for i, t in enumerate(types) if t == "T"]
    image = [i for i, t in enumerate(types) if t == "I"]
    a_t2i = torch.rand(len(text), len(image), generator=gen, dtype=torch.float64)
    a_t2t = torch.rand(len(text), len(text), generator=gen, dtype=torch.float64)
    return text, image, a_t2i, a_t2t


def _batched(samples, new_rows: int):
    """Pad samples into FocusInputs: every text row known, the last ``new_rows`` of each sample as queries."""
    batch = len(samples)
    t_max = max(len(s[0]) for s in samples)
    n_max = max(len(s[1]) for s in samples)
    rows = torch.zeros(batch, t_max, n_max)        # float32, as the model's rows are
    a_text = torch.zeros(batch, new_rows, t_max)
    a_img = torch.zeros(batch, new_rows, n_max)
    pos = torch.zeros(batch, t_max, dtype=torch.long)
    rank = torch.zeros(batch, t_max, dtype=torch.long)
    valid = torch.zeros(batch, t_max, dtype=torch.bool)
    q_pos = torch.zeros(batch, new_rows, dtype=torch.long)
    q_rank = torch.zeros(batch, new_rows, dtype=torch.long)
    q_valid = torch.zeros(batch, new_rows, dtype=torch.bool)
    for b, (text, image, a_t2i, a_t2t) in enumerate(samples):
        m, n = len(text), len(image)
        rows[b, :m, :n] = a_t2i
        pos[b, :m] = torch.tensor(text)
        rank[b, :m] = torch.arange(m)
        valid[b, :m] = True
        for slot, j in enumerate(range(m - new_rows, m)):
            a_img[b, slot, :n] = a_t2i[j]
            a_text[b, slot, :m] = a_t2t[j]
            q_pos[b, slot], q_rank[b, slot], q_valid[b, slot] = text[j], j, True
    return FocusInputs(a_img=a_img, a_text=a_text, rows=rows, query=TextPositions(q_pos, q_rank, q_valid),
                       known=TextPositions(pos, rank, valid))


@pytest.mark.parametrize("variant", list(FOCUS_VARIANTS))
def test_focus_score_matches_reference(variant):
    samples = [_sample(types, seed=i) for i, types in enumerate(SAMPLES)]
    new_rows = 3
    got = focus_score(variant, _batched(samples, new_rows), discount=0.7)
    for b, (text, image, a_t2i, a_t2t) in enumerate(samples):
        expected = cmai_reference.focus_scores(variant, a_t2i, a_t2t, 0.7)[-new_rows:]
        assert torch.allclose(got[b, :, :len(image)].double(), expected, atol=1e-6), (variant, b)


def test_focus_variants_differ():
    """Each variant computes something of its own (or the reference comparison could be vacuous)."""
    inputs = _batched([_sample(SAMPLES[0], seed=0)], new_rows=3)
    scores = {v: focus_score(v, inputs, discount=0.7) for v in FOCUS_VARIANTS}
    names = list(scores)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.allclose(scores[a], scores[b]), (a, b)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.6, 0.95])
def test_inhibition_mask_matches_reference(gamma):
    types = SAMPLES[1]
    text, image, a_t2i, a_t2t = _sample(types, seed=5)
    focus = cmai_reference.focus_scores("neighborhood", a_t2i, a_t2t, 0.9).float()
    focus[2, 1] = focus[2, 2]  # a tie
    image_pos = torch.tensor(image)
    visible = image_pos[None, :] <= torch.tensor(text)[:, None]
    got = inhibition_mask(focus, visible, gamma)
    expected = torch.tensor(cmai_reference.blocked_image_keys(focus, image, text, gamma))
    assert torch.equal(got, expected)
    if gamma > 0.5:
        assert got.any()                      # the comparison is not vacuous
    assert not got[0].any()                   # text before the first image is never inhibited


@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 0.6, 0.999])
def test_masked_quantile_large_rows_match_torch_quantile(gamma):
    """Rows big enough for the integer radix sort, negative values and zeros included."""
    gen = torch.Generator().manual_seed(7)
    values = torch.randn(2, 9, 700, generator=gen)
    values[0, 0, ::3] = 0.0
    values[1, 2, ::5] = -0.0
    valid = torch.rand(2, 9, 700, generator=gen) > 0.4
    got = masked_quantile(values, valid, gamma)
    for i in range(2):
        for j in range(9):
            assert_is_torch_quantile(got[i, j], values[i, j][valid[i, j]], gamma)
    assert torch.equal(sorted_rows(values), values.sort(dim=-1).values)


@pytest.mark.parametrize("count", [0, 1, 2, 57, 576])
@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.6 * 3 / 7, 0.5, 0.999])
def test_uniform_quantile_equals_masked_quantile(count, gamma):
    gen = torch.Generator().manual_seed(count)
    values = torch.rand(3, 5, 576, generator=gen).round(decimals=2)  # many ties
    valid = torch.zeros(3, 5, 576, dtype=torch.bool)
    for i in range(3):
        for j in range(5):
            valid[i, j, torch.randperm(576, generator=gen)[:count]] = True
    expected = masked_quantile(values, valid, gamma)
    got = uniform_quantile(values.masked_fill(~valid, float("inf")), count, gamma).squeeze(-1)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("heads,kv_heads,budget", [(4, 4, 1 << 20), (4, 2, 1 << 20), (8, 2, 1), (6, 3, 50)])
@pytest.mark.parametrize("hidden_from", [0, 9])
def test_head_mean_attention_matches_reference(heads, kv_heads, budget, hidden_from):
    gen = torch.Generator().manual_seed(heads * 10 + kv_heads)
    batch, rows, keys, dim = 2, 5, 13, 8
    q = torch.randn(batch, heads, rows, dim, generator=gen)
    k = torch.randn(batch, kv_heads, keys, dim, generator=gen)
    allowed = torch.rand(batch, rows, keys, generator=gen) > 0.3
    allowed[:, :, :hidden_from] = True     # the contract: every key below hidden_from is seen
    allowed[:, :, hidden_from] = True      # no row sees nothing
    hidden = ~allowed[:, :, hidden_from:]
    got = head_mean_attention(q, k, 0.35, hidden, budget, hidden_from)
    assert got.dtype == torch.float32 and got.shape == (batch, rows, keys)
    for b in range(batch):
        expected = cmai_reference.head_mean_attention(q[b], k[b], 0.35, allowed[b])
        assert torch.allclose(got[b].double(), expected, atol=1e-6)


def test_focus_registry_drives_config_validation():
    with pytest.raises(ConfigError, match="unknown focus score 'nope'"):
        CMAIConfig(focus="nope")

    @register_focus("test_only_double_tia")
    class DoubleTIA(FocusScore):
        def score(self, a_img, a_text, rows, relation):
            return 2 * a_img

    try:
        assert CMAIConfig(focus="test_only_double_tia").focus == "test_only_double_tia"
        inputs = _batched([_sample(SAMPLES[0], seed=0)], new_rows=2)
        assert torch.equal(focus_score("test_only_double_tia", inputs), 2 * inputs.a_img)
        with pytest.raises(ValueError, match="registered twice"):
            register_focus("test_only_double_tia")(DoubleTIA)
    finally:
        del FOCUS_VARIANTS["test_only_double_tia"]
