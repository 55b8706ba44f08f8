"""VisionZip as a registered method: config and binding.

The tensor function is in ``visionzip.py`` and follows the official code
(dvlab-research/VisionZip). The binding hands it what that code reads, all
from the encoder layer whose output the LLM reads (layer 22 of CLIP-L for
LLaVA-1.5): its output with CLS, the CLS row of its attention per head and
its keys averaged over heads, both recomputed from its own q/k projections
so the tower keeps its fused attention. The dominant + contextual tokens
(CLS among them) replace the projector's whole input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, fail
from ..methods import SelectionShape, VisionMethod, register_method
from ..viz import DROPPED, MERGED, PRIMARY, Panel, record_field
from . import visionzip

#: the patches the official setting (54 + 10) was chosen for: CLIP ViT-L/14-336 in LLaVA-1.5
LLAVA15_PATCHES = 576


@dataclass(frozen=True)
class VisionZipConfig:
    """VisionZip: ``dominant`` tokens by CLS attention (CLS counted among them) + ``contextual`` merged tokens.

    Official LLaVA-1.5 setting: 54 + 10 = 64 tokens to the LLM. On the command
    line ``visionzip:192`` gives a total, split in the README's 54:10
    proportion (``visionzip.split_budget``: 192 -> 162 + 30).
    """

    dominant: int = visionzip.DEFAULT_DOMINANT
    contextual: int = visionzip.DEFAULT_CONTEXTUAL

    def __post_init__(self) -> None:
        for name in ("dominant", "contextual"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                fail("VisionZipConfig", name, f"must be a positive integer, got {v!r}")

    @property
    def tokens(self) -> int:
        return self.dominant + self.contextual


@register_method
class VisionZip(VisionMethod):
    """VisionZip bound to a model: dominant + contextual tokens of the feature layer replace the projector input."""

    name = "visionzip"
    config_class = VisionZipConfig
    summary = "visionzip[:tokens] VisionZip, official code (default 54 dominant + 10 contextual = 64 tokens)"
    cli_arg = "tokens"

    @classmethod
    def selection_flops(cls, config: VisionZipConfig, shape: SelectionShape) -> int:
        # per crop: the CLS attention row (dominant tokens), then every remaining token's key similarity to the
        # contextual targets (its merge)
        rest = max(shape.patches - config.dominant, 0)
        return shape.crops * 2 * shape.vision_width * ((shape.patches + 1) + rest * config.contextual)

    @classmethod
    def parse(cls, value: str | None) -> VisionZipConfig:
        if value is None or value == "":
            return cls.default_config()
        try:
            total = float(value)
        except ValueError:
            raise ConfigError(f"method 'visionzip': {value!r} is not a number") from None
        if not total.is_integer():
            raise ConfigError(f"method 'visionzip': the budget is a token count (dominant + contextual), got {value}")
        try:
            dominant, contextual = visionzip.split_budget(int(total))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return VisionZipConfig(dominant=dominant, contextual=contextual)

    def __init__(self, model: Any, adapter: Any, config: VisionZipConfig, processor: Any | None = None):
        from ..models import UnsupportedModelError

        super().__init__(model, adapter, config, processor)
        self.geometry = g = adapter.tower_geometry(model)
        if len(g.feature_layers) != 1:
            raise UnsupportedModelError("VisionZip needs a single vision_feature_layer")
        if not g.has_cls:
            raise UnsupportedModelError("VisionZip needs a vision tower with a CLS token (CLIP)")
        if g.feature_layers[0] == 0:
            raise UnsupportedModelError("VisionZip reads an encoder layer's attention, but the LLM reads the "
                                        "embeddings")
        self.layer = g.feature_layers[0] - 1     # the layer whose output the LLM reads (official: layers[-2])
        try:
            visionzip.token_count(g.num_patches, config.dominant, config.contextual)
        except ValueError as exc:
            raise ConfigError(f"VisionZipConfig: {exc}") from None
        self._dominant: torch.Tensor | None = None   # the last tower call's dominant positions, per crop
        self._next_crop = 0                           # the first of them the AnyRes packing has not laid out
        self._take, undo_capture = adapter.capture_layer_output(model, self.layer)
        self.on_remove(undo_capture)
        try:
            self.on_remove(adapter.replace_projector_input(model, self._replace))
            # AnyRes: the official LLaVA-NeXT layout (visionzip/llava_arch.py); a single-crop family: nothing
            if adapter.packs_crops:
                self.on_remove(adapter.pack_images_with(model, self._pack_images, self._image_count))
        except Exception:
            self.remove()
            raise

    def _pack_images(self, images: list) -> list[torch.Tensor]:
        return [self._pack(image.crops, image.tiles, image.newline) for image in images]

    def _replace(self, features: torch.Tensor) -> torch.Tensor:
        layer, layer_input, hidden = self._take()
        q, k, scale = self.adapter.tower_cls_qk(layer, layer.layer_norm1(layer_input))
        heads = k.shape[1]
        keys = k.transpose(1, 2).flatten(2)                                     # k_proj output (B, 1 + N, C)
        cls_attn = visionzip.multihead_cls_attention(q.flatten(1), keys, heads, scale)
        metric = visionzip.head_mean_keys(keys, heads)
        out, record = visionzip.visionzip(hidden, cls_attn, metric, self.config.dominant, self.config.contextual)
        self._dominant, self._next_crop = record.dominant, 0
        if self.record:
            self.records = [record]
        return out

    def _pack(self, crops: torch.Tensor, tiles: tuple[int, int], newline: torch.Tensor) -> torch.Tensor:
        """One AnyRes image's projected crops in the official layout; its crops are the next 1 + tiles rows of
        the last tower call (the family packs images in the order their crops went through the tower)."""
        start, stop = self._next_crop, self._next_crop + crops.shape[0]
        if self._dominant is None or stop > self._dominant.shape[0]:
            raise RuntimeError("VisionZip: an image's crops reached the packing without a tower call that chose "
                               "their dominant tokens")
        self._next_crop = stop
        return visionzip.pack_anyres(crops, self._dominant[start:stop].to(crops.device), tiles, self.geometry.grid,
                                     newline)

    def _image_count(self, stock: int, tiles: int) -> int:
        return visionzip.anyres_token_count(tiles, self.config.dominant, self.config.contextual)

    @classmethod
    def fit_to_model(cls, config: VisionZipConfig, model: Any, adapter: Any) -> VisionZipConfig:
        """A tower with fewer tokens than dominant + contextual (a small preset): the same share of its patches as
        the config takes of LLaVA-1.5's 576 (64 -> 2 of next-tiny's 16), at least 2, in the config's proportion."""
        from ..models import UnsupportedModelError

        try:
            n = adapter.tower_geometry(model).num_patches
        except UnsupportedModelError:
            return config
        if config.tokens <= n + 1:
            return config
        total = max(2, int(config.tokens * n / LLAVA15_PATCHES + 0.5))
        dominant = min(max(int(total * config.dominant / config.tokens + 0.5), 1), total - 1)
        return VisionZipConfig(dominant=dominant, contextual=total - dominant)

    def output_patches(self, grid: tuple[int, int]) -> int:
        if self.adapter.packs_crops:
            raise ValueError(f"VisionZip on {self.adapter.title}: an image's count depends on its tiles "
                             f"((1 + tiles) x {self.config.tokens}, no newlines); the patched processor emits it")
        total = visionzip.token_count(grid[0] * grid[1], self.config.dominant, self.config.contextual)
        # ``image_tokens`` adds one for a kept CLS; VisionZip's total already holds it, whatever the strategy
        return total - (1 if self.geometry.keeps_cls else 0)

    def panels(self, sample: int = 0) -> list[Any]:
        return [visionzip_panel(self.records[0], self.geometry.num_patches, sample)] if self.records else []


def visionzip_panel(record, num_patches: int, sample: int = 0) -> Panel:
    """VisionZip (``visionzip.VisionZipRecord``; positions count CLS as 0): dominant patches outlined,
    each contextual token's target and members tinted with one colour."""
    dom = record_field(record, "dominant")[sample].cpu().numpy()
    ctx = record_field(record, "contextual")[sample].cpu().numpy()
    merged = record_field(record, "merged")[sample].cpu().numpy()
    into = record_field(record, "merged_into")[sample].cpu().numpy()
    state = np.full(num_patches, DROPPED)
    group = np.full(num_patches, -1)
    patch = lambda pos: pos[pos > 0] - 1  # noqa: E731  (CLS has no patch)
    state[patch(dom)] = PRIMARY
    for slot, pos in enumerate(ctx):
        if pos > 0:
            state[pos - 1], group[pos - 1] = MERGED, slot
    for pos, slot in zip(merged, into):
        if pos > 0:
            state[pos - 1], group[pos - 1] = MERGED, slot
    return Panel(f"VisionZip: {num_patches} -> {len(dom)} + {len(ctx)}", state, group)
