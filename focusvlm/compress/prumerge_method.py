"""LLaVA-PruMerge / PruMerge+ as a registered method: config and binding.

The tensor functions are in ``baselines.py``; this module reads the CLS
attention and keys of the layer whose output the LLM uses and reduces the
features before the projector (through the family adapter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import ConfigError, fail
from ..methods import VisionMethod, register_method
from . import baselines


@dataclass(frozen=True)
class PruMergeConfig:
    """LLaVA-PruMerge baseline (and PruMerge+ with ``plus=True``).

    budget: None keeps PruMerge's adaptive (IQR outlier) count, which differs
        per image, so only batch size 1 works; an int or a fraction fixes the
        number of kept tokens so batches keep one shape.
    neighbours: how many key-nearest tokens each kept token absorbs.
    plus: add spatially uniform samples (PruMerge+).
    """

    budget: int | float | None = None
    neighbours: int = 32
    plus: bool = False

    def __post_init__(self) -> None:
        b = self.budget
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or b <= 0):
            fail("PruMergeConfig", "budget", f"must be None, a fraction in (0, 1] or a positive count, got {b!r}")
        if isinstance(b, float) and b > 1.0:
            if not b.is_integer():
                fail("PruMergeConfig", "budget", f"a value above 1 is a token count and must be whole, got {b!r}")
            object.__setattr__(self, "budget", int(b))
        if isinstance(self.neighbours, bool) or not isinstance(self.neighbours, int) or self.neighbours < 1:
            fail("PruMergeConfig", "neighbours", f"must be a positive integer, got {self.neighbours!r}")
        if not isinstance(self.plus, bool):
            fail("PruMergeConfig", "plus", f"must be true or false, got {self.plus!r}")


@register_method
class PruMerge(VisionMethod):
    """PruMerge bound to a model: CLS attention of the feature layer decides, before the projector."""

    name = "prumerge"
    config_class = PruMergeConfig
    summary = "prumerge[:budget] LLaVA-PruMerge (budget: fraction or count; none = adaptive)"
    cli_arg = "budget"

    def __init__(self, model: Any, adapter: Any, config: PruMergeConfig, processor: Any | None = None):
        from ..models import UnsupportedModelError

        super().__init__(model, adapter, config, processor)
        self.geometry = g = adapter.tower_geometry(model)
        if len(g.feature_layers) != 1:
            raise UnsupportedModelError("PruMerge needs a single vision_feature_layer (its CLS attention decides)")
        if not g.has_cls:
            raise UnsupportedModelError("PruMerge needs a vision tower with a CLS token (CLIP)")
        self.budget = None
        if config.budget is not None:
            self.budget = baselines.resolve_budget(g.num_patches, config.budget)
        elif processor is not None:
            self.output_patches(g.grid)  # raises the adaptive-count error
        self.records: list[dict] = []
        self._take, undo_capture = adapter.capture_layer_input(model, g.feature_layers[0] - 1)
        self._undo = [undo_capture]
        try:
            self._undo.append(adapter.reduce_projector_input(model, self._reduce))
            # AnyRes families pack the reduced crops without a grid (the adaptive count is known only per call)
            self._undo.append(adapter.pack_reduced_crops(model, self.image_tokens() if self.budget else None))
        except Exception:
            self.remove()
            raise

    def _reduce(self, patches: torch.Tensor) -> torch.Tensor:
        layer, z = self._take()
        q, k, scale = self.adapter.tower_cls_qk(layer, layer.layer_norm1(z))
        from .vmtc import cls_importance

        attn = cls_importance(q, k, scale)
        keys = k.transpose(1, 2).flatten(2)  # (B, 1 + n, D): the heads side by side, as the layer's k_proj output
        keep = baselines.prumerge_keep(attn, self.budget, self.config.plus)
        out, kept, near = baselines.prumerge_merge(patches, keys[:, 1:], attn, keep, self.config.neighbours)
        if self.record:
            self.records = [{"kind": "prumerge", "kept": kept, "neighbours": near, "attention": attn}]
        return out

    def output_patches(self, grid: tuple[int, int]) -> int:
        if self.config.budget is None:
            raise ConfigError("PruMergeConfig.budget: the adaptive (IQR) count is only known after the image is "
                              "seen, so a processor cannot emit matching placeholders; set a budget")
        return baselines.resolve_budget(grid[0] * grid[1], self.config.budget)

    def panels(self, sample: int = 0) -> list[Any]:
        from .. import viz

        return [viz.prumerge_panel(self.records[0], self.geometry.num_patches, sample)] if self.records else []

    def remove(self, processor: Any | None = None) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo = []
        self.records = []
