"""SPD, spatial down-sampling (the paper's baseline): average-pool the patch-feature grid.

The features that enter the projector (24x24 for LLaVA-1.5) are pooled over
non-overlapping f x f windows (factor 2: 576 -> 144 tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ConfigError, fail
from ..methods import VisionMethod, register_method


def spd_grid(height: int, width: int, factor: int) -> tuple[int, int]:
    """Output grid of SPD: ceil(h / f) x ceil(w / f) (a partial edge window averages what it covers)."""
    if factor < 1:
        raise ValueError(f"SPDConfig.factor must be >= 1, got {factor}")
    if factor > max(height, width):
        raise ValueError(f"SPDConfig.factor={factor} is larger than the {height}x{width} feature grid")
    return math.ceil(height / factor), math.ceil(width / factor)


def spd_pool(x: torch.Tensor, grid: tuple[int, int], factor: int) -> torch.Tensor:
    """Average-pool patch features x (B, h*w, D), raster order, over non-overlapping f x f windows.

    Grids not divisible by f keep their edge: the last window row/column
    averages only the patches it covers. Returns (B, ceil(h/f) * ceil(w/f), D).
    """
    h, w = grid
    B, n, D = x.shape
    if n != h * w:
        raise ValueError(f"SPD: {n} feature tokens do not form the {h}x{w} grid")
    oh, ow = spd_grid(h, w, factor)
    img = x.float().transpose(1, 2).reshape(B, D, h, w)
    pooled = torch.nn.functional.avg_pool2d(img, factor, stride=factor, ceil_mode=True, count_include_pad=False)
    assert pooled.shape[-2:] == (oh, ow)
    return pooled.flatten(2).transpose(1, 2).to(x.dtype)


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

    def __init__(self, model: Any, adapter: Any, config: SPDConfig, processor: Any | None = None):
        super().__init__(model, adapter, config, processor)
        self.geometry = adapter.tower_geometry(model)
        try:
            spd_grid(*self.geometry.grid, config.factor)  # validates early
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.records: list[dict] = []
        undo_reduce = adapter.reduce_projector_input(model, self._reduce)
        try:  # pooled crops are packed without their grid by AnyRes families (factor 1 pools nothing)
            undo_pack = adapter.pack_reduced_crops(model, self.image_tokens()) if config.factor > 1 else (lambda: None)
        except Exception:
            undo_reduce()
            raise

        def undo() -> None:
            undo_pack()
            undo_reduce()
        self._undo = undo

    def _reduce(self, patches: torch.Tensor) -> torch.Tensor:
        if self.record:
            self.records = [{"kind": "spd", "factor": self.config.factor, "grid": self.geometry.grid}]
        return spd_pool(patches, self.geometry.grid, self.config.factor)

    def output_patches(self, grid: tuple[int, int]) -> int:
        oh, ow = spd_grid(*grid, self.config.factor)
        return oh * ow

    def panels(self, sample: int = 0) -> list[Any]:
        from .. import viz

        return [viz.spd_panel(self.geometry.grid, self.config.factor)]

    def remove(self, processor: Any | None = None) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None
