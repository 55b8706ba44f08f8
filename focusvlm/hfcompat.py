"""The one boundary between focusvlm and transformers' internals.

Everything focusvlm needs from transformers beyond its public, stable API
(model and processor classes, ``from_pretrained``, ``generate``, the Trainer)
is reached through this module, so a release that renames or moves one of
these things is fixed here, once, and the version range in pyproject.toml
follows what this module has been checked against (docs/architecture.md,
"The transformers boundary", lists each contact and why it is needed).

Contacts:
* the cache argument's name (``past_key_values`` up to 5.23, ``cache`` from
  5.24; the old name is deprecated there): read under both names, passed under
  the one this version declares; the cache on a model output likewise;
* a call's arguments bound by name, whatever the positional order of the
  family's ``forward`` (it changes with renames);
* the past length and static capacity of a cache object (what every version
  hands a layer), or a ``cache_position`` where a version still passes one;
* the keyword names a decoder layer receives;
* generation hooks: the position-ids hook Qwen-VL's adapter overrides, the
  precomputed-features keyword generate() hands a prefill;
* the attention-function and mask-function registries (CMAI's attention is
  registered under its own name) and the stock attention a layer would call;
* functions that live in a family's modeling module (``eager_attention_forward``,
  ``apply_rotary_pos_emb``) and the module-level helpers some families use;
* gradient (activation) checkpointing, renamed in 5.25;
* transformers' progress bars inside the GGUF reader;
* building a model without its random initialisation, for a caller that
  loads every weight next.

Leaf module: it imports nothing of focusvlm.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from typing import Any, Callable, Iterator, Mapping

import torch
import transformers
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# the cache keyword, newest name first; a call may carry either
CACHE_NAMES = ("cache", "past_key_values")


def _declares(function: Callable, name: str) -> bool:
    return name in inspect.signature(function).parameters


# the name this version's models declare (feature test, not a version number: a backport or a revert is followed)
CACHE_ARG = "cache" if _declares(transformers.LlamaModel.forward, "cache") else "past_key_values"


def cache_of(arguments: Mapping[str, Any]) -> Any:
    """The cache a call carries, under either name (None without one)."""
    for name in CACHE_NAMES:
        value = arguments.get(name)
        if value is not None:
            return value
    return None


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """Keyword arguments that hand ``cache`` to a model's forward under this version's name."""
    return {CACHE_ARG: cache}


def output_cache(output: Any) -> Any:
    """The cache a model output carries (``output.cache`` from 5.24, ``past_key_values`` before)."""
    fields = getattr(output, "__dataclass_fields__", {})
    for name in CACHE_NAMES:
        if name in fields:
            return getattr(output, name)
    return None


# a plain dict, not functools.lru_cache: torch.compile traces through a dict lookup but warns on lru_cache
_POSITIONAL_NAMES: dict[type, tuple[str, ...]] = {}


def _positional_names(cls: type) -> tuple[str, ...]:
    names = _POSITIONAL_NAMES.get(cls)
    if names is None:
        parameters = list(inspect.signature(cls.forward).parameters.values())[1:]   # without self
        names = tuple(p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        _POSITIONAL_NAMES[cls] = names
    return names


def bound_arguments(module: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A forward call's arguments by name (positional ones named by the module's own signature)."""
    given = dict(zip(_positional_names(type(module)), args))
    given.update(kwargs)
    return given


# --------------------------------------------------------------------------- generation hooks

# the GenerationMixin method that builds a prefill's position ids before the pixels are encoded (Qwen-VL's
# 3-D rope positions); Qwen's adapter overrides it per instance so a compressed encoding comes first
POSITION_IDS_HOOK = "_prepare_position_ids_for_generation"
# the keyword under which generate() hands a prefill vision features it already computed, per modality
ENCODER_OUTPUTS_ARG = "mm_encoder_outputs"


