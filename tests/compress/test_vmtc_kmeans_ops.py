"""VMTC's batched K-means against loop versions, and its pinned op counts.

tests/reference/vmtc_kmeans_loop.py keeps the functions as they were before the rewrite (re-seeding
in every iteration with a one-hot, a masked arg-max, two sorts, a gather and a scatter: 40 ops per
K-means iteration), and today's rule as a loop (``spherical_kmeans_reseed_last``: re-seeding once,
after the last assignment; a centre left empty in between stays where it was). The batched code must
return the SAME labels and merged tokens (torch.equal, not a tolerance) as that loop on inputs that
empty clusters out: duplicated points, fewer distinct points than clusters, all points equal, zero
rows, exact ties, batches that mix these. Where no cluster empties before the last assignment (every
VMTC stage of the `tiny` and `mid` presets, checked) it must also equal the version before the
rewrite. Similarities near a tie decide labels, so equality needs the same float arithmetic in the
same order (normalise, bmm, member sums in index order); these tests check that it is.

Op counts are top-level aten ops (focusvlm.bench.opcount, the counter of `focusvlm bench
--count-ops`), deterministic on CPU; the bounds below are today's counts for preset `mid`, batch 1.
Run this file as a script to print them.
"""

import pytest
import torch

from focusvlm.bench.opcount import top_level_aten_ops
from focusvlm.compress import vmtc, vmtc_method
from reference import vmtc_kmeans_loop as old

ITERS = (1, 2, 3, 10)

# pinned upper bounds (preset mid, batch 1, CPU); before the rewrite: 40 / 455 / +1,872
OPS_PER_KMEANS_ITERATION = 7
OPS_PER_STAGE = 115          # compress() of mid's first stage (576 -> 423 + 61, 10 iterations)
EXTRA_OPS_PER_TOWER = 496    # default VMTCConfig (4 stages) over the stock tower
MID_STAGE = vmtc.Stage(576, 423, 61)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def point_sets():
    """(name, x (B, m, D), clusters): K-means inputs, most of them with clusters that empty out."""
    g = _gen(0)
    cases = [(f"random {B}x{m}x{D} c={c}", torch.randn(B, m, D, generator=g), c)
             for B, m, D, c in [(1, 153, 256, 61), (3, 25, 6, 5), (4, 40, 8, 40), (2, 100, 16, 30),
                                (5, 12, 3, 6), (2, 9, 4, 1)]]
    distinct = torch.randn(3, 10, 5, generator=g)
    cases.append(("duplicated points", distinct[:, torch.randint(0, 10, (60,), generator=g)], 20))
    cases.append(("fewer distinct points than clusters", torch.randn(2, 4, 5, generator=g).repeat(1, 8, 1), 9))
    cases.append(("all points identical", torch.randn(2, 1, 7, generator=g).expand(2, 30, 7).contiguous(), 6))
    zeros = torch.zeros(2, 20, 4)
    zeros[:, ::3] = torch.randn(2, 7, 4, generator=g)
    cases.append(("zero rows", zeros, 5))
    cases.append(("lattice (exact ties)", torch.randint(-1, 2, (3, 50, 3), generator=g).float(), 12))
    pairs = torch.randn(2, 8, 6, generator=g)
    cases.append(("antipodal pairs", torch.cat([pairs, -pairs], dim=1), 5))
    mixed = torch.randn(3, 24, 8, generator=g)
    mixed[1] = mixed[1, :1]                      # one sample collapsed, one with three distinct points
    mixed[2] = mixed[2, torch.arange(24) % 3]
    cases.append(("batch mixing degenerate samples", mixed, 7))
    cases.append(("bfloat16", torch.randn(2, 40, 16, generator=g).bfloat16(), 9))
    return cases


CASES = point_sets()


@pytest.fixture
def reseed_last(monkeypatch):
    """old.compress with today's K-means rule (the loop version of it), for stage-level equality."""
    monkeypatch.setattr(old, "spherical_kmeans", old.spherical_kmeans_reseed_last)


