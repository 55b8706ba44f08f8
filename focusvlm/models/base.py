"""What a model-family adapter answers: everything family-specific, in one place.

An adapter is stateless (one instance per family, shared); every method takes
the model. Methods (``focusvlm.methods``) and the CMAI wiring
(``focusvlm.inhibit.cmai_wiring``) reach transformers' model internals only
through these calls, so a new family is one adapter file plus its
registration (``@register_family``), and nothing else changes.

Hooks an adapter does not support raise ``UnsupportedModelError`` with the
reason; the base class does that for every optional hook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from .. import hfcompat
from ..errors import UnsupportedModelError  # noqa: F401 - re-exported: its first home


@dataclass(frozen=True)
class CallInputs:
    """What the CMAI wiring needs from one forward call of the language side.

    image_mask: (B, Q) bool, the new positions that receive image/video features in THIS call
        (a decode step carries no pixels, so a generated token is text whatever its id).
    attention_mask: (B, past + Q) 2-D padding mask or None.
    cache: the cache object or None (passed as ``cache`` or ``past_key_values``, by version).
    """

    image_mask: torch.Tensor
    attention_mask: torch.Tensor | None
    cache: Any


@dataclass(frozen=True)
class TowerGeometry:
    """Facts about the vision tower that vision-side methods plan with.

    grid: (rows, cols) of patch tokens of one image / crop as the tower sees it.
    patch_size: pixels per patch side.
    num_layers: encoder layers.
    feature_layers: hidden-state indices the LLM reads (hidden_states[0] = embeddings), non-negative.
    has_cls: the tower has a CLS token at position 0.
    keeps_cls: the LLM receives the CLS token too (LLaVA's "full" feature strategy).
    """

    grid: tuple[int, int]
    patch_size: int
    num_layers: int
    feature_layers: tuple[int, ...]
    has_cls: bool
    keeps_cls: bool

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def layers_before_features(self) -> int:
        """Encoder layers that run before the earliest layer the LLM reads (where VMTC may act)."""
        return min(self.feature_layers)



@dataclass(frozen=True)
class MergedCall:
    """One vision-tower call (all images, or all videos, of a forward) after a patch merger.

    For towers that merge patch groups into LLM tokens (Qwen's 2x2 merger), where one
    reduction stage runs on the merged tokens (SPEC: Other model families).

    features: per visual input, (t * h * w, D) merged tokens, frame-major raster order of the
        merged grid (what the LLM would receive).
    extras: per feature level, per visual input, (t * h * w, D') tensors aligned with ``features``
        that must be reduced with the same selection and weights (Qwen3's deepstack features).
    grids: (inputs, 3) merged grid (t, h, w) of each input.
    q, k: (S, heads, d) queries / keys (rotary applied) of the last full-attention tower block,
        S = every patch of the call, in the tower's row order.
    scale: that block's attention scale.
    segments: (frames + 1,) cumulative row offsets of the block's attention segments (one per frame).
    group_index: (S / unit,) the merged token (index over the call, inputs and frames concatenated in
        order) that each run of ``unit`` consecutive rows of q/k forms.
    unit: patches per merged token (4 for a 2x2 merger).
    modality: "image" or "video".
    """

    features: tuple[torch.Tensor, ...]
    extras: tuple[tuple[torch.Tensor, ...], ...]
    grids: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    scale: float
    segments: torch.Tensor
    group_index: torch.Tensor
    unit: int
    modality: str


@dataclass(frozen=True)
class MergedResult:
    """What a merger stage hands back: the reduced tokens and where each one sits.

    features / extras: as in ``MergedCall``, each input reduced to its new count.
    sources: per input, (m,) long, ascending: the merged token (index into that input's
        t * h * w tokens) whose 3-D rope position each output token takes.
    """

    features: tuple[torch.Tensor, ...]
    extras: tuple[tuple[torch.Tensor, ...], ...]
    sources: tuple[torch.Tensor, ...]


MergerStage = Callable[[MergedCall], MergedResult]


@dataclass(frozen=True)
class ShownCrop:
    """One picture ``focusvlm show`` draws: what the tower saw of one crop, and the token grid over it.

    pixels: (3, H, W) as the processor normalised them.
    grid: (rows, cols) of the tokens a vision method ranks, drawn as cells over the pixels.
    patches: tower patches of this crop.
    merged: tokens after the tower's patch merger (None: the tower has no merger, a cell is a patch).
    label: where the crop sits ("base crop", "tile 2/4"); "" for an image that is one crop.
    """

    pixels: torch.Tensor
    grid: tuple[int, int]
    patches: int
    merged: int | None = None
    label: str = ""


TowerStage = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]
"""fn(layer, normed, z) -> z': runs inside an encoder layer between the attention residual and the MLP.
``normed`` is LN1(z), the input the layer's attention saw; ``z`` the residual stream after attention."""

CropBudget = Callable[[int, int], tuple[int, int]]
"""fn(stock placeholders, tiles) -> (tokens the base crop keeps, tokens each tile keeps; 0: the tiles are dropped)."""

ImageCount = Callable[[int, int], int]
"""fn(stock placeholders, tiles) -> placeholders of one image after a method that packs or reduces whole images."""


@dataclass(frozen=True)
class AnyResImage:
    """One image of a vision call as an AnyRes family hands it to ``pack_images_with``.

    crops: (1 + tiles, n, D) its projected crops: the base crop first, then the tiles in the processor's
        raster order (n = the crop's patches, plus its CLS token first under the "full" feature strategy).
    tiles: (rows, cols) of its tile grid; (0, 0) for an image sent as one crop.
    size: (height, width) of the original image (the processor's ``image_sizes`` entry).
    newline: (D,) the model's image_newline.
    stock_tokens: the stock model's count for this image (after unpadding and any downscale).
    Computed on request (the family's own packing run on this image):
    stock_packed: () -> (L, D) what the stock model puts at the image's placeholders, newlines included.
    stock_sources: () -> (L,) long: per row of ``stock_packed``, the crop token it is (crop x n + token), -1 for
        a newline or a row blended from several tokens (OneVision's downscale).
    stock_order: () -> the crop tokens in the order the stock packing places them, newline and blended rows
        left out and the tokens its unpadding crops away absent (HiRED keeps its chosen tokens where the
        stock packing puts them).
    """

    crops: torch.Tensor
    tiles: tuple[int, int]
    size: tuple[int, int]
    newline: torch.Tensor
    stock_tokens: int = 0
    stock_packed: Callable[[], torch.Tensor] | None = None
    stock_sources: Callable[[], torch.Tensor] | None = None
    stock_order: Callable[[], torch.Tensor] | None = None


ImagesPacker = Callable[[list[AnyResImage]], list[torch.Tensor]]
"""fn(every image of one vision call, in order) -> each image's (L, D) features (``pack_images_with``)."""


def override_on_instance(obj: Any, **methods: Callable) -> Callable[[], None]:
    """Set ``methods`` on ``obj`` itself (its class untouched: other instances stay stock); the undo removes them
    and puts back what the instance held before (a method applied twice is undone in turn)."""
    saved = {name: obj.__dict__[name] for name in methods if name in obj.__dict__}
    for name, method in methods.items():
        setattr(obj, name, method)

    def undo() -> None:
        for name in methods:
            obj.__dict__.pop(name, None)
            if name in saved:
                obj.__dict__[name] = saved[name]
    return undo


class FamilyAdapter:
    """Base class of every family adapter. Subclasses set the class attributes and override the hooks."""

    name: ClassVar[str]                      # registry key, e.g. "llava"
    title: ClassVar[str]                     # for messages and the support table, e.g. "LLaVA-1.5"
    model_types: ClassVar[tuple[str, ...]]   # config.model_type values this adapter handles
    presets: ClassVar[tuple[str, ...]] = ()  # random-weight presets it can build

    # ------------------------------------------------------------------ recognising a model
    def handles(self, model: torch.nn.Module) -> bool:
        config = getattr(model, "config", None)
        return getattr(config, "model_type", None) in self.model_types and self.core(model) is not None

    def core(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """The multimodal core (e.g. ``LlavaModel``) of ``model`` or of its ``...ForConditionalGeneration``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ language side (CMAI)
    def decoder_attention_modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """Self-attention module of every decoder layer, in order; each has a ``layer_idx``."""
        core = self.core(model)
        lm = core.language_model
        layers = getattr(lm, "layers", None)
        if layers is None:
            raise UnsupportedModelError(f"the language model {type(lm).__name__} has no `.layers`")
        modules = [getattr(layer, "self_attn", None) for layer in layers]
        if any(m is None or not hasattr(m, "layer_idx") for m in modules):
            raise UnsupportedModelError("every decoder layer needs a `self_attn` module with a `layer_idx`")
        return modules

    def text_attn_implementation(self, model: torch.nn.Module) -> str:
        """The language model's current attention implementation ("sdpa", "eager", ...)."""
        return self.core(model).language_model.config._attn_implementation or "eager"

    def set_text_attn_implementation(self, model: torch.nn.Module, name: str) -> None:
        model.set_attn_implementation({"text_config": name})

    def call_module(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module whose forward receives a call's ids, pixels, mask and cache (pre-hook target)."""
        return self.core(model)

    def call_inputs(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> CallInputs:
        """Token types of one call, from the arguments ``call_module`` received."""
        raise NotImplementedError

    # ------------------------------------------------------------------ language side (token removal: FastV)
    def decoder_layers(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """Every decoder layer of the language model, in order (pre-hook targets of token removal)."""
        layers = getattr(self.core(model).language_model, "layers", None)
        if layers is None:
            raise UnsupportedModelError(f"the language model of {self.title} has no `.layers`")
        return list(layers)

    def decoder_layer_inputs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """What a decoder layer was called with: hidden_states, attention_mask, position_embeddings,
        position_ids, cache (transformers 5 decoder layers: hidden states first, the rest by keyword)."""
        return hfcompat.decoder_layer_inputs(args, kwargs)

    def with_decoder_layer_inputs(self, args: tuple, kwargs: dict, **changes: Any) -> tuple[tuple, dict]:
        """(args, kwargs) of a decoder-layer call with some inputs replaced (names as ``decoder_layer_inputs``)."""
        return hfcompat.replace_decoder_layer_inputs(args, kwargs, **changes)

    def decoder_query_key(self, attention: torch.nn.Module, hidden_states: torch.Tensor, position_embeddings: Any,
                          query_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """A decoder attention's queries at ``query_rows`` and its keys at every position, as it forms them.

        hidden_states (B, Q, D) is the attention's input (after the layer's norm),
        ``position_embeddings`` what the layer received, query_rows (B,) one row
        per sample. Returns (q (B, H, 1, d), k (B, H, Q, d) with the key heads
        repeated to the query heads, scale), positions embedded as the layer does.
        """
        raise UnsupportedModelError(f"{self.title}: no decoder q/k")

    # ------------------------------------------------------------------ vision side
    def tower_geometry(self, model: torch.nn.Module) -> TowerGeometry:
        raise UnsupportedModelError(f"{self.title}: vision-side methods are not supported yet")

    def vision_tower(self, model: torch.nn.Module) -> torch.nn.Module:
        """The vision encoder as one module (what ``focusvlm.compile_model`` compiles), methods' stages inside."""
        raise UnsupportedModelError(f"{self.title}: no vision tower exposed")

    def encoder_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        """The vision tower's encoder layers (benchmarks hook them to record the token schedule)."""
        raise UnsupportedModelError(f"{self.title}: no encoder layers exposed")

    def add_tower_stage(self, model: torch.nn.Module, layer_idx: int, stage: TowerStage) -> Callable[[], None]:
        """Run ``stage`` inside encoder layer ``layer_idx``; returns the undo."""
        raise UnsupportedModelError(f"{self.title}: no in-tower hook")

    def tower_qk(self, layer: Any, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(q, k, scale) of an encoder layer's attention from its input LN1(z): q, k (B, heads, N, d)."""
        raise UnsupportedModelError(f"{self.title}: no tower q/k")

    def capture_layer_input(self, model: torch.nn.Module, layer_idx: int) -> tuple[Callable[[], Any], Callable[[], None]]:
        """(take, undo): ``take()`` returns (layer, its input hidden states) of the last forward, once."""
        raise UnsupportedModelError(f"{self.title}: no layer-input capture")

    def reduce_projector_input(self, model: torch.nn.Module,
                               reduce: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        """Apply ``reduce`` to the patch features (B, N, D; CLS excluded) before the projector; returns the undo."""
        raise UnsupportedModelError(f"{self.title}: no projector hook")

    def capture_layer_output(self, model: torch.nn.Module,
                             layer_idx: int) -> tuple[Callable[[], Any], Callable[[], None]]:
        """(take, undo): ``take()`` returns (layer, its input, its output) hidden states of the last forward, once."""
        raise UnsupportedModelError(f"{self.title}: no layer-output capture")

    def replace_projector_input(self, model: torch.nn.Module,
                                replace: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        """Hand the projector ``replace(features)`` instead of its input; returns the undo.

        Unlike ``reduce_projector_input`` the whole input is replaced: ``features``
        is what the projector would receive (CLS included when the family keeps it)
        and the result is projected as it is (for methods that choose CLS
        themselves, e.g. VisionZip)."""
        raise UnsupportedModelError(f"{self.title}: no projector hook")

    def reduce_projector_output(self, model: torch.nn.Module,
                                reduce: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        """Apply ``reduce`` to the projected image features (images, tokens, LLM width); returns the undo."""
        raise UnsupportedModelError(f"{self.title}: no projector hook")

    # a tower whose tokens are reduced once, after its patch merger (Qwen), instead of inside encoder layers
    reduces_after_merger: ClassVar[bool] = False

    def add_merger_stage(self, model: torch.nn.Module, stage: MergerStage) -> Callable[[], None]:
        """Run ``stage`` on every vision call's merged tokens, and make the LLM's positions follow
        (``MergedResult.sources``); returns the undo. Only where ``reduces_after_merger``."""
        raise UnsupportedModelError(f"{self.title}: no merger hook")

    def image_features(self, model: torch.nn.Module, pixel_values: torch.Tensor, **inputs: Any) -> torch.Tensor:
        """Run the vision path (tower + projector) alone; returns (images, tokens, hidden).

        ``inputs``: the other image tensors the processor returns, where a family needs them
        (``image_sizes`` for AnyRes models)."""
        raise UnsupportedModelError(f"{self.title}: no image-feature call")

    def shown_crops(self, model: torch.nn.Module, processed: Any) -> tuple[dict[str, Any], list[ShownCrop]]:
        """What ``focusvlm show`` draws for one image the image processor returned as ``processed``.

        Returns (the keyword inputs of ``image_features`` for it, one ``ShownCrop`` per picture, in
        the order a vision method's ``panels(sample=i)`` numbers them). Default: crops of the
        tower's fixed grid, a single image (B, 3, H, W) or AnyRes crops (1, crops, 3, H, W) with
        ``image_sizes``."""
        geometry = self.tower_geometry(model)
        pixels = processed["pixel_values"]
        inputs = {"pixel_values": pixels, **{k: processed[k] for k in ("image_sizes",) if k in processed}}
        crops = pixels[0] if pixels.dim() == 5 else pixels
        shown = []
        for index, crop in enumerate(crops):
            label = "" if len(crops) == 1 else ("base crop" if index == 0 else f"tile {index}/{len(crops) - 1}")
            shown.append(ShownCrop(crop, geometry.grid, geometry.num_patches, label=label))
        return inputs, shown

    def pack_reduced_crops(self, model: torch.nn.Module, tokens_per_crop: int | None) -> Callable[[], None]:
        """A vision method now hands the projector ``tokens_per_crop`` tokens per crop (None: a count known
        only per call, e.g. PruMerge's adaptive one), with no patch grid.

        Families that lay several crops of one image out on a grid (AnyRes) switch to a packing that
        needs no grid; returns the undo. Single-crop families pass features on as they are: nothing to do.
        """
        return lambda: None

    def budget_reduced_crops(self, model: torch.nn.Module, tokens_per_crop: int,
                             budget: CropBudget) -> tuple[Callable[[], list[int] | None] | None, Callable[[], None]]:
        """``pack_reduced_crops`` under a per-image budget (VMTC on AnyRes; SPEC "Per-image budget").

        Where ``packs_crops``: every crop leaves the tower with ``tokens_per_crop`` rows, of which
        ``budget(stock, tiles)`` -> (base, tile) says how many count, per image of ``tiles`` tiles
        whose stock model hands the LLM ``stock`` tokens (computed from the image size alone, after
        unpadding and any downscale; an image sent as one crop has 0 tiles): the base crop's first
        ``base`` rows, then each tile's first ``tile`` rows followed by one image_newline, or with
        tile 0 the base crop's rows alone. The family packs images so, and a processor patched
        afterwards emits base + tiles x (tile + 1) (or base) placeholders (the stock processor's
        own count as ``stock``). Returns (crop_counts, undo): during a vision call ``crop_counts()``
        lists the rows each crop of the tower's batch keeps (base crops' and tiles', in batch order),
        None outside one. Families with one crop per image: (None, ``pack_reduced_crops``' undo).
        """
        return None, self.pack_reduced_crops(model, tokens_per_crop)

    # a family that lays several crops of one image out in one packed sequence (AnyRes: LLaVA-NeXT, OneVision)
    packs_crops: ClassVar[bool] = False

    def pack_images_with(self, model: torch.nn.Module, pack: ImagesPacker,
                         count: ImageCount | None = None) -> Callable[[], None]:
        """A vision method lays out every image of a vision call from its crops (VisionZip's official LLaVA-NeXT
        layout, DivPrune's packed-sequence path, HiRED, GlobalCom2; the fixed packings of
        ``pack_reduced_crops`` and ``budget_reduced_crops`` are built on it).

        Where ``packs_crops``: ``pack(images)`` replaces the family's packing and sees the call's images at
        once, in order (``AnyResImage``), so a method can line them up with what it captured from the tower's
        batch of all their crops; it returns each image's (L, D) features. ``count(stock, tiles)``: the
        placeholders a processor patched afterwards (``patch_processor``) emits per image (stock: the stock
        processor's count; tiles: rows x cols); None when the count depends on the image's content (the
        processor then asks the method's ``output_patches``, which should refuse). Returns the undo.
        Families with one crop per image have no packing to replace.
        """
        raise UnsupportedModelError(f"{self.title}: an image is one crop here, not a base crop plus tiles (AnyRes); "
                                    "there is no crop packing to replace")

    def patch_processor(self, model: torch.nn.Module, processor: Any,
                        patches_for_grid: Callable[[tuple[int, int]], int]) -> Callable[[], None]:
        """Make ``processor`` emit ``patches_for_grid(grid)`` placeholders per image; returns the undo."""
        raise UnsupportedModelError(f"{self.title}: cannot change the processor's placeholder count")

    # ------------------------------------------------------------------ building and loading
    def load(self, source: str, dtype: torch.dtype | None = None, device: Any = None,
             **kwargs: Any) -> tuple[torch.nn.Module, Any]:
        """(stock model in eval mode, processor) from a hub id or a local folder."""
        raise NotImplementedError

    def random_model(self, preset: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                     attn_implementation: str = "sdpa", **overrides: Any) -> torch.nn.Module:
        """A model of a preset's shape with seeded random weights, in eval mode (tests, benchmarks)."""
        raise UnsupportedModelError(f"{self.title}: no random-weight presets")

    # ------------------------------------------------------------------ benchmark inputs
    def random_pixel_inputs(self, model: torch.nn.Module, batch: int, generator: torch.Generator) -> dict[str, Any]:
        """Vision inputs of ``batch`` random images, as the model's forward takes them (bench).

        Default: a fixed-size square image per sample (LLaVA-style ``pixel_values``)."""
        vc = model.config.vision_config
        return {"pixel_values": torch.randn(batch, getattr(vc, "num_channels", 3), vc.image_size, vc.image_size,
                                            generator=generator)}

    def prompt_inputs(self, model: torch.nn.Module, input_ids: torch.Tensor) -> dict[str, Any]:
        """Extra forward inputs a prompt of ``input_ids`` needs besides ids, mask and pixels (bench)."""
        return {}

    def step_inputs(self, model: torch.nn.Module, attention_mask: torch.Tensor) -> dict[str, Any]:
        """Extra forward inputs of one decode step after a prefill, ``attention_mask`` covering every position so far
        (a hand-written decode loop: bench, op counts; ``generate`` prepares them itself). Most families derive
        what they need from the cache; Qwen's 3-D positions come from the prompt's rope deltas."""
        return {}

    def image_token_id(self, model: torch.nn.Module) -> int:
        return int(model.config.image_token_id)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
