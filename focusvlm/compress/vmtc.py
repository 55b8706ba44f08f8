"""VMTC (visual-modality token compression) as pure tensor functions.

Every function works on a batch (leading dimension B) with no Python loop
over tokens, and every sample of a batch leaves with the same token count.
No transformers import: the ``VMTC`` method at the bottom reaches the model
only through its family adapter (``focusvlm.models``), which feeds these
functions the tensors of a CLIP-style encoder layer.

Notation (SPEC, section VMTC): a stage receives CLS + n patch tokens, keeps
k primary patches unchanged and merges the other n - k into c cluster tokens,
so it emits CLS + k + c tokens. Equation numbers (V1 ... V7) refer to
docs/method.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ConfigError, check_layer_list, fail
from ..methods import VisionMethod, register_method


def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves upwards (Python's round() rounds halves to even)."""
    return int(math.floor(x + 0.5))


# --------------------------------------------------------------------------- schedule

def resolve_target(num_patches: int, target: float | int) -> int:
    """The number of patch tokens that leave the tower.

    A float in (0, 1] is a share of ``num_patches``; an int is a count. 1.0
    (or a count equal to ``num_patches``) keeps every token.
    """
    if num_patches < 1:
        raise ValueError(f"VMTC needs at least one patch token, got {num_patches}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or target <= 0:
        raise ValueError(f"VMTCConfig.target must be a positive share or count, got {target!r}")
    if isinstance(target, float) and target <= 1.0:
        count = round_half_up(num_patches * target)
        if count < 1:
            raise ValueError(f"VMTCConfig.target={target} leaves no token of {num_patches} patches "
                             f"(needs at least {1 / num_patches:.4g})")
        return count
    count = int(target)
    if count > num_patches:
        raise ValueError(f"VMTCConfig.target={count} tokens exceeds the {num_patches} patch tokens the tower makes")
    return count


@dataclass(frozen=True)
class Stage:
    """One compression stage: ``n_in`` patch tokens in, ``keep`` primary + ``clusters`` merged out."""

    n_in: int
    keep: int
    clusters: int

    @property
    def n_out(self) -> int:
        return self.keep + self.clusters

    @property
    def is_identity(self) -> bool:
        return self.n_out == self.n_in and self.clusters == 0


def stage_schedule(num_patches: int, target: float | int, stages: int, cluster_frac: float,
                   prune_only: bool = False) -> list[Stage]:
    """Per-stage token counts (V7; SPEC: n_s = round(n_{s-1} * r), r = (T / n)^(1/S), last stage = T).

    Clusters per stage c = max(1, round(cluster_frac * n_s)) (never more than
    n_s). ``prune_only`` drops the redundant tokens (c = 0). A stage whose
    rounded count would not shrink is an identity (no compression there).
    """
    if stages < 1:
        raise ValueError(f"VMTC needs at least one stage, got {stages}")
    final = resolve_target(num_patches, target)
    ratio = (final / num_patches) ** (1.0 / stages)
    out: list[Stage] = []
    n_in = num_patches
    for s in range(stages):
        n_out = final if s == stages - 1 else min(n_in, max(final, round_half_up(n_in * ratio)))
        if n_out >= n_in:
            out.append(Stage(n_in, n_in, 0))
            continue
        c = 0 if prune_only else max(1, round_half_up(cluster_frac * n_out))
        c = min(c, n_out)
        out.append(Stage(n_in, n_out - c, c))
        n_in = n_out
    return out


def default_layers(num_used_layers: int, stages: int) -> list[int]:
    """``stages`` equally spaced 0-based encoder layers among the first ``num_used_layers`` (V7).

    The last stage sits in the last layer whose output the LLM reads, so the
    token set the LLM sees is the compressed one. Layer s is
    (s + 1) * F // S - 1 with F = ``num_used_layers``.
    """
    if stages > num_used_layers:
        raise ValueError(f"VMTCConfig.stages={stages} needs at least {stages} encoder layers before the feature "
                         f"layer, but only {num_used_layers} run before it; lower stages or pass layers=")
    return [(s + 1) * num_used_layers // stages - 1 for s in range(stages)]


# --------------------------------------------------------------------------- the steps

def cls_importance(cls_query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Importance IPS_i (V1): CLS-to-patch attention, softmax over all keys (CLS included), mean over heads.

    cls_query: (B, H, Dh) the CLS row of the layer's queries; keys: (B, H, N, Dh)
    with N = 1 + n (CLS first). Returns (B, n) in float32. Only the CLS row of
    the attention matrix is formed.
    """
    # .float() only where needed: on float32 it returns the tensor itself, yet still costs a dispatched op
    q = cls_query if cls_query.dtype == torch.float32 else cls_query.float()
    k = keys if keys.dtype == torch.float32 else keys.float()
    logits = torch.einsum("bhd,bhnd->bhn", q, k) * scale
    probs = logits.softmax(dim=-1)
    return probs.mean(dim=1)[:, 1:]


def received_importance(query: torch.Tensor, keys: torch.Tensor, scale: float, prefix: int = 0) -> torch.Tensor:
    """Importance of each patch as the attention it receives (SPEC, towers without a CLS token).

    Softmax over all keys of every query row, then the mean over query
    positions and heads of each key's column. query, keys: (B, H, N, Dh);
    ``prefix`` leading tokens (a CLS token) are not ranked. Returns
    (B, N - prefix) in float32. One head at a time, so the largest temporary
    is a single (B, N, N) matrix.
    """
    B, H, N, _ = query.shape
    received = torch.zeros(B, N, device=query.device, dtype=torch.float32)
    for h in range(H):
        logits = query[:, h].float() @ keys[:, h].float().transpose(-1, -2) * scale   # (B, N, N)
        received += logits.softmax(dim=-1).sum(dim=1)
    return (received / (H * N))[:, prefix:]


def select_primary(importance: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Primary / redundant split (V2): the ``keep`` highest-importance patches (ties: lower index first).

    Returns (primary, redundant) index tensors of shapes (B, keep) and
    (B, n - keep), each in ascending (spatial) order.
    """
    n = importance.shape[-1]
    if not 0 <= keep <= n:
        raise ValueError(f"cannot keep {keep} of {n} tokens")
    order = torch.sort(importance, dim=-1, descending=True, stable=True).indices
    primary = order[:, :keep].sort(dim=-1).values
    redundant = order[:, keep:].sort(dim=-1).values
    return primary, redundant


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (zero rows stay zero): torch.nn.functional.normalize(eps=1e-12)
    without its expand_as, i.e. the same values with one op fewer."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)


def kmeans_init(m: int, clusters: int, device=None) -> torch.Tensor:
    """Deterministic initial centre indices (V3): ``clusters`` points evenly spread over the m tokens
    (index floor((i + 0.5) * m / c)), so the seeds cover the whole image in raster order.

    Integer form ((2i + 1) m) // (2c): the exact quotient is either a whole number or at least
    1 / (2c) away from one, so it floors to the same index as the float64 formula (checked for every
    m < 700, c <= m), in two ops instead of six.
    """
    return torch.arange(m, (2 * clusters + 1) * m, 2 * m, device=device) // (2 * clusters)


# Re-seeding as a fixed op sequence. The rule (V3, ``reseed_empty``): the e-th empty cluster (ascending
# id) takes the e-th point in ascending (similarity to own centre, index) order among the points that
# are not their cluster's "anchor" (best-fitting member, lowest index on ties). The rule is one-shot,
# not sequential: every mover is picked from this assignment's labels at once, and moving a non-anchor
# never empties a cluster, so no pick depends on an earlier one and it vectorises exactly.
#
# All of it works on one (B, m, c) matrix ``member``: each point's fit in its own cluster's column,
# ``non_member`` (far below any fit) in the others.
#   * Column max: per cluster its anchor (max(dim) returns the first maximal row, as the arg-max of
#     the old masked fit did) and the anchor's fit; an empty column's max is ``non_member``.
#   * Sort key: fit, with each anchor raised to fit + ``lift`` (above every fit) by a
#     scatter_reduce(amax). An empty column scatters non_member + lift, below any fit, onto its arg-max
#     row 0, which therefore keeps its own fit. Stable sort: non-anchors by (fit, index), anchors last.
#   * Stable sort of the column maxima: the empty clusters first, in ascending id. Pair k (k-th mover,
#     k-th cluster of that order) gets -2 * (the cluster's column max) added to its cell of ``member``.
#     For an empty cluster that is -2 * non_member, which makes the cell the row's maximum: the point
#     moves. For a non-empty one it is at most 2 * bound in size, too little to change the row's arg-max.
#     So no count of empty clusters, no mask and no branch is needed.
#   * Row arg-max of ``member``: the new label of every point.
# With similarities in [-b, b], non_member = -(4b + 2) and lift = 2b + 1 leave every one of these margins
# at 1 or more.
_COSINE_BOUND = 2.0   # |cos| <= 1 for unit rows, up to rounding; 2 leaves room


def _reseed_constants(bound):
    return -(4 * bound + 2), 2 * bound + 1


def _reseed(fit: torch.Tensor, labels: torch.Tensor, member_fill: torch.Tensor, batch: torch.Tensor,
            rows: torch.Tensor, lift: float | None, keepdim: bool) -> torch.Tensor:
    """New labels after re-seeding (see the comment above). fit, labels (B, m); member_fill (B, m, c)
    all ``non_member``; batch (B, 1) and rows (m,) index maps. 11 ops when m > c, none reading values.

    ``lift=None``: anchors get an infinite key, all equal, as in the rule's literal form. That only
    matters when there are more clusters than points (c > m), where anchors themselves must move and
    then go in index order; K-means never has c > m and uses the cheaper finite lift.
    """
    member = torch.index_put(member_fill, (batch, rows, labels), fit)                    # (B, m, c)
    top, anchor = member.max(dim=1)                                                      # (B, c)
    if lift is None:  # an empty column's maximum is the fill value, a filled one's is a member's fit
        src = torch.where(top > member_fill.amin(), torch.inf, -torch.inf).to(top.dtype)
    else:
        src = top + lift
    key = fit.scatter_reduce(1, anchor, src, "amax")                                     # anchors last
    m, c = member.shape[1], member.shape[2]
    movers = key.sort(dim=1, stable=True).indices                                        # (B, m)
    level, target = top.sort(dim=1, stable=True)                                         # empty clusters first
    if m > c:  # shapes only: the k-th empty cluster pairs with the k-th mover, k < min(m, c)
        movers = movers[:, :c]
    elif c > m:
        level, target = level[:, :m], target[:, :m]
    member.index_put_((batch, movers, target), level * -2, accumulate=True)
    return member.argmax(dim=-1, keepdim=keepdim)


def reseed_empty(labels: torch.Tensor, sim_own: torch.Tensor, clusters: int) -> torch.Tensor:
    """Give every empty cluster one point, so exactly ``clusters`` clusters are non-empty (V3).

    The e-th empty cluster (ascending id) takes the e-th point in ascending order of similarity to its own
    centre (ties: lower index), chosen among points that are not the best-fitting member ("anchor") of
    their cluster; taking only non-anchors never empties another cluster. labels (B, m), sim_own (B, m)
    finite similarity of each point to its assigned centre, compared in float32. ``spherical_kmeans``
    runs the same steps (``_reseed``) with buffers made once per call; here the margins follow the
    largest |sim_own|, in float64 so that they cannot overflow.
    """
    B, m = labels.shape
    if m == 0:
        return labels
    fit = sim_own.float().double()   # float32 values as the rule compares them, exactly, in float64
    non_member, _ = _reseed_constants(fit.abs().amax())
    batch = torch.arange(B, device=labels.device).unsqueeze(1)
    rows = torch.arange(m, device=labels.device)
    return _reseed(fit, labels, non_member.expand(B, m, clusters), batch, rows, None, keepdim=False)


def spherical_kmeans(x: torch.Tensor, clusters: int, iters: int) -> torch.Tensor:
    """Spherical K-means (V3: cosine similarity on L2-normalised rows) with a fixed iteration count.

    x: (B, m, D) with m >= clusters. Each iteration assigns every point to the most similar centre
    (ties: lower cluster id), re-seeds empty clusters (``reseed_empty``) and sets each centre to the
    normalised mean of its members. Returns the final labels (B, m), every cluster id in use.

    Every iteration is the same 17 ops (12 in the last, whose centres nobody reads): no Python loop
    over clusters or samples, no branch on values, no host read. Index maps and constant buffers are
    made once per call.
    """
    B, m, D = x.shape
    if not 1 <= clusters <= m:
        raise ValueError(f"cannot form {clusters} clusters from {m} tokens")
    if iters < 1:
        return torch.zeros(B, m, dtype=torch.long, device=x.device)
    with torch.no_grad():  # labels are discrete: nothing differentiates through the centres
        return _kmeans(x, clusters, iters)


def _kmeans(x: torch.Tensor, clusters: int, iters: int) -> torch.Tensor:
    B, m, D = x.shape
    xn = _normalize(x if x.dtype == torch.float32 else x.float())
    non_member, lift = _reseed_constants(_COSINE_BOUND)
    member_fill = torch.full((B, m, clusters), non_member, device=x.device)
    batch = torch.arange(B, device=x.device).unsqueeze(1)
    rows = torch.arange(m, device=x.device)
    zero_sums = torch.zeros(B, clusters, D, device=x.device)
    centres = xn.index_select(1, kmeans_init(m, clusters, x.device))                    # (B, c, D)
    for it in range(iters):
        last = it == iters - 1
        # einsum: one op for xn @ centres^T (same bmm, same bits as the matmul of a transposed view)
        best = torch.einsum("bmd,bcd->bmc", xn, centres).max(dim=-1)
        # under autocast the similarities come out in bf16/fp16: re-seeding compares them as float32, as before
        fit = best.values if best.values.dtype == torch.float32 else best.values.float()
        labels = _reseed(fit, best.indices, member_fill, batch, rows, lift, keepdim=not last)
        if not last:
            # scatter_add adds each cluster's members in index order, as before: same sums, same bits
            centres = _normalize(torch.scatter_add(zero_sums, 1, labels.expand(-1, -1, D), xn))
    return labels


def merge_clusters(x: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, clusters: int,
                   mode: str = "mean") -> torch.Tensor:
    """Cluster tokens z_C = sum_{j in C} w_j z_j (V4, V5; SPEC step 4).

    mode "mean": w_j = IPS_j / sum_{j in C} IPS_j (importance-weighted mean);
    mode "sum": w_j = IPS_j (the paper's literal weighted sum). x (B, m, D),
    labels (B, m), weights (B, m) >= 0. Returns (B, clusters, D) in x.dtype;
    accumulates in float32.
    """
    if mode not in ("mean", "sum"):
        raise ValueError(f"unknown merge mode {mode!r}; use 'mean' or 'sum'")
    B, m, D = x.shape
    xf = x if x.dtype == torch.float32 else x.float()
    w = (weights if weights.dtype == torch.float32 else weights.float()).unsqueeze(-1)          # (B, m, 1)
    if mode == "sum":
        total = torch.zeros(B, clusters, D, device=x.device).scatter_add_(
            1, labels.unsqueeze(-1).expand(-1, -1, D), xf * w)
        return total if x.dtype == torch.float32 else total.to(x.dtype)
    # One scatter_add of [1, x, w, w x] per point: per cluster the count, the plain sum, the mass and the
    # weighted sum, each added in member order as four separate scatters would, so the same bits.
    width = 2 * (D + 1)
    acc = torch.zeros(B, clusters, width, device=x.device).scatter_add_(
        1, labels.unsqueeze(-1).expand(-1, -1, width), torch.cat([torch.ones_like(w), xf, w, xf * w], dim=-1))
    mass, sums = acc.view(B, clusters, 2, D + 1).split([1, D], dim=-1)                       # (B, c, 2, .)
    # slot 1 = weighted mean (sum / mass clamped at 1e-30); slot 0 = plain mean, the fallback where every
    # member's importance underflowed to zero. A count is a whole number, so clamping it at 1e-30
    # instead of 1 changes nothing: an empty cluster's sum is 0 either way.
    plain, weighted = (sums / mass.clamp_min(1e-30)).unbind(2)
    out = torch.where(mass[:, :, 1] > 0, weighted, plain)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


@dataclass
class StageRecord:
    """What one stage did, in positions of its input patch tokens (CLS excluded)."""

    importance: torch.Tensor   # (B, n_in)
    primary: torch.Tensor      # (B, keep)
    redundant: torch.Tensor    # (B, n_in - keep)
    labels: torch.Tensor       # (B, n_in - keep) cluster of each redundant token; empty if pruned


def compress(z: torch.Tensor, importance: torch.Tensor, stage: Stage, iters: int, merge: str = "mean",
             prune_only: bool = False, prefix: int = 1) -> tuple[torch.Tensor, StageRecord]:
    """One VMTC stage on z = [CLS, patches] (B, 1 + n, D) -> [CLS, primary, clusters] (B, 1 + keep + c, D) (V6).

    Primary tokens keep their spatial order; redundant tokens are clustered
    (spherical K-means) and merged with importance weights, or dropped when
    ``prune_only``. ``prefix``: leading tokens passed through untouched (1 for
    the CLS token, 0 for a tower without one, e.g. SigLIP).
    """
    B, N, D = z.shape
    n = N - prefix
    if n != stage.n_in:
        raise ValueError(f"stage expects {stage.n_in} patch tokens, got {n}")
    primary, redundant = select_primary(importance, stage.keep)
    patches = z[:, prefix:]
    # take_along_dim broadcasts the (B, k, 1) index over D: the gather without a separate expand
    parts = [z[:, :prefix], torch.take_along_dim(patches, primary.unsqueeze(-1), dim=1)]
    if not prune_only and stage.clusters > 0:
        rest = torch.take_along_dim(patches, redundant.unsqueeze(-1), dim=1)
        labels = spherical_kmeans(rest, stage.clusters, iters)
        parts.append(merge_clusters(rest, labels, importance.gather(1, redundant), stage.clusters, merge))
    else:
        labels = redundant.new_zeros((B, 0))
    return torch.cat(parts, dim=1), StageRecord(importance, primary, redundant, labels)


def owners_after(owner: torch.Tensor, record: StageRecord) -> torch.Tensor:
    """Track which token each original patch lives in, through one stage.

    owner (B, n0): index (in the stage's input patch tokens) of the token that
    holds each original patch, or -1 if dropped. Returns the same map for the
    stage output (primary tokens first, then cluster tokens), -1 for dropped.
    """
    B, n_in = record.importance.shape
    keep = record.primary.shape[1]
    dest = torch.full((B, n_in), -1, dtype=torch.long, device=owner.device)
    dest.scatter_(1, record.primary, torch.arange(keep, device=owner.device).expand(B, -1))
    if record.labels.numel():
        dest.scatter_(1, record.redundant, keep + record.labels)
    safe = owner.clamp_min(0)
    out = dest.gather(1, safe)
    return torch.where(owner < 0, owner, out)


# --------------------------------------------------------------------------- config and binding

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
            from ..models import UnsupportedModelError

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
        self.records: list[StageRecord] = []
        self._undo = []
        try:
            for index, (layer_idx, stage) in enumerate(zip(layers, self.stages)):
                if not stage.is_identity:  # nothing to do there; the layer stays stock
                    self._undo.append(adapter.add_tower_stage(model, layer_idx, self._stage_fn(index, stage)))
            if self._undo:  # crops lose their grid: AnyRes families pack them without one
                self._undo.append(adapter.pack_reduced_crops(model, self.image_tokens()))
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
        self.layers, self.stages, self.records, self._undo = [], [], [], []
        if self.config.target == 1.0 and isinstance(self.config.target, float):
            return  # keeps every token: the stock model
        self._undo.append(self.adapter.add_merger_stage(self.model, self._merged_stage))

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
        from .vmtc_merged import reduce_call

        records = [] if self.record else None
        features, extras, sources = reduce_call(call, self.merged_stage_for, self.config.kmeans_iters,
                                                self.config.merge, self.config.prune_only, records)
        if records is not None:  # per input of the last call (`focusvlm show`): MergedRecord, None if left whole
            self.records = records
        return MergedResult(tuple(features), tuple(tuple(level) for level in extras), tuple(sources))

    def _stage_fn(self, index: int, stage: Stage):
        def run(layer: Any, normed: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            if self.importance == "cls":
                q, k, scale = self.adapter.tower_cls_qk(layer, normed)
                importance = cls_importance(q, k, scale)
            else:
                q, k, scale = self.adapter.tower_qk(layer, normed)
                importance = received_importance(q, k, scale, self.prefix)
            out, record = compress(z, importance, stage, self.config.kmeans_iters, self.config.merge,
                                   self.config.prune_only, self.prefix)
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

    def panels(self, sample: int = 0) -> list[Any]:
        from .. import viz

        if self.merged:  # one stage after the merger; ``sample`` = the input (image) of the last call
            if sample >= len(self.records) or self.records[sample] is None:
                return []
            return [viz.merged_panel(self.records[sample])]
        active = [layer for layer, s in zip(self.layers, self.stages) if not s.is_identity]
        return viz.vmtc_panels(self.records, active, sample) if self.records else []

    def remove(self, processor: Any | None = None) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo = []
        self.records = []