@pytest.mark.parametrize("name,x,clusters", CASES, ids=[c[0] for c in CASES])
def test_kmeans_labels_identical_to_loop_version(name, x, clusters):
    for iters in ITERS:
        got = vmtc.spherical_kmeans(x, clusters, iters)
        assert torch.equal(got, old.spherical_kmeans_reseed_last(x, clusters, iters)), (name, iters)
        assert bool((torch.nn.functional.one_hot(got, clusters).sum(1) > 0).all())  # every cluster in use


@pytest.mark.parametrize("name,x,clusters", CASES, ids=[c[0] for c in CASES])
def test_kmeans_under_bf16_autocast_identical_to_loop_version(name, x, clusters):
    """Training runs the tower under bf16 autocast (the demo recipe): the similarities then come out in bf16."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(vmtc.spherical_kmeans(x, clusters, 3), old.spherical_kmeans_reseed_last(x, clusters, 3))


def empty_before_last(x, clusters, iters, monkeypatch):
    """How many times the version before the rewrite found an empty cluster in an iteration before its last."""
    seen = []
    original = old.reseed_empty

    def spy(labels, sim_own, clusters):
        seen.append(int((torch.nn.functional.one_hot(labels, clusters).sum(1) == 0).sum()))
        return original(labels, sim_own, clusters)

    with monkeypatch.context() as m:
        m.setattr(old, "reseed_empty", spy)
        old.spherical_kmeans(x, clusters, iters)
    return sum(seen[:-1])


def test_cases_exercise_empty_clusters_between_iterations_and_agree_where_none_empties(monkeypatch):
    """The set above is worth something only if clusters empty out before the end; where none does, re-seeding
    once or in every iteration is the same rule, so the version before the rewrite gives the same labels."""
    emptying = agreeing = 0
    for _, x, clusters in CASES:
        for iters in ITERS:
            if empty_before_last(x, clusters, iters, monkeypatch):
                emptying += 1
            else:
                agreeing += 1
                assert torch.equal(vmtc.spherical_kmeans(x, clusters, iters), old.spherical_kmeans(x, clusters, iters))
    assert emptying >= 5 and agreeing >= 10, (emptying, agreeing)


def test_reseed_empty_identical_to_loop_version():
    g = _gen(1)
    for trial in range(300):
        B = 1 + trial % 3
        m = int(torch.randint(1, 14, (1,), generator=g))
        c = int(torch.randint(1, 14, (1,), generator=g))          # c > m too: anchors must move then
        labels = torch.randint(0, c, (B, m), generator=g)
        fit = torch.randint(-3, 4, (B, m), generator=g).float() * 0.37   # many exact ties
        if trial % 5 == 0:
            fit = fit * 1e6
        assert torch.equal(vmtc.reseed_empty(labels, fit, c), old.reseed_empty(labels, fit, c)), trial


def test_kmeans_init_identical_to_float_formula():
    for m in range(1, 200):
        for c in range(1, m + 1):
            assert torch.equal(vmtc.kmeans_init(m, c), old.kmeans_init(m, c)), (m, c)
    assert torch.equal(vmtc.kmeans_init(576, 61), old.kmeans_init(576, 61))


@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_merge_identical_to_loop_version(mode):
    g = _gen(2)
    x = torch.randn(3, 30, 8, generator=g)
    labels = torch.randint(0, 6, (3, 30), generator=g)
    labels[2] = labels[2] % 4                                      # clusters 4, 5 empty in sample 2
    w = torch.rand(3, 30, generator=g)
    w[0, labels[0] == 1] = 0.0                                     # zero mass: plain-mean fallback
    w[1, labels[1] == 2] = 1e-38                                   # mass below the 1e-30 clamp
    for xs in (x, x.bfloat16()):
        got = vmtc.merge_clusters(xs, labels, w, 6, mode)
        assert torch.equal(got, old.merge_clusters(xs, labels, w, 6, mode))


def _stage_inputs():
    g = _gen(3)
    out = []
    for B, n, keep, c, prefix in [(3, 30, 12, 4, 1), (2, 64, 45, 6, 1), (1, 40, 10, 30, 0), (2, 20, 5, 15, 1)]:
        z = torch.randn(B, prefix + n, 8, generator=g)
        imp = torch.rand(B, n, generator=g)
        imp[:, ::4] = imp[:, :1]                                  # importance ties
        out.append((z, imp, vmtc.Stage(n, keep, c), prefix))
    z, imp, stage, prefix = out[0]
    out.append((z[:, torch.arange(31) % 5], imp[:, torch.arange(30) % 4], stage, prefix))  # duplicated tokens
    return out


def _assert_same_stage(z, imp, stage, iters=10, merge="mean", prune=False, prefix=1):
    got, rec = vmtc.compress(z, imp, stage, iters, merge, prune, prefix)
    want, ref = old.compress(z, imp, stage, iters, merge, prune, prefix)
    assert torch.equal(got, want)
    for field in ("importance", "primary", "redundant", "labels"):
        assert torch.equal(getattr(rec, field), getattr(ref, field)), field


@pytest.mark.parametrize("merge,prune", [("mean", False), ("sum", False), ("mean", True)])
def test_compress_identical_to_loop_version(merge, prune, reseed_last):
    for z, imp, stage, prefix in _stage_inputs():
        for iters in (1, 10):
            _assert_same_stage(z, imp, stage, iters, merge, prune, prefix)
        _assert_same_stage(z.bfloat16(), imp, stage, 10, merge, prune, prefix)


def capture_stage_inputs(preset, stages, batch=2, seed=0):
    """The (z, importance, stage) every VMTC stage of a random `preset` model gets on random pixels."""
    from focusvlm import FocusConfig, VMTCConfig, patch, unpatch
    from focusvlm.models.factory import random_llava

    model = random_llava(preset)
    seen = []
    real = vmtc_method.compress  # the method calls the function it imported from vmtc

    def record(z, importance, stage, *args, **kwargs):
        seen.append((z.clone(), importance.clone(), stage))
        return real(z, importance, stage, *args, **kwargs)

    size = model.config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=_gen(seed))
    vmtc_method.compress = record
    try:
        with pytest.warns(Warning):  # no processor passed: the placeholder-count hint
            patch(model, FocusConfig(vmtc=VMTCConfig(stages=stages)))
        with torch.no_grad():
            model.model.get_image_features(pixels, vision_feature_layer=-2, vision_feature_select_strategy="default")
    finally:
        vmtc_method.compress = real
        unpatch(model)
    return model, seen


@pytest.fixture(scope="module")
def mid_stages():
    return capture_stage_inputs("mid", 4)


def test_tiny_preset_stages_identical_to_the_version_before_the_rewrite():
    """The test presets' stages never empty a cluster before the last assignment, so today's labels are those
    of the per-iteration re-seeding the code had before issue 29 (old.compress runs that version here)."""
    _, seen = capture_stage_inputs("tiny", 3)
    assert len(seen) == 3
    for z, imp, stage in seen:
        _assert_same_stage(z, imp, stage)
        _assert_same_stage(z[:1], imp[:1], stage)


def test_mid_preset_stages_identical_to_the_version_before_the_rewrite(mid_stages):
    _, seen = mid_stages
    assert [s for _, _, s in seen][0] == MID_STAGE and len(seen) == 4
    for z, imp, stage in seen:
        _assert_same_stage(z, imp, stage)


@pytest.mark.slow
def test_compiled_stage_gives_the_same_labels(record_property):
    """torch.compile(fullgraph=True) traces a stage into one graph (a host read would break it) and, on
    the tiny preset's stage and a random set, gives the eager labels (SPEC: 0 differing in fp32).

    On duplicated points a label is decided by a last-bit difference between two equal centres, and
    inductor's own reduction order flips such ties: the share that differs there is recorded, not
    asserted (the loop version compiled differs from its eager self on the same input just as much).
    """
    torch._dynamo.reset()
    _, seen = capture_stage_inputs("tiny", 3)
    z, imp, stage = seen[0]
    got, rec = torch.compile(lambda z, imp: vmtc.compress(z, imp, stage, 10), fullgraph=True)(z, imp)
    want, ref = old.compress(z, imp, stage, 10)
    assert torch.equal(rec.labels, ref.labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    kmeans = torch.compile(vmtc.spherical_kmeans, fullgraph=True)
    for name, x, clusters in CASES:
        if name.startswith("random 2x100") or name == "duplicated points":
            labels = kmeans(x, clusters, 10)
            share = (labels != old.spherical_kmeans_reseed_last(x, clusters, 10)).float().mean().item()
            record_property(f"compiled label share differing, {name}", share)
            assert bool((torch.nn.functional.one_hot(labels, clusters).sum(1) > 0).all())
            if name.startswith("random"):
                assert share == 0.0


# --------------------------------------------------------------------------- op counts

def kmeans_iteration_ops(x=None, clusters=MID_STAGE.clusters):
    """Top-level aten ops of one K-means iteration: 3 iterations minus 2 (neither is the cheaper last)."""
    if x is None:
        x = torch.randn(1, MID_STAGE.n_in - MID_STAGE.keep, 256, generator=_gen(4))
    with torch.inference_mode():
        counts = [sum(top_level_aten_ops(lambda: vmtc.spherical_kmeans(x, clusters, it)).values()) for it in (2, 3, 4)]
    assert counts[2] - counts[1] == counts[1] - counts[0]  # a fixed sequence per iteration
    return counts[2] - counts[1]


def stage_ops(z, importance, stage=MID_STAGE, iters=10):
    with torch.inference_mode():
        return sum(top_level_aten_ops(lambda: vmtc.compress(z, importance, stage, iters)).values())


def tower_extra_ops(model):
    """Extra top-level aten ops of one image through mid's tower with the default VMTCConfig."""
    from focusvlm import FocusConfig, VMTCConfig, patch, unpatch

    size = model.config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=_gen(5))

    def tower():
        model.model.get_image_features(pixels, vision_feature_layer=-2, vision_feature_select_strategy="default")

    with torch.inference_mode():
        stock = top_level_aten_ops(tower)
        with pytest.warns(Warning):
            patch(model, FocusConfig(vmtc=VMTCConfig()))
        try:
            method = top_level_aten_ops(tower)
        finally:
            unpatch(model)
    return sum(method.values()) - sum(stock.values())


