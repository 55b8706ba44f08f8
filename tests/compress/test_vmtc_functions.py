"""VMTC pure functions against the slow literal references in tests/reference/vmtc_reference.py."""

import pytest
import torch

from focusvlm.compress import vmtc
from reference import vmtc_reference as ref


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_importance_matches_reference():
    g = _gen(1)
    B, H, N, Dh = 3, 4, 10, 8
    q = torch.randn(B, H, Dh, generator=g)
    k = torch.randn(B, H, N, Dh, generator=g)
    got = vmtc.cls_importance(q, k, Dh ** -0.5)
    assert got.shape == (B, N - 1) and got.dtype == torch.float32
    for b in range(B):
        want = torch.tensor(ref.importance(q[b], k[b], Dh ** -0.5), dtype=torch.float32)
        torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-7)
    # CLS takes part of the softmax mass, so the patches sum to less than one
    assert bool((got.sum(-1) < 1).all())


def test_importance_matches_full_attention_matrix():
    g = _gen(2)
    q = torch.randn(2, 3, 7, 5, generator=g)
    k = torch.randn(2, 3, 7, 5, generator=g)
    full = ((q @ k.transpose(-1, -2)) * 0.3).softmax(-1).mean(1)
    torch.testing.assert_close(vmtc.cls_importance(q[:, :, 0], k, 0.3), full[:, 0, 1:])


def test_select_primary_matches_reference_with_ties():
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.2, 0.5, 0.0], [3.0, 2.0, 1.0, 0.0, -1.0, 5.0]])
    primary, redundant = vmtc.select_primary(scores, 3)
    for b in range(2):
        p, r = ref.primary(scores[b].tolist(), 3)
        assert primary[b].tolist() == p and redundant[b].tolist() == r
    assert primary[0].tolist() == [1, 2, 4]
    g = _gen(3)
    rnd = torch.randint(0, 4, (4, 20), generator=g).float()  # many ties
    primary, redundant = vmtc.select_primary(rnd, 7)
    for b in range(4):
        p, r = ref.primary(rnd[b].tolist(), 7)
        assert primary[b].tolist() == p and redundant[b].tolist() == r
    with pytest.raises(ValueError, match="cannot keep"):
        vmtc.select_primary(rnd, 21)


def test_kmeans_matches_reference():
    g = _gen(4)
    x = torch.randn(3, 25, 6, generator=g)
    labels = vmtc.spherical_kmeans(x, 5, 7)
    for b in range(3):
        assert labels[b].tolist() == ref.kmeans(x[b].tolist(), 5, 7)
        assert sorted(set(labels[b].tolist())) == list(range(5))


def test_kmeans_reseeds_empty_clusters_to_exactly_c():
    # nine identical points and one outlier: the seeds collapse, so clusters empty out and must be re-seeded
    x = torch.zeros(2, 10, 3)
    x[:, :, 0] = 1.0
    x[:, 9] = torch.tensor([0.0, 1.0, 0.0])
    x[1, 4] = torch.tensor([0.0, 0.0, 1.0])
    labels = vmtc.spherical_kmeans(x, 4, 3)
    for b in range(2):
        assert sorted(set(labels[b].tolist())) == [0, 1, 2, 3]
        assert labels[b].tolist() == ref.kmeans(x[b].tolist(), 4, 3)


def test_reseed_empty_hand_example():
    labels = torch.tensor([[0, 0, 0, 2, 2]])
    fit = torch.tensor([[0.9, 0.1, 0.5, 0.8, 0.2]])
    out = vmtc.reseed_empty(labels, fit, 4)
    # clusters 1 and 3 are empty; non-anchors by rising fit: point 1 (0.1), point 4 (0.2)
    assert out.tolist() == [[0, 1, 0, 2, 3]]
    assert torch.equal(vmtc.reseed_empty(out, fit, 4), out)  # nothing empty: unchanged


def test_kmeans_init_is_deterministic_and_spread():
    assert vmtc.kmeans_init(10, 4).tolist() == [1, 3, 6, 8]
    assert vmtc.kmeans_init(5, 5).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_merge_matches_reference(mode):
    g = _gen(5)
    x = torch.randn(2, 12, 4, generator=g)
    labels = torch.randint(0, 3, (2, 12), generator=g)
    labels[:, :3] = torch.arange(3)
    w = torch.rand(2, 12, generator=g) + 0.01
    got = vmtc.merge_clusters(x, labels, w, 3, mode)
    for b in range(2):
        want = torch.tensor(ref.merge(x[b].tolist(), labels[b].tolist(), w[b].tolist(), 3, mode), dtype=torch.float32)
        torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-6)


def test_merge_mean_of_one_member_is_that_member():
    x = torch.randn(1, 3, 4)
    got = vmtc.merge_clusters(x, torch.tensor([[2, 0, 1]]), torch.tensor([[0.5, 0.2, 0.1]]), 3)
    torch.testing.assert_close(got[0], x[0, [1, 2, 0]])
    with pytest.raises(ValueError, match="merge mode"):
        vmtc.merge_clusters(x, torch.tensor([[0, 0, 0]]), torch.ones(1, 3), 1, "max")


