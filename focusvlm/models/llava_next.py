"""LLaVA-NeXT adapter (``LlavaNextForConditionalGeneration`` / ``LlavaNextModel``: CLIP tower, AnyRes).

AnyRes: the processor picks a grid pinpoint for each image (``select_best_resolution``), cuts the
resized, padded image into tiles of the tower's resolution and adds a base crop of the whole image;
every crop is its own tower pass (crops sit in the batch dimension of the tower). Stock packing lays
the tiles' patch grids out as one big grid, crops the padding away ("unpadding") and ends every grid
row with ``image_newline``.

What this adapter adds to the LLaVA-1.5 one (which it subclasses: tower hooks, q/k, projector hook,
layer capture are the same CLIP code):
* image positions: the core's forward takes ``image_sizes`` third, so the positional order differs;
* ``pack_reduced_crops``: once a vision method reduces each crop to a token set with no grid, an
  instance-level ``pack_image_features`` on the core packs per SPEC ("Other model families"): the
  base crop's tokens, then each tile's tokens in raster order of tiles, each tile followed by one
  ``image_newline``; no unpadding. An image with no tiles (OneVision's multi-image mode) keeps the
  stock layout for that case: its crop followed by one newline;
* ``patch_processor``: the processor's placeholder count follows the same rule, with the tiles from
  the processor's own pinpoint choice: ``per_crop * (1 + tiles) + tiles``;
* ``pack_images_with``: the one replacement of the packing that the others build on: a method lays out every
  image of a call from its crops (``AnyResImage``: tile grid, size, newline, and on request the stock
  packing, its rows' sources and order, the stock count), optionally with its own per-image count that the
  processor then follows (VisionZip's official layout, DivPrune's packed-sequence path, HiRED, GlobalCom2);
* ``budget_reduced_crops`` (VMTC): the same packing under SPEC's per-image budget: a base-crop and a
  tile count per image from its stock count (``anyres_stock_tokens``, from the size alone) and tiles,
  the tokens each crop of a vision call keeps (a ``get_image_features`` wrapper), the matching
  processor count;
* presets with the real AnyRes geometry (llava-v1.6-vicuna-7b) and small ones for tests / CPU bench.
Every hook returns its undo; the stock classes are never modified.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import LlavaNextForConditionalGeneration, LlavaNextModel

from .. import hfcompat
from . import register_family
from .base import AnyResImage, TowerGeometry, UnsupportedModelError, override_on_instance
from .llava import LlavaAdapter


# --------------------------------------------------------------------------- AnyRes arithmetic (pure)

def anyres_tiles(image_size: tuple[int, int], pinpoints: list, crop: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of tiles the processor cuts an image of ``image_size`` (h, w) into.

    The pinpoint is the processor's own choice (``select_best_resolution``); a partial tile
    counts as a tile, as in ``image_size_to_num_patches``.
    """
    best_h, best_w = hfcompat.select_best_resolution([int(image_size[0]), int(image_size[1])], pinpoints)
    return math.ceil(best_h / crop[0]), math.ceil(best_w / crop[1])


def packed_length(per_crop: int, tiles: int) -> int:
    """Tokens of one image packed without grids: per_crop x (1 + tiles) + tiles newlines (one newline
    after a lone crop, as the stock model puts one there)."""
    return per_crop * (1 + tiles) + (tiles if tiles else 1)