def encoder_outputs(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The precomputed vision features a call carries ({} when none), keyed by modality ("image", "video")."""
    return arguments.get(ENCODER_OUTPUTS_ARG) or {}


# --------------------------------------------------------------------------- caches

def past_length(cache: Any, cache_position: torch.Tensor | None = None) -> int | torch.Tensor:
    """Positions already in the cache: 0 without one; a static cache answers with a 0-d tensor.

    The cache object is what every version passes; a ``cache_position`` (versions before 5.2x passed
    one to every layer) is used when no cache is there to ask.
    """
    if cache is not None:
        return cache.get_seq_length()
    if cache_position is not None and cache_position.numel():
        return cache_position[0]
    return 0


def static_capacity(cache: Any) -> int | None:
    """The fixed length of a static (compile-ready) cache; None for a growing one."""
    if cache is None or not getattr(cache, "is_compileable", False):
        return None
    length = cache.get_max_length()
    return int(length) if length and length > 0 else None


def layer_length(cache: Any, layer_idx: int) -> int:
    """Positions one layer of the cache holds (layers may differ once tokens are dropped)."""
    return int(cache.get_seq_length(layer_idx))


def static_cache(model: torch.nn.Module, max_cache_len: int) -> Any:
    """A static (compile-ready) cache for ``model``'s text config."""
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_cache_len)


def rope_deltas(core: torch.nn.Module) -> torch.Tensor | None:
    """Qwen-VL: the offset of each sample's text positions after its images, which the model keeps from the
    prompt's call (``rope_deltas``) to number the tokens that follow; None before any prompt."""
    return getattr(core, "rope_deltas", None)


def compile_decode_steps(generation_config: Any, backend: str, mode: str | None = None, fullgraph: bool = True) -> None:
    """Make ``generate`` compile its decode steps: a static cache and a compile config, on every device.

    transformers compiles the decode forward itself when the cache is static; by default only on CUDA, which
    ``CompileConfig._compile_all_devices`` (private, read by generate) lifts, so CPU runs compile the same way.
    """
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=fullgraph, dynamic=False, backend=backend, mode=mode)
    config._compile_all_devices = True
    generation_config.cache_implementation = "static"
    generation_config.compile_config = config


# --------------------------------------------------------------------------- decoder layers

# what a transformers 5 decoder layer receives by keyword (hidden states come first, positionally)
DECODER_LAYER_KWARGS = ("attention_mask", "position_embeddings", "position_ids", "cache")


