"""SPD, spatial down-sampling (the paper's baseline): average-pool the patch-feature grid.

The features that enter the projector (24x24 for LLaVA-1.5) are pooled over
non-overlapping f x f windows (factor 2: 576 -> 144 tokens). The method is in
``spd_method.py``.
"""

from __future__ import annotations

import math

import torch


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
