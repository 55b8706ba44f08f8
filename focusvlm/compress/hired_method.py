"""HiRED as a registered method: config and binding.

The tensor functions are in ``hired.py`` and follow the official code (hasanar1f/HiRED, its modified
``modeling_llava_next.py`` and, for one crop, ``modeling_llava.py``). The binding hands them what that
code hooks: the q/k projections of an early encoder layer (0) and of the layer whose output the LLM
reads (22 of CLIP-L), on their layer-normed inputs, for every crop of the call.

* AnyRes families (LLaVA-NeXT): ``pack_images_with`` replaces the packing; the method selects each image's
  tokens per crop and keeps them where the stock packing puts them (``AnyResImage.stock_order``),
  without image_newline. The count
  depends on the image, so no processor can emit it: ``processor=`` is refused.
* One crop per image (LLaVA-1.5, the repository's single-partition version): the top tokens of the
  final layer replace the projector input; a fixed count, so the processor follows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, fail
from ..errors import UnsupportedModelError
from ..methods import SelectionShape, VisionMethod, register_method
from ..viz import DROPPED, PRIMARY, Panel, record_field
from . import hired


@dataclass(frozen=True)
class HiREDConfig:
    """HiRED (High-Resolution Early Dropping), as the official code computes it.

    budget: a fraction in (0, 1] is the official ``token_budget_rate``: an image of C crops of N tokens
        keeps ``int(C * N * rate)`` tokens in all (before the unpadding drops the selected tokens that
        lie in the padding); 1.0 keeps every token (the official switch, still packed without newlines).
        A whole number >= 2 is that per-image total directly. On one-crop models: ``min(N, int(N * rate))``
        or ``min(N, count)`` tokens.
    alpha: the base crop's share of the budget (official 0.5); the tiles' share is split by the base
        crop's top ``int(N * (1 - alpha))`` early-layer tokens.
    early_layer: encoder layer whose CLS attention splits the tiles' budget (official ``vit_top_layer`` 0).
    final_layer: encoder layer whose CLS attention selects the tokens (official ``vit_bottom_layer`` 22);
        None: the layer whose output the LLM reads (22 for CLIP-L at feature layer -2).
    split: "rows" (official: the base crop's top tokens counted in contiguous slices of its token
        sequence) or "regions" (a corrected variant: counted in the part of the base crop's patch grid
        each tile covers, the grid cut like the tile grid, padding ignored).
    """

    budget: float | int = hired.DEFAULT_BUDGET
    alpha: float = hired.DEFAULT_ALPHA
    early_layer: int = hired.EARLY_LAYER
    final_layer: int | None = None
    split: str = "rows"

    def __post_init__(self) -> None:
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0:
            fail("HiREDConfig", "budget", f"must be a fraction in (0, 1] or a token count per image, got {b!r}")
        if isinstance(b, float) and b > 1.0:
            if not b.is_integer():
                fail("HiREDConfig", "budget", f"a value above 1 is a token count and must be whole, got {b!r}")
            object.__setattr__(self, "budget", int(b))
        if isinstance(self.budget, int) and self.budget == 1:
            fail("HiREDConfig", "budget", "the integer 1 is ambiguous: write 1.0 to keep every token or a count >= 2")
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1:
            fail("HiREDConfig", "alpha", f"must be a share in [0, 1], got {a!r}")
        object.__setattr__(self, "alpha", float(a))
        for name in ("early_layer", "final_layer"):
            v = getattr(self, name)
            if v is None and name == "final_layer":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                fail("HiREDConfig", name, f"must be a non-negative encoder layer index, got {v!r}")
        if self.split not in hired.SPLITS:
            fail("HiREDConfig", "split", f"must be one of {', '.join(hired.SPLITS)}, got {self.split!r}")


@dataclass
class HiREDRecord:
    """What the last recorded forward kept, per crop of the tower's batch (images in order, base crop first).

    selected: (crops, N) bool, the tokens chosen; kept: (crops, N) bool, those that reached the LLM (a
    tile token chosen in the padding is lost to the unpadding); budgets: (crops,) long; base: (crops,)
    bool, the base crops; one_crop: a one-crop model (LLaVA-1.5: one entry per image).
    """

    selected: torch.Tensor
    kept: torch.Tensor
    budgets: torch.Tensor
    base: torch.Tensor
    one_crop: bool = False


@register_method
class HiRED(VisionMethod):
    """HiRED bound to a model: per-crop budgets from early CLS attention, tokens from final CLS attention."""

    name = "hired"
    config_class = HiREDConfig
    summary = ("hired[:budget] HiRED, official code (budget: share of the crops' tokens if <= 1, else tokens per "
               "image; default 0.2)")
    cli_arg = "budget"

    @classmethod
    def selection_flops(cls, config: HiREDConfig, shape: SelectionShape) -> int:
        # the CLS row of the attention (q . k over every head) of each crop: in the early layer (the budget
        # split, AnyRes only) and in the final layer (the selection)
        layers = 2 if shape.crops > 1 else 1
        return layers * shape.crops * 2 * (shape.patches + 1) * shape.vision_width

    def __init__(self, model: Any, adapter: Any, config: HiREDConfig, processor: Any | None = None):
        super().__init__(model, adapter, config, processor)
        if adapter.reduces_after_merger:
            raise UnsupportedModelError(f"HiRED ranks tokens by a CLS token's attention per crop; the {adapter.title} "
                                        "tower has no CLS token and no crops (a patch-merger tower)")
        self.geometry = g = adapter.tower_geometry(model)
        if not g.has_cls:
            raise UnsupportedModelError(f"HiRED ranks tokens by the CLS token's attention; the {adapter.title} "
                                        "vision tower has no CLS token")
        if len(g.feature_layers) != 1:
            raise UnsupportedModelError("HiRED needs a single vision_feature_layer (its CLS attention selects)")
        if g.feature_layers[0] == 0 and config.final_layer is None:
            raise UnsupportedModelError("HiRED reads the attention of the layer whose output the LLM reads, but the "
                                        "LLM reads the embeddings; set final_layer")
        # the official vit_bottom_layer 22 is the layer whose OUTPUT is hidden_states[-2], LLaVA's feature layer
        self.final = g.feature_layers[0] - 1 if config.final_layer is None else config.final_layer
        for name, layer in (("early_layer", config.early_layer), ("final_layer", self.final)):
            if layer >= g.num_layers:
                raise ConfigError(f"HiREDConfig.{name}={layer}: the vision tower has {g.num_layers} encoder layers")
        self.anyres = adapter.packs_crops       # a base crop plus tiles per image (AnyRes)
        self.extra = 1 if g.keeps_cls else 0       # a kept CLS is one more token to choose from (one crop only)
        tokens = g.num_patches + self.extra
        if self.anyres:
            if g.keeps_cls:
                raise UnsupportedModelError(
                    f"HiRED on {adapter.title} lays the tiles' tokens out on their patch grid, which has no place for "
                    "each crop's CLS token (vision_feature_select_strategy='full'; the official code fails there too)")
            if processor is not None:
                self.output_patches(g.grid)          # raises: the count is only known after the image is seen
            votes = hired.spatial_count(tokens, config.alpha)
            if votes < 1 and (isinstance(config.budget, int) or config.budget < 1.0):
                raise ConfigError(f"HiREDConfig.alpha={config.alpha} leaves int({tokens} * (1 - alpha)) = 0 base-crop "
                                  "tokens to split the tiles' budget by (the official code divides 0 by 0)")
        elif hired.keep_count(tokens, config.budget) < 1:
            raise ConfigError(f"HiREDConfig.budget={config.budget} keeps no token of {tokens}")
        self._take_final, undo = adapter.capture_layer_input(model, self.final)
        self.on_remove(undo)
        try:
            if self.anyres:
                self._take_early, undo = adapter.capture_layer_input(model, config.early_layer)
                self.on_remove(undo)
                self.on_remove(adapter.pack_images_with(model, self._pack))
            else:
                self.on_remove(adapter.replace_projector_input(model, self._replace))
        except Exception:
            self.remove()
            raise

    # ------------------------------------------------------------------ the two bindings
    def _scores(self, layer: Any, hidden: torch.Tensor, tokens: int) -> torch.Tensor:
        """(rows, tokens): the CLS attention of ``layer`` on its input ``hidden``, summed over heads, last columns."""
        q, k, scale = self.adapter.tower_cls_qk(layer, layer.layer_norm1(hidden))
        return hired.cls_attention(q, k, scale)[:, -tokens:]

    def _pack(self, images: list[Any]) -> list[torch.Tensor]:
        """Every image of one vision call (``AnyResImage``s, in order) -> each image's kept tokens."""
        early_layer, early_hidden = self._take_early()
        final_layer, final_hidden = self._take_final()
        crops = [image.crops for image in images]
        grids = [image.tiles for image in images]
        orders = [image.stock_order() for image in images]      # where the stock packing puts each crop token
        counts = [int(c.shape[0]) for c in crops]
        n = int(crops[0].shape[1])
        if final_hidden.shape[0] != sum(counts) or early_hidden.shape[0] != sum(counts):
            raise RuntimeError(f"HiRED: the tower ran {final_hidden.shape[0]} crops, the packing got {sum(counts)}")
        starts = torch.tensor([0] + counts[:-1], device=early_hidden.device).cumsum(0)
        early = self._scores(early_layer, early_hidden[starts], n)       # base crops only: they split the budget
        final = self._scores(final_layer, final_hidden, n)
        cfg = self.config
        chosen = hired.select(early, final, counts, cfg.budget, cfg.alpha, cfg.split, grid=self.geometry.grid,
                              tile_grids=grids)
        selected = chosen.selected.split(counts)
        packed = [hired.pack_image(c, s.to(c.device), o) for c, s, o in zip(crops, selected, orders)]
        if self.record:
            placed = torch.cat([hired.present(o, c, n) for o, c in zip(orders, counts)])
            base = torch.zeros(sum(counts), dtype=torch.bool)
            base[starts.cpu()] = True
            kept = chosen.selected & placed.to(chosen.selected.device)
            self.records = [HiREDRecord(chosen.selected.cpu(), kept.cpu(), chosen.budgets.cpu(), base)]
        return packed

    def _replace(self, features: torch.Tensor) -> torch.Tensor:
        layer, hidden = self._take_final()
        n = features.shape[1]
        out, kept = hired.select_single(features, self._scores(layer, hidden, n), self.config.budget)
        if self.record:
            selected = torch.zeros(features.shape[:2], dtype=torch.bool)
            selected.scatter_(1, kept.cpu(), True)
            self.records = [HiREDRecord(selected, selected.clone(), torch.full((features.shape[0],), kept.shape[1]),
                                        torch.ones(features.shape[0], dtype=torch.bool), one_crop=True)]
        return out

    # ------------------------------------------------------------------ counts and pictures
    def output_patches(self, grid: tuple[int, int]) -> int:
        if self.anyres:
            raise ConfigError("HiRED's token count on AnyRes crops is only known after the image is seen (the tiles' "
                              "budgets follow the base crop's attention, and chosen tokens in the padding are lost), "
                              "so a processor cannot emit matching placeholders; patch without processor= and build "
                              "prompts from the features' count")
        tokens = grid[0] * grid[1] + self.extra
        return hired.keep_count(tokens, self.config.budget) - self.extra

    def panels(self, sample: int = 0) -> list[Any]:
        if not self.records:
            return []
        return [hired_panel(self.records[0], self.geometry.num_patches, sample, offset=self.extra)]


def hired_panel(record, num_patches: int, sample: int = 0, offset: int = 0) -> Panel:
    """HiRED (``HiREDRecord`` or a dict with its fields) for crop ``sample`` of the tower's batch: the tokens
    that reach the LLM outlined, the rest dropped (a tile token chosen in the padding shows as dropped).
    ``offset`` = 1 when the tokens start with CLS (one-crop models, 'full' strategy)."""
    kept = np.asarray(record_field(record, "kept")[sample].cpu())[offset:]
    chosen = int(record_field(record, "selected")[sample].sum())
    budget = int(record_field(record, "budgets")[sample])
    state = np.where(kept, PRIMARY, DROPPED)
    if record_field(record, "one_crop"):
        return Panel(f"HiRED: {num_patches + offset} -> {chosen}", state, np.full(num_patches, -1))
    where = "base crop" if bool(record_field(record, "base")[sample]) else "tile"
    lost = chosen - int(record_field(record, "kept")[sample].sum())
    note = f", {lost} of them in the padding" if lost else ""
    return Panel(f"HiRED {where}: budget {budget}, {chosen} chosen{note}", state, np.full(num_patches, -1))
