"""The vision-side baselines VMTC is compared with, as pure tensor functions.

* LLaVA-PruMerge (Shang et al. 2024): CLS attention of the feature layer
  picks the kept tokens (interquartile-range outlier rule, or a fixed budget
  so a batch keeps one shape); each kept token then absorbs its most similar
  pruned tokens (cosine of keys), weighted by CLS attention. PruMerge+ adds
  spatially uniform samples so regions the CLS ignores still get a token.

Written from the method's description; the exact weighting choices are ours
and documented on each function (docs/vision.md lists them).
"""

from __future__ import annotations

import math

import torch

from .vmtc import round_half_up


# --------------------------------------------------------------------------- PruMerge

def iqr_outliers(attn: torch.Tensor) -> torch.Tensor:
    """PruMerge's adaptive keep set: tokens whose CLS attention exceeds Q3 + 1.5 * (Q3 - Q1).

    attn (B, n) -> bool mask (B, n). The most attended token is always kept,
    so no image ends with zero tokens.
    """
    a = attn.float()
    q1 = torch.quantile(a, 0.25, dim=-1, keepdim=True)
    q3 = torch.quantile(a, 0.75, dim=-1, keepdim=True)
    mask = a > q3 + 1.5 * (q3 - q1)
    top = a.argmax(-1, keepdim=True)
    return mask.scatter(1, top, True)


def resolve_budget(num_patches: int, budget: int | float) -> int:
    """A fraction in (0, 1] of the patches or an absolute count -> a token count in [1, n]."""
    if isinstance(budget, float) and budget <= 1.0:
        count = round_half_up(num_patches * budget)
        if count < 1:
            raise ValueError(f"PruMergeConfig.budget={budget} leaves no token of {num_patches} patches")
        return count
    count = int(budget)
    if count > num_patches:
        raise ValueError(f"PruMergeConfig.budget={count} exceeds the {num_patches} patch tokens")
    return count


def uniform_fill(taken: torch.Tensor, count: int) -> torch.Tensor:
    """Add ``count`` spatially uniform positions not yet taken (PruMerge+).

    taken (B, n) bool with the same number of free positions per sample; the
    free positions are listed in raster order and every (n_free / count)-th
    one (centred) is added. Returns the new mask.
    """
    B, n = taken.shape
    free = (~taken).sum(-1)
    if count == 0:
        return taken
    if not bool((free == free[0]).all()) or int(free[0]) < count:
        raise ValueError(f"uniform_fill needs {count} free positions, same in every sample; have {free.tolist()}")
    nf = int(free[0])
    order = torch.sort(taken.long(), dim=-1, stable=True).indices[:, :nf]               # free positions, raster order
    pick = torch.floor((torch.arange(count, dtype=torch.float64) + 0.5) * nf / count).long().to(taken.device)
    return taken.scatter(1, order[:, pick], True)


def prumerge_keep(attn: torch.Tensor, budget: int | None, plus: bool) -> torch.Tensor:
    """Which tokens PruMerge(+) keeps, as a bool mask (B, n).

    budget None: the IQR outliers (adaptive count), plus as many uniform
    samples again for PruMerge+. budget b: the b most attended tokens (ties:
    lower index), or for PruMerge+ the ceil(b / 2) most attended and
    floor(b / 2) uniform samples, so every sample keeps exactly b.
    """
    B, n = attn.shape
    if budget is None:
        mask = iqr_outliers(attn)
        if plus:
            if B != 1:
                raise ValueError("adaptive PruMerge+ works one image at a time; set PruMergeConfig.budget for batches")
            mask = uniform_fill(mask, min(int(mask.sum()), n - int(mask.sum())))
        return mask
    by_attn = math.ceil(budget / 2) if plus else budget
    order = torch.sort(attn.float(), dim=-1, descending=True, stable=True).indices[:, :by_attn]
    mask = torch.zeros(B, n, dtype=torch.bool, device=attn.device).scatter(1, order, True)
    return uniform_fill(mask, budget - by_attn) if plus else mask


def prumerge_merge(x: torch.Tensor, keys: torch.Tensor, attn: torch.Tensor, keep: torch.Tensor,
                   neighbours: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kept tokens absorb their key-nearest pruned tokens, weighted by CLS attention.

    For kept token i with neighbour set N(i) (the ``neighbours`` pruned tokens
    of highest key cosine similarity to i, ties lower index; a pruned token
    may join several kept tokens):
        y_i = (a_i x_i + sum_{j in N(i)} a_j x_j) / (a_i + sum_{j in N(i)} a_j)
    x (B, n, D) features, keys (B, n, Dk), attn (B, n) CLS attention, keep
    (B, n) bool with the same count k in every sample. Returns (y (B, k, D) in
    raster order of the kept tokens, kept indices (B, k), neighbour indices
    (B, k, m) with m = min(neighbours, n - k)).
    """
    B, n, D = x.shape
    counts = keep.sum(-1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"PruMerge kept different token counts per sample {counts.tolist()}; "
                         "a batch needs PruMergeConfig.budget")
    k = int(counts[0])
    kept = torch.sort((~keep).long(), dim=-1, stable=True).indices[:, :k].sort(-1).values  # (B, k)
    m = min(neighbours, n - k)
    xf, a = x.float(), attn.float()
    gather = lambda t, idx: t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # noqa: E731
    centre = gather(xf, kept)
    a_kept = a.gather(1, kept)
    if m == 0:
        return centre.to(x.dtype), kept, kept.new_zeros((B, k, 0))
    kn = torch.nn.functional.normalize(keys.float(), dim=-1)
    sim = gather(kn, kept) @ kn.transpose(1, 2)                                          # (B, k, n)
    sim = sim.masked_fill(keep.unsqueeze(1), float("-inf"))
    near = torch.sort(sim, dim=-1, descending=True, stable=True).indices[:, :, :m]       # (B, k, m)
    a_near = a.gather(1, near.flatten(1)).view(B, k, m)
    x_near = gather(xf, near.flatten(1)).view(B, k, m, D)
    num = a_kept.unsqueeze(-1) * centre + (a_near.unsqueeze(-1) * x_near).sum(2)
    den = (a_kept + a_near.sum(-1)).clamp_min(1e-30).unsqueeze(-1)
    return (num / den).to(x.dtype), kept, near
