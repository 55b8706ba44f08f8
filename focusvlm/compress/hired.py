"""HiRED (High-Resolution Early Dropping) as the authors' code computes it, as pure tensor functions.

Follows github hasanar1f/HiRED, ``transformers/src/transformers/models/llava_next/modeling_llava_next.py``
(``ViT_Attn_Hook.get_attn``, ``HiRED_token_selection``, ``HiRED_sub_img_budgets``,
``pack_HiRED_image_features`` and the HiRED block of ``forward``) and, for the single-crop
version, ``.../llava/modeling_llava.py`` (``HiRED_token_selection``).

What the official code computes for one LLaVA-NeXT image of C = 1 + T crops (base crop first, then
the T tiles in the processor's order), N image tokens per crop:

1. Scores: the CLS row of an encoder layer's attention (its q/k projections, softmax per head over
   all keys, CLS included), the last N columns, summed over heads. Two layers: an early one
   (``vit_top_layer = 0``) and the one whose output the LLM reads (``vit_bottom_layer = 22`` of
   CLIP-L, feature layer -2).
2. Budget: ``total = int(C * N * rate)`` (rate = ``token_budget_rate``, default 0.2), the base crop's
   share ``base = min(int(total * alpha), N)`` (alpha default 0.5), the tiles' share
   ``sub = min(total - base, T * N)``.
3. Split of ``sub`` across the tiles: the base crop's top ``int(N * (1 - alpha))`` tokens by the EARLY
   scores are counted in T contiguous slices of the base crop's token sequence (slice t -> tile t:
   rows of the base crop, not the quadrant tile t covers); tile t gets
   ``int(count_t / sum(count) * sub)`` (float32 division), at most N.
4. Selection: the base crop keeps its top ``base`` tokens, tile t its top ``budget_t`` tokens, both by
   the FINAL-layer scores. The rest is dropped before the LLM (the projector still maps every token).
5. Packing: the base crop's kept tokens in sequence order, then the tiles' kept tokens in the order
   of the stock tile grid after unpadding (kept tokens in the padding are lost), with NO image_newline.

The count therefore depends on the image's content (the truncated split, and selected tokens lost to
unpadding): it is known only after the tower ran. On LLaVA-1.5 (one crop) the official code keeps the
top ``min(N, int(N * rate))`` tokens by the final-layer scores, in sequence order: a fixed count.

Ties that the official ``torch.topk`` leaves unspecified go to the earlier position here. Scores are
computed in float32 (float64 for float64 inputs). No transformers import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .precision import work_dtype

#: ``token_budget_rate`` and ``alpha`` of the repository's scripts (run_HiRED_sys_report.py,
#: accuracy_benchmarks/*.sh): 20 % of the crops' tokens, half of it for the base crop
DEFAULT_BUDGET = 0.2
DEFAULT_ALPHA = 0.5
#: ``vit_top_layer``: the early layer whose CLS attention splits the tiles' budget
EARLY_LAYER = 0
#: how the base crop's early top tokens are assigned to tiles: "rows" (official: contiguous slices of
#: the base crop's token sequence) or "regions" (the base crop's patch grid cut like the tile grid)
SPLITS = ("rows", "regions")


def _check_budget(budget: float | int) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ValueError(f"HiRED budget must be a positive rate or token count, got {budget!r}")


# --------------------------------------------------------------------------- scores

def cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """The CLS row of an encoder layer's attention, summed over heads (``ViT_Attn_Hook.get_attn``, row 0,
    ``.sum(dim=1)`` over heads).

    q: (B, H, d) the CLS query per head; k: (B, H, T, d) every key (CLS first); scale: the layer's
    (d^-0.5, as the official hook uses). Softmax per head over all T keys. Returns (B, T) float32
    (float64 for float64 input): the caller takes the last N columns (``[-N:]``, the patches for
    LLaVA's default feature strategy).
    """
    if q.dim() != 3 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"HiRED needs q (B, H, d) and k (B, H, T, d), got {tuple(q.shape)} and {tuple(k.shape)}")
    dtype = work_dtype(q, k)
    logits = torch.einsum("bhd,bhtd->bht", q.to(dtype), k.to(dtype)) * scale
    return logits.softmax(dim=-1).sum(dim=1)


# --------------------------------------------------------------------------- budgets

def total_budget(crops: int, tokens: int, budget: float | int) -> int:
    """Tokens one image of ``crops`` crops of ``tokens`` tokens may keep: ``int(crops * tokens * rate)``
    (the official order of operations) for a rate, the count itself for an integer budget."""
    _check_budget(budget)
    if isinstance(budget, int):
        return budget
    return int(crops * tokens * budget)


def split_budget(total: int, tokens: int, tiles: int, alpha: float) -> tuple[int, int]:
    """(base crop's budget, tiles' budget) as officially: ``min(int(total * alpha), N)`` and
    ``min(total - base, T * N)``."""
    base = min(int(total * alpha), tokens)
    return base, min(total - base, tiles * tokens)


def spatial_count(tokens: int, alpha: float) -> int:
    """The base crop's early top tokens that split the tiles' budget: ``int(N * (1 - alpha))``."""
    return int(tokens * (1 - alpha))


def top_mask(scores: torch.Tensor, keep: torch.Tensor | Sequence[int] | int) -> torch.Tensor:
    """Per row of ``scores`` (M, n), the ``keep`` highest entries (ties: the earlier position), as an (M, n)
    bool mask. ``keep``: one count, or one per row ((M,), on any device; 0 keeps nothing)."""
    if scores.dim() != 2:
        raise ValueError(f"HiRED scores must be (M, n), got {tuple(scores.shape)}")
    M, n = scores.shape
    keep = torch.as_tensor(keep, dtype=torch.long, device=scores.device)
    keep = keep.expand(M) if keep.dim() == 0 else keep
    if keep.shape != (M,):
        raise ValueError(f"HiRED needs one count per row ({M}), got {tuple(keep.shape)}")
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=scores.device).expand(M, n))
    return ranks < keep[:, None]


def tile_of_token(tokens: int, tiles: int, split: str = "rows", grid: tuple[int, int] | None = None,
                  tile_grid: tuple[int, int] | None = None) -> torch.Tensor:
    """(N,) long: the tile each base-crop token's early vote goes to.

    "rows" (official): token p votes for tile ``p * T // N``, the T contiguous slices of the base crop's
    sequence (the official ``reshape(rows, cols, -1)``; for N divisible by T exactly its slices, else
    slices of floor or ceil size, where the official reshape fails).
    "regions" (a corrected variant, not the official code): the base crop's patch grid (gh, gw) is cut
    like the tile grid (R, C); patch (y, x) votes for tile ``(y * R // gh) * C + x * C // gw``.
    """
    if split == "rows":
        if tiles < 1:
            raise ValueError(f"HiRED splits among at least one tile, got {tiles}")
        return torch.arange(tokens) * tiles // tokens
    if split == "regions":
        if grid is None or tile_grid is None:
            raise ValueError("HiRED split='regions' needs the base crop's patch grid and the tile grid")
        (gh, gw), (R, C) = grid, tile_grid
        if gh * gw != tokens or R * C != tiles:
            raise ValueError(f"HiRED split='regions': grid {grid} / tile grid {tile_grid} do not match "
                             f"{tokens} tokens / {tiles} tiles")
        y, x = torch.arange(gh)[:, None], torch.arange(gw)[None, :]
        return ((y * R // gh) * C + x * C // gw).flatten()
    raise ValueError(f"HiRED split must be one of {SPLITS}, got {split!r}")


def tile_budgets(votes: torch.Tensor, tile: torch.Tensor, tiles: int, sub: int, tokens: int) -> torch.Tensor:
    """(T,) long: each tile's budget (``HiRED_sub_img_budgets``).

    votes: (N,) bool, the base crop's early top tokens; tile: (N,) long, the tile each token votes for
    (``tile_of_token``). A tile gets ``int(count_t / sum(count) * sub)``, the ratio in float32 as the
    official int64 / int64 division gives it, truncated toward zero, at most N.
    """
    counts = torch.zeros(tiles, dtype=torch.long, device=votes.device)
    counts.index_add_(0, tile.to(votes.device), votes.long())
    ratio = counts.to(torch.float32) / counts.sum().to(torch.float32)
    return (ratio * sub).int().clamp(max=tokens).long()


# --------------------------------------------------------------------------- selection

@dataclass
class HiREDSelection:
    """What HiRED chose for the crops of one call (images in order, each base crop first, then its tiles).

    selected: (crops, N) bool, the tokens each crop keeps (before the packing drops the tiles' padding).
    budgets: (crops,) long, each crop's budget (the base crop's share, then each tile's).
    crops: crops per image.
    """

    selected: torch.Tensor
    budgets: torch.Tensor
    crops: list[int]


def select(early_base: torch.Tensor, final: torch.Tensor, crops: Sequence[int], budget: float | int,
           alpha: float = DEFAULT_ALPHA, split: str = "rows", grid: tuple[int, int] | None = None,
           tile_grids: Sequence[tuple[int, int]] | None = None) -> HiREDSelection:
    """HiRED's token selection for every crop of a call (``HiRED_token_selection``).

    early_base: (images, N) early-layer scores of each image's base crop.
    final: (sum(crops), N) final-layer scores of every crop, images in order, base crop first.
    crops: crops per image (1 + its tiles). budget: a rate (float; >= 1 keeps everything, the official
    ``token_budget_rate < 1`` switch) or a token count per image (int). grid / tile_grids: the base
    crop's patch grid and each image's tile grid (rows, cols), for ``split="regions"`` only.
    """
    crops = [int(c) for c in crops]
    if final.dim() != 2 or early_base.dim() != 2 or final.shape[0] != sum(crops) or early_base.shape[0] != len(crops):
        raise ValueError(f"HiRED needs early_base (images, N) and final (crops, N) for crops {crops}, got "
                         f"{tuple(early_base.shape)} and {tuple(final.shape)}")
    if any(c < 1 for c in crops):
        raise ValueError(f"HiRED: every image has at least its base crop, got crops {crops}")
    _check_budget(budget)
    n = final.shape[1]
    if isinstance(budget, float) and budget >= 1.0:   # the official code skips the selection
        return HiREDSelection(torch.ones_like(final, dtype=torch.bool),
                              torch.full((final.shape[0],), n, dtype=torch.long, device=final.device), crops)
    k_votes = spatial_count(n, alpha)
    votes = top_mask(early_base, k_votes)                                       # (images, N)
    keeps = []
    for i, c in enumerate(crops):
        base, sub = split_budget(total_budget(c, n, budget), n, c - 1, alpha)
        keeps.append(torch.tensor([base], dtype=torch.long, device=final.device))
        if c == 1:
            continue
        if sub > 0:
            if k_votes < 1:
                raise ValueError(f"HiRED alpha={alpha} leaves int({n} * (1 - alpha)) = 0 base-crop tokens to split "
                                 f"the tiles' budget of {sub} by (the official code divides 0 by 0)")
            tile = tile_of_token(n, c - 1, split, grid, tile_grids[i] if tile_grids is not None else None)
            keeps.append(tile_budgets(votes[i], tile, c - 1, sub, n))
        else:
            keeps.append(torch.zeros(c - 1, dtype=torch.long, device=final.device))
    budgets = torch.cat(keeps)
    return HiREDSelection(top_mask(final, budgets), budgets, crops)


def keep_count(tokens: int, budget: float | int) -> int:
    """Tokens the single-crop version keeps of ``tokens``: ``min(N, int(N * rate))`` for a rate below 1
    (every token at 1 or more, the official switch), ``min(N, count)`` for a count."""
    _check_budget(budget)
    if isinstance(budget, int):
        return min(tokens, budget)
    return tokens if budget >= 1.0 else min(tokens, int(tokens * budget))


def select_single(features: torch.Tensor, final: torch.Tensor,
                  budget: float | int) -> tuple[torch.Tensor, torch.Tensor]:
    """The single-crop version (LLaVA-1.5): (B, N, D) features and (B, N) final-layer scores ->
    ((B, k, D) the kept features in sequence order, (B, k) their positions). Per image (the official
    code applies sample 0's choice to the whole batch)."""
    if features.dim() != 3 or final.shape != features.shape[:2]:
        raise ValueError(f"HiRED needs features (B, N, D) and scores (B, N), got {tuple(features.shape)} and "
                         f"{tuple(final.shape)}")
    B, n, _ = features.shape
    k = keep_count(n, budget)
    if k < 1:
        raise ValueError(f"HiRED budget {budget} keeps no token of {n}")
    kept = top_mask(final, k).nonzero()[:, 1].view(B, k)
    return features.gather(1, kept.unsqueeze(-1).expand(-1, -1, features.shape[-1])), kept


# --------------------------------------------------------------------------- packing

def present(order: torch.Tensor, crops: int, tokens: int) -> torch.Tensor:
    """(C, N) bool: the crop tokens the stock packing places (``order`` lists them; unpadding drops the rest)."""
    placed = torch.zeros(crops * tokens, dtype=torch.bool, device=order.device)
    placed[order] = True
    return placed.view(crops, tokens)


def pack_image(features: torch.Tensor, selected: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """One image's packed tokens (``pack_HiRED_image_features`` with ``image_newline=None``).

    features: (C, N, D) its crops' projected features; selected: (C, N) bool; order: (L,) long, the crop
    tokens (index c * N + j) in the order the stock packing places them without newlines: the base crop's
    N tokens in sequence order, then the tiles' tokens in the unpadded tile grid's raster order (tokens
    the unpadding crops away are absent). Returns the selected tokens in that order: the base crop's
    kept tokens, then the tiles' (a selected token in the padding is lost, as officially).
    """
    if features.dim() != 3 or selected.shape != features.shape[:2]:
        raise ValueError(f"HiRED needs features (C, N, D) and a (C, N) mask, got {tuple(features.shape)} and "
                         f"{tuple(selected.shape)}")
    order = order.to(features.device)
    return features.flatten(0, 1)[order[selected.flatten()[order]]]
