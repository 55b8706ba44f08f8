"""CMAI wired into any decoder-only LLM behind a family adapter (no family specifics here).

How (transformers' internals reached through ``focusvlm.hfcompat``):
* an attention function registered with ``AttentionInterface`` under one name
  per stock implementation (``focusvlm_cmai_sdpa`` ...), together with the
  mask function that implementation uses (without a registered mask function
  the model would silently run with no causal mask);
* the language model's sub-config switched to it (the adapter knows how);
* a forward pre-hook on the module that receives the call's inputs (the
  adapter names it) records the token types of every call and builds the
  call's plan: ``generate()`` rejects unknown kwargs, so the user's call
  cannot carry it;
* a forward pre-hook on the language model adds that plan to the keyword
  arguments the language model hands every layer (and so its attention
  function), which also makes a recomputed (checkpointed) layer see its own
  call's plan;
* a guard around ``generate`` for decoding modes the cached rows cannot
  follow (beam search reorders them, assisted and contrastive decoding roll
  the cache back, sliding-window caches evict keys).

Static caches and ``torch.compile(fullgraph=True)`` decode steps work: the
text-row store is preallocated to the cache length and a decode step's plan
has fixed shapes and no host synchronisation. A prefill plan has
data-dependent shapes, so a prefill runs eagerly (transformers' generate
compiles only the decode steps).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from .. import hfcompat
from ..hfcompat import past_length, static_capacity
from .attention import PLAN_KWARG, LayerLink, cmai_attention_forward
from ..methods import COMPILED_ATTR
from .state import CMAIState, CMAIStateError

_REGISTERED: set[str] = set()


def stock_attention(implementation: str, module: torch.nn.Module) -> Callable:
    """The attention function the model would call without CMAI (eager lives in the family's module)."""
    from ..models import UnsupportedModelError

    function = hfcompat.stock_attention(implementation, module)
    if function is None:
        raise UnsupportedModelError(f"unknown attention implementation {implementation!r}")
    return function


def register_attention(implementation: str) -> str:
    """Register the CMAI attention + mask pair for one stock implementation, once per process."""
    name = f"focusvlm_cmai_{implementation}"
    if name not in _REGISTERED:
        hfcompat.register_attention(name, cmai_attention_forward, like=implementation)
        _REGISTERED.add(name)
    return name


def language_model(adapter: Any, model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack whose forward hands its keyword arguments to every layer's attention."""
    from ..models import UnsupportedModelError

    lm = getattr(adapter.core(model), "language_model", None)
    if lm is None:
        raise UnsupportedModelError(f"{type(model).__name__}: no `language_model` to hand CMAI's call plan to")
    return lm


class CMAIBinding:
    """CMAI switched on for one model; ``remove`` restores the stock model exactly."""

    def __init__(self, model: torch.nn.Module, adapter: Any, gammas: list[float], focus: str, discount: float):
        self.model, self.adapter = model, adapter
        modules = adapter.decoder_attention_modules(model)
        if len(gammas) != len(modules):
            raise ValueError(f"{len(gammas)} gammas for {len(modules)} decoder layers")
        self.original = adapter.text_attn_implementation(model)
        heads = getattr(getattr(modules[0], "config", None), "num_attention_heads", None) or 32
        self.state = CMAIState(focus, discount, gammas, num_heads=int(heads))
        name = register_attention(self.original)
        for module, gamma in zip(modules, gammas):
            module._focusvlm_cmai = LayerLink(self.state, gamma, stock_attention(self.original, module), self.original)
        self.modules = modules
        adapter.set_text_attn_implementation(model, name)
        self.hooks = [
            adapter.call_module(model).register_forward_pre_hook(self._before_forward, with_kwargs=True),
            # the plan rides along as a keyword argument: a layer recomputed under gradient checkpointing gets
            # the arguments of its own call, so it reads its own call's plan, never a later one
            language_model(adapter, model).register_forward_pre_hook(self._hand_plan, with_kwargs=True),
            language_model(adapter, model).register_forward_hook(self._release_scratch),
        ]

    def _before_forward(self, module, args, kwargs):
        call = self.adapter.call_inputs(module, args, kwargs)
        cache = call.cache
        # rows are kept for a later call only when this one can leave a cache behind
        keep = not module.training and kwargs.get("use_cache") is not False
        # compile_model's mark: the per-layer prefill math runs through its regionally compiled form
        mark = getattr(self.model, COMPILED_ATTR, None) or {}
        self.state.compiled_prefill = mark.get("backend") if mark.get("prefill") else None
        self.state.begin_call(call.image_mask, call.attention_mask, past_length(cache),
                              max_cache_len=static_capacity(cache), keep_rows=keep)
        return None

    def _hand_plan(self, module, args, kwargs):
        return args, {**kwargs, PLAN_KWARG: self.state.plan}

    def _release_scratch(self, module, args, output):
        # the masks a call's layers shared are dead once the last layer ran; the plan itself stays (the
        # state keeps the latest one) and must not keep them alive through the next decode steps
        if self.state.plan is not None:
            self.state.plan.workspace.masks.clear()
        if torch.compiler.is_compiling():
            # a compiled step leaves no tensor of its own in a Python object: each one would be a graph output,
            # and those that are views of an input AOTAutograd replays on the host after the graph (3 ops per
            # decode step). The plan is the call's only such object.
            self.state.plan = None
        return None

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for module in self.modules:
            del module._focusvlm_cmai
        self.adapter.set_text_attn_implementation(self.model, self.original)
        self.state.reset()


# --------------------------------------------------------------------------- generate guard

# caches that drop old keys: a key's slot would stop being its position, which CMAI indexes by
EVICTING_CACHES = ("sliding_window", "hybrid", "hybrid_chunked")


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
        if cache_impl in EVICTING_CACHES:
            raise NotImplementedError(f"focusvlm CMAI does not support cache_implementation={cache_impl!r}: it "
                                      "evicts old keys, so key slots stop being positions. Use the default dynamic "
                                      "cache or 'static'.")
        if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens") or \
                (kwargs.get("penalty_alpha") or 0) > 0:
            raise NotImplementedError("focusvlm CMAI does not support assisted or contrastive decoding: "
                                      "both roll the cache back.")
        return original(model, *args, **kwargs)

    model.generate = generate


def unguard_generate(model: torch.nn.Module) -> None:
    model.__dict__.pop("generate", None)


__all__ = ["CMAIBinding", "CMAIStateError", "EVICTING_CACHES", "guard_generate", "language_model", "past_length",
           "register_attention", "static_capacity", "stock_attention", "unguard_generate"]