def decoder_layer_inputs(args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A decoder layer's inputs under focusvlm's names (the cache as ``cache``, whatever it was passed as)."""
    out = {name: kwargs.get(name) for name in DECODER_LAYER_KWARGS if name != "cache"}
    out["cache"] = cache_of(kwargs)
    out["hidden_states"] = args[0] if args else kwargs.get("hidden_states")
    return out


def replace_decoder_layer_inputs(args: tuple, kwargs: Mapping[str, Any], **changes: Any) -> tuple[tuple, dict]:
    """(args, kwargs) of a decoder-layer call with some inputs replaced (names as ``decoder_layer_inputs``)."""
    args, kwargs = tuple(args), dict(kwargs)
    if "hidden_states" in changes:
        hidden = changes.pop("hidden_states")
        if args:
            args = (hidden,) + args[1:]
        else:
            kwargs["hidden_states"] = hidden
    unknown = set(changes) - set(DECODER_LAYER_KWARGS)
    if unknown:
        raise ValueError(f"unknown decoder-layer inputs {sorted(unknown)}")
    if "cache" in changes:
        cache = changes.pop("cache")
        name = next((n for n in CACHE_NAMES if n in kwargs), CACHE_ARG)
        kwargs[name] = cache
    kwargs.update(changes)
    return args, kwargs


# --------------------------------------------------------------------------- attention

def stock_attention(implementation: str, module: torch.nn.Module) -> Callable | None:
    """The attention function a layer calls without CMAI; None for an unknown implementation.

    eager is not in the registry: each family's modeling module defines its own.
    """
    if implementation == "eager":
        return modeling_function(module, "eager_attention_forward")
    if implementation not in ALL_ATTENTION_FUNCTIONS:
        return None
    return ALL_ATTENTION_FUNCTIONS[implementation]


def register_attention(name: str, function: Callable, like: str) -> None:
    """Register ``function`` as attention implementation ``name``, masked as implementation ``like`` is.

    Without a registered mask function a custom implementation would run with no causal mask at all.
    """
    mask = ALL_MASK_ATTENTION_FUNCTIONS.get(like) or ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    AttentionInterface.register(name, function)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask)


def modeling_function(module_or_class: Any, name: str) -> Callable | None:
    """A module-level function of the modeling file that defines ``module_or_class`` (None if absent)."""
    cls = module_or_class if isinstance(module_or_class, type) else type(module_or_class)
    return getattr(sys.modules[cls.__module__], name, None)


def encoder_layer_class(family: str) -> type:
    """The vision encoder layer class of a tower family ("clip", "siglip"): in-tower methods wrap it."""
    if family == "clip":
        from transformers.models.clip.modeling_clip import CLIPEncoderLayer

        return CLIPEncoderLayer
    if family == "siglip":
        from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

        return SiglipEncoderLayer
    raise ValueError(f"unknown tower family {family!r}")


def qwen2_5_vision_window_index(*args: Any, **kwargs: Any) -> Any:
    """Qwen2.5-VL's window partition of the vision tower (a module-level helper)."""
    from transformers.vision_utils import get_vision_window_index

    return get_vision_window_index(*args, **kwargs)


def select_best_resolution(*args: Any, **kwargs: Any) -> Any:
    """The AnyRes grid choice LLaVA-NeXT's processor and model make."""
    from transformers.image_processing_utils import select_best_resolution as choose

    return choose(*args, **kwargs)


def image_height_width(image: Any) -> tuple[int, int]:
    """(height, width) of one image as a processor holds it (channels first or last), as the processor reads it."""
    from transformers.image_utils import get_image_size, to_numpy_array

    return get_image_size(to_numpy_array(image))


# --------------------------------------------------------------------------- training

def last_checkpoint(folder: Any) -> str | None:
    """The newest ``checkpoint-*`` folder the Trainer wrote in ``folder`` (None if there is none)."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder))


def enable_checkpointing(model: torch.nn.Module, checkpoint_kwargs: dict[str, Any] | None = None) -> None:
    """Activation (gradient) checkpointing on, by the name this version declares (renamed in 5.25);
    ``checkpoint_kwargs`` go to ``torch.utils.checkpoint`` (e.g. ``use_reentrant``)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)


def is_checkpointing(model: torch.nn.Module) -> bool:
    """Whether activation checkpointing is on (the property was renamed with the method)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)


# --------------------------------------------------------------------------- model construction

def no_weight_init() -> contextlib.AbstractContextManager:
    """A context in which constructing a transformers model (``Model(config)``) skips the random initialisation
    of its weights (torch's init functions and ``init_weights``, hence also its tying); buffers computed in
    ``__init__`` (rotary frequencies, position ids) are still set. For callers that load every weight next."""
    from transformers.initialization import no_init_weights  # 5.23-5.25

    return no_init_weights()


# --------------------------------------------------------------------------- GGUF reading

@contextlib.contextmanager
def gguf_progress_bar() -> Iterator[None]:
    """Make the GGUF reader's own tqdm bar follow transformers' progress-bar switch, which does not reach it
    (``--no-progress`` would still print it); the module is left as it was afterwards."""
    from transformers import modeling_gguf_pytorch_utils as gguf_reader
    from transformers.utils import logging as hf_logging

    original = getattr(gguf_reader, "tqdm", None)
    if original is None or hf_logging.is_progress_bar_enabled():
        yield
        return
    gguf_reader.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_reader.tqdm = original


__all__ = ["CACHE_ARG", "CACHE_NAMES", "DECODER_LAYER_KWARGS", "ENCODER_OUTPUTS_ARG", "POSITION_IDS_HOOK",
           "bound_arguments", "cache_kwargs", "cache_of", "decoder_layer_inputs",
           "enable_checkpointing", "encoder_layer_class", "encoder_outputs", "gguf_progress_bar",
           "image_height_width", "is_checkpointing", "last_checkpoint", "layer_length", "modeling_function",
           "no_weight_init", "output_cache", "past_length", "qwen2_5_vision_window_index",
           "register_attention", "replace_decoder_layer_inputs", "select_best_resolution", "static_cache",
           "static_capacity", "stock_attention"]
