"""CMAI wired into any decoder-only LLM behind a family adapter (no family specifics here).

How (checked on transformers 5.23):
* an attention function registered with ``AttentionInterface`` under one name
  per stock implementation (``focusvlm_cmai_sdpa`` ...), together with the
  mask function that implementation uses (without a registered mask function
  the model would silently run with no causal mask);
* the language model's sub-config switched to it (the adapter knows how);
* a forward pre-hook on the module that receives the call's inputs (the
  adapter names it) records the token types of every call: ``generate()``
  rejects unknown kwargs, so nothing can travel as kwargs;
* a guard around ``generate`` for decoding modes the cached rows cannot follow.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention import LayerLink, cmai_attention_forward
from .state import CMAIState, CMAIStateError

COMPILE_ERROR = ("focusvlm CMAI cannot run under torch.compile: it picks text rows with data-dependent "
                 "shapes. Compile the model without patching, or unpatch first.")
_REGISTERED: set[str] = set()


def stock_attention(implementation: str, module: torch.nn.Module) -> Callable:
    """The attention function the model would call without CMAI (eager lives in the family's module)."""
    from ..models import UnsupportedModelError

    if implementation == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    if implementation not in ALL_ATTENTION_FUNCTIONS:
        raise UnsupportedModelError(f"unknown attention implementation {implementation!r}")
    return ALL_ATTENTION_FUNCTIONS[implementation]


def register_attention(implementation: str) -> str:
    """Register the CMAI attention + mask pair for one stock implementation, once per process."""
    name = f"focusvlm_cmai_{implementation}"
    if name not in _REGISTERED:
        mask_fn = ALL_MASK_ATTENTION_FUNCTIONS.get(implementation) or ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
        AttentionInterface.register(name, cmai_attention_forward)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask_fn)
        _REGISTERED.add(name)
    return name


def past_length(past_key_values: Any) -> int:
    """Positions already in the cache (0 without one)."""
    if past_key_values is None:
        return 0
    from transformers.cache_utils import StaticCache

    if isinstance(past_key_values, StaticCache):
        raise NotImplementedError("focusvlm CMAI does not support a static cache (its fixed-length keys hide which "
                                  "positions are filled); use the default dynamic cache.")
    return int(past_key_values.get_seq_length())


class CMAIBinding:
    """CMAI switched on for one model; ``remove`` restores the stock model exactly."""

    def __init__(self, model: torch.nn.Module, adapter: Any, gammas: list[float], focus: str, discount: float):
        self.model, self.adapter = model, adapter
        modules = adapter.decoder_attention_modules(model)
        if len(gammas) != len(modules):
            raise ValueError(f"{len(gammas)} gammas for {len(modules)} decoder layers")
        self.original = adapter.text_attn_implementation(model)
        self.state = CMAIState(focus, discount)
        name = register_attention(self.original)
        for module, gamma in zip(modules, gammas):
            module._focusvlm_cmai = LayerLink(self.state, gamma, stock_attention(self.original, module))
        self.modules = modules
        adapter.set_text_attn_implementation(model, name)
        self.hook = adapter.call_module(model).register_forward_pre_hook(self._before_forward, with_kwargs=True)

    def _before_forward(self, module, args, kwargs):
        if torch.compiler.is_compiling():
            raise RuntimeError(COMPILE_ERROR)
        call = self.adapter.call_inputs(module, args, kwargs)
        past = past_length(call.past_key_values)
        self.state.begin_call(call.image_mask, call.attention_mask, past)
        return None

    def remove(self) -> None:
        self.hook.remove()
        for module in self.modules:
            del module._focusvlm_cmai
        self.adapter.set_text_attn_implementation(self.model, self.original)
        self.state.reset()


# --------------------------------------------------------------------------- generate guard

def guard_generate(model: torch.nn.Module) -> None:
    """Refuse decoding modes whose cache handling CMAI cannot follow."""
    if "generate" in model.__dict__ or not hasattr(type(model), "generate"):
        return  # already guarded, or a bare core model that cannot generate
    original = type(model).generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        config = kwargs.get("generation_config") or model.generation_config
        beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
        if beams > 1:
            raise NotImplementedError("focusvlm CMAI does not support beam search (num_beams > 1): the cached text "
                                      "rows would need reordering with the beams. Use greedy or sampling.")
        cache_impl = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
        if cache_impl in ("static", "hybrid", "sliding_window", "offloaded_static"):
            raise NotImplementedError(f"focusvlm CMAI does not support cache_implementation={cache_impl!r}; "
                                      "use the default dynamic cache.")
        if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens") or \
                (kwargs.get("penalty_alpha") or 0) > 0:
            raise NotImplementedError("focusvlm CMAI does not support assisted or contrastive decoding: "
                                      "both roll the cache back.")
        return original(model, *args, **kwargs)

    model.generate = generate


def unguard_generate(model: torch.nn.Module) -> None:
    model.__dict__.pop("generate", None)


__all__ = ["CMAIBinding", "CMAIStateError", "COMPILE_ERROR", "guard_generate", "unguard_generate",
           "past_length", "register_attention", "stock_attention"]
