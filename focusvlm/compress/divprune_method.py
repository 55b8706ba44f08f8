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
from ..methods import SelectionShape, VisionMethod, register_method
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

    def image_tokens(self, num_tokens: int) -> int:
        """Tokens kept of an AnyRes image's ``num_tokens`` packed tokens, whose count varies with the image: as
        ``tokens``, except that a count above ``num_tokens`` keeps the whole image and a share keeps at least one."""
        if isinstance(self.budget, int):
            return min(self.budget, num_tokens)
        return max(1, int(round(self.budget * num_tokens)))


@register_method
class DivPrune(VisionMethod):
    """DivPrune bound to a model: max-min diversity selection on the projected image features."""

    name = "divprune"
    config_class = DivPruneConfig
    summary = "divprune[:budget] DivPrune, official code (budget: tokens, or the share kept if <= 1; default 0.098)"
    cli_arg = "budget"

    @classmethod
    def selection_flops(cls, config: DivPruneConfig, shape: SelectionShape) -> int:
        # the official code's cosine similarities of every pair of the image's L projected tokens (L = the stock
        # count: the packed sequence on AnyRes, the crop's tokens otherwise), then k max-min steps over L
        n = shape.stock_tokens
        return 2 * n * n * shape.llm_width + 3 * n * shape.llm_width + 2 * shape.kept_tokens * n

    def __init__(self, model: Any, adapter: Any, config: DivPruneConfig, processor: Any | None = None):
        super().__init__(model, adapter, config, processor)
        self.geometry = g = adapter.tower_geometry(model)
        self.extra = 1 if g.keeps_cls else 0   # a kept CLS is one more projected token to choose from
        self.anyres = adapter.packs_crops
        if self.anyres:
            # the official LLaVA-1.6 path: the selection runs over each image's whole packed sequence (base crop,
            # unpadded tiles, newlines), so the kept count follows the stock count of that image
            self.on_remove(adapter.pack_images_with(model, self._reduce_images, self._image_count))
            return
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

    def _reduce_images(self, images: list) -> list[torch.Tensor]:
        return [self._reduce_image(index, image.stock_packed(), image.stock_sources) for index, image in enumerate(images)]

    def _reduce_image(self, index: int, packed: torch.Tensor, sources: Any) -> torch.Tensor:
        """Image ``index`` of a call: its packed (L, D) features -> the kept (m, D), in sequence order."""
        out, record = divprune.divprune(packed[None], self.config.image_tokens(packed.shape[0]))
        if self.record:   # `focusvlm show`: per image of the call, the record and where each packed row came from
            self.records = (self.records if index else []) + [AnyResDivPruneRecord(record, sources())]
        return out[0]

    def _image_count(self, stock: int, tiles: int) -> int:
        return self.config.image_tokens(stock)

    def output_patches(self, grid: tuple[int, int]) -> int:
        if self.anyres:
            raise ValueError(f"DivPrune on {self.adapter.title}: an image's count is a share of its whole packed "
                             "sequence, so it depends on the image size; the patched processor emits it")
        return self.config.tokens(grid[0] * grid[1] + self.extra) - self.extra

    def panels(self, sample: int = 0) -> list[Any]:
        if not self.records:
            return []
        if self.anyres:   # ``sample``: a crop of the first image of the last call
            return [anyres_divprune_panel(self.records[0], self.geometry.num_patches, sample, offset=self.extra)]
        return [divprune_panel(self.records[0], self.geometry.num_patches, sample, offset=self.extra)]


@dataclass
class AnyResDivPruneRecord:
    """DivPrune on one AnyRes image's packed sequence: the selection and where each packed row came from."""

    selection: divprune.DivPruneRecord   # positions in the packed sequence (batch of one)
    sources: torch.Tensor                # (L,) crop x n + token of each packed row; -1: newline or blended row


def anyres_divprune_panel(record: AnyResDivPruneRecord, num_patches: int, crop: int = 0, offset: int = 0) -> Panel:
    """DivPrune on an AnyRes image, one crop: the patches whose packed rows were kept outlined, the rest dropped
    (a patch unpadding cut away never reached the LLM). ``offset`` = 1 when each crop starts with CLS."""
    n = num_patches + offset
    kept = record.sources[record.selection.kept[0]].cpu().numpy()
    kept = kept[(kept >= 0) & (kept // n == crop)] % n - offset
    state = np.full(num_patches, DROPPED)
    state[kept[kept >= 0]] = PRIMARY
    total = int(record.sources.shape[0])
    return Panel(f"DivPrune: {total} -> {record.selection.kept.shape[1]} of the image; this crop keeps "
                 f"{int((kept >= 0).sum())}", state, np.full(num_patches, -1))


def divprune_panel(record, num_patches: int, sample: int = 0, offset: int = 0) -> Panel:
    """DivPrune (``divprune.DivPruneRecord``): kept patches outlined, the rest dropped. ``offset`` = 1 when
    the projected tokens start with CLS."""
    kept = record_field(record, "kept")[sample].cpu().numpy() - offset
    state = np.full(num_patches, DROPPED)
    state[kept[kept >= 0]] = PRIMARY
    return Panel(f"DivPrune: {num_patches + offset} -> {len(kept)}", state, np.full(num_patches, -1))
