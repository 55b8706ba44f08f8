"""PruMerge(+), VisionZip, DivPrune and FastV pure functions against slow literal references."""

import math

import pytest
import torch

from focusvlm.compress import divprune, prumerge, visionzip
from focusvlm.inhibit import fastv
from reference import peers_reference as ref

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def peaked_attention(B, N, seed):
    """CLS-like attention: a few spikes (2 + b per image) over a noisy floor, so the IQR rule finds a
    small outlier share, as with CLIP (a share near 1/4 would hide the adaptive PruMerge+ step)."""
    g = gen(seed)
    a = 1 + 0.2 * torch.rand(B, N, generator=g, dtype=F64)
    for b in range(B):
        spikes = torch.randperm(N, generator=g)[:2 + b]
        a[b, spikes] += 5 + 5 * torch.rand(len(spikes), generator=g, dtype=F64)
    return a / a.sum(-1, keepdim=True)


# =========================================================================== PruMerge

def check_prumerge(features, keys, attn, *, plus, adaptive, ratio, neighbours):
    out, rec = prumerge.prumerge_from_attention(features, keys, attn, plus=plus, adaptive=adaptive, ratio=ratio,
                                                neighbours=neighbours)
    rows = attn.tolist()
    idx, want_ratio = ref.prumerge_indices(rows, plus, adaptive, ratio)
    assert rec.ratio == want_ratio
    assert rec.kept.tolist() == idx
    for b in range(features.shape[0]):
        tokens, near, compl = ref.prumerge_image(features[b], keys[b], rows[b], idx[b], neighbours)
        torch.testing.assert_close(out[b], torch.stack(tokens), rtol=1e-12, atol=1e-12)
        assert rec.neighbours[b].tolist() == (near if idx[b] else [])
        assert rec.pruned[b].tolist() == compl
    return out, rec


@pytest.mark.parametrize("plus,adaptive,ratio,B", [
    (False, True, None, 3),     # official default call of PruMerge: IQR over the whole batch
    (True, True, None, 1),      # official default call of PruMerge+
    (False, False, 1 / 8, 2),   # fixed count, batchable
    (True, False, 1 / 8, 2),    # fixed PruMerge+: uniform samples appended unfiltered
    (True, False, 0.3, 2),      # sample count != k: the official shape check would fail, we keep both
    (False, False, 1 / 4, 2),
])
def test_prumerge_matches_reference(plus, adaptive, ratio, B):
    N, D, C = 64, 6, 5
    g = gen(11)
    features = torch.randn(B, N, D, generator=g, dtype=F64)
    keys = torch.randn(B, N, C, generator=g, dtype=F64)
    attn = peaked_attention(B, N, 12)
    out, rec = check_prumerge(features, keys, attn, plus=plus, adaptive=adaptive, ratio=ratio or 1 / 8,
                              neighbours=prumerge.NEIGHBOURS)
    assert out.shape == (B, rec.kept.shape[1] + 1, D)
    if adaptive:
        assert 0 < rec.kept.shape[1] < N and rec.ratio < 1 / 8
    else:
        assert out.shape[1] == prumerge.token_count(N, ratio, plus)


def test_prumerge_full_path_from_q_and_k():
    """prumerge() forms the attention from q/k itself: one head, full width, softmax incl. CLS."""
    B, N, D, C = 2, 40, 4, 8
    g = gen(3)
    features = torch.randn(B, N, D, generator=g, dtype=F64)
    q = torch.randn(B, 1 + N, C, generator=g, dtype=F64)
    keys = torch.randn(B, 1 + N, C, generator=g, dtype=F64)
    keys[:, 0] = 2 * q[:, 0]                                    # CLS takes a large share of its own attention
    attn = prumerge.cls_attention(q[:, 0], keys)
    for b in range(B):
        torch.testing.assert_close(attn[b], torch.tensor(ref.prumerge_attention(q[b], keys[b]), dtype=F64))
    assert bool((attn.sum(-1) < 0.9).all())                     # the CLS column was part of the softmax
    out, rec = prumerge.prumerge(features, q[:, 0], keys, adaptive=False, ratio=1 / 8, neighbours=7)
    want, _ = prumerge.prumerge_from_attention(features, keys[:, 1:], attn, adaptive=False, ratio=1 / 8,
                                               neighbours=7)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    check_prumerge(features, keys[:, 1:], attn, plus=False, adaptive=False, ratio=1 / 8, neighbours=7)


