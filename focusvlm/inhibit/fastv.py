"""FastV's token choice (which image tokens survive after LLM layer K), as pure tensor functions.

Follows github pkunlp-icler/FastV: the in-place (token dropping) path of
``LlamaModel.forward`` in src/transformers/src/transformers/models/llama/
modeling_llama.py and ``LlamaModel.fastv_forward`` in src/FastV/llava-hf/
transformers/src/transformers/models/llama/modeling_llama.py (the KV-cache
version). Only the choice lives here; removing the tokens from the hidden
states and the cache is the model wiring's job.

What the wiring passes: the attention probabilities of decoder layer K - 1
(0-based; the K-th layer, the last one that still sees every token) from the
prefill forward, (B, H, Q, Kv), reduced with ``last_token_attention`` to the
head-mean row of the last prompt token; a boolean mask of the image
positions; optionally a mask of valid (non-padding) positions. The hidden
states entering layer K are then cut to the positions ``select`` keeps,
with their ORIGINAL position ids (the official code passes the kept
indices as position_ids), and layers K.. only ever cache those positions.
No transformers import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: the paper's setting ("after layer 2, drop half"): K = 2, R = 50%
DEFAULT_K = 2
DEFAULT_RATIO = 0.5


def _check_ratio(ratio: float) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
        raise ValueError(f"FastV drop ratio R must be in [0, 1], got {ratio!r}")


def keep_count(num_image_tokens: int, ratio: float = DEFAULT_RATIO) -> int:
    """Image tokens kept: round(n * (1 - R)) (Python round: halves to even), as the HF-LLaVA path computes it."""
    if num_image_tokens < 0:
        raise ValueError(f"FastV: negative image token count {num_image_tokens}")
    _check_ratio(ratio)
    return round(num_image_tokens * (1 - ratio))


def last_token_attention(attn: torch.Tensor, last_index: torch.Tensor | None = None) -> torch.Tensor:
    """The head-mean attention row of each sample's last token, (B, H, Q, Kv) -> (B, Kv).

    ``last_index`` (B,) is the query row of each sample's last real token;
    None means row Q - 1 (the official code's [-1]; right for unpadded or
    left-padded batches). float32 (float64 for float64 input).
    """
    if attn.dim() != 4:
        raise ValueError(f"FastV attention must be (B, H, Q, Kv), got {tuple(attn.shape)}")
    B, _, Q, _ = attn.shape
    if last_index is None:
        rows = attn[:, :, -1]
    else:
        if last_index.shape != (B,):
            raise ValueError(f"FastV last_index must be ({B},), got {tuple(last_index.shape)}")
        if bool(((last_index < 0) | (last_index >= Q)).any()):
            raise ValueError(f"FastV last_index outside the {Q} query rows: {last_index.tolist()}")
        rows = attn[torch.arange(B, device=attn.device), :, last_index]
    return rows.to(torch.promote_types(torch.float32, attn.dtype)).mean(dim=1)


@dataclass
class FastVSelection:
    """Which positions survive FastV, per sample."""

    keep: torch.Tensor         # (B, Kv) bool: every valid position except the dropped image tokens
    kept_image: torch.Tensor   # (B, max count) kept image positions ascending, padded with -1
    counts: torch.Tensor       # (B,) kept image tokens per sample


def select(scores: torch.Tensor, image_mask: torch.Tensor, ratio: float = DEFAULT_RATIO,
           valid_mask: torch.Tensor | None = None, keep: int | None = None) -> FastVSelection:
    """Keep, per sample, the round(n_b * (1 - R)) image tokens with the highest last-token attention.

    ``keep`` (optional) is an absolute count instead, min(keep, n_b) per sample:
    the original LLaVA path's ``fast_v_attention_rank``.

    scores (B, Kv) from ``last_token_attention``; image_mask (B, Kv) bool, the
    image positions of each sample (n_b = its count; any number, not
    necessarily contiguous); valid_mask (B, Kv) bool, False on padding (image
    positions must be valid). Ties go to the lower position (official topk
    leaves them unspecified); kept image positions come back in ascending
    order, as the official code sorts the kept indices.
    """
    if scores.dim() != 2:
        raise ValueError(f"FastV scores must be (B, Kv), got {tuple(scores.shape)}")
    if image_mask.shape != scores.shape or image_mask.dtype != torch.bool:
        raise ValueError(f"FastV image_mask must be a bool tensor of shape {tuple(scores.shape)}, got "
                         f"{image_mask.dtype} {tuple(image_mask.shape)}")
    if valid_mask is not None:
        if valid_mask.shape != scores.shape or valid_mask.dtype != torch.bool:
            raise ValueError(f"FastV valid_mask must be a bool tensor of shape {tuple(scores.shape)}, got "
                             f"{valid_mask.dtype} {tuple(valid_mask.shape)}")
        if bool((image_mask & ~valid_mask).any()):
            raise ValueError("FastV: an image position lies on padding (image_mask outside valid_mask)")
    _check_ratio(ratio)
    B, L = scores.shape
    n = image_mask.sum(-1)
    if keep is None:
        counts = torch.round(n.double() * (1 - ratio)).long()                     # round half to even, like round()
    else:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise ValueError(f"FastV keep must be a non-negative int, got {keep!r}")
        counts = n.clamp(max=keep)
    # rank the image positions by score (descending, ties: lower position), non-image positions last
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort((~image_mask).gather(1, order).long(), dim=-1, stable=True).indices)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(L, device=scores.device).expand(B, -1))
    kept_img = image_mask & (rank < counts.unsqueeze(-1))
    keep = ~image_mask | kept_img
    if valid_mask is not None:
        keep = keep & valid_mask
    width = int(counts.max()) if B else 0
    pos = torch.sort(torch.where(kept_img, torch.arange(L, device=scores.device), L), dim=-1).values[:, :width]
    kept_image = torch.where(pos < L, pos, -1)
    return FastVSelection(keep, kept_image, counts)


# --------------------------------------------------------------------------- after removal

def kept_index(keep: torch.Tensor) -> torch.Tensor:
    """The positions each sample keeps, ascending, as one (B, M) tensor: M = the largest kept count,
    shorter samples left-filled with -1 (like left padding), so later layers see one rectangle."""
    if keep.dim() != 2 or keep.dtype != torch.bool:
        raise ValueError(f"FastV keep must be a (B, L) bool tensor, got {keep.dtype} {tuple(keep.shape)}")
    B, L = keep.shape
    width = int(keep.sum(-1).max()) if B else 0
    pos = torch.where(keep, torch.arange(L, device=keep.device), -1)
    return torch.sort(pos, dim=-1).values[:, L - width:]


def removal_mask(key_pos: torch.Tensor, key_valid: torch.Tensor, query_pos: torch.Tensor,
                 query_filler: torch.Tensor | None = None) -> torch.Tensor:
    """Which cached entries each query may attend to in a layer after the removal, (B, 1, Q, KV) bool.

    key_pos (B, KV) / query_pos (B, Q): ORIGINAL sequence positions of the
    entries a layer >= K holds and of the queries; key_valid (B, KV) False on
    fillers and padding. A query attends to the valid entries at or before
    its own position: the stock causal + padding rule, in original positions.
    query_filler (B, Q), prefill only (queries = keys): filler rows attend to
    themselves alone, so their (unused) outputs stay finite.
    """
    allowed = key_valid[:, None, :] & (key_pos[:, None, :] <= query_pos[:, :, None])
    if query_filler is not None:
        if query_pos.shape[1] != key_pos.shape[1]:
            raise ValueError("FastV filler rows exist only when the queries are the kept entries themselves")
        eye = torch.eye(query_pos.shape[1], dtype=torch.bool, device=key_pos.device)
        allowed = allowed | (query_filler[:, :, None] & eye)
    return allowed[:, None]
