"""SPD bound to a model: pools the features the projector receives (tensor functions in ``spd.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, fail
from ..methods import SelectionShape, VisionMethod, register_method
from ..viz import MERGED, Panel
from .spd import spd_grid, spd_pool


@dataclass(frozen=True)
class SPDConfig:
    """Spatial down-sampling baseline: average-pool the feature grid by ``factor``."""

    factor: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.factor, bool) or not isinstance(self.factor, int) or self.factor < 1:
            fail("SPDConfig", "factor", f"must be a positive integer, got {self.factor!r}")


@register_method
class SPD(VisionMethod):
    """SPD bound to a model: pools the features the projector receives."""

    name = "spd"
    config_class = SPDConfig
    summary = "spd[:factor] spatial down-sampling before the projector (default factor 2)"
    cli_arg = "factor"

    @classmethod
    def selection_flops(cls, config: SPDConfig, shape: SelectionShape) -> int:
        # average pooling: one addition per input feature value
        return shape.crops * shape.patches * shape.vision_width

    def __init__(self, model: Any, adapter: Any, config: SPDConfig, processor: Any | None = None):
        super().__init__(model, adapter, config, processor)
        self.geometry = adapter.tower_geometry(model)
        try:
            spd_grid(*self.geometry.grid, config.factor)  # validates early
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.on_remove(adapter.reduce_projector_input(model, self._reduce))
        try:  # pooled crops are packed without their grid by AnyRes families (factor 1 pools nothing)
            if config.factor > 1:
                self.on_remove(adapter.pack_reduced_crops(model, self.image_tokens()))
        except Exception:
            self.remove()
            raise

    def _reduce(self, patches: torch.Tensor) -> torch.Tensor:
        if self.record:
            self.records = [{"kind": "spd", "factor": self.config.factor, "grid": self.geometry.grid}]
        return spd_pool(patches, self.geometry.grid, self.config.factor)

    def output_patches(self, grid: tuple[int, int]) -> int:
        oh, ow = spd_grid(*grid, self.config.factor)
        return oh * ow

    def panels(self, sample: int = 0) -> list[Panel]:
        return [window_panel(self.geometry.grid, self.config.factor)]


def window_panel(grid: tuple[int, int], factor: int) -> Panel:
    """Every pooling window tinted as the one token it becomes."""
    h, w = grid
    ys, xs = np.divmod(np.arange(h * w), w)
    windows = (ys // factor) * (-(-w // factor)) + xs // factor
    return Panel(f"SPD x{factor}: {h * w} -> {int(windows.max()) + 1}", np.full(h * w, MERGED), windows)