@pytest.mark.parametrize("n,target,stages,frac,prune", [
    (576, 0.5, 4, 0.125, False), (576, 64, 4, 0.125, False), (576, 36, 3, 0.0, False),
    (576, 0.5, 1, 0.125, True), (64, 0.25, 2, 0.5, False), (64, 1.0, 2, 0.125, False), (10, 9, 4, 0.2, False),
])
def test_schedule_matches_reference(n, target, stages, frac, prune):
    got = vmtc.stage_schedule(n, target, stages, frac, prune)
    assert [(s.n_in, s.keep, s.clusters) for s in got] == ref.schedule(n, target, stages, frac, prune)
    want_final = n if target == 1.0 else (round(n * target) if isinstance(target, float) else target)
    assert got[-1].n_out == want_final
    assert all(s.n_out <= s.n_in for s in got)


def test_schedule_llava_geometry_counts():
    assert vmtc.stage_schedule(576, 0.5, 4, 0.125)[-1].n_out == 288
    assert vmtc.stage_schedule(576, 64, 4, 0.125)[-1].n_out == 64
    assert vmtc.stage_schedule(576, 36, 4, 0.125)[-1].n_out == 36
    assert [s.n_out for s in vmtc.stage_schedule(576, 0.5, 4, 0.125)] == [484, 407, 342, 288]
    assert all(s.is_identity for s in vmtc.stage_schedule(576, 1.0, 4, 0.125))
    assert [s.clusters for s in vmtc.stage_schedule(576, 0.5, 2, 0.0)] == [1, 1]


def test_target_errors():
    with pytest.raises(ValueError, match="leaves no token"):
        vmtc.resolve_target(64, 0.001)
    with pytest.raises(ValueError, match="exceeds"):
        vmtc.resolve_target(64, 65)
    with pytest.raises(ValueError, match="stages=5"):
        vmtc.default_layers(3, 5)


def test_default_layers_end_at_last_used_layer():
    assert vmtc.default_layers(23, 4) == [4, 10, 16, 22]
    assert vmtc.default_layers(23, 1) == [22]
    assert vmtc.default_layers(3, 3) == [0, 1, 2]


def _compress_reference(z, imp, stage, iters, mode, prune):
    patches = z[1:]
    p, r = ref.primary(imp.tolist(), stage.keep)
    rows = [z[0].tolist()] + [patches[i].tolist() for i in p]
    if not prune and stage.clusters:
        pts = [patches[i].tolist() for i in r]
        labels = ref.kmeans(pts, stage.clusters, iters)
        rows += ref.merge(pts, labels, [float(imp[i]) for i in r], stage.clusters, mode)
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("prune", [False, True])
def test_compress_matches_reference_and_batch1(prune):
    g = _gen(6)
    z = torch.randn(3, 1 + 30, 8, generator=g)
    imp = torch.rand(3, 30, generator=g)
    stage = vmtc.Stage(30, 12, 0 if prune else 4)
    out, rec = vmtc.compress(z, imp, stage, 5, "mean", prune)
    assert out.shape == (3, 1 + stage.keep + stage.clusters, 8)
    for b in range(3):
        torch.testing.assert_close(out[b], _compress_reference(z[b], imp[b], stage, 5, "mean", prune),
                                   rtol=1e-5, atol=1e-5)
        single, _ = vmtc.compress(z[b:b + 1], imp[b:b + 1], stage, 5, "mean", prune)
        torch.testing.assert_close(out[b:b + 1], single, rtol=0, atol=1e-6)
    assert rec.primary.shape == (3, 12) and rec.labels.shape == ((3, 0) if prune else (3, 18))


def test_compress_bf16():
    g = _gen(7)
    z = torch.randn(2, 17, 8, generator=g).bfloat16()
    imp = torch.rand(2, 16, generator=g)
    out, _ = vmtc.compress(z, imp, vmtc.Stage(16, 5, 3), 4)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 9, 8)
    ref32, _ = vmtc.compress(z.float(), imp, vmtc.Stage(16, 5, 3), 4)
    torch.testing.assert_close(out.float(), ref32, rtol=2e-2, atol=2e-2)


def test_owners_after_tracks_patches():
    rec = vmtc.StageRecord(importance=torch.zeros(1, 5), primary=torch.tensor([[1, 3]]),
                           redundant=torch.tensor([[0, 2, 4]]), labels=torch.tensor([[1, 0, 1]]))
    owner = torch.arange(5).unsqueeze(0)
    assert vmtc.owners_after(owner, rec).tolist() == [[3, 0, 2, 1, 3]]
    pruned = vmtc.StageRecord(rec.importance, rec.primary, rec.redundant, torch.zeros(1, 0, dtype=torch.long))
    assert vmtc.owners_after(owner, pruned).tolist() == [[-1, 0, -1, 1, -1]]