def test_kmeans_iteration_op_count():
    assert kmeans_iteration_ops() <= OPS_PER_KMEANS_ITERATION


def test_op_count_does_not_depend_on_empty_clusters():
    """The same ops run whether or not a cluster empties: no branch on values."""
    g = _gen(6)
    spread = torch.randn(1, 40, 8, generator=g)
    collapsed = spread[:, :1].expand(1, 40, 8).contiguous()
    assert kmeans_iteration_ops(spread, 7) == kmeans_iteration_ops(collapsed, 7)


def test_stage_op_count(mid_stages):
    z, imp, stage = mid_stages[1][0]
    assert stage_ops(z[:1], imp[:1], stage) <= OPS_PER_STAGE


def test_tower_extra_op_count(mid_stages):
    assert tower_extra_ops(mid_stages[0]) <= EXTRA_OPS_PER_TOWER


def test_stage_reads_nothing_back_to_the_host():
    from focusvlm.bench.opcount import HostReadCounter

    z, imp, stage, prefix = _stage_inputs()[-1]
    with torch.inference_mode(), HostReadCounter() as reads:
        vmtc.compress(z, imp, stage, 10, prefix=prefix)
        vmtc.reseed_empty(torch.zeros(2, 6, dtype=torch.long), torch.rand(2, 6), 4)
    assert not reads.counts, dict(reads.counts)


def _use_reference():
    """Swap the loop version back into focusvlm.compress.vmtc (for the 'before' counts)."""
    for name in ("cls_importance", "select_primary", "kmeans_init", "reseed_empty", "spherical_kmeans",
                 "merge_clusters", "compress"):
        setattr(vmtc, name, getattr(old, name))


if __name__ == "__main__":  # PYTHONPATH=tests:tests/bench python tests/compress/test_vmtc_kmeans_ops.py [--reference]
    import sys

    if "--reference" in sys.argv:
        _use_reference()
    model, seen = capture_stage_inputs("mid", 4)
    z, imp, stage = seen[0]
    print(f"ops per K-means iteration: {kmeans_iteration_ops()}")
    print(f"ops per stage (mid stage 1 {stage}, batch 1, 10 iterations): {stage_ops(z[:1], imp[:1], stage)}")
    print(f"extra ops per tower (mid, batch 1, default VMTCConfig): {tower_extra_ops(model)}")
