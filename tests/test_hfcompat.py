"""The transformers boundary (focusvlm.hfcompat): renamed arguments read under both names, the cache handed
under the name this version declares, the past length from the cache object; and the early-warning net
(tests/deprecations.py) that fails a test whose call transformers reports as deprecated."""

from __future__ import annotations

import inspect
import traceback
import warnings

import pytest
import torch
import transformers
from deprecations import RECORDER, caller_of_warning, is_ours
from packaging.version import Version

from focusvlm import hfcompat
from focusvlm.models.llava import random_llava


def test_cache_argument_name_is_the_one_this_version_declares():
    declared = inspect.signature(transformers.LlavaForConditionalGeneration.forward).parameters
    assert hfcompat.CACHE_ARG in declared
    # 5.24 renamed past_key_values to cache; the feature test and the release agree on the versions tested
    expected = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"
    assert hfcompat.CACHE_ARG == expected


@pytest.mark.parametrize("name", hfcompat.CACHE_NAMES)
def test_cache_is_read_under_either_name(name):
    marker = object()
    assert hfcompat.cache_of({name: marker}) is marker
    assert hfcompat.cache_of({"attention_mask": None}) is None
    assert hfcompat.decoder_layer_inputs((torch.zeros(1),), {name: marker})["cache"] is marker


def test_replacing_the_cache_keeps_the_name_the_call_used():
    _, kwargs = hfcompat.replace_decoder_layer_inputs((), {"past_key_values": 1}, cache=2)
    assert kwargs == {"past_key_values": 2}
    _, kwargs = hfcompat.replace_decoder_layer_inputs((), {}, cache=3)
    assert kwargs == {hfcompat.CACHE_ARG: 3}
    with pytest.raises(ValueError, match="unknown decoder-layer inputs"):
        hfcompat.replace_decoder_layer_inputs((), {}, positions=1)


def test_cached_decoding_through_the_boundary_matches_a_full_forward():
    model = random_llava("tiny", seed=0).eval()
    ids = torch.randint(0, 100, (1, 7))
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1]
        out = model(input_ids=ids[:, :6], use_cache=True)
        cache = hfcompat.output_cache(out)
        assert hfcompat.past_length(cache) == 6
        step = model(input_ids=ids[:, 6:], **hfcompat.cache_kwargs(cache), use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def test_positional_arguments_are_bound_by_the_modules_own_signature():
    model = random_llava("tiny", seed=0)
    core = model.model
    order = [p for p in inspect.signature(type(core).forward).parameters if p != "self"]
    args = tuple(range(len(order[:5])))
    bound = hfcompat.bound_arguments(core, args, {"use_cache": True})
    assert [bound[name] for name in order[:5]] == list(args) and bound["use_cache"] is True


def test_past_length_without_a_cache_comes_from_cache_position():
    assert hfcompat.past_length(None) == 0
    assert int(hfcompat.past_length(None, torch.arange(5, 8))) == 5


def test_checkpointing_is_switched_on_without_a_deprecation():
    model = random_llava("tiny", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        hfcompat.enable_checkpointing(model, checkpoint_kwargs={"use_reentrant": False})
    assert hfcompat.is_checkpointing(model)


# ----------------------------------------------------------------------------- the early-warning net

def _frame(path: str) -> traceback.FrameSummary:
    return traceback.FrameSummary(path, 1, "f")


SITE = "/venv/lib/python3.11/site-packages"


def test_a_deprecation_from_our_call_is_ours_and_one_from_another_library_is_not():
    ours = hfcompat.__file__
    # stacks are outermost first, as traceback.extract_stack returns them
    assert is_ours(caller_of_warning([_frame(ours), _frame(f"{SITE}/torch/nn/modules/module.py"),
                                      _frame(f"{SITE}/transformers/utils/deprecation.py")]))
    assert not is_ours(caller_of_warning([_frame(ours), _frame(f"{SITE}/peft/tuners/lora.py"),
                                          _frame(f"{SITE}/transformers/modeling_utils.py")]))
    # a warning no watched library raised is not this net's business
    assert caller_of_warning([_frame(ours), _frame(f"{SITE}/numpy/core.py")]) is None


def test_the_net_catches_a_deprecated_keyword_that_we_pass():
    from transformers.utils.deprecation import deprecate_kwarg

    def renamed(new=None):
        return new

    # as if transformers defined it: the decorated function's frames must count as the library's
    renamed = deprecate_kwarg("old", "99.0", new_name="new")(renamed)
    RECORDER.take()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _call_through_transformers(renamed, old=1) == 1
    found = RECORDER.take()   # taken here, so the autouse net does not fail this test for it
    assert any("`old` is deprecated" in line and "test_hfcompat.py" in line for line in found), found


def _call_through_transformers(function, **kwargs):
    return function(**kwargs)
