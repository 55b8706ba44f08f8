"""Model families: one adapter per family and the registry that finds it.

    adapter_for(model)        the adapter that handles this model (or UnsupportedModelError)
    adapter_named("llava")    by registry name
    adapter_for_type("llava") by config ``model_type``
    list_families()           registered adapters

This package is the only place that names transformers' model, layer and
processor classes. A family registers itself with ``@register_family`` where
its adapter is defined; ``BUILTIN_FAMILIES`` lists the modules imported on
first use (imports stay lazy so ``import focusvlm`` does not load them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import UnsupportedModelError
from ..registry import Registry

if TYPE_CHECKING:
    from .base import CallInputs, FamilyAdapter, MergedCall, MergedResult, TowerGeometry  # noqa: F401

# the placeholder a LLaVA-style prompt holds for each image (training formats, easy-VQA data, the composed LLaVAs)
IMAGE_TOKEN = "<image>"

# the adapter contract needs torch: its names are imported on first use, so that importing this package (and the
# demo model's names in focusvlm.models.demo, or IMAGE_TOKEN) stays light
_BASE_NAMES = ("CallInputs", "FamilyAdapter", "MergedCall", "MergedResult", "TowerGeometry")


def __getattr__(name: str) -> Any:
    if name in _BASE_NAMES:
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

BUILTIN_FAMILIES = ("focusvlm.models.llava", "focusvlm.models.llava_next", "focusvlm.models.llava_onevision",
                    "focusvlm.models.qwen2_5_vl", "focusvlm.models.qwen3_vl")

FAMILIES: Registry[FamilyAdapter] = Registry("model family", modules=BUILTIN_FAMILIES, error=UnsupportedModelError)

# Class decorator: register one instance of the adapter under ``cls.name``.
register_family = FAMILIES.decorator(make=lambda cls: cls())


def list_families() -> list[FamilyAdapter]:
    return [adapter for _, adapter in FAMILIES.items()]


def supported() -> str:
    """``"LLaVA-1.5 (llava), ..."`` for error messages."""
    return ", ".join(f"{a.title} (model_type {'/'.join(a.model_types)})" for a in list_families())


def adapter_named(name: str) -> FamilyAdapter:
    return FAMILIES.get(name)


def adapter_for_type(model_type: str) -> FamilyAdapter:
    for adapter in list_families():
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedModelError(f"focusvlm has no adapter for model_type {model_type!r}; supported: {supported()}")


def adapter_for(model: Any) -> FamilyAdapter:
    """The adapter of ``model`` (a ``...ForConditionalGeneration`` or its bare core model)."""
    for adapter in list_families():
        if adapter.handles(model):
            return adapter
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    raise UnsupportedModelError(f"focusvlm has no adapter for {type(model).__name__} (model_type {model_type!r}); "
                                f"supported: {supported()}. A new family is one adapter in focusvlm/models/ "
                                "(docs/architecture.md).")


def read_checkpoint_config(source: Any, **kwargs: Any) -> Any:
    """A checkpoint's config (transformers' AutoConfig), to pick the family adapter before loading weights."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source, **kwargs)


def adapter_for_preset(preset: str) -> FamilyAdapter:
    """The adapter that builds random-weight preset ``preset``."""
    for adapter in list_families():
        if preset in adapter.presets:
            return adapter
    known = [p for a in list_families() for p in a.presets]
    raise ValueError(f"unknown preset {preset!r}; known: {', '.join(known)}")


__all__ = ["CallInputs", "FamilyAdapter", "IMAGE_TOKEN", "MergedCall", "MergedResult", "TowerGeometry",
           "UnsupportedModelError", "adapter_for", "adapter_for_preset", "adapter_for_type", "adapter_named",
           "list_families", "read_checkpoint_config", "register_family", "supported"]
