"""GlobalCom2 as a registered method: config and binding.

The tensor functions are in ``globalcom2.py`` and follow the official code (xuyang-liu16/GlobalCom2,
llava/model/llava_arch.py and multimodal_encoder/apply_customvit.py). The binding hands them what that
code reads: the CLS row of the LAST encoder layer's pre-softmax attention logits for every crop of the
call (recomputed from that layer's own q/k projections of its layer-normed input, so the tower keeps its
fused attention), and every image's projected crops, tile grid, original size and image_newline, where
the family would pack them (``pack_images_with``). AnyRes families only (a thumbnail plus tiles); the
count depends on the thumbnail's scores, so no processor can emit it (docs/methods.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, fail
from ..methods import SelectionShape, VisionMethod, register_method
from ..viz import DROPPED, PRIMARY, Panel
from . import globalcom2


@dataclass(frozen=True)
class GlobalCom2Config:
    """GlobalCom2: the thumbnail (base crop) decides each tile's retention ratio and guides its selection.

    ratio: the official ``retention_ratio`` (0.25): the thumbnail keeps int(P x ratio) tokens, and the
        tiles' ratios spread around it (softmax of the thumbnail's scores per tile region), capped at 1.
    temperature: the softmax temperature of that spread (official 10.0).
    scores: "logits" (official: pre-softmax CLS logits averaged over heads) or "softmax" (the attention
        probabilities instead; a named variant).
    thumbnail_order: "score" (official: the thumbnail's kept tokens in score order) or "position"
        (raster order; a named variant).
    placement: "unpadded_index" (official: a tile's kept token goes to the grid slot of its index among
        the tile's unpadded tokens, a newline after every grid row) or "position" (at its own patch, the
        stock unpadded layout; a named variant).
    """

    ratio: float = globalcom2.DEFAULT_RATIO
    temperature: float = globalcom2.DEFAULT_TEMPERATURE
    scores: str = "logits"
    thumbnail_order: str = "score"
    placement: str = "unpadded_index"

    def __post_init__(self) -> None:
        r = self.ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or not 0 < r <= 1:
            fail("GlobalCom2Config", "ratio", f"must be a share in (0, 1] (the official retention_ratio; "
                 f"GlobalCom2 has no token-count budget, its count is adaptive), got {r!r}")
        object.__setattr__(self, "ratio", float(r))
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            fail("GlobalCom2Config", "temperature", f"must be a positive number, got {t!r}")
        object.__setattr__(self, "temperature", float(t))
        for name, allowed in (("scores", globalcom2.SCORES), ("thumbnail_order", globalcom2.THUMBNAIL_ORDERS),
                              ("placement", globalcom2.PLACEMENTS)):
            if getattr(self, name) not in allowed:
                fail("GlobalCom2Config", name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")


@register_method
class GlobalCom2(VisionMethod):
    """GlobalCom2 bound to an AnyRes model: last-layer CLS logits of every crop decide, where the crops are packed."""

    name = "globalcom2"
    config_class = GlobalCom2Config
    summary = ("globalcom2[:ratio] GlobalCom2, official code (AnyRes: the thumbnail sets each tile's retention "
               "ratio; default 0.25; adaptive count)")
    cli_arg = "ratio"

    @classmethod
    def selection_flops(cls, config: GlobalCom2Config, shape: SelectionShape) -> int:
        # the last layer's CLS logits of every crop (q . k over every head), the per-tile ratios and the
        # thumbnail's scores resized onto each tile (a few operations per patch)
        return shape.crops * (2 * (shape.patches + 1) * shape.vision_width + 8 * shape.patches)

    def __init__(self, model: Any, adapter: Any, config: GlobalCom2Config, processor: Any | None = None):
        from ..models import UnsupportedModelError

        super().__init__(model, adapter, config, processor)
        self.geometry = g = adapter.tower_geometry(model)
        if not g.has_cls:
            raise UnsupportedModelError(f"GlobalCom2 ranks tokens by the CLS token's attention logits, and the "
                                        f"{adapter.title} vision tower has no CLS token")
        if len(g.feature_layers) != 1:
            raise UnsupportedModelError("GlobalCom2 needs a single vision_feature_layer")
        if g.keeps_cls:
            raise UnsupportedModelError("GlobalCom2 lays each crop's patches out on its grid, but this model also "
                                        "hands the LLM each crop's CLS token (vision_feature_select_strategy="
                                        "'full')")
        if processor is not None:
            self.output_patches(g.grid)  # raises: the count is only known after the image is encoded
        # the official code reads attn_maps[-1]: the tower's last encoder layer, whatever layer the LLM reads
        self.layer = g.num_layers - 1
        self._take, undo_capture = adapter.capture_layer_input(model, self.layer)
        self.on_remove(undo_capture)
        try:
            self.on_remove(adapter.pack_images_with(model, self._pack))
        except UnsupportedModelError as exc:
            self.remove()
            raise UnsupportedModelError(f"GlobalCom2 needs an AnyRes model (a thumbnail plus tiles): {exc}") from None
        except Exception:
            self.remove()
            raise

    def _scores(self) -> torch.Tensor:
        """(crops of the call, P) CLS scores of the last encoder layer, from its captured input."""
        layer, h = self._take()
        q, k, scale = self.adapter.tower_cls_qk(layer, layer.layer_norm1(h))
        # the projection outputs as the official attention forms them: heads side by side
        return globalcom2.cls_scores(q.flatten(1), k.transpose(1, 2).flatten(2), k.shape[1], scale,
                                     self.config.scores)

    def _pack(self, images: list) -> list[torch.Tensor]:
        scores = self._scores()
        sizes = [image.crops.shape[0] for image in images]
        if sum(sizes) != scores.shape[0]:
            raise RuntimeError(f"GlobalCom2: the tower encoded {scores.shape[0]} crops, but the call packs "
                               f"{sum(sizes)}")
        c = self.config
        packed, records = globalcom2.globalcom2(
            [image.crops for image in images], list(scores.split(sizes)), [image.tiles for image in images],
            self.geometry.grid, [image.size for image in images], images[0].newline, ratio=c.ratio,
            temperature=c.temperature, thumbnail_order=c.thumbnail_order, placement=c.placement)
        if self.record:
            self.records = records
        return packed

    def output_patches(self, grid: tuple[int, int]) -> int:
        raise ConfigError("GlobalCom2: the tokens per image depend on the thumbnail's attention (each tile's "
                          "retention ratio), so they are only known after the image is encoded and no processor "
                          "can emit matching placeholders; patch without processor= and build prompts from the "
                          "features' length (adapter.image_features)")

    def panels(self, sample: int = 0) -> list[Any]:
        """One panel for crop ``sample`` of the last recorded call (crops of all its images, in order)."""
        for record in self.records:
            crops = 1 + record.kept.shape[0]
            if sample < crops:
                return [globalcom2_panel(record, self.geometry.num_patches, sample)]
            sample -= crops
        return []


def globalcom2_panel(record: globalcom2.GlobalCom2Record, num_patches: int, crop: int) -> Panel:
    """GlobalCom2 (``globalcom2.GlobalCom2Record``), crop ``crop`` of the image (0 = the thumbnail): kept
    patches outlined, the rest (padding included) darkened; tiles show their retention ratio."""
    state = np.full(num_patches, DROPPED)
    group = np.full(num_patches, -1)
    if crop == 0:
        state[record.base_kept.cpu().numpy()] = PRIMARY
        what = "thumbnail" if record.tiles != (0, 0) else "single crop, kept whole"
        return Panel(f"GlobalCom2 {what}: {num_patches} -> {int(record.base_kept.numel())}", state, group)
    kept, valid = record.kept[crop - 1].cpu(), record.valid[crop - 1].cpu()
    state[kept.numpy()] = PRIMARY
    ratio = float(record.ratios[crop - 1])
    return Panel(f"GlobalCom2 tile {crop}: ratio {ratio:.3f}, {int(valid.sum())} unpadded -> {int(kept.sum())}",
                 state, group)
