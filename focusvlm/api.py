"""Public entry points: patch, unpatch, patched, load."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from .config import ConfigError, FocusConfig


class ProcessorHint(UserWarning):
    """``patch`` got no processor while the vision side changes the tokens per image. Callers that
    build their inputs with ``handle.image_tokens()`` placeholders themselves may ignore it."""


class FocusHandle:
    """What ``patch`` switched on; attached to the model as ``model._focusvlm``.

    ``methods`` maps each switched-on method's name to its bound ``Method``;
    ``vision`` / ``cmai`` are shortcuts to the vision-side method and to CMAI.
    """

    def __init__(self, model: torch.nn.Module, config: FocusConfig, processor: Any | None, adapter: Any):
        self.model = model
        self.config = config
        self.processor = processor
        self.adapter = adapter
        self.methods: dict[str, Any] = {}
        self._undo_processor = None
        self._placeholder_guard = None

    @property
    def vision(self) -> Any | None:
        return next((m for m in self.methods.values() if m.side == "vision"), None)

    @property
    def llm(self) -> Any | None:
        return next((m for m in self.methods.values() if m.side == "llm"), None)

    @property
    def cmai(self) -> Any | None:
        return self.methods.get("cmai")

    def image_tokens(self, grid: tuple[int, int] | None = None) -> int:
        """Tokens per image the LLM receives (the placeholders a processor must emit)."""
        if self.vision is not None:
            return self.vision.image_tokens(grid)
        geometry = self.adapter.tower_geometry(self.model)
        grid = grid or geometry.grid
        return grid[0] * grid[1] + (1 if geometry.keeps_cls else 0)

    def stock_image_tokens(self) -> int:
        geometry = self.adapter.tower_geometry(self.model)
        return geometry.grid[0] * geometry.grid[1] + (1 if geometry.keeps_cls else 0)

    def remove(self, processor: Any | None = None) -> None:
        if self._placeholder_guard is not None:
            self._placeholder_guard.remove()
            self._placeholder_guard = None
        if self._undo_processor is not None:
            self._undo_processor()
            self._undo_processor = None
        for method in reversed(list(self.methods.values())):
            method.remove(processor or self.processor)
        self.methods = {}

    def __repr__(self) -> str:
        return f"FocusHandle({type(self.model).__name__}, {self.config})"


def patch(model: torch.nn.Module, config: FocusConfig | None = None, processor: Any | None = None) -> FocusHandle:
    """Switch focusvlm's methods on for ``model`` in place and return the handle.

    ``processor`` (optional) is adjusted too when the vision side changes the
    number of image tokens, so it emits the matching number of placeholders.
    Without it, build inputs with the reduced count yourself
    (``handle.image_tokens()`` per image).
    """
    from .methods import get_method
    from .models import adapter_for

    config = FocusConfig() if config is None else config
    if not isinstance(config, FocusConfig):
        raise ConfigError(f"patch() needs a FocusConfig, got {type(config).__name__}")
    adapter = adapter_for(model)  # fail early, with the supported families named
    if getattr(model, "_focusvlm", None) is not None:
        raise RuntimeError("this model is already patched by focusvlm; call unpatch(model) first")
    handle = FocusHandle(model, config, processor, adapter)
    try:
        # vision first: it decides the token count the LLM side then sees
        for name, section in sorted(config.sections.items(), key=lambda kv: get_method(kv[0]).side != "vision"):
            handle.methods[name] = get_method(name)(model, adapter, section, processor)
        vision = handle.vision
        if vision is not None and processor is not None:
            handle._undo_processor = adapter.patch_processor(model, processor, vision.output_patches)
        if vision is not None:
            _guard_placeholders(handle, processor)
    except Exception:
        handle.remove(processor)
        raise
    model._focusvlm = handle
    return handle


def _guard_placeholders(handle: FocusHandle, processor: Any | None) -> None:
    """When the vision side changes the tokens per image, catch prompts built for the stock count.

    Without the processor, inputs made by a stock processor carry the stock number of
    ``<image>`` placeholders, and the model would fail deep inside with transformers'
    "tokens: 576, features: ..." message. Warn now, and refuse such inputs with the fix named.
    """
    import warnings

    if getattr(handle.adapter, "packs_crops", False):
        # AnyRes: an image's count depends on its size (tiles, unpadding), not one number per image to compare
        # a prompt against; the patched processor emits it, and transformers names a mismatch itself
        return
    try:
        patched_count = handle.image_tokens()
        stock_count = handle.stock_image_tokens()
    except Exception:  # noqa: BLE001 - an adaptive count (PruMerge without a budget), a dynamic-resolution tower
        return

    if patched_count == stock_count:
        return
    name = handle.config.describe()
    if processor is None:
        warnings.warn(f"{name} gives {patched_count} image tokens per image instead of {stock_count}, and patch() "
                      f"got no processor: pass processor= to patch() (or focusvlm.load) so prompts carry "
                      f"{patched_count} placeholders; inputs from a stock processor will be refused",
                      ProcessorHint, stacklevel=3)
    token_id = handle.adapter.image_token_id(handle.model)

    def check(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        pixels = kwargs.get("pixel_values", args[1] if len(args) > 1 else None)
        if not isinstance(input_ids, torch.Tensor) or not isinstance(pixels, torch.Tensor):
            return None
        images = int(pixels.shape[0])
        found = int((input_ids == token_id).sum())
        if images and found == images * stock_count != images * patched_count:
            raise ValueError(
                f"the inputs hold {found} image placeholder tokens for {images} image(s), the stock {stock_count} "
                f"per image, but with {name} each image gives {patched_count} tokens: pass the processor to "
                f"patch(model, config, processor=processor) (or focusvlm.load) so it emits {patched_count} per "
                f"image, or build the prompt with handle.image_tokens() placeholders per image")
        return None

    handle._placeholder_guard = handle.model.register_forward_pre_hook(check, with_kwargs=True)


def unpatch(model: torch.nn.Module, processor: Any | None = None) -> None:
    """Restore the stock model (and processor) exactly. A no-op on an unpatched model."""
    handle: FocusHandle | None = getattr(model, "_focusvlm", None)
    if handle is None:
        return
    handle.remove(processor)
    del model._focusvlm


@contextlib.contextmanager
def patched(model: torch.nn.Module, config: FocusConfig | None = None, processor: Any | None = None) -> Iterator[FocusHandle]:
    """``with patched(model, cfg, processor=p): ...`` — stock again on exit, even on error."""
    handle = patch(model, config, processor)
    try:
        yield handle
    finally:
        unpatch(model, processor)


def load(model_id: str, config: FocusConfig | None = None, *, torch_dtype: Any = None, device_map: Any = None,
         attn_implementation: str | None = None, compile: bool = False, **kwargs: Any):
    """Load a checkpoint of any supported family and its processor, then patch both with ``config``.

    ``model_id``: a hub id, a local folder, or ``"demo"`` (the embedded model). Without a
    config the model comes back unpatched (stock); ``patch`` it yourself later.
    ``compile=True``: the compiled path (``focusvlm.compiling.compile_model``: the vision tower and
    generate's decode steps, static cache).
    """
    from .runtime import load_model

    model, processor = load_model(model_id, dtype=torch_dtype, device_map=device_map,
                                  attn_implementation=attn_implementation, **kwargs)
    if config is not None and not config.is_stock:
        patch(model, config, processor)
    if compile:
        from .compiling import compile_model

        compile_model(model)
    return model, processor
