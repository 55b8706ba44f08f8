"""DivPrune (max-min diversity selection) as the authors' code computes it, as a pure tensor function.

Follows github vbdi/divprune, LLaVA/llava/model/llava_arch.py
(``LlavaMetaForCausalLM.DivPrune`` and ``pairwise_cosine_similarity``, called
from ``prepare_inputs_labels_for_multimodal`` when LAYER_INDEX=0).

What the wiring passes: ``features`` (B, N, D), the image features AFTER the
multimodal projector, i.e. the rows of the LLM's input embeddings that hold
the image (576 for LLaVA-1.5). The kept rows replace them, so the LLM sees
``token_count(N, ratio)`` image tokens from its first layer on.
No transformers import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: the repository's default SUBSET_RATIO (run_Divprune.sh, README): 56 of 576 tokens
DEFAULT_RATIO = 0.098


def token_count(num_tokens: int, ratio: float = DEFAULT_RATIO) -> int:
    """Kept count as the official code rounds it: int(round(ratio * N)) (Python round: halves to even)."""
    if num_tokens < 1:
        raise ValueError(f"DivPrune needs at least one image token, got {num_tokens}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"DivPrune ratio must be in (0, 1], got {ratio!r}")
    count = int(round(ratio * num_tokens))
    if count < 1:
        raise ValueError(f"DivPrune ratio {ratio} keeps no token of {num_tokens}")
    return count


def cosine_distance(features: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity between all pairs, (B, N, D) -> (B, N, N).

    Rows are divided by their norm without an epsilon, as officially (a zero
    feature gives NaN). float32, or float64 for float64 input.

    The matrix is made exactly symmetric (the upper triangle mirrored). A
    plain matrix product can round d_ij and d_ji differently, and that
    matters: the first pick is usually a tie between the two tokens of the
    most isolated mutual-nearest pair (both have that pair's distance as
    their nearest-neighbour distance), which rounding would then decide. With
    a symmetric matrix the tie goes to the lower position, argmax's rule.
    """
    dtype = torch.promote_types(torch.float32, features.dtype)
    x = features.to(dtype)
    xn = x / x.norm(dim=-1, keepdim=True)
    d = 1.0 - xn @ xn.transpose(1, 2)
    return torch.triu(d) + torch.triu(d, diagonal=1).transpose(1, 2)


def select(features: torch.Tensor, keep: int) -> torch.Tensor:
    """Greedy max-min diversity order, (B, N, D) -> (B, keep) positions in the order picked.

    With d = 1 - cosine similarity: the first pick maximises the second
    smallest entry of its column of d (the smallest being its own ~0
    distance), i.e. the token farthest from its nearest other token; each
    next pick maximises the minimum distance to the tokens already picked.
    argmax ties go to the lower position (torch.argmax returns the first
    maximum). As officially, nothing stops a re-pick when every remaining
    token duplicates a picked one.
    """
    if features.dim() != 3:
        raise ValueError(f"DivPrune features must be (B, N, D), got {tuple(features.shape)}")
    B, N, _ = features.shape
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= N:
        raise ValueError(f"DivPrune keeps between 1 and {N} tokens, got {keep!r}")
    dist = cosine_distance(features)
    picks = torch.empty(B, keep, dtype=torch.long, device=features.device)
    if N == 1:
        return picks.zero_()
    first = torch.topk(dist, 2, dim=1, largest=False).values[:, 1]                   # (B, N) per column
    picks[:, 0] = first.argmax(dim=-1)
    nearest = dist.gather(1, picks[:, :1].unsqueeze(-1).expand(-1, -1, N)).squeeze(1)  # (B, N)
    for i in range(1, keep):
        # the official code recomputes the min over all picked rows; a running min is the same value
        picks[:, i] = nearest.argmax(dim=-1)
        row = dist.gather(1, picks[:, i:i + 1].unsqueeze(-1).expand(-1, -1, N)).squeeze(1)
        nearest = torch.minimum(nearest, row)
    return picks


@dataclass
class DivPruneRecord:
    """What DivPrune did, in positions of the N image tokens."""

    picked: torch.Tensor   # (B, keep) in the order the greedy loop chose them
    kept: torch.Tensor     # (B, keep) ascending: the positions of the output tokens


def divprune(features: torch.Tensor, keep: int) -> tuple[torch.Tensor, DivPruneRecord]:
    """Keep ``keep`` of the N image tokens by max-min diversity, in their original (ascending) order.

    features (B, N, D) projected image features. The official code sorts the
    kept sequence positions before slicing, so the output is in image order.
    Returns (tokens (B, keep, D) in features.dtype; record).
    """
    picked = select(features, keep)
    kept = picked.sort(dim=-1).values
    out = features.gather(1, kept.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
    return out, DivPruneRecord(picked, kept)