def test_prumerge_ties_follow_list_order():
    """Tied attention (top-k) and duplicate keys (nearest neighbours): the earlier entry wins."""
    B, N, D = 2, 24, 3
    g = gen(5)
    attn = (torch.randint(0, 4, (B, N), generator=g).to(F64) + 1) / 100
    # keys on three axes, scaled by powers of two: cosine similarities are exactly 0 or 1, so they tie
    axis = torch.randint(0, 3, (B, N), generator=g)
    scale = 2.0 ** torch.randint(0, 3, (B, N, 1), generator=g).to(F64)
    keys = torch.nn.functional.one_hot(axis, 3).to(F64) * scale
    features = torch.randn(B, N, D, generator=g, dtype=F64)
    check_prumerge(features, keys, attn, plus=False, adaptive=False, ratio=1 / 4, neighbours=6)
    check_prumerge(features, keys, attn, plus=True, adaptive=False, ratio=1 / 4, neighbours=6)


def test_prumerge_plus_fixed_duplicates_drop_lowest_pruned():
    """A top-k token that is also a uniform sample appears twice; complement_idx then skips a pruned position."""
    N = 32                       # ratio 1/8: k = 4, samples 4, 12, 20, 28
    attn = torch.full((1, N), 0.01, dtype=F64)
    attn[0, [4, 12, 7, 9]] = torch.tensor([0.9, 0.8, 0.7, 0.6], dtype=F64)
    g = gen(9)
    features, keys = torch.randn(1, N, 3, generator=g, dtype=F64), torch.randn(1, N, 4, generator=g, dtype=F64)
    out, rec = check_prumerge(features, keys, attn, plus=True, adaptive=False, ratio=1 / 8, neighbours=5)
    assert rec.kept[0].tolist() == [4, 12, 7, 9, 4, 12, 20, 28]
    truly_pruned = [p for p in range(N) if p not in {4, 12, 7, 9, 20, 28}]
    assert rec.pruned[0].tolist() == truly_pruned[2:]          # two duplicates -> positions 0 and 1 left out
    torch.testing.assert_close(out[0, 0], out[0, 4])            # the duplicate emits the same token twice


def test_prumerge_plus_adaptive_skips_samples_already_kept():
    """Two outliers of 64: ratio 1/32, step int(32 / 3) = 10, samples 0, 10, .., 60 minus the kept 0."""
    N = 64
    attn = torch.full((1, N), 1.0, dtype=F64)
    attn[0, [7, 0]] = torch.tensor([9.0, 8.0], dtype=F64)
    attn = attn / attn.sum()
    g = gen(10)
    features, keys = torch.randn(1, N, 3, generator=g, dtype=F64), torch.randn(1, N, 4, generator=g, dtype=F64)
    out, rec = check_prumerge(features, keys, attn, plus=True, adaptive=True, ratio=1 / 8, neighbours=32)
    assert rec.ratio == 2 / 64
    assert rec.kept[0].tolist() == [7, 0, 10, 20, 30, 40, 50, 60]
    assert out.shape == (1, 9, 3)


