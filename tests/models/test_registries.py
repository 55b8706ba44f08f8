"""The two registries: model families (focusvlm.models) and methods (focusvlm.methods).

A method defined here, in one class, must be usable everywhere a built-in one
is (FocusConfig, YAML, patch, the processor count, bench's --methods): that is
the promise "a new method is one module plus a registration".
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from focusvlm import ConfigError, FocusConfig, UnsupportedModelError, patch, unpatch
from focusvlm.methods import UnknownMethodError, VisionMethod, all_methods, get_method, register_method
from focusvlm.models import adapter_for, adapter_for_preset, adapter_for_type, adapter_named, list_families
from focusvlm.models.factory import random_llava
from helpers import make_inputs


@dataclasses.dataclass(frozen=True)
class KeepFirstConfig:
    count: int = 9

    def __post_init__(self):
        if self.count < 1:
            raise ConfigError(f"KeepFirstConfig.count: must be >= 1, got {self.count}")


@register_method
class KeepFirst(VisionMethod):
    """A toy vision method: keep the first ``count`` patch features (raster order)."""

    name = "keepfirst"
    config_class = KeepFirstConfig
    cli_arg = "count"

    def __init__(self, model, adapter, config, processor=None):
        super().__init__(model, adapter, config, processor)
        self._undo = adapter.reduce_projector_input(model, lambda x: x[:, :config.count])

    def output_patches(self, grid):
        return min(self.config.count, grid[0] * grid[1])

    def remove(self, processor=None):
        self._undo()


def test_builtin_methods_are_registered_with_their_sides():
    methods = all_methods()
    assert {"cmai", "vmtc", "spd", "prumerge"} <= set(methods)
    assert methods["cmai"].side == "llm"
    assert {methods[n].side for n in ("vmtc", "spd", "prumerge")} == {"vision"}


def test_unknown_method_is_named_with_the_known_ones():
    with pytest.raises(UnknownMethodError, match=r"unknown method 'visonzip'; known: cmai, vmtc"):
        get_method("visonzip")
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['nope'\]; known: \[.*'cmai'.*\]"):
        FocusConfig.from_dict({"nope": {}})
    from focusvlm.bench.arms import parse_arm

    with pytest.raises(ValueError, match=r"unknown benchmark method 'nope:3'; known: stock, eager, cmai\[:gamma_max\]"):
        parse_arm("nope:3")


def test_a_plugin_method_works_everywhere_a_builtin_does(tmp_path):
    cfg = FocusConfig(keepfirst=KeepFirstConfig(count=5))
    assert cfg.keepfirst.count == 5 and cfg.vision == cfg.keepfirst and cfg.active == ["keepfirst"]
    path = tmp_path / "c.yaml"
    cfg.save(path)
    assert FocusConfig.load(path) == cfg
    from focusvlm.bench.arms import parse_arm

    assert parse_arm("keepfirst:7+cmai").config.keepfirst == KeepFirstConfig(count=7)
    with pytest.raises(ConfigError, match="only one vision-side reduction at a time, got vmtc and keepfirst"):
        FocusConfig(vmtc={}, keepfirst={})

    model = random_llava("tiny")
    handle = patch(model, cfg)
    try:
        assert handle.image_tokens() == 5
        inputs = make_inputs(model, [[2, "img", 3]], image_tokens=5)
        with torch.no_grad():
            assert model(**inputs).logits.shape[1] == 10
    finally:
        unpatch(model)
    assert "forward" not in model.model.multi_modal_projector.__dict__


def test_family_registry_finds_llava_by_model_class_type_and_preset():
    model = random_llava("tiny")
    assert adapter_for(model).name == "llava" and adapter_for(model.model).name == "llava"
    assert adapter_for_type("llava") is adapter_named("llava")
    assert adapter_for_preset("tiny").name == "llava"
    assert "llava" in [a.name for a in list_families()]


def test_unknown_family_names_the_supported_ones():
    with pytest.raises(UnsupportedModelError, match=r"no adapter for Linear .*supported: LLaVA-1.5 \(model_type llava\)"):
        adapter_for(torch.nn.Linear(2, 2))
    with pytest.raises(UnsupportedModelError, match="no adapter for model_type 'blip-2'; supported: "):
        adapter_for_type("blip-2")
    with pytest.raises(ValueError, match="unknown preset 'huge'; known: tiny, mid"):
        adapter_for_preset("huge")
    with pytest.raises(UnsupportedModelError, match="unknown model family 'blip'"):
        adapter_named("blip")


def test_focus_config_is_immutable_and_replace_returns_a_copy():
    from focusvlm import CMAIConfig

    cfg = FocusConfig(cmai=CMAIConfig(gamma_max=0.5))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.cmai = None
    other = cfg.replace(cmai=None, spd={"factor": 3})
    assert cfg.cmai.gamma_max == 0.5 and other.cmai is None and other.spd.factor == 3
    assert hash(cfg) == hash(FocusConfig(cmai={"gamma_max": 0.5}))
    assert cfg.describe() == "cmai(gamma_max=0.5)" and FocusConfig().describe().startswith("stock")
