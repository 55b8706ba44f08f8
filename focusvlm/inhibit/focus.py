"""CMAI as pure tensor functions: focus scores, quantile thresholds, inhibition.

Shapes used throughout (one decoder layer, one forward call):
    B   batch
    Qt  text query rows recomputed in this call (padded per batch)
    N   image key slots of each sample (padded to the batch maximum)
    T   text rows known so far in this layer: cached earlier ones + this call's

All weights here are head-averaged, pre-inhibition attention weights
(shared/SPEC.md, CMAI). Nothing in this file imports transformers.
"""

from __future__ import annotations

import torch

# the focus scores focus_score knows (the paper's method first, then its Table 5 ablations)
FOCUS_VARIANTS = ("neighborhood", "tia", "sum", "discounted")


def masked_quantile(values: torch.Tensor, valid: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row quantile over the entries where ``valid`` is True.

    Same definition as ``torch.quantile(..., interpolation="linear")`` applied
    to each row's valid entries, but batched over rows that hold different
    numbers of valid entries, and free of torch.quantile's input-size limit.
    Rows with no valid entry get +inf (callers never use them).
    """
    filled = values.masked_fill(~valid, float("inf"))
    ordered, _ = filled.sort(dim=-1)
    count = valid.sum(dim=-1)
    rank = q * (count - 1).clamp(min=0).to(values.dtype)
    lo = rank.floor()
    weight = rank - lo
    lo = lo.long().clamp(max=values.shape[-1] - 1)
    hi = rank.ceil().long().clamp(max=values.shape[-1] - 1)
    v_lo = ordered.gather(-1, lo.unsqueeze(-1)).squeeze(-1)
    v_hi = ordered.gather(-1, hi.unsqueeze(-1)).squeeze(-1)
    # torch.lerp is what torch.quantile uses, so ties at exact ranks agree bit for bit
    return torch.lerp(v_lo, v_hi, weight).masked_fill(count == 0, float("inf"))


def focus_score(
    variant: str,
    a_img: torch.Tensor,
    a_text: torch.Tensor,
    rows: torch.Tensor,
    text_pos: torch.Tensor,
    text_valid: torch.Tensor,
    text_rank: torch.Tensor,
    q_pos: torch.Tensor,
    q_rank: torch.Tensor,
    discount: float = 0.9,
) -> torch.Tensor:
    """Text-to-image focus score F of each new text query row, shape (B, Qt, N).

    a_img:     (B, Qt, N) weights of the new text rows on the image keys (A_t2i rows).
    a_text:    (B, Qt, T) weights of the new text rows on every known text row's key.
    rows:      (B, T, N)  A_t2i rows of every known text row (the new ones included).
    text_pos:  (B, T) absolute positions of those rows; text_valid (B, T) marks real ones.
    text_rank: (B, T) index of each row among the sample's text tokens.
    q_pos, q_rank: (B, Qt) position and text index of each new query row.

    Variants (shared/SPEC.md):
      neighborhood  F_j = A_t2i[j] + sum_{h text, h < j} A[j, h] A_t2i[h]
      tia           F_j = A_t2i[j]
      sum           F_j = sum_{h text, h <= j} A_t2i[h]
      discounted    F_j = sum_{h text, h <= j} discount**(rank_j - rank_h) A_t2i[h]
    """
    if variant == "tia":
        return a_img
    earlier = text_valid.unsqueeze(1) & (text_pos.unsqueeze(1) < q_pos.unsqueeze(2))  # (B, Qt, T)
    if variant == "neighborhood":
        weights = a_text * earlier
        return a_img + torch.bmm(weights, rows)
    up_to = earlier | (text_valid.unsqueeze(1) & (text_pos.unsqueeze(1) == q_pos.unsqueeze(2)))
    if variant == "sum":
        return torch.bmm(up_to.to(rows.dtype), rows)
    if variant == "discounted":
        gap = (q_rank.unsqueeze(2) - text_rank.unsqueeze(1)).clamp(min=0).to(rows.dtype)
        weights = torch.pow(torch.full_like(gap, discount), gap) * up_to
        return torch.bmm(weights, rows)
    raise ValueError(f"unknown focus variant {variant!r}")


def inhibition_mask(focus: torch.Tensor, visible: torch.Tensor, gamma: float) -> torch.Tensor:
    """Image keys each text row stops attending to: F below the row's gamma-quantile.

    The quantile runs over the image keys the row can see; a row that sees no
    image key is left alone.
    """
    tau = masked_quantile(focus, visible, gamma)
    return visible & (focus < tau.unsqueeze(-1))