def test_prumerge_adaptive_ratio_is_batch_wide():
    attn = peaked_attention(3, 50, 21)
    ratio = prumerge.adaptive_ratio(attn)
    assert ratio == ref.outlier_ratio(attn.tolist())
    singles = [prumerge.adaptive_ratio(attn[b:b + 1]) for b in range(3)]
    assert singles == [ref.outlier_ratio([attn[b].tolist()]) for b in range(3)]
    # alone, image a has one outlier (k = 1); next to image b the shared quartiles rise and it keeps none
    a = torch.tensor([[1.0] * 10 + [100.0]], dtype=F64) / 200
    b = torch.full((1, 11), 50.0, dtype=F64) / 200
    assert int(11 * prumerge.adaptive_ratio(a)) == 1
    assert prumerge.adaptive_ratio(torch.cat([a, b])) == 0
    _, rec = prumerge.prumerge_from_attention(torch.zeros(3, 50, 2, dtype=F64), torch.randn(3, 50, 2, dtype=F64),
                                              attn, neighbours=4)
    assert rec.kept.shape[1] == int(50 * ratio)                 # the same count for every image


def test_prumerge_degenerate_counts():
    B, N = 2, 12
    g = gen(4)
    features, keys = torch.randn(B, N, 3, generator=g, dtype=F64), torch.randn(B, N, 4, generator=g, dtype=F64)
    attn = peaked_attention(B, N, 5)
    # keep everything: every token absorbs neighbours among kept ones, the extra token is empty
    out, rec = check_prumerge(features, keys, attn, plus=False, adaptive=False, ratio=1.0, neighbours=N - 1)
    assert out.shape == (B, N + 1, 3) and rec.pruned.shape == (B, 0)
    assert bool((out[:, -1] == 0).all())
    # keep one token
    out, rec = check_prumerge(features, keys, attn, plus=False, adaptive=False, ratio=1 / N, neighbours=3)
    assert out.shape == (B, 2, 3)
    # keep none (int(N * r) = 0): only the attention-weighted sum of all tokens
    out, rec = check_prumerge(features, keys, attn, plus=False, adaptive=False, ratio=0.05, neighbours=3)
    torch.testing.assert_close(out[:, 0], (features * attn.unsqueeze(-1)).sum(1))
    # adaptive without outliers (flat attention): the same single token
    flat = torch.full((B, N), 1 / N, dtype=F64)
    out, rec = prumerge.prumerge_from_attention(features, keys, flat, neighbours=3)
    assert rec.ratio == 0 and out.shape == (B, 1, 3)


def test_prumerge_token_count():
    assert prumerge.token_count(576) == 73
    assert prumerge.token_count(576, plus=True) == 145           # 72 top-k + 72 samples + 1
    assert prumerge.token_count(576, 1 / 4, plus=True) == 289
    for n, r, plus in [(576, 0.3, True), (100, 0.1, False), (100, 0.2, True), (7, 1.0, False)]:
        idx, _ = prumerge.select(torch.rand(1, n), plus=plus, adaptive=False, ratio=r)
        assert prumerge.token_count(n, r, plus) == idx.shape[1] + 1


def test_prumerge_keeps_dtype_and_rounds_once():
    g = gen(8)
    features = torch.randn(2, 20, 4, generator=g).half()
    q, keys = torch.randn(2, 4, generator=g).half(), torch.randn(2, 21, 4, generator=g).half()
    out, _ = prumerge.prumerge(features, q, keys, adaptive=False, ratio=0.25, neighbours=4)
    want, _ = prumerge.prumerge(features.double(), q.double(), keys.double(), adaptive=False, ratio=0.25, neighbours=4)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), want, rtol=2e-3, atol=2e-3)


