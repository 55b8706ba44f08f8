"""Validation of the vision-side configs (VMTC, SPD, PruMerge): every bad value names its field."""

import pytest

from focusvlm import ConfigError, FocusConfig, PruMergeConfig, SPDConfig, VMTCConfig


def test_vmtc_defaults_and_round_trip():
    cfg = VMTCConfig()
    assert (cfg.target, cfg.stages, cfg.layers, cfg.cluster_frac, cfg.kmeans_iters, cfg.merge) == \
        (0.5, 4, None, 0.125, 10, "mean")
    full = FocusConfig(vmtc=VMTCConfig(target=64, layers=(20, 4, 10), merge="sum"))
    assert full.vmtc.layers == (4, 10, 20)
    assert FocusConfig.from_dict(full.to_dict()) == full
    assert VMTCConfig(target=64.0).target == 64 and isinstance(VMTCConfig(target=64.0).target, int)


@pytest.mark.parametrize("kwargs,field", [
    (dict(target=0), "target"), (dict(target=-0.5), "target"), (dict(target=2.5), "target"),
    (dict(target=True), "target"), (dict(stages=0), "stages"), (dict(layers=()), "layers"),
    (dict(layers=(1, 1)), "layers"), (dict(layers=(-1,)), "layers"), (dict(cluster_frac=1.5), "cluster_frac"),
    (dict(kmeans_iters=0), "kmeans_iters"), (dict(merge="max"), "merge"), (dict(prune_only=1), "prune_only"),
    (dict(prune_only=True, merge="sum"), "merge"), (dict(layers=(1, 2), stages=3), "stages"),
])
def test_vmtc_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"VMTCConfig.{field}"):
        VMTCConfig(**kwargs)


def test_vmtc_ablation_rows():
    assert VMTCConfig.ablation("last_layer_prune").stages == 1
    assert VMTCConfig.ablation("last_layer_prune").prune_only
    assert VMTCConfig.ablation("layerwise_prune", stages=3) == VMTCConfig(stages=3, prune_only=True)
    assert VMTCConfig.ablation("single_merge").cluster_frac == 0.0
    assert VMTCConfig.ablation("cluster_merge", target=64) == VMTCConfig(target=64)
    with pytest.raises(ConfigError, match="unknown row"):
        VMTCConfig.ablation("everything")


@pytest.mark.parametrize("factor", [0, -2, 1.5, True])
def test_spd_bad_factor(factor):
    with pytest.raises(ConfigError, match="SPDConfig.factor"):
        SPDConfig(factor=factor)


@pytest.mark.parametrize("kwargs,field", [
    (dict(budget=0), "budget"), (dict(budget=3.5), "budget"), (dict(budget=True), "budget"),
    (dict(neighbours=0), "neighbours"), (dict(plus="yes"), "plus"),
])
def test_prumerge_bad_values(kwargs, field):
    with pytest.raises(ConfigError, match=f"PruMergeConfig.{field}"):
        PruMergeConfig(**kwargs)


def test_one_vision_reduction_at_a_time():
    with pytest.raises(ConfigError, match="only one vision-side reduction"):
        FocusConfig(vmtc=VMTCConfig(), spd=SPDConfig())
    with pytest.raises(ConfigError, match="only one vision-side reduction"):
        FocusConfig(spd=SPDConfig(), prumerge=PruMergeConfig(budget=64))
    assert FocusConfig(prumerge=PruMergeConfig(budget=0.25, plus=True)).vision.plus
