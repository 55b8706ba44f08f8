"""Unsupported modes fail loudly with an explanation, never silently wrong."""

import pytest
import torch

from focusvlm import hfcompat

from focusvlm import CMAIConfig, ConfigError, FocusConfig, patch, patched, unpatch
from focusvlm.inhibit.state import CMAIStateError
from focusvlm.models.factory import random_llava
from focusvlm.models.llava import UnsupportedModelError
from helpers import make_inputs

CMAI = FocusConfig(cmai=CMAIConfig())


@pytest.fixture(scope="module")
def model():
    return random_llava("tiny", seed=0)


def test_unknown_model_family_is_rejected():
    with pytest.raises(UnsupportedModelError, match="no adapter for Linear.*supported: LLaVA-1.5"):
        patch(torch.nn.Linear(2, 2), CMAI)


def test_patch_needs_a_focus_config(model):
    with pytest.raises(ConfigError, match="needs a FocusConfig"):
        patch(model, {"cmai": {}})


def test_double_patch_is_refused_and_unpatch_is_idempotent(model):
    with patched(model, CMAI):
        with pytest.raises(RuntimeError, match="already patched"):
            patch(model, CMAI)
    unpatch(model)  # no-op on a stock model
    assert model.config.text_config._attn_implementation == "sdpa"


def test_beam_search_is_refused(model):
    inputs = make_inputs(model, [[3, "img", 4]])
    with patched(model, CMAI), pytest.raises(NotImplementedError, match="beam search"):
        model.generate(**inputs, num_beams=2, max_new_tokens=2)


def test_static_cache_is_accepted_and_evicting_caches_are_refused(model):
    # a static cache works since issue 12 (tests/inhibit/test_cmai_static_compile.py checks its outputs)
    inputs = make_inputs(model, [[3, "img", 4]])
    with patched(model, CMAI), torch.no_grad():
        static = model.generate(**inputs, cache_implementation="static", max_new_tokens=2, do_sample=False)
        dynamic = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert torch.equal(static, dynamic)
        with pytest.raises(NotImplementedError, match="sliding_window"):
            model.generate(**inputs, cache_implementation="sliding_window", max_new_tokens=2)


def test_contrastive_search_is_refused(model):
    inputs = make_inputs(model, [[3, "img", 4]])
    with patched(model, CMAI), pytest.raises(NotImplementedError, match="contrastive"):
        model.generate(**inputs, penalty_alpha=0.5, top_k=4, max_new_tokens=2)


def test_inputs_embeds_without_image_positions_is_refused(model):
    inputs = make_inputs(model, [[3, "img", 4]])
    with torch.no_grad():
        merged = model.model(**inputs, output_hidden_states=True).hidden_states[0]
    with patched(model, CMAI), pytest.raises(CMAIStateError, match="inputs_embeds-only"):
        model(inputs_embeds=merged, attention_mask=inputs["attention_mask"])


def test_inputs_embeds_with_image_token_embeddings_works(model):
    inputs = make_inputs(model, [[3, "img", 4]])
    with torch.no_grad(), patched(model, CMAI):
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        from_embeds = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                            pixel_values=inputs["pixel_values"]).logits
        from_ids = model(**inputs).logits
    assert torch.allclose(from_embeds, from_ids, atol=1e-6)


def test_cache_from_another_sequence_is_refused(model):
    inputs = make_inputs(model, [[3, "img", 4]])
    other = make_inputs(model, [[3, "img", 9]], seed=3)
    with torch.no_grad(), patched(model, CMAI):
        past = hfcompat.output_cache(model(**other, use_cache=True))
        model(**inputs, use_cache=True)  # the state now tracks a shorter sequence
        with pytest.raises(CMAIStateError, match="cache"):
            model(input_ids=inputs["input_ids"][:, :1], attention_mask=torch.ones(1, past.get_seq_length() + 1,
                  dtype=torch.long), **hfcompat.cache_kwargs(past))


def test_torch_compile_fullgraph_is_refused(model):
    inputs = make_inputs(model, [[3, "img", 4]])
    with patched(model, CMAI):
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        with pytest.raises(Exception, match="torch.compile"):
            with torch.no_grad():
                compiled(**inputs)
    torch._dynamo.reset()


def test_bare_llava_model_can_be_patched(model):
    core = model.model
    inputs = make_inputs(model, [[3, "img", 4]])
    with torch.no_grad():
        stock = core(**inputs).last_hidden_state
        with patched(core, CMAI):
            changed = core(**inputs).last_hidden_state
        after = core(**inputs).last_hidden_state
    assert not torch.equal(stock, changed)
    assert torch.equal(stock, after)