def test_prumerge_errors():
    attn = peaked_attention(2, 40, 1)
    x, k = torch.zeros(2, 40, 3), torch.randn(2, 40, 3)
    with pytest.raises(ValueError, match="one image at a time"):
        prumerge.select(attn, plus=True, adaptive=True)
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        prumerge.select(attn, adaptive=False, ratio=0)
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        prumerge.token_count(576, 1.5)
    with pytest.raises(ValueError, match="more than the"):
        prumerge.token_count(576, 0.9, plus=True)
    with pytest.raises(ValueError, match="only 39 others"):
        prumerge.prumerge_from_attention(x, k, attn, adaptive=False, ratio=0.5, neighbours=40)
    with pytest.raises(ValueError, match="no IQR outlier"):
        prumerge.select(torch.full((1, 40), 0.025), plus=True, adaptive=True)
    with pytest.raises(ValueError, match=r"keys must be \(B, 1\+N, C\)"):
        prumerge.prumerge(x, torch.zeros(2, 3), torch.zeros(2, 40, 3))
    with pytest.raises(ValueError, match="does not match keys"):
        prumerge.cls_attention(torch.zeros(2, 4), torch.zeros(2, 41, 3))
    with pytest.raises(ValueError, match="disagree"):
        prumerge.merge(x, k[:, :30], attn, torch.zeros(2, 1, dtype=torch.long))


# =========================================================================== VisionZip

def check_visionzip(hidden, attn, metric, dominant, contextual):
    out, rec = visionzip.visionzip(hidden, attn, metric, dominant, contextual)
    assert out.shape == (hidden.shape[0], dominant + contextual, hidden.shape[-1])
    for b in range(hidden.shape[0]):
        heads = attn[b] if attn.dim() == 3 else attn[b].unsqueeze(0)
        tokens, dom, targets, assign = ref.visionzip_image(hidden[b], heads, metric[b], dominant, contextual)
        torch.testing.assert_close(out[b], torch.stack(tokens), rtol=1e-12, atol=1e-12)
        assert rec.dominant[b].tolist() == dom
        assert rec.contextual[b].tolist() == targets
        assert dict(zip(rec.merged[b].tolist(), rec.merged_into[b].tolist())) == assign
    return out, rec


@pytest.mark.parametrize("dominant,contextual", [(54, 10), (12, 5), (1, 1), (1, 64), (64, 1), (30, 35), (9, 7)])
def test_visionzip_matches_reference(dominant, contextual):
    B, N, H, D = 2, 64, 4, 6
    g = gen(dominant * 100 + contextual)
    hidden = torch.randn(B, 1 + N, D, generator=g, dtype=F64)
    attn = torch.randn(B, H, 1 + N, generator=g, dtype=F64).softmax(-1)
    metric = torch.randn(B, 1 + N, 5, generator=g, dtype=F64)
    out, rec = check_visionzip(hidden, attn, metric, dominant, contextual)
    assert rec.dominant[:, 0].tolist() == [0] * B               # CLS always leads
    torch.testing.assert_close(out[:, 0], hidden[:, 0])


def test_visionzip_ties():
    B, N = 2, 30
    g = gen(2)
    hidden = torch.randn(B, 1 + N, 3, generator=g, dtype=F64)
    attn = torch.randint(0, 3, (B, 2, 1 + N), generator=g).to(F64)             # tied head sums
    metric = torch.randint(0, 2, (B, 1 + N, 2), generator=g).to(F64) + 1.0     # tied similarities
    check_visionzip(hidden, attn, metric, 8, 4)
    check_visionzip(hidden, attn.sum(1), metric, 8, 4)                         # pre-summed attention


def test_visionzip_helpers():
    g = gen(6)
    B, T, H, dh = 2, 9, 3, 4
    q, k = torch.randn(B, T, H * dh, generator=g, dtype=F64), torch.randn(B, T, H * dh, generator=g, dtype=F64)
    attn = visionzip.multihead_cls_attention(q[:, 0], k, H)
    for h in range(H):
        qs, ks = q[:, 0, h * dh:(h + 1) * dh], k[:, :, h * dh:(h + 1) * dh]
        want = (torch.einsum("bd,btd->bt", qs, ks) / math.sqrt(dh)).softmax(-1)
        torch.testing.assert_close(attn[:, h], want)
    metric = visionzip.head_mean_keys(k, H)
    torch.testing.assert_close(metric, sum(k[..., h * dh:(h + 1) * dh] for h in range(H)) / H)


