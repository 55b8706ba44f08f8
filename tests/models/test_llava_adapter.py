"""The LLaVA-1.5 adapter's own duties: typing positions per call, tower facts, undo."""

from __future__ import annotations

import pytest
import torch

from focusvlm import hfcompat

from focusvlm import CMAIConfig, ConfigError, FocusConfig, VMTCConfig, patched
from focusvlm.models import adapter_for
from focusvlm.models.factory import random_llava
from helpers import make_inputs


@pytest.fixture(scope="module")
def model():
    return random_llava("tiny")


def test_decoded_token_with_the_image_id_is_text(model):
    """A decode step carries no pixels, so a generated token equal to <image> receives no image feature."""
    inputs = make_inputs(model, [[3, "img", 4], [1, "img", 6]], seed=2)
    image_id = model.config.image_token_id
    with patched(model, FocusConfig(cmai=CMAIConfig())) as handle, torch.no_grad():
        out = model(**inputs, use_cache=True)
        state = handle.cmai.state
        before = state.store.text_count.clone()
        step = torch.full((2, 1), image_id)
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
        logits = model(input_ids=step, attention_mask=mask, **hfcompat.cache_kwargs(hfcompat.output_cache(out)), use_cache=True).logits
        assert torch.equal(state.store.text_count, before + 1)
    assert torch.isfinite(logits).all()


def test_call_inputs_types_image_positions_only_with_pixels(model):
    adapter = adapter_for(model)
    inputs = make_inputs(model, [[2, "img", 2]])
    with_pixels = adapter.call_inputs(model.model, (), inputs)
    assert int(with_pixels.image_mask.sum()) == 64
    text_only = adapter.call_inputs(model.model, (), {k: v for k, v in inputs.items() if k != "pixel_values"})
    assert not text_only.image_mask.any()


def test_tower_geometry_of_the_tiny_preset(model):
    g = adapter_for(model).tower_geometry(model)
    # 112 px / 14 px patches; LLaVA-1.5 reads hidden state -2 of 4 layers = index 3; CLS dropped
    assert (g.grid, g.patch_size, g.num_layers, g.feature_layers, g.has_cls, g.keeps_cls) == \
        ((8, 8), 14, 4, (3,), True, False)
    assert g.layers_before_features == 3


def test_integer_target_one_is_refused_with_what_to_write():
    with pytest.raises(ConfigError, match="the integer 1 is ambiguous: write 1.0 to keep every patch"):
        VMTCConfig(target=1)
    assert VMTCConfig(target=1.0).target == 1.0
    assert FocusConfig.from_dict({"vmtc": {"target": 2}}).vmtc.target == 2


def test_bench_fits_vmtc_stages_to_the_adapter_geometry(model):
    from focusvlm.bench.arms import parse_arm
    from focusvlm.bench.setup import fit_arm

    fitted = fit_arm(model, parse_arm("vmtc"))
    assert fitted.config.vmtc.stages == 3  # 4 stages asked, 3 layers run before the feature layer
    with patched(model, fitted.config) as handle:
        assert handle.vision.layers == [0, 1, 2]
