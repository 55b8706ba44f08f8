"""DivPrune as a registered method: config and binding.

The tensor function is in ``divprune.py`` and follows the official code
(vbdi/divprune, llava_arch.py). The binding applies it where that code does:
to each image's projected features (after the projector, before they are
placed in the LLM's input embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, fail
from ..methods import VisionMethod, register_method
from ..viz import DROPPED, PRIMARY, Panel, record_field
from . import divprune


@dataclass(frozen=True)
class DivPruneConfig:
    """DivPrune: keep a max-min diverse subset of each image's projected tokens.

    budget: a fraction in (0, 1] is the official SUBSET_RATIO (default 0.098:
        int(round(0.098 * 576)) = 56 tokens); a whole number >= 2 is the token count.
    """

    budget: float | int = divprune.DEFAULT_RATIO

    def __post_init__(self) -> None:
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0:
            fail("DivPruneConfig", "budget", f"must be a fraction in (0, 1] or a token count, got {b!r}")
        if isinstance(b, float) and b > 1.0:
            if not b.is_integer():
                fail("DivPruneConfig", "budget", f"a value above 1 is a token count and must be whole, got {b!r}")
            object.__setattr__(self, "budget", int(b))
        if isinstance(self.budget, int) and self.budget == 1:
            fail("DivPruneConfig", "budget",
                 "the integer 1 is ambiguous: write 1.0 to keep every token or a count >= 2")

    def tokens(self, num_tokens: int) -> int:
        """Tokens kept of ``num_tokens`` image tokens."""
        if isinstance(self.budget, float):
            return divprune.token_count(num_tokens, self.budget)
        if self.budget > num_tokens:
            raise ConfigError(f"DivPruneConfig.budget={self.budget} exceeds the {num_tokens} image tokens")
        return self.budget


@register_method
class DivPrune(VisionMethod):
    """DivPrune bound to a model: max-min diversity selection on the projected image features."""

    name = "divprune"
    config_class = DivPruneConfig
    summary = "divprune[:budget] DivPrune, official code (budget: tokens, or the share kept if <= 1; default 0.098)"
    cli_arg = "budget"

    def __init__(self, model: Any, adapter: Any, config: DivPruneConfig, processor: Any | None = None):
        super().__init__(model, adapter, config, processor)
        self.geometry = g = adapter.tower_geometry(model)
        self.extra = 1 if g.keeps_cls else 0   # a kept CLS is one more projected token to choose from
        try:
            config.tokens(g.num_patches + self.extra)
        except ValueError as exc:
            raise ConfigError(f"DivPruneConfig.budget: {exc}") from None
        self.on_remove(adapter.reduce_projector_output(model, self._reduce))

    def _reduce(self, projected: torch.Tensor) -> torch.Tensor:
        out, record = divprune.divprune(projected, self.config.tokens(projected.shape[1]))
        if self.record:
            self.records = [record]
        return out

    def output_patches(self, grid: tuple[int, int]) -> int:
        return self.config.tokens(grid[0] * grid[1] + self.extra) - self.extra

    def panels(self, sample: int = 0) -> list[Any]:
        if not self.records:
            return []
        return [divprune_panel(self.records[0], self.geometry.num_patches, sample, offset=self.extra)]


def divprune_panel(record, num_patches: int, sample: int = 0, offset: int = 0) -> Panel:
    """DivPrune (``divprune.DivPruneRecord``): kept patches outlined, the rest dropped. ``offset`` = 1 when
    the projected tokens start with CLS."""
    kept = record_field(record, "kept")[sample].cpu().numpy() - offset
    state = np.full(num_patches, DROPPED)
    state[kept[kept >= 0]] = PRIMARY
    return Panel(f"DivPrune: {num_patches + offset} -> {len(kept)}", state, np.full(num_patches, -1))