def test_visionzip_budget_split_and_count():
    assert visionzip.split_budget(64) == (54, 10)
    assert visionzip.split_budget(128) == (108, 20)
    assert visionzip.split_budget(192) == (162, 30)
    assert visionzip.split_budget(2) == (1, 1)
    assert visionzip.token_count(576) == 64
    assert visionzip.token_count(576, *visionzip.split_budget(192)) == 192


def test_visionzip_errors():
    h, a, m = torch.zeros(1, 11, 3), torch.rand(1, 2, 11), torch.rand(1, 11, 2)
    with pytest.raises(ValueError, match="exceeds the 11 tokens"):
        visionzip.visionzip(h, a, m, 8, 4)
    with pytest.raises(ValueError, match="contextual must be an int >= 1"):
        visionzip.visionzip(h, a, m, 8, 0)
    with pytest.raises(ValueError, match="disagree"):
        visionzip.visionzip(h, a[:, :, :10], m, 4, 2)
    with pytest.raises(ValueError, match="budget must be an int >= 2"):
        visionzip.split_budget(1)
    with pytest.raises(ValueError, match="divisible"):
        visionzip.head_mean_keys(torch.zeros(1, 3, 10), 4)


# =========================================================================== DivPrune

@pytest.mark.parametrize("keep", [1, 2, 7, 19, 20])
def test_divprune_matches_reference(keep):
    B, N = 3, 20
    x = torch.randn(B, N, 8, generator=gen(keep), dtype=F64)
    out, rec = divprune.divprune(x, keep)
    for b in range(B):
        picks, kept = ref.divprune_image(x[b], keep=keep)
        assert rec.picked[b].tolist() == picks
        assert rec.kept[b].tolist() == kept
        torch.testing.assert_close(out[b], x[b, kept], rtol=0, atol=0)


def test_divprune_ties_and_repicks():
    """Exact distances 0 / 1 everywhere: every argmax ties, and once each direction is taken
    the greedy loop re-picks a token, as the official loop does."""
    basis = torch.eye(3, dtype=F64)
    x = torch.stack([basis[i % 3] * (1 + i) for i in range(7)]).unsqueeze(0)
    x = torch.cat([x, x.flip(1)])
    out, rec = divprune.divprune(x, 5)
    for b in range(2):
        picks, kept = ref.divprune_image(x[b], keep=5)
        assert rec.picked[b].tolist() == picks
        assert rec.kept[b].tolist() == kept
    assert len(set(rec.picked[0].tolist())) < 5


def test_divprune_first_pick_tie_goes_to_lower_index():
    """The first pick ties between the two tokens of the most isolated mutual-nearest pair;
    the distance matrix is exactly symmetric, so argmax takes the lower one (here 8, not 15)."""
    x = torch.randn(3, 20, 8, generator=gen(7), dtype=F64)
    d = divprune.cosine_distance(x)
    assert torch.equal(d, d.transpose(1, 2))
    nearest = d[0].topk(2, dim=0, largest=False).values[1]
    assert nearest[8] == nearest[15] == nearest.max()
    assert int(divprune.select(x, 1)[0, 0]) == 8


def test_divprune_ratio_count():
    assert divprune.token_count(576) == 56                      # default SUBSET_RATIO 0.098
    assert divprune.token_count(5, 0.5) == 2                    # round(2.5) = 2, halves to even
    assert divprune.token_count(7, 0.5) == 4                    # round(3.5) = 4
    x = torch.randn(1, 30, 4, generator=gen(1), dtype=F64)
    picks, _ = ref.divprune_image(x[0], ratio=0.25)
    assert divprune.select(x, divprune.token_count(30, 0.25))[0].tolist() == picks


def test_divprune_errors():
    with pytest.raises(ValueError, match="between 1 and 4"):
        divprune.select(torch.randn(1, 4, 2), 5)
    with pytest.raises(ValueError, match="between 1 and 4"):
        divprune.select(torch.randn(1, 4, 2), 0)
    with pytest.raises(ValueError, match="keeps no token"):
        divprune.token_count(4, 0.1)
    with pytest.raises(ValueError, match=r"must be \(B, N, D\)"):
        divprune.select(torch.randn(4, 2), 1)


