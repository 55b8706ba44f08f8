"""The VMTC K-means step as it stood before the batched rewrite (verbatim copy, for equality tests),
and ``spherical_kmeans_reseed_last``, today's rule (re-seeding once, at the end) as a loop.

focusvlm/compress/vmtc.py replaced the per-iteration re-seeding below (one-hot, masked arg-max,
two sorts, gather and scatter: 31 ops) with a fixed, shorter op sequence that must return the SAME
labels and merged tokens. cls_importance ... compress are kept literally (they call each other by
their plain names, so these copies call each other), for tests/compress/test_vmtc_kmeans_ops.py to
compare old and new on any input and to count the old ops. They are a reference, not an oracle of the
SPEC: tests/reference/vmtc_reference.py is that.
"""

from __future__ import annotations

import torch

from focusvlm.compress.vmtc import Stage, StageRecord


def cls_importance(cls_query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Importance IPS_i (V1): CLS-to-patch attention, softmax over all keys (CLS included), mean over heads.

    cls_query: (B, H, Dh) the CLS row of the layer's queries; keys: (B, H, N, Dh)
    with N = 1 + n (CLS first). Returns (B, n) in float32. Only the CLS row of
    the attention matrix is formed.
    """
    logits = torch.einsum("bhd,bhnd->bhn", cls_query.float(), keys.float()) * scale
    probs = logits.softmax(dim=-1)
    return probs.mean(dim=1)[:, 1:]


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
    return torch.nn.functional.normalize(x, dim=-1, eps=1e-12)


def kmeans_init(m: int, clusters: int, device=None) -> torch.Tensor:
    """Deterministic initial centre indices (V3): ``clusters`` points evenly spread over the m tokens
    (index floor((i + 0.5) * m / c)), so the seeds cover the whole image in raster order."""
    i = torch.arange(clusters, device=device, dtype=torch.float64)
    return torch.floor((i + 0.5) * m / clusters).long()


def reseed_empty(labels: torch.Tensor, sim_own: torch.Tensor, clusters: int) -> torch.Tensor:
    """Give every empty cluster one point, so exactly ``clusters`` clusters are non-empty (V3).

    The e-th empty cluster (ascending id) takes the e-th point in ascending
    order of similarity to its own centre (ties: lower index), chosen among
    points that are not the best-fitting member ("anchor") of their cluster;
    taking only non-anchors never empties another cluster. labels (B, m),
    sim_own (B, m) similarity of each point to its assigned centre.
    """
    B, m = labels.shape
    onehot = torch.nn.functional.one_hot(labels, clusters).bool()                      # (B, m, c)
    sizes = onehot.sum(1)                                                               # (B, c)
    empty = sizes == 0
    # no early exit when nothing is empty: testing that would cost a host sync every iteration,
    # and with no empty cluster `take` below is all False, so labels come back unchanged
    fit = sim_own.float().unsqueeze(-1).masked_fill(~onehot, float("-inf"))
    anchor = fit.argmax(dim=1)                                                          # (B, c)
    positions = torch.arange(m, device=labels.device).view(1, m, 1)
    is_anchor = (onehot & (positions == anchor.unsqueeze(1))).any(-1)                  # (B, m)
    # Non-anchors in ascending similarity, anchors last; the first `num_empty` of them move.
    key = sim_own.float().masked_fill(is_anchor, float("inf"))
    movers = torch.sort(key, dim=-1, stable=True).indices                               # (B, m)
    empty_ids = torch.sort(empty.long(), dim=-1, descending=True, stable=True).indices  # empties first, ascending
    num_empty = empty.sum(-1, keepdim=True)                                             # (B, 1)
    rank = torch.arange(min(m, clusters), device=labels.device).unsqueeze(0)
    take = rank < num_empty
    who = movers[:, : rank.shape[1]]
    new = empty_ids[:, : rank.shape[1]]
    current = labels.gather(1, who)
    return labels.scatter(1, who, torch.where(take, new, current))


def spherical_kmeans(x: torch.Tensor, clusters: int, iters: int) -> torch.Tensor:
    """Spherical K-means (V3: cosine similarity on L2-normalised rows) with a fixed iteration count.

    x: (B, m, D) with m >= clusters. Each iteration assigns every point to the
    most similar centre (ties: lower cluster id), re-seeds empty clusters
    (``reseed_empty``) and sets each centre to the normalised mean of its
    members. Returns the final labels (B, m), every cluster id in use.
    """
    B, m, _ = x.shape
    if not 1 <= clusters <= m:
        raise ValueError(f"cannot form {clusters} clusters from {m} tokens")
    xn = _normalize(x.float())
    centres = xn[:, kmeans_init(m, clusters, x.device)]                                 # (B, c, D)
    labels = torch.zeros(B, m, dtype=torch.long, device=x.device)
    for _ in range(iters):
        sim = xn @ centres.transpose(1, 2)                                              # (B, m, c)
        best = sim.max(dim=-1)
        labels = reseed_empty(best.indices, best.values, clusters)
        sums = torch.zeros(B, clusters, xn.shape[-1], device=x.device).scatter_add_(
            1, labels.unsqueeze(-1).expand(-1, -1, xn.shape[-1]), xn)
        centres = _normalize(sums)
    return labels


def spherical_kmeans_reseed_last(x: torch.Tensor, clusters: int, iters: int) -> torch.Tensor:
    """The K-means rule of focusvlm.compress.vmtc since issue 29, written with loops (not a copy of old code).

    Re-seeding once, after the last assignment (``reseed_empty`` above); between iterations a centre becomes
    the normalised sum of its members, and one without members, or whose members sum to zero, stays where
    it was. Member sums are added one point at a time in index order, so the float arithmetic is the
    vectorised version's and the labels must be equal, ties included.
    """
    B, m, D = x.shape
    xn = _normalize(x.float())
    centres = xn[:, kmeans_init(m, clusters, x.device)]                                 # (B, c, D)
    for it in range(iters):
        best = (xn @ centres.transpose(1, 2)).max(dim=-1)
        if it == iters - 1:
            break
        sums = torch.zeros(B, clusters, D, device=x.device)
        for b in range(B):
            for j in range(m):
                c = int(best.indices[b, j])
                sums[b, c] = sums[b, c] + xn[b, j]
        norm = torch.linalg.vector_norm(sums, dim=-1)
        moved = centres.clone()
        for b in range(B):
            for c in range(clusters):
                if norm[b, c] > 0:
                    moved[b, c] = sums[b, c] / norm[b, c]
        centres = moved
    return reseed_empty(best.indices, best.values, clusters)


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
    w = weights.float()
    idx = labels.unsqueeze(-1).expand(-1, -1, D)
    total = torch.zeros(B, clusters, D, device=x.device).scatter_add_(1, idx, x.float() * w.unsqueeze(-1))
    if mode == "mean":
        mass = torch.zeros(B, clusters, device=x.device).scatter_add_(1, labels, w)
        # zero mass only if every member's importance underflowed; fall back to a plain mean then
        count = torch.zeros(B, clusters, device=x.device).scatter_add_(1, labels, torch.ones_like(w))
        plain = torch.zeros(B, clusters, D, device=x.device).scatter_add_(1, idx, x.float())
        total = torch.where(mass.unsqueeze(-1) > 0, total / mass.clamp_min(1e-30).unsqueeze(-1),
                            plain / count.clamp_min(1).unsqueeze(-1))
    return total.to(x.dtype)


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
    kept = patches.gather(1, primary.unsqueeze(-1).expand(-1, -1, D))
    parts = [z[:, :prefix], kept]
    labels = redundant.new_zeros((B, 0))
    if not prune_only and stage.clusters > 0:
        rest = patches.gather(1, redundant.unsqueeze(-1).expand(-1, -1, D))
        labels = spherical_kmeans(rest, stage.clusters, iters)
        parts.append(merge_clusters(rest, labels, importance.gather(1, redundant), stage.clusters, merge))
    return torch.cat(parts, dim=1), StageRecord(importance, primary, redundant, labels)
