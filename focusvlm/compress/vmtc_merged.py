"""VMTC after a patch merger (Qwen2.5-VL / Qwen3-VL) as pure tensor functions.

SPEC (Other model families): one stage, after the 2x2 merger. A merged token's
importance is the attention its patches receive in the last full-attention ViT
block (summed over queries, averaged over heads). The most important merged tokens
are kept, the rest clustered and merged with importance weights (the same steps as
``vmtc.compress``). Kept tokens keep their 3-D rope positions; a cluster token takes
the position of its most important member; tokens are ordered by position.

No transformers import: the adapter (``focusvlm.models``) hands these functions the
tower's tensors in a ``MergedCall`` and installs what they return.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .vmtc import Stage, merge_clusters, select_primary, spherical_kmeans

# attention rows materialised at once when scoring: (chunk x segment) per head, bounds memory on big frames
_QUERY_CHUNK = 1024


def received_attention(q: torch.Tensor, k: torch.Tensor, scale: float, segments: torch.Tensor) -> torch.Tensor:
    """Attention each patch receives in its segment: sum over queries of softmax(q.k^T * scale), mean over heads.

    q, k: (S, H, d) rows of packed segments; segments: (F + 1,) cumulative offsets, rows
    attend only within their segment (one frame). Returns (S,) float32. Query rows are
    processed in chunks so a large frame never holds its full attention matrix.
    """
    S, H, _ = q.shape
    out = torch.zeros(S, dtype=torch.float32, device=q.device)
    bounds = segments.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        keys = k[start:end].float().transpose(0, 1)                               # (H, L, d)
        total = torch.zeros(H, end - start, dtype=torch.float32, device=q.device)
        for a in range(start, end, _QUERY_CHUNK):
            b = min(a + _QUERY_CHUNK, end)
            queries = q[a:b].float().transpose(0, 1)                               # (H, c, d)
            probs = torch.softmax(queries @ keys.transpose(1, 2) * scale, dim=-1)  # (H, c, L)
            total += probs.sum(dim=1)
        out[start:end] = total.mean(dim=0)
    return out


def merged_importance(received: torch.Tensor, group_index: torch.Tensor, unit: int) -> torch.Tensor:
    """Importance of each merged token: the attention its ``unit`` patches receive, added up.

    received: (S,) per patch row; rows r*unit .. r*unit + unit - 1 form the merged token
    ``group_index[r]``. Returns (S / unit,) indexed by merged token.
    """
    groups = received.view(-1, unit).sum(dim=-1)
    out = torch.empty_like(groups)
    out[group_index] = groups
    return out


def cluster_representatives(importance: torch.Tensor, labels: torch.Tensor, members: torch.Tensor,
                            clusters: int) -> torch.Tensor:
    """The most important member of each cluster (ties: the lower token index), as token indices.

    importance, labels, members: (B, m) for the m clustered tokens (``members`` their token
    indices, ascending). Returns (B, clusters). Every cluster must be non-empty (K-means re-seeds).
    """
    inside = torch.nn.functional.one_hot(labels, clusters).bool().transpose(1, 2)        # (B, c, m)
    scores = importance.float().unsqueeze(1).masked_fill(~inside, float("-inf"))
    best = scores.argmax(dim=-1)                                # first maximum = lowest index among ties
    return members.gather(1, best)


@dataclass
class MergedRecord:
    """What the stage did to one batch of equal-size frames (token indices within a frame)."""

    importance: torch.Tensor   # (B, n)
    primary: torch.Tensor      # (B, keep)
    redundant: torch.Tensor    # (B, n - keep)
    labels: torch.Tensor       # (B, n - keep), empty when pruned
    sources: torch.Tensor      # (B, keep + c) ascending: the position source of each output token


def compress_frames(features: torch.Tensor, importance: torch.Tensor, extras: Sequence[torch.Tensor], stage: Stage,
                    iters: int, merge: str = "mean", prune_only: bool = False
                    ) -> tuple[torch.Tensor, list[torch.Tensor], MergedRecord]:
    """One VMTC stage on B frames of n merged tokens each, outputs ordered by 3-D position.

    features: (B, n, D) in raster order of the merged grid; importance: (B, n); extras:
    tensors (B, n, D') reduced with the same selection, labels and weights. Primary tokens
    are kept unchanged; redundant tokens are clustered (spherical K-means on ``features``)
    and merged with importance weights, or dropped when ``prune_only``. A cluster token
    takes the position of its most important member. Returns (features (B, m, D),
    extras, record) with m = keep + clusters, every token at the rank of its position.
    """
    B, n, D = features.shape
    if n != stage.n_in:
        raise ValueError(f"stage expects {stage.n_in} merged tokens per frame, got {n}")
    primary, redundant = select_primary(importance, stage.keep)

    def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    outs = [[take(x, primary)] for x in (features, *extras)]
    sources = [primary]
    labels = redundant.new_zeros((B, 0))
    if not prune_only and stage.clusters > 0:
        weights = importance.gather(1, redundant)
        labels = spherical_kmeans(take(features, redundant), stage.clusters, iters)
        for parts, x in zip(outs, (features, *extras)):
            parts.append(merge_clusters(take(x, redundant), labels, weights, stage.clusters, merge))
        sources.append(cluster_representatives(weights, labels, redundant, stage.clusters))
    source = torch.cat(sources, dim=1)
    source, order = source.sort(dim=1)  # positions are distinct: primaries and representatives never overlap
    reduced = [take(torch.cat(parts, dim=1), order) for parts in outs]
    record = MergedRecord(importance, primary, redundant, labels, source)
    return reduced[0], reduced[1:], record


# --------------------------------------------------------------------------- 3-D positions of the compressed layout

@dataclass(frozen=True)
class VisionRun:
    """One run of vision placeholders in the compressed prompt and what it stands for.

    stock_length: the placeholders the stock model would have there (t * h * w merged tokens).
    sources: (m,) ascending, the stock placeholder (index within the run) whose position each
        compressed placeholder takes.
    """

    stock_length: int
    sources: torch.Tensor


def expand_to_stock_layout(token_types: torch.Tensor, runs: dict[int, Iterator[VisionRun]]
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The stock layout of one unpadded compressed prompt, and where each compressed token sits in it.

    token_types: (L,) 0 for text, otherwise the modality of a vision run (1 image, 2 video);
    runs: per modality, the runs in prompt order. Returns (stock_types (L',), index (L,)) with
    ``stock_positions[:, index]`` the compressed prompt's positions: text maps one to one, a
    vision token to its source placeholder. The stock position function then sees exactly the
    prompt it was written for.
    """
    types = token_types.tolist()
    pieces: list[torch.Tensor] = []
    index: list[torch.Tensor] = []
    stock_at = 0
    i = 0
    while i < len(types):
        j = i
        while j < len(types) and types[j] == types[i]:
            j += 1
        length = j - i
        if types[i] == 0:
            pieces.append(torch.zeros(length, dtype=torch.long))
            index.append(torch.arange(stock_at, stock_at + length))
            stock_at += length
        else:
            try:
                run = next(runs[types[i]])
            except (StopIteration, KeyError, TypeError):
                kind = "image" if types[i] == 1 else "video"
                raise ValueError(f"the prompt has more {kind} placeholder runs than compressed {kind}s were "
                                 "recorded for this call") from None
            if run.sources.numel() != length:
                raise ValueError(f"a vision run of {length} placeholders stands for an input VMTC reduced to "
                                 f"{run.sources.numel()} tokens: build the prompt with the patched processor")
            pieces.append(torch.full((run.stock_length,), types[i], dtype=torch.long))
            index.append(stock_at + run.sources.cpu())
            stock_at += run.stock_length
        i = j
    if not pieces:
        return token_types.new_zeros(0), token_types.new_zeros(0)
    return torch.cat(pieces), torch.cat(index)


# --------------------------------------------------------------------------- one vision call

def reduce_call(call, plan, iters: int, merge: str = "mean", prune_only: bool = False,
                records: list | None = None
                ) -> tuple[list[torch.Tensor], list[list[torch.Tensor]], list[torch.Tensor]]:
    """Run the stage on every frame of a ``MergedCall`` (``focusvlm.models.base``).

    ``plan(n)`` is the ``Stage`` for a frame of n merged tokens (identity: left whole). Frames
    of one input share a size, so they are reduced together as a batch; each frame is still
    reduced on its own (no token crosses frames). Returns per input: features (m, D), per
    extras level (m, D'), and sources (m,) ascending indices into the input's t * h * w tokens.
    ``records``: when a list is given, one ``MergedRecord`` per input (its frames as the batch;
    None where the stage left the input whole) is appended to it (`focusvlm show` draws them).
    """
    received = received_attention(call.q, call.k, call.scale, call.segments)
    importance = merged_importance(received, call.group_index, call.unit)
    features: list[torch.Tensor] = []
    extras: list[list[torch.Tensor]] = [[] for _ in call.extras]
    sources: list[torch.Tensor] = []
    offset = 0
    for i, (feats, (t, h, w)) in enumerate(zip(call.features, call.grids.tolist())):
        n = h * w
        frame_importance = importance[offset:offset + t * n].view(t, n).to(feats.device)
        offset += t * n
        stage = plan(n)
        if stage.is_identity:
            if records is not None:
                records.append(None)
            features.append(feats)
            for level, ride in zip(extras, call.extras):
                level.append(ride[i])
            sources.append(torch.arange(t * n, device=feats.device))
            continue
        riders = [ride[i].view(t, n, -1) for ride in call.extras]
        out, reduced, record = compress_frames(feats.view(t, n, -1), frame_importance, riders, stage, iters, merge,
                                               prune_only)
        features.append(out.reshape(-1, out.shape[-1]))
        for level, ride in zip(extras, reduced):
            level.append(ride.reshape(-1, ride.shape[-1]))
        frame_start = n * torch.arange(t, device=feats.device).unsqueeze(1)
        sources.append((record.sources + frame_start).reshape(-1))
        if records is not None:
            records.append(record)
    if offset != importance.shape[0]:
        raise ValueError(f"the call's features cover {offset} merged tokens but its tower rows {importance.shape[0]}")
    return features, extras, sources
