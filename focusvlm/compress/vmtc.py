"""VMTC (visual-modality token compression) as pure tensor functions.

Every function works on a batch (leading dimension B) with no Python loop
over tokens, and every sample of a batch leaves with the same token count.
No transformers import and no model: the method (``vmtc_method.py``) reaches
the model through its family adapter (``focusvlm.models``), which feeds these
functions the tensors of a CLIP-style encoder layer.

Notation (SPEC, section VMTC): a stage receives CLS + n patch tokens, keeps
k primary patches unchanged and merges the other n - k into c cluster tokens,
so it emits CLS + k + c tokens. Equation numbers (V1 ... V7) refer to
docs/method.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch



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
        out.append(crop_stage(n_in, n_out, cluster_frac, prune_only))
        n_in = out[-1].n_out
    return out


def crop_stage(n_in: int, n_out: int, cluster_frac: float, prune_only: bool = False) -> Stage:
    """The stage that takes ``n_in`` patch tokens to ``n_out`` (one step of ``stage_schedule``).

    Clusters c = max(1, round(cluster_frac * n_out)), at most n_out (0 when ``prune_only``);
    ``n_out >= n_in`` is the identity; ``n_out = 0`` drops every token.
    """
    if n_out >= n_in:
        return Stage(n_in, n_in, 0)
    c = 0 if prune_only else min(n_out, max(1, round_half_up(cluster_frac * n_out)))
    return Stage(n_in, n_out - c, c)


# --------------------------------------------------------------------------- per-image budget (AnyRes)

def anyres_budget(stock: int, patches: int, tiles: int, target: float | int) -> tuple[int, int]:
    """SPEC "Per-image budget": (tokens the base crop keeps, tokens each tile keeps) for one AnyRes image.

    ``stock``: S, the stock model's token count for the image (after unpadding / anyres_max
    downscale); ``patches``: P per crop; ``tiles``: T. B = round_half_up(target x S) for a share,
    the count itself for a count target; b = the per-crop target (``resolve_target``); each tile
    keeps t = min(b, floor((B - b - T) / T)) tokens plus its newline. When t < 1 (or the image has
    no tiles) the tiles are dropped: returns (min(b, B), 0).
    """
    base = resolve_target(patches, target)
    budget = round_half_up(target * stock) if isinstance(target, float) and target <= 1.0 else int(target)
    if tiles > 0:
        tile = min(base, (budget - base - tiles) // tiles)
        if tile >= 1:
            return base, tile
    return min(base, budget), 0


def anyres_count(base: int, tile: int, tiles: int) -> int:
    """Tokens of one image under ``anyres_budget``: base + tiles x (tile + 1 newline), or the base alone."""
    return base + tiles * (tile + 1) if tile > 0 else base


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
    top, rest = order.split([keep, n - keep], dim=-1)   # one op for both views (two slices otherwise)
    return top.sort(dim=-1).values, rest.sort(dim=-1).values


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
            rows: torch.Tensor, lift: float | None) -> torch.Tensor:
    """New labels after re-seeding (see the comment above). fit, labels (B, m); member_fill (B, m, c)
    all ``non_member``; batch (B, 1) and rows (m,) index maps. 10 ops when m > c, none reading values.

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
    return member.argmax(dim=-1)


def reseed_empty(labels: torch.Tensor, sim_own: torch.Tensor, clusters: int) -> torch.Tensor:
    """Give every empty cluster one point, so exactly ``clusters`` clusters are non-empty (V3).

    The e-th empty cluster (ascending id) takes the e-th point in ascending order of similarity to its own
    centre (ties: lower index), chosen among points that are not the best-fitting member ("anchor") of
    their cluster; taking only non-anchors never empties another cluster. labels (B, m), sim_own (B, m)
    finite similarity of each point to its assigned centre, compared in float32. ``spherical_kmeans``
    runs the same steps (``_reseed``) once, after its last assignment, with margins fixed by the cosine
    bound; here the margins follow the largest |sim_own|, in float64 so that they cannot overflow.
    """
    B, m = labels.shape
    if m == 0:
        return labels
    fit = sim_own.float().double()   # float32 values as the rule compares them, exactly, in float64
    non_member, _ = _reseed_constants(fit.abs().amax())
    batch = torch.arange(B, device=labels.device).unsqueeze(1)
    rows = torch.arange(m, device=labels.device)
    return _reseed(fit, labels, non_member.expand(B, m, clusters), batch, rows, None)


