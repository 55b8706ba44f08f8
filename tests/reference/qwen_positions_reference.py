"""Slow, literal oracles for VMTC after Qwen's 2x2 merger (SPEC: Other model families).

Python loops over tokens, written from the rules as stated, sharing no code with focusvlm:
* which merged token each patch row of the tower belongs to (Qwen2.5's window order);
* a merged token's importance from the attention weights of the last full-attention block;
* which tokens leave a frame and where each takes its position from;
* the 3-D rope positions and rope deltas of a compressed prompt.
"""

from __future__ import annotations

import torch


def window_order(t: int, h: int, w: int, side: int) -> list[int]:
    """Merged tokens (frame-major raster index over an input of t x h x w merged tokens) in the order
    Qwen2.5's window attention lays them out: per frame, windows of side x side merged tokens in raster
    order of windows, raster order inside each window (windows at the edges are cut short)."""
    order = []
    for f in range(t):
        for wy in range(0, h, side):
            for wx in range(0, w, side):
                for y in range(wy, min(wy + side, h)):
                    for x in range(wx, min(wx + side, w)):
                        order.append(f * h * w + y * w + x)
    return order


def importance_from_weights(segment_weights: list[torch.Tensor], row_to_token: list[int], unit: int) -> torch.Tensor:
    """Importance of every merged token of a call.

    segment_weights: per attention segment (frame), the (heads, L, L) softmax weights of the block.
    Row r of the concatenated segments is patch r % unit of merged token row_to_token[r // unit].
    Importance = sum over the token's patches of (sum over queries, mean over heads) of the weights.
    """
    received = []
    for weights in segment_weights:
        heads, length, _ = weights.shape
        for key in range(length):
            total = 0.0
            for head in range(heads):
                for query in range(length):
                    total += float(weights[head, query, key])
            received.append(total / heads)
    out = torch.zeros(len(row_to_token), dtype=torch.float64)
    for r, value in enumerate(received):
        out[row_to_token[r // unit]] += value
    return out


def frame_sources(importance: list[float], keep: int, redundant: list[int], labels: list[int]) -> list[int]:
    """Tokens of one frame whose positions the output takes: the ``keep`` most important (ties: lower index),
    then per cluster its most important member (ties: lower index); ascending."""
    ranked = sorted(range(len(importance)), key=lambda i: (-importance[i], i))
    kept = set(ranked[:keep])
    if set(redundant) != set(range(len(importance))) - kept:
        raise AssertionError("the redundant tokens are not the ones left after keeping the most important")
    best: dict[int, int] = {}
    for token, label in zip(redundant, labels):
        if label not in best or importance[token] > importance[best[label]] or \
                (importance[token] == importance[best[label]] and token < best[label]):
            best[label] = token
    return sorted(kept | set(best.values()))


def stock_vision_positions(start: int, t: int, h: int, w: int, interval: float) -> list[tuple[int, int, int]]:
    """(temporal, height, width) rope positions of every merged token of one vision run, stock rules:
    temporal = start + floor(frame * interval), height = start + row, width = start + column."""
    return [(start + int(f * interval), start + y, start + x) for f in range(t) for y in range(h) for x in range(w)]


def compressed_positions(input_ids: torch.Tensor, token_types: torch.Tensor, attention_mask: torch.Tensor,
                         image_runs: list[tuple[tuple[int, int, int], list[int]]],
                         video_runs: list[tuple[tuple[int, int, int], list[int], float]]):
    """3-D positions (3, B, S) and rope deltas (B, 1) of a compressed prompt, token by token.

    image_runs / video_runs: per vision run in prompt order, its merged grid (t, h, w), the sources
    (indices into the run's t*h*w stock tokens) of its placeholders, and (videos) the time interval
    between frames. Text advances by one; a vision run advances the position by max(h, w).
    """
    B, S = input_ids.shape
    positions = torch.zeros(3, B, S, dtype=torch.long)
    deltas = []
    runs = {1: iter(image_runs), 2: iter([(g, s) for g, s, _ in video_runs])}
    intervals = iter([i for _, _, i in video_runs])
    for b in range(B):
        valid = [i for i in range(S) if attention_mask[b, i]]
        types = [int(token_types[b, i]) for i in valid]
        current = 0
        out: list[tuple[int, int, int]] = []
        i = 0
        while i < len(types):
            if types[i] == 0:
                out.append((current, current, current))
                current += 1
                i += 1
                continue
            kind = types[i]
            j = i
            while j < len(types) and types[j] == kind:
                j += 1
            (t, h, w), sources = next(runs[kind])
            interval = next(intervals) if kind == 2 else 1
            stock = stock_vision_positions(current, t, h, w, interval)
            if len(sources) != j - i:
                raise AssertionError(f"run of {j - i} placeholders has {len(sources)} sources")
            out.extend(stock[s] for s in sources)
            current += max(h, w)
            i = j
        for k, pos in zip(valid, out):
            positions[:, b, k] = torch.tensor(pos)
        deltas.append(max(max(p) for p in out) + 1 - len(out) if out else 0)
    return positions, torch.tensor(deltas).unsqueeze(1)