# =========================================================================== FastV

def image_layout(B, L, seed):
    """Per-sample image masks of different sizes and places (one split in two runs), plus padding."""
    g = gen(seed)
    image = torch.zeros(B, L, dtype=torch.bool)
    valid = torch.ones(B, L, dtype=torch.bool)
    for b in range(B):
        start = int(torch.randint(1, 5, (1,), generator=g))
        n = 8 + 3 * b
        image[b, start:start + n] = True
        if b == 2:
            image[b, start + 2] = False                         # not contiguous
        valid[b, L - b:] = False                                # b padding positions on the right
    return image, valid


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.3, 0.0, 1.0])
def test_fastv_matches_reference(ratio):
    B, H, L = 3, 4, 30
    image, valid = image_layout(B, L, 3)
    attn = torch.rand(B, H, L, L, generator=gen(7), dtype=F64)
    last = valid.sum(-1) - 1                                    # right padding: last real token per sample
    scores = fastv.last_token_attention(attn, last)
    sel = fastv.select(scores, image, ratio, valid)
    for b in range(B):
        positions = image[b].nonzero().flatten().tolist()
        want = ref.fastv_image(attn[b], positions, ratio, last=int(last[b]))
        got = sel.kept_image[b].tolist()
        assert got[:len(want)] == want and all(v == -1 for v in got[len(want):])
        assert int(sel.counts[b]) == len(want) == fastv.keep_count(len(positions), ratio)
        expect = [bool(valid[b, p]) and (not image[b, p] or p in want) for p in range(L)]
        assert sel.keep[b].tolist() == expect


def test_fastv_last_row_default_and_ties():
    B, H, L = 2, 3, 16
    attn = torch.randint(0, 3, (B, H, L, L), generator=gen(4)).to(F64)       # many tied means
    image = torch.zeros(B, L, dtype=torch.bool)
    image[:, 2:12] = True
    sel = fastv.select(fastv.last_token_attention(attn), image, 0.5)
    for b in range(B):
        assert sel.kept_image[b].tolist() == ref.fastv_image(attn[b], list(range(2, 12)), 0.5)
    assert bool(sel.keep[:, 12:].all()) and bool(sel.keep[:, :2].all())


def test_fastv_keep_count():
    assert fastv.keep_count(576) == 288
    assert fastv.keep_count(576, 0.75) == 144
    assert fastv.keep_count(5, 0.5) == 2                        # round(2.5) = 2, as the official round()
    assert fastv.keep_count(0, 0.5) == 0
    image = torch.zeros(2, 8, dtype=torch.bool)
    image[0, 1:6] = True                                        # 5 tokens -> 2 kept; sample 1 has none
    sel = fastv.select(torch.rand(2, 8), image, 0.5)
    assert sel.counts.tolist() == [2, 0] and bool(sel.keep[1].all())


def test_fastv_errors():
    image = torch.zeros(1, 6, dtype=torch.bool)
    image[0, 4:] = True
    valid = torch.ones(1, 6, dtype=torch.bool)
    valid[0, 5] = False
    with pytest.raises(ValueError, match="lies on padding"):
        fastv.select(torch.rand(1, 6), image, 0.5, valid)
    with pytest.raises(ValueError, match=r"R must be in \[0, 1\]"):
        fastv.select(torch.rand(1, 6), image, 1.5)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        fastv.select(torch.rand(1, 6), image.long(), 0.5)
    with pytest.raises(ValueError, match="outside the 6 query rows"):
        fastv.last_token_attention(torch.rand(1, 2, 6, 6), torch.tensor([6]))
    with pytest.raises(ValueError, match=r"\(B, H, Q, Kv\)"):
        fastv.last_token_attention(torch.rand(2, 6, 6))
