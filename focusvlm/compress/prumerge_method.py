"""LLaVA-PruMerge / PruMerge+ as a registered method: config and binding.

The tensor functions are in ``prumerge.py`` and follow the official code
(42Shawn/LLaVA-PruMerge, clip_encoder.py). The binding hands them what that
code hooks: the q/k projections of the LAST encoder layer on its layer-normed
input, which is the hidden state LLaVA reads its features from, and the patch
features before the projector (docs/methods.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, fail
from ..methods import SelectionShape, VisionMethod, register_method
from ..viz import DROPPED, MERGED, PRIMARY, Panel, record_field
from . import prumerge


@dataclass(frozen=True)
class PruMergeConfig:
    """LLaVA-PruMerge baseline (and PruMerge+ with ``plus=True``), as the official code computes it.

    budget: None (default) runs the official adaptive path: the kept count comes
        from the IQR outliers of the batch's CLS attention, so it is only known
        after the tower ran (no processor can emit matching placeholders). A
        fraction in (0, 1] is the official ``reduction_ratio`` of the fixed path
        (1/8: 72 kept + 1 merged = 73 tokens of 576; PruMerge+ 145). A whole
        number >= 2 is the number of tokens the LLM receives: the fixed path
        runs at the ratio that yields it (PruMerge+ may land one short).
    neighbours: key-nearest tokens merged into each kept token (official: 32).
    plus: PruMerge+ (uniform spatial samples added to the kept tokens).
    """

    budget: int | float | None = None
    neighbours: int = prumerge.NEIGHBOURS
    plus: bool = False

    def __post_init__(self) -> None:
        b = self.budget
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0):
            fail("PruMergeConfig", "budget",
                 f"must be None (adaptive), a fraction in (0, 1] or a token count, got {b!r}")
        if isinstance(b, float) and b > 1.0:
            if not b.is_integer():
                fail("PruMergeConfig", "budget", f"a value above 1 is a token count and must be whole, got {b!r}")
            object.__setattr__(self, "budget", int(b))
        if isinstance(self.budget, int) and self.budget == 1:
            fail("PruMergeConfig", "budget", "the integer 1 is ambiguous: write 1.0 for the reduction ratio 1 or a "
                 "token count of at least 2 (one kept token + the merged one)")
        if isinstance(self.neighbours, bool) or not isinstance(self.neighbours, int) or self.neighbours < 1:
            fail("PruMergeConfig", "neighbours", f"must be a positive integer, got {self.neighbours!r}")
        if not isinstance(self.plus, bool):
            fail("PruMergeConfig", "plus", f"must be true or false, got {self.plus!r}")

    @property
    def adaptive(self) -> bool:
        return self.budget is None

    def ratio(self, num_patches: int) -> float:
        """The official ``reduction_ratio`` of the fixed path for ``num_patches`` patches."""
        if self.budget is None:
            raise ConfigError("PruMergeConfig.budget: the adaptive path has no fixed ratio")
        if isinstance(self.budget, float):
            return self.budget
        return prumerge.ratio_for_count(num_patches, self.budget, self.plus)


@register_method
class PruMerge(VisionMethod):
    """PruMerge(+) bound to a model: CLS attention of the last encoder layer decides, before the projector."""

    name = "prumerge"
    config_class = PruMergeConfig
    summary = ("prumerge[:budget] LLaVA-PruMerge, official code (budget: tokens, or the reduction ratio if <= 1; "
               "none = adaptive)")
    cli_arg = "budget"

    @classmethod
    def selection_flops(cls, config: PruMergeConfig, shape: SelectionShape) -> int:
        # per crop: the CLS attention row, then each kept token's key similarity to every other token (its
        # nearest neighbours merged in)
        kept = max(1, shape.kept_tokens // shape.crops)
        return shape.crops * 2 * shape.vision_width * ((shape.patches + 1) + kept * shape.patches)

    def __init__(self, model: Any, adapter: Any, config: PruMergeConfig, processor: Any | None = None):
        from ..models import UnsupportedModelError

        super().__init__(model, adapter, config, processor)
        self.geometry = g = adapter.tower_geometry(model)
        if len(g.feature_layers) != 1:
            raise UnsupportedModelError("PruMerge needs a single vision_feature_layer (its CLS attention decides)")
        if not g.has_cls:
            raise UnsupportedModelError("PruMerge needs a vision tower with a CLS token (CLIP)")
        # the official code reads layer 23 of CLIP-L: the layer whose INPUT is the feature hidden state
        self.layer = g.feature_layers[0]
        if self.layer >= g.num_layers:
            raise UnsupportedModelError(
                f"PruMerge reads the q/k of the encoder layer after the feature layer, but the LLM reads the last "
                f"encoder layer's output (vision_feature_layer={g.feature_layers[0] - g.num_layers - 1})")
        self.ratio = None
        try:
            if config.budget is not None:
                self.ratio = config.ratio(g.num_patches)
                prumerge.token_count(g.num_patches, self.ratio, config.plus)  # fails now on an impossible ratio
        except ValueError as exc:
            raise ConfigError(f"PruMergeConfig.budget: {exc}") from None
        if processor is not None:
            self.output_patches(g.grid)  # raises the adaptive-count error
        self._take, undo_capture = adapter.capture_layer_input(model, self.layer)
        self.on_remove(undo_capture)
        try:
            self.on_remove(adapter.reduce_projector_input(model, self._reduce))
            # AnyRes families pack the reduced crops without a grid (the adaptive count is known only per call)
            self.on_remove(adapter.pack_reduced_crops(model, self.image_tokens() if self.ratio is not None else None))
        except Exception:
            self.remove()
            raise

    def _reduce(self, patches: torch.Tensor) -> torch.Tensor:
        layer, h = self._take()
        q, k, _ = self.adapter.tower_cls_qk(layer, layer.layer_norm1(h))
        # the raw projection outputs, as the official forward hooks see them: heads side by side, no scaling
        cls_query = q.flatten(1)                                   # (B, C)
        keys = k.transpose(1, 2).flatten(2)                        # (B, 1 + N, C)
        try:
            out, record = prumerge.prumerge(patches, cls_query, keys, plus=self.config.plus,
                                            adaptive=self.config.adaptive, ratio=self.ratio or prumerge.DEFAULT_RATIO,
                                            neighbours=self.config.neighbours)
        except ValueError as exc:
            raise ValueError(f"PruMerge{'+' if self.config.plus else ''}: {exc}") from None
        if self.record:
            self.records = [record]
        return out

    def output_patches(self, grid: tuple[int, int]) -> int:
        if self.config.adaptive:
            raise ConfigError("PruMergeConfig.budget: the adaptive (IQR) count is only known after the image is seen, "
                              "so a processor cannot emit matching placeholders; set a budget (e.g. 0.125, the "
                              "official fixed path, or a token count)")
        n = grid[0] * grid[1]
        ratio = self.config.ratio(n)
        return prumerge.token_count(n, ratio, self.config.plus)

    def panels(self, sample: int = 0) -> list[Any]:
        if not self.records:
            return []
        return [prumerge_panel(self.records[0], self.geometry.num_patches, sample, plus=self.config.plus)]


def prumerge_panel(record, num_patches: int, sample: int = 0, plus: bool = False) -> Panel:
    """PruMerge(+) (``prumerge.PruMergeRecord`` or a dict with kept / neighbours):
    kept patches outlined; each kept token's merged neighbours tinted with its
    colour (a patch several kept tokens absorb shows its nearest claim); every
    other pruned patch flows into the one extra token, tinted with one more colour."""
    kept = record_field(record, "kept")[sample].cpu()
    near = record_field(record, "neighbours")[sample].cpu()
    state = np.full(num_patches, MERGED)
    group = np.full(num_patches, len(kept))          # the extra token (sum of the pruned patches)
    for slot in range(near.shape[1] - 1, -1, -1):  # the closest neighbour wins where sets overlap
        group[near[:, slot].numpy()] = np.arange(len(kept))
    pruned = record.get("pruned") if isinstance(record, dict) else record.pruned
    if pruned is not None:  # positions the official complement skips (duplicate picks) reach no token
        reached = np.zeros(num_patches, dtype=bool)
        for positions in (pruned[sample].cpu(), kept, near.flatten()):
            reached[positions.numpy()] = True
        state[~reached], group[~reached] = DROPPED, -1
    state[kept.numpy()] = PRIMARY
    group[kept.numpy()] = np.arange(len(kept))
    return Panel(f"PruMerge{'+' if plus else ''}: {num_patches} -> {len(kept) + 1}", state, group)