def anyres_stock_tokens(image_size, pinpoints: list, crop: tuple[int, int], grid: tuple[int, int],
                        max_tiles: int | None = None) -> int:
    """Tokens the stock model packs for one image cut into tiles (the processor's own count, from the size alone).

    Base crop (grid patches), then the tiles' joint patch grid unpadded (the rows or columns that
    only show padding cropped away, as ``unpad_image`` does), a newline after every row. With
    ``max_tiles`` (OneVision's ``anyres_max_N``) a grid larger than 1.1 x sqrt(N crops' patches) is
    first shrunk by that ratio, as the stock bilinear downscale does.
    """
    rows, cols = anyres_tiles(image_size, pinpoints, crop)
    h, w = rows * grid[0], cols * grid[1]
    orig_h, orig_w = int(image_size[0]), int(image_size[1])
    if orig_w / orig_h > w / h:
        h -= 2 * ((h - int(round(orig_h * (w / orig_w), 7))) // 2)
    else:
        w -= 2 * ((w - int(round(orig_w * (h / orig_h), 7))) // 2)
    if max_tiles is not None:
        ratio = math.sqrt(h * w / (max_tiles * grid[0] * grid[1]))
        if ratio > 1.1:
            h, w = int(h // ratio), int(w // ratio)
    return grid[0] * grid[1] + h * w + h


def pack_budget_crops(crops: torch.Tensor, newline: torch.Tensor, base: int, tile: int) -> torch.Tensor:
    """One image's reduced crops (1 + tiles, n, D) under a per-image budget -> (base + tiles x (tile + 1), D).

    The base crop's first ``base`` tokens, then every tile's first ``tile`` tokens, each tile followed
    by ``newline``; ``tile`` 0: the base crop alone, no newline (SPEC "Per-image budget").
    """
    first = crops[0, :base]
    if tile == 0 or crops.shape[0] == 1:
        return first
    tiles = crops[1:, :tile]
    rows = torch.cat([tiles, newline.to(crops.device, crops.dtype).expand(tiles.shape[0], 1, -1)], dim=1)
    return torch.cat([first, rows.flatten(0, 1)], dim=0)


def pack_crops(crops: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """One image's reduced crops (1 + tiles, n, D) -> (packed_length(n, tiles), D).

    Base crop first (no newline after it), then every tile in the order the processor cut them
    (raster order), each followed by ``newline`` (D,). A lone crop gets one newline.
    """
    base, tiles = crops[0], crops[1:]
    newline = newline.to(crops.device, crops.dtype)
    if tiles.shape[0] == 0:
        return torch.cat([base, newline[None]], dim=0)
    rows = torch.cat([tiles, newline.expand(tiles.shape[0], 1, -1)], dim=1)   # (tiles, n + 1, D)
    return torch.cat([base, rows.flatten(0, 1)], dim=0)


def _packed_sources(stock_pack: Callable, crops: torch.Tensor, image_size: torch.Tensor, args: tuple,
                    kwargs: dict) -> torch.Tensor:
    """(L,) long: which crop token (crop x n + token) each row of one image's stock packing is.

    The stock packing runs on two float64 channels, the token's index i and i squared, with the
    newline (-1, 1): a row that is one token keeps (i, i^2); a row blended from several (a bilinear
    downscale) has a non-integer i or a second channel above i^2 (Jensen); those and newlines get -1.
    """
    count, n = crops.shape[:2]
    index = torch.arange(count * n, dtype=torch.float64, device=crops.device).view(count, n, 1)
    marker = torch.tensor([-1.0, 1.0], dtype=torch.float64, device=crops.device)
    packed, _ = stock_pack([torch.cat([index, index.square()], dim=-1)], image_size, *args,
                           **{**kwargs, "image_newline": marker})
    i, sq = packed[0].unbind(-1)
    single = (i >= 0) & (i == i.round()) & (sq == i.square())
    return torch.where(single, i, -1).long()


def _stock_order(stock_pack: Callable, crops: torch.Tensor, image_size: torch.Tensor, args: tuple,
                 kwargs: dict) -> torch.Tensor:
    """(L,) long: the crop tokens (crop x n + token) in the order the stock packing places them, newline rows
    (and rows blended from several tokens) left out; tokens the unpadding crops away are absent."""
    sources = _packed_sources(stock_pack, crops, image_size, args, kwargs)
    return sources[sources >= 0]


# --------------------------------------------------------------------------- presets

@dataclass(frozen=True)
class AnyResPreset:
    vision: dict[str, Any]
    text: dict[str, Any]
    pinpoints: list[list[int]]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)   # more top-level config fields


_CLIP_L_336 = dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                   num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
_VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)
_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

PRESETS: dict[str, AnyResPreset] = {
    # unit tests: 4x4 patches per 56 px crop, the real pinpoint pattern scaled by 1/6, GQA in the LM
    "next-tiny": AnyResPreset(
        vision=dict(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                    num_attention_heads=4, projection_dim=32),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096),
        pinpoints=[[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]],
        extra=dict(image_token_index=511)),
    # CPU benchmarks: the real image geometry (336 px crops of 24x24 patches, the real pinpoints), small LM
    "next-mid": AnyResPreset(
        vision=dict(image_size=336, patch_size=14, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                    num_attention_heads=8, projection_dim=256),
        text=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=16, vocab_size=32064, max_position_embeddings=4096),
        pinpoints=_NEXT_PINPOINTS, extra=dict(image_token_index=32000)),
    # llava-hf/llava-v1.6-vicuna-7b-hf's architecture (random weights)
    "llava-v1.6-vicuna-7b": AnyResPreset(vision=_CLIP_L_336, text=_VICUNA_7B, pinpoints=_NEXT_PINPOINTS,
                                         extra=dict(image_token_index=32000)),
    # the AnyRes equal-budget table on a CPU: the real tower (CLIP-L/336) and image geometry (2,928 tokens for a
    # 2x2-tile image) in front of next-mid's small LM (a 7B LM's prefill of 2,928 tokens does not fit a CPU bench)
    "next-clip-l": AnyResPreset(vision=_CLIP_L_336, text=dict(hidden_size=1024, intermediate_size=2816,
                                                               num_hidden_layers=8, num_attention_heads=16,
                                                               num_key_value_heads=16, vocab_size=32064,
                                                               max_position_embeddings=4096),
                                pinpoints=_NEXT_PINPOINTS, extra=dict(image_token_index=32000)),
}