def spherical_kmeans(x: torch.Tensor, clusters: int, iters: int) -> torch.Tensor:
    """Spherical K-means (V3: cosine similarity on L2-normalised rows) with a fixed iteration count.

    x: (B, m, D) with m >= clusters. Each iteration assigns every point to the most similar centre
    (ties: lower cluster id); between iterations each centre becomes the normalised sum of its members,
    and a centre left with no members (or members that cancel out) stays where it was, so it can win
    points back. After the last assignment empty clusters are re-seeded (``reseed_empty``). Returns the
    labels (B, m), every cluster id in use.

    Every iteration is the same 7 ops (2 in the last), the re-seeding 10 once: no Python loop over
    clusters or samples, no branch on values, no host read. Re-seeding once instead of in every
    iteration is what makes an iteration this short (the rule needs two sorts and four scatters); on
    inputs where no cluster empties before the last assignment, e.g. every VMTC stage of the test
    presets, the labels are those of the per-iteration version (tests/compress/test_vmtc_kmeans_ops.py).
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
    batch = torch.arange(B, device=x.device).unsqueeze(1)
    zero_sums = torch.zeros(B, clusters, D, device=x.device)
    centres = xn.index_select(1, kmeans_init(m, clusters, x.device))                    # (B, c, D)
    for it in range(iters):
        # einsum: one op for xn @ centres^T (same bmm, same bits as the matmul of a transposed view)
        best = torch.einsum("bmd,bcd->bmc", xn, centres).max(dim=-1)
        if it == iters - 1:
            break
        # members summed in index order (as scatter_add does), in one op without an expanded index
        sums = torch.index_put(zero_sums, (batch, best.indices), xn, accumulate=True)
        norm = torch.linalg.vector_norm(sums, dim=-1, keepdim=True)
        # where a sum is zero the quotient is 0/0, and the previous centre is kept instead
        centres = torch.where(norm > 0, sums / norm, centres)
    # under autocast the similarities come out in bf16/fp16: re-seeding compares them as float32
    fit = best.values if best.values.dtype == torch.float32 else best.values.float()
    non_member, lift = _reseed_constants(_COSINE_BOUND)
    member_fill = torch.full((B, m, clusters), non_member, device=x.device)
    return _reseed(fit, best.indices, member_fill, batch, torch.arange(m, device=x.device), lift)


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
    head, patches = z.split([prefix, n], dim=1)
    # take_along_dim broadcasts the (B, k, 1) index over D: the gather without a separate expand
    parts = [head, torch.take_along_dim(patches, primary.unsqueeze(-1), dim=1)]
    if not prune_only and stage.clusters > 0:
        rest = torch.take_along_dim(patches, redundant.unsqueeze(-1), dim=1)
        labels = spherical_kmeans(rest, stage.clusters, iters)
        parts.append(merge_clusters(rest, labels, importance.gather(1, redundant), stage.clusters, merge))
    else:
        labels = redundant.new_zeros((B, 0))
    return torch.cat(parts, dim=1), StageRecord(importance, primary, redundant, labels)


@dataclass
class CropRecords:
    """What a stage whose crops keep different counts did (``compress_crops``): per count, the crops
    (positions in the batch) that kept it and their ``StageRecord``."""

    groups: list[tuple[list[int], StageRecord]]

    def of(self, sample: int) -> StageRecord:
        """The record of crop ``sample`` alone (batch dimension 1)."""
        for crops, record in self.groups:
            if sample in crops:
                j = crops.index(sample)
                return StageRecord(*(t[j:j + 1] for t in (record.importance, record.primary, record.redundant,
                                                          record.labels)))
        raise IndexError(f"crop {sample} is not in this stage's batch of "
                         f"{sum(len(c) for c, _ in self.groups)} crops")


def compress_crops(z: torch.Tensor, importance: torch.Tensor, counts: list[int], iters: int,
                   cluster_frac: float, merge: str = "mean", prune_only: bool = False,
                   prefix: int = 1) -> tuple[torch.Tensor, CropRecords]:
    """One VMTC stage in which crop i of the batch leaves with ``counts[i]`` patch tokens (SPEC "Per-image
    budget": an AnyRes image's tiles may keep fewer tokens than its base crop).

    Crop i becomes exactly what ``compress`` makes of it alone with ``crop_stage(n, counts[i])``: the
    same importance, primary split, K-means and merge; crops with equal counts run as one batch.
    Returns z' (B, prefix + max(counts), D): each crop's prefix and kept tokens first, zeros after
    (the padding a caller trims by ``counts``), and the stage's ``CropRecords``.
    """
    B, N, D = z.shape
    if len(counts) != B:
        raise ValueError(f"{len(counts)} crop counts for a batch of {B} crops")
    n = N - prefix
    width = prefix + max(counts)
    parts, order, groups = [], [], []
    for count in sorted(set(counts), reverse=True):
        crops = [i for i, c in enumerate(counts) if c == count]
        index = torch.tensor(crops, device=z.device)
        stage = crop_stage(n, count, cluster_frac, prune_only)
        out, record = compress(z.index_select(0, index), importance.index_select(0, index), stage, iters, merge,
                               prune_only, prefix)
        parts.append(torch.nn.functional.pad(out, (0, 0, 0, width - out.shape[1])))
        order += crops
        groups.append((crops, record))
    inverse = torch.empty(B, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(B)
    return torch.cat(parts).index_select(0, inverse.to(z.device)), CropRecords(groups)


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
