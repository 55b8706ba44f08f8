"""VMTC bound to a model: its config, the hooks that run a stage inside the tower, its counts and pictures.

The tensor functions are in ``vmtc.py`` (CLIP-style towers, a stage inside an
encoder layer) and ``vmtc_merged.py`` (one stage after a patch merger, Qwen);
this module reaches the model only through its family adapter.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, check_layer_list, fail
from ..errors import UnsupportedModelError
from ..methods import VisionMethod, register_method
from ..viz import DROPPED, MERGED, PRIMARY, Panel
from .vmtc import (CropRecords, Stage, StageRecord, anyres_budget, cls_importance, compress, compress_crops,
                   default_layers, owners_after, received_importance, stage_schedule)
from .vmtc_merged import reduce_call

VMTC_MERGES = ("mean", "sum")
VMTC_IMPORTANCES = ("auto", "cls", "received")


@dataclass(frozen=True)
class VMTCConfig:
    """Visual-modality token compression inside a CLS-token ViT (CLIP).

    target: share of the patch tokens that leave the tower (0 < t <= 1) or an
        absolute token count (an int > 1). 1.0 keeps the stock model.
    stages: how many encoder layers compress (equally spaced before the layer
        the LLM reads), ignored when ``layers`` is given.
    layers: explicit 0-based encoder layer indices that compress.
    cluster_frac: clusters per stage = max(1, round(cluster_frac * stage output)).
        0 means one cluster per stage. Default 0.125: an eighth of each stage's
        output merges the redundant tokens by meaning while most of the budget
        stays with the primary (most attended) patches.
    kmeans_iters: spherical K-means iterations (fixed, so runs repeat).
    merge: "mean" (importance-weighted mean) or "sum" (the paper's literal
        importance-weighted sum).
    prune_only: drop redundant tokens instead of merging them (ablation).
    importance: how patches are ranked: "cls" (attention from the CLS query, the
        paper's IPS), "received" (attention each patch receives, averaged over
        query positions and heads: the SPEC's choice for towers without a CLS
        token such as OneVision's SigLIP, and selectable for CLIP), or "auto"
        (cls where the tower has a CLS token, received otherwise).
    """

    target: float | int = 0.5
    stages: int = 4
    layers: tuple[int, ...] | None = None
    cluster_frac: float = 0.125
    kmeans_iters: int = 10
    merge: str = "mean"
    prune_only: bool = False
    importance: str = "auto"

    def __post_init__(self) -> None:
        name = "VMTCConfig"
        t = self.target
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0 or (isinstance(t, float) and not math.isfinite(t)):
            fail(name, "target", f"must be a fraction in (0, 1] or a positive token count, got {t!r}")
        if isinstance(t, float) and t > 1.0:
            if not t.is_integer():
                fail(name, "target", f"a value above 1 is a token count and must be whole, got {t!r}")
            object.__setattr__(self, "target", int(t))
        if t == 1 and isinstance(t, int):  # YAML `target: 1` reads as the int 1: one token, not "keep all"
            fail(name, "target", "the integer 1 is ambiguous: write 1.0 to keep every patch (the stock tower) "
                 "or a token count of at least 2")
        if not isinstance(self.stages, int) or self.stages < 1:
            fail(name, "stages", f"must be a positive integer, got {self.stages!r}")
        object.__setattr__(self, "layers", check_layer_list(name, "layers", self.layers))
        if not isinstance(self.cluster_frac, (int, float)) or not 0.0 <= self.cluster_frac <= 1.0:
            fail(name, "cluster_frac", f"must be in [0, 1], got {self.cluster_frac!r}")
        if not isinstance(self.kmeans_iters, int) or self.kmeans_iters < 1:
            fail(name, "kmeans_iters", f"must be a positive integer, got {self.kmeans_iters!r}")
        if self.merge not in VMTC_MERGES:
            fail(name, "merge", f"unknown merge {self.merge!r}; use one of {', '.join(VMTC_MERGES)}")
        if self.importance not in VMTC_IMPORTANCES:
            fail(name, "importance", f"unknown importance {self.importance!r}; use one of {', '.join(VMTC_IMPORTANCES)}")
        if not isinstance(self.prune_only, bool):
            fail(name, "prune_only", f"must be true or false, got {self.prune_only!r}")
        if self.prune_only and self.merge != "mean":
            fail(name, "merge", f"merge={self.merge!r} has no effect with prune_only=True (nothing is merged)")
        if self.layers is not None and self.stages != 4 and self.stages != len(self.layers):
            fail(name, "stages", f"stages={self.stages} conflicts with layers={list(self.layers)} "
                  f"({len(self.layers)} stages); give one of them")

    @classmethod
    def ablation(cls, name: str, target: float | int = 0.5, stages: int = 4, **kwargs: Any) -> "VMTCConfig":
        """The paper's Table 4 rows as configs.

        "last_layer_prune": one stage in the last layer the LLM reads, redundant tokens dropped;
        "layerwise_prune": ``stages`` stages, dropped; "single_merge": ``stages`` stages, the
        redundant tokens of each stage merged into one token; "cluster_merge": the full method.
        """
        rows = {"last_layer_prune": dict(stages=1, prune_only=True),
                "layerwise_prune": dict(stages=stages, prune_only=True),
                "single_merge": dict(stages=stages, cluster_frac=0.0),
                "cluster_merge": dict(stages=stages)}
        if name not in rows:
            raise ConfigError(f"VMTCConfig.ablation: unknown row {name!r}; use one of {', '.join(rows)}")
        return cls(target=target, **{**rows[name], **kwargs})




@register_method
class VMTC(VisionMethod):
    """VMTC bound to a model: one stage inside each chosen encoder layer (through the family adapter)."""

    name = "vmtc"
    config_class = VMTCConfig
    summary = "vmtc[:target] visual token compression in the tower (default target 0.5)"
    cli_arg = "target"

    def __init__(self, model: Any, adapter: Any, config: VMTCConfig, processor: Any | None = None):
        super().__init__(model, adapter, config, processor)
        if getattr(adapter, "reduces_after_merger", False):  # Qwen: one stage after the 2x2 merger
            self._bind_after_merger()
            return
        self.merged = False
        self.geometry = g = adapter.tower_geometry(model)
        self.importance = config.importance if config.importance != "auto" else ("cls" if g.has_cls else "received")
        if self.importance == "cls" and not g.has_cls:
            raise UnsupportedModelError("VMTCConfig.importance='cls' needs a vision tower with a CLS token (CLIP); "
                                        "this tower has none: use importance='received' (or 'auto')")
        self.prefix = 1 if g.has_cls else 0  # tokens ahead of the patches that every stage passes through
        used = g.layers_before_features
        if used == 0:
            raise ConfigError("VMTCConfig: the LLM reads the embedding output (vision_feature_layer=0); "
                              "no encoder layer runs before it")
        if config.layers is not None:
            late = [i for i in config.layers if i >= used]
            if late:
                raise ConfigError(f"VMTCConfig.layers: {late} at or after the feature layer; the LLM reads the "
                                  f"output of encoder layer {used - 1} ({g.num_layers} layers), so only layers "
                                  f"0..{used - 1} can compress")
            layers = list(config.layers)
        else:
            try:
                layers = default_layers(used, config.stages)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        try:
            self.stages = stage_schedule(g.num_patches, config.target, len(layers), config.cluster_frac,
                                         config.prune_only)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.layers = layers
        # AnyRes: the per-image budget (SPEC) cuts each crop to its own count in the last layer the LLM reads
        self.crop_counts = None
        self.budget_layer: int | None = None   # where that cut runs; None: one count for every crop
        self.budget_extra = False              # the cut is a stage of its own (the schedule ends before it)
        try:
            if any(not stage.is_identity for stage in self.stages):  # crops lose their grid: AnyRes packs them without one
                self.crop_counts, undo = adapter.budget_reduced_crops(model, self.image_tokens(), self.crop_budget)
                self.on_remove(undo)
            if self.crop_counts is not None:
                self.budget_layer = used - 1
                self.budget_extra = layers[-1] != used - 1 or self.stages[-1].is_identity
            for index, (layer_idx, stage) in enumerate(zip(layers, self.stages)):
                if not stage.is_identity:  # nothing to do there; the layer stays stock
                    per_crop = layer_idx == self.budget_layer and not self.budget_extra
                    self.on_remove(adapter.add_tower_stage(model, layer_idx, self._stage_fn(index, stage, per_crop)))
            if self.budget_extra:  # every crop arrives with the schedule's count: base crops pass, tiles are cut
                final = self.stages[-1].n_out
                self.on_remove(adapter.add_tower_stage(model, self.budget_layer,
                                                       self._stage_fn(len(layers), Stage(final, final, 0), True)))
        except Exception:
            self.remove()
            raise

    # ------------------------------------------------------------------ after a patch merger (vmtc_merged.py)
    def _bind_after_merger(self) -> None:
        """SPEC (Other model families): one stage on the merged tokens of every frame, sized by the frame alone."""
        if self.config.layers is not None:
            raise ConfigError("VMTCConfig.layers: this tower compresses once, after its patch merger; "
                              "layers= does not apply (stages= is ignored too)")
        self.merged = True
        self.layers, self.stages = [], []
        if self.config.target == 1.0 and isinstance(self.config.target, float):
            return  # keeps every token: the stock model
        self.on_remove(self.adapter.add_merger_stage(self.model, self._merged_stage))

    def merged_stage_for(self, n: int) -> Stage:
        """The stage of a frame of ``n`` merged tokens; a count target above n keeps the frame whole."""
        if isinstance(self.config.target, int) and self.config.target >= n:
            return Stage(n, n, 0)
        try:
            return stage_schedule(n, self.config.target, 1, self.config.cluster_frac, self.config.prune_only)[0]
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def _merged_stage(self, call: Any) -> Any:
        from ..models.base import MergedResult

        records = [] if self.record else None
        features, extras, sources = reduce_call(call, self.merged_stage_for, self.config.kmeans_iters,
                                                self.config.merge, self.config.prune_only, records)
        if records is not None:  # per input of the last call (`focusvlm show`): MergedRecord, None if left whole
            self.records = records
        return MergedResult(tuple(features), tuple(tuple(level) for level in extras), tuple(sources))

    def crop_budget(self, stock: int, tiles: int) -> tuple[int, int]:
        """SPEC "Per-image budget": (tokens the base crop keeps, tokens each tile keeps; 0 drops the tiles) of
        an AnyRes image whose stock model hands the LLM ``stock`` tokens from ``tiles`` tiles."""
        return anyres_budget(stock, self.geometry.num_patches, tiles, self.config.target)

    def _stage_fn(self, index: int, stage: Stage, per_crop: bool = False):
        """The stage in one layer. ``per_crop``: the last layer the LLM reads on an AnyRes model, where every
        crop of the call leaves with its own count (``crop_counts``: base crops the schedule's, tiles their
        budget's), each compressed from this layer's input as VMTC compresses it alone (``compress_crops``)."""
        def run(layer: Any, normed: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            counts = self.crop_counts() if per_crop else None
            if counts is not None and len(counts) != z.shape[0]:
                raise RuntimeError(f"VMTC: {len(counts)} crop counts for a tower batch of {z.shape[0]} crops")
            uniform = counts is None or all(c == stage.n_out for c in counts)
            if uniform and stage.is_identity and not self.record:
                return z  # the budget's own stage with nothing to cut in this call
            if self.importance == "cls":
                q, k, scale = self.adapter.tower_cls_qk(layer, normed)
                importance = cls_importance(q, k, scale)
            else:
                q, k, scale = self.adapter.tower_qk(layer, normed)
                importance = received_importance(q, k, scale, self.prefix)
            if uniform:
                out, record = compress(z, importance, stage, self.config.kmeans_iters, self.config.merge,
                                       self.config.prune_only, self.prefix)
            else:
                out, record = compress_crops(z, importance, counts, self.config.kmeans_iters, self.config.cluster_frac,
                                             self.config.merge, self.config.prune_only, self.prefix)
            if self.record:
                if index == 0 or not self.records:
                    self.records = []
                self.records.append(record)
            return out
        return run

    def output_patches(self, grid: tuple[int, int]) -> int:
        h, w = grid
        if self.merged:  # grid = one frame's merged tokens
            return self.merged_stage_for(h * w).n_out
        return stage_schedule(h * w, self.config.target, len(self.layers), self.config.cluster_frac,
                              self.config.prune_only)[-1].n_out

    def image_tokens(self, grid: tuple[int, int] | None = None) -> int:
        if self.merged:
            if grid is None:
                raise ValueError("this tower's token count depends on the image size: pass its merged grid")
            return self.output_patches(grid)
        return super().image_tokens(grid)

    def stage_plan(self, merged_tokens: int | None = None) -> list[tuple[int, int, int, int]]:
        if self.merged and merged_tokens is None:
            return []  # the stage's size follows the image: nothing to plan without it
        stages = [self.merged_stage_for(merged_tokens)] if self.merged else self.stages
        prefix = 0 if self.merged else self.prefix
        return [(s.n_in + prefix, s.keep, s.clusters, self.config.kmeans_iters) for s in stages if not s.is_identity]

    @classmethod
    def fit_to_model(cls, config: VMTCConfig, model: Any, adapter: Any) -> VMTCConfig:
        """Fewer stages when a small tower runs fewer encoder layers before its feature layer than ``stages``."""
        if config.layers is not None or adapter.reduces_after_merger:  # one stage after a merger: no layers
            return config
        used = adapter.tower_geometry(model).layers_before_features
        return config if config.stages <= used else dataclasses.replace(config, stages=used)

    def panels(self, sample: int = 0) -> list[Panel]:
        if self.merged:  # one stage after the merger; ``sample`` = the input (image) of the last call
            if sample >= len(self.records) or self.records[sample] is None:
                return []
            return [merged_panel(self.records[sample])]
        active = [layer for layer, s in zip(self.layers, self.stages) if not s.is_identity]
        if self.budget_extra:
            active.append(self.budget_layer)
        return stage_panels(self.records, active, sample) if self.records else []


# --------------------------------------------------------------------------- `focusvlm show`


def stage_panels(records: list[StageRecord | CropRecords], layers: list[int], sample: int = 0) -> list[Panel]:
    """Per stage: which original patches are primary, merged (with cluster id) or already dropped."""
    def one(rec):  # crop ``sample``'s record, on the CPU
        rec = rec.of(sample) if isinstance(rec, CropRecords) else \
            StageRecord(*(t[sample:sample + 1] for t in (rec.importance, rec.primary, rec.redundant, rec.labels)))
        return StageRecord(*(t.cpu() for t in (rec.importance, rec.primary, rec.redundant, rec.labels)))

    n0 = one(records[0]).importance.shape[1]
    owner = torch.arange(n0).unsqueeze(0)
    panels = []
    for layer, rec in zip(layers, records):
        rec = one(rec)
        n_in = rec.importance.shape[1]
        kind = torch.full((n_in,), DROPPED)
        kind[rec.primary[0]] = PRIMARY
        cluster = torch.full((n_in,), -1)
        if rec.labels.numel():
            kind[rec.redundant[0]] = MERGED
            cluster[rec.redundant[0]] = rec.labels[0]
        o = owner[0]
        alive = o >= 0
        state = torch.where(alive, kind[o.clamp_min(0)], torch.tensor(DROPPED))
        group = torch.where(alive, cluster[o.clamp_min(0)], torch.tensor(-1))
        kept = rec.primary.shape[1] + (int(rec.labels.max()) + 1 if rec.labels.numel() else 0)
        panels.append(Panel(f"layer {layer}: {n_in} -> {kept}", state.numpy(), group.numpy()))
        owner = owners_after(owner, rec)
    return panels


def merged_panel(record, frame: int = 0) -> Panel:
    """VMTC after a patch merger (``vmtc_merged.MergedRecord``), one frame: per merged token (raster order of
    the merged grid) primary, merged into a cluster (its id) or dropped (prune_only)."""
    n = record.importance.shape[1]
    state = np.full(n, DROPPED)
    group = np.full(n, -1)
    state[record.primary[frame].cpu().numpy()] = PRIMARY
    if record.labels.numel():
        redundant = record.redundant[frame].cpu().numpy()
        state[redundant] = MERGED
        group[redundant] = record.labels[frame].cpu().numpy()
    return Panel(f"after the merger: {n} -> {record.sources.shape[1]}", state, group)