def llava_next_config(preset: str = "next-tiny", **text_overrides: Any):
    """The LlavaNextConfig of a preset (CLIP feature layer -2, CLS dropped, the preset's pinpoints)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    return LlavaNextConfig(vision_config=CLIPVisionConfig(**p.vision), text_config=LlamaConfig(**{**p.text, **text_overrides}),
                           vision_feature_layer=-2, vision_feature_select_strategy="default",
                           image_grid_pinpoints=[list(x) for x in p.pinpoints], projector_hidden_act="gelu",
                           **p.extra)


def build_random(model_class, config, seed: int, dtype: torch.dtype, attn_implementation: str):
    """``model_class(config)`` with seeded random weights in ``dtype``, eval mode."""
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return model_class(config).to(dtype).eval()


def random_llava_next(preset: str = "next-tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
                      attn_implementation: str = "sdpa", **text_overrides: Any) -> LlavaNextForConditionalGeneration:
    """A LLaVA-NeXT model of the preset's shape with seeded random weights, in eval mode."""
    return build_random(LlavaNextForConditionalGeneration, llava_next_config(preset, **text_overrides), seed, dtype,
                        attn_implementation)


# --------------------------------------------------------------------------- the adapter

@register_family
class LlavaNextAdapter(LlavaAdapter):
    name = "llava_next"
    title = "LLaVA-NeXT"
    model_types = ("llava_next",)
    presets = tuple(PRESETS)
    model_class = LlavaNextForConditionalGeneration
    packs_crops = True

    def core(self, model):
        if isinstance(model, LlavaNextForConditionalGeneration):
            return model.model
        if isinstance(model, LlavaNextModel):
            return model
        return None

    # ------------------------------------------------------------------ vision side
    def tower_geometry(self, model) -> TowerGeometry:
        geometry = super().tower_geometry(model)
        # "full" keeps the CLS token only where the tower has one (OneVision's SigLIP has none)
        return dataclasses.replace(geometry, keeps_cls=geometry.keeps_cls and geometry.has_cls)

    def image_features(self, model, pixel_values: torch.Tensor, image_sizes=None, **inputs: Any):
        """Packed features per image: a (images, tokens, hidden) tensor, or a tuple when lengths differ."""
        if image_sizes is None:
            raise UnsupportedModelError(f"{self.title}: image_features needs image_sizes with pixel_values "
                                        "(the processor returns both)")
        out = self.core(model).get_image_features(pixel_values=pixel_values, image_sizes=image_sizes, **inputs)
        feats = list(out.pooler_output)
        return torch.stack(feats) if len({f.shape[0] for f in feats}) == 1 else tuple(feats)

    def random_pixel_inputs(self, model, batch: int, generator: torch.Generator) -> dict[str, Any]:
        """``batch`` square images twice the crop size (2x2 tiles + the base crop: 672 px for 336 px crops)."""
        vc = model.config.vision_config
        side = 2 * vc.image_size
        rows, cols = anyres_tiles((side, side), model.config.image_grid_pinpoints, (vc.image_size, vc.image_size))
        crops = 1 + rows * cols
        pixels = torch.randn(batch, crops, getattr(vc, "num_channels", 3), vc.image_size, vc.image_size,
                             generator=generator)
        return {"pixel_values": pixels, "image_sizes": torch.tensor([[side, side]] * batch)}

    def pack_reduced_crops(self, model, tokens_per_crop: int | None) -> Callable[[], None]:
        title = self.title

        def pack(images: list[AnyResImage]) -> list[torch.Tensor]:
            for image in images:
                if tokens_per_crop is not None and image.crops.shape[1] != tokens_per_crop:
                    raise RuntimeError(f"{title}: a crop reached the projector with {image.crops.shape[1]} tokens, "
                                       f"expected {tokens_per_crop}")
            return [pack_crops(image.crops, image.newline) for image in images]

        return self.pack_images_with(model, pack)

    def pack_images_with(self, model, pack, count=None):
        core = self.core(model)
        if "pack_image_features" in core.__dict__:
            raise RuntimeError(f"{type(core).__name__}.pack_image_features is already replaced on this model")
        title, adapter = self.title, self
        stock = core.pack_image_features   # the class's own packing, bound to this core

        # same call shape as the stock method for both NeXT (strategy third) and OneVision (aspect ratio)
        def pack_image_features(image_features, image_sizes, *args: Any, image_newline=None, **kwargs: Any):
            if image_newline is None:
                raise RuntimeError(f"{title}: packing crops needs the model's image_newline")
            vc = core.config.vision_config
            images = []
            for index, (crops, size) in enumerate(zip(image_features, image_sizes)):
                size = tuple(int(x) for x in size)
                tiles = (0, 0) if crops.shape[0] == 1 else \
                    anyres_tiles(size, core.config.image_grid_pinpoints, (vc.image_size,) * 2)
                if tiles[0] * tiles[1] != crops.shape[0] - 1:
                    raise RuntimeError(f"{title}: an image of {crops.shape[0]} crops has a {tiles[0]}x{tiles[1]} "
                                       "tile grid")
                # the family's own packing of this image, its rows' sources and order: computed on request
                one = ([crops], image_sizes[index:index + 1], args, {**kwargs, "image_newline": image_newline})
                images.append(AnyResImage(
                    crops, tiles, size, image_newline,
                    stock_order=functools.partial(_stock_order, stock, crops, *one[1:]),
                    stock_packed=lambda one=one: stock(one[0], one[1], *one[2], **one[3])[0][0],
                    stock_sources=functools.partial(_packed_sources, stock, crops, *one[1:]),
                    stock_tokens=adapter._stock_tokens(core, list(size), crops.shape[0] - 1,
                                                       kwargs.get("vision_aspect_ratio"))))
            packed = pack(images)
            lengths = torch.tensor([p.shape[0] for p in packed], dtype=torch.long, device=packed[0].device)
            return packed, lengths

        core.pack_image_features = pack_image_features
        if count is not None:   # the processor follows (patch_processor)
            core._focusvlm_image_count = count

        def undo() -> None:
            core.__dict__.pop("pack_image_features", None)
            core.__dict__.pop("_focusvlm_image_count", None)
        return undo

    def budget_reduced_crops(self, model, tokens_per_crop, budget):
        geometry = self.tower_geometry(model)
        if geometry.keeps_cls:
            raise UnsupportedModelError(f"{self.title}: a per-image budget counts patch tokens, but this model "
                                        "keeps each crop's CLS token (vision_feature_select_strategy='full')")
        core = self.core(model)
        title, adapter = self.title, self
        call: dict[str, Any] = {}

        def pack(images: list[AnyResImage]) -> list[torch.Tensor]:
            packed = []
            for image in images:
                if image.crops.shape[1] != tokens_per_crop:
                    raise RuntimeError(f"{title}: a crop reached the projector with {image.crops.shape[1]} tokens, "
                                       f"expected {tokens_per_crop}")
                base, tile = budget(image.stock_tokens, image.crops.shape[0] - 1)
                packed.append(pack_budget_crops(image.crops, image.newline, base, tile))
            return packed

        def count(stock: int, tiles: int) -> int:
            base, tile = budget(stock, tiles)
            return base + tiles * (tile + 1) if tile > 0 else base

        import inspect

        undo_packing = self.pack_images_with(model, pack, count)
        stock_features = core.get_image_features
        signature = inspect.signature(stock_features)

        # each vision call: the tokens every crop of the tower's batch keeps, from the image sizes alone
        @functools.wraps(stock_features)
        def get_image_features(*args: Any, **kwargs: Any):
            bound = signature.bind_partial(*args, **kwargs).arguments
            sizes = [[int(x) for x in size] for size in bound["image_sizes"]]
            counts = []
            for size, crops in zip(sizes, adapter._crops_per_image(core, sizes, bound.get("batch_num_images"))):
                tiles = crops - 1
                base, tile = budget(adapter._stock_tokens(core, size, tiles, bound.get("vision_aspect_ratio")), tiles)
                counts += [base] + [tile] * tiles
            call["counts"] = counts
            try:
                return stock_features(*args, **kwargs)
            finally:
                call.pop("counts", None)

        core.get_image_features = get_image_features

        def undo() -> None:
            core.__dict__.pop("get_image_features", None)
            undo_packing()
        return (lambda: call.get("counts")), undo

    def _crops_per_image(self, core, image_sizes: list, batch_num_images=None) -> list[int]:
        """Crops the core cuts each image of a vision call into (base crop + tiles), as ``get_image_features``."""
        vc = core.config.vision_config
        return [1 + math.prod(anyres_tiles(size, core.config.image_grid_pinpoints, (vc.image_size,) * 2))
                for size in image_sizes]

    def _stock_tokens(self, core, image_size: list, tiles: int, vision_aspect_ratio=None) -> int:
        """The stock model's token count for one image of ``tiles`` tiles (a lone crop: its patches + a newline)."""
        vc = core.config.vision_config
        side = vc.image_size // vc.patch_size
        if tiles == 0:
            return side * side + 1
        return anyres_stock_tokens(image_size, core.config.image_grid_pinpoints, (vc.image_size,) * 2, (side, side))

    # ------------------------------------------------------------------ processor
    def _image_tiles(self, processor, image_inputs: dict, image_idx: int) -> int:
        """Tiles the processor cut image ``image_idx`` into (its own pinpoint choice)."""
        size = image_inputs["image_sizes"][image_idx]
        size = size.tolist() if hasattr(size, "tolist") else list(size)
        crop = tuple(image_inputs["pixel_values"][0][0].shape[-2:])
        rows, cols = anyres_tiles(size, processor.image_processor.image_grid_pinpoints, crop)
        return rows * cols

    def _patch_counts(self, processor, count: Callable[[int, int], int]) -> Callable[[], None]:
        """The processor emits ``count(stock, tiles)`` placeholders per image (a method that packs or reduces
        whole images with a count: ``pack_images_with``)."""
        stock_replace = processor.replace_image_token
        stock_count = processor._get_num_multimodal_tokens
        p, adapter = processor, self

        def replace_image_token(image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
            stock = len(stock_replace(image_inputs, image_idx, **kwargs)) // len(p.image_token)
            return p.image_token * count(stock, adapter._image_tiles(p, image_inputs, image_idx))

        def _get_num_multimodal_tokens(image_sizes=None, **kwargs: Any):
            data = stock_count(image_sizes=image_sizes, **kwargs)
            if image_sizes is not None:
                crop = adapter._processed_crop(p, kwargs)
                pins = p.image_processor.image_grid_pinpoints
                data.num_image_tokens = [count(n, math.prod(anyres_tiles(list(size), pins, crop)))
                                         for n, size in zip(data.num_image_tokens, image_sizes)]
            return data

        return override_on_instance(processor, replace_image_token=replace_image_token,
                                    _get_num_multimodal_tokens=_get_num_multimodal_tokens)

    def _per_crop(self, model, processor, patches_for_grid) -> int:
        geometry = self.tower_geometry(model)
        if getattr(processor, "patch_size", geometry.patch_size) != geometry.patch_size:
            from ..errors import ConfigError

            raise ConfigError(f"processor patch_size={processor.patch_size} does not match the vision tower's "
                              f"{geometry.patch_size}")
        return patches_for_grid(geometry.grid) + (1 if geometry.keeps_cls else 0)

    def _image_count(self, processor, per_crop: int, image_size, crop: tuple[int, int]) -> int:
        rows, cols = anyres_tiles(image_size, processor.image_processor.image_grid_pinpoints, crop)
        return packed_length(per_crop, rows * cols)

    @staticmethod
    def _processed_crop(processor, kwargs: dict) -> tuple[int, int]:
        """The crop size the image processor emits (what stock _get_num_multimodal_tokens reads)."""
        size = processor._merge_kwargs(**kwargs)["images_kwargs"].get("size") or processor.image_processor.size
        get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
        side = get("shortest_edge") or min(get("height"), get("width"))
        return side, side

    def _replacement_count(self, processor, per_crop: int, image_inputs: dict, image_idx: int) -> int:
        size = image_inputs["image_sizes"][image_idx]
        size = size.tolist() if hasattr(size, "tolist") else list(size)
        crop = tuple(image_inputs["pixel_values"][0][0].shape[-2:])
        return self._image_count(processor, per_crop, size, crop)

    def patch_processor(self, model, processor, patches_for_grid):
        for name in ("replace_image_token", "_get_num_multimodal_tokens", "image_token", "image_processor"):
            if not hasattr(processor, name):
                raise UnsupportedModelError(f"the processor {type(processor).__name__} has no {name}; focusvlm "
                                            f"adjusts {self.title} processor placeholder counts")
        if getattr(processor.image_processor, "image_grid_pinpoints", None) is None:
            raise UnsupportedModelError(f"the image processor {type(processor.image_processor).__name__} has no "
                                        "image_grid_pinpoints (not an AnyRes processor)")
        count = self.core(model).__dict__.get("_focusvlm_image_count")
        if count is not None:   # the vision method packs or reduces whole images: its own count per image
            return self._patch_counts(processor, count)
        if "pack_image_features" not in self.core(model).__dict__:
            # the crops keep their grids (e.g. VMTC target 1.0), so the model packs them the stock way
            # (unpadding, a newline per grid row) and the stock count is already right
            return lambda: None
        per_crop = self._per_crop(model, processor, patches_for_grid)
        stock_count = processor._get_num_multimodal_tokens
        p, adapter = processor, self

        def replace_image_token(image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
            return p.image_token * adapter._replacement_count(p, per_crop, image_inputs, image_idx)

        def _get_num_multimodal_tokens(image_sizes=None, **kwargs: Any):
            data = stock_count(image_sizes=image_sizes, **kwargs)
            if image_sizes is not None:
                crop = adapter._processed_crop(p, kwargs)
                data.num_image_tokens = [adapter._image_count(p, per_crop, size, crop) for size in image_sizes]
            return data

        return override_on_instance(processor, replace_image_token=replace_image_token,
                                    _get_num_multimodal_tokens=_get_num_multimodal_tokens)

    # ------------------------------------------------------------------ building
    def random_model(self, preset, seed=0, dtype=torch.float32, attn_implementation="sdpa", **overrides):
        return random_llava_next(preset, seed=seed, dtype=dtype, attn_implementation=attn_implementation,
                                 **overrides)
