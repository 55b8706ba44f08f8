"""Slow, literal VMTC oracles: one image at a time, plain Python loops, float64.

Each function mirrors one equation of SPEC section VMTC so that the batched
implementation in focusvlm/compress/vmtc.py can be checked against it.
"""

from __future__ import annotations

import math

import torch


def importance(q_cls, keys, scale):
    """q_cls (H, Dh), keys (H, N, Dh) -> list of n floats: CLS->patch softmax weight, mean over heads."""
    H, N, _ = keys.shape
    out = [0.0] * (N - 1)
    for h in range(H):
        logits = [float(sum(q_cls[h, d].double() * keys[h, j, d].double() for d in range(keys.shape[2]))) * scale
                  for j in range(N)]
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        total = sum(exps)
        for j in range(1, N):
            out[j - 1] += exps[j] / total / H
    return out


def primary(scores, keep):
    """Indices of the `keep` largest scores (ties: lower index), returned in ascending order."""
    chosen = []
    remaining = list(range(len(scores)))
    for _ in range(keep):
        best = remaining[0]
        for i in remaining:
            if scores[i] > scores[best]:
                best = i
        chosen.append(best)
        remaining.remove(best)
    return sorted(chosen), sorted(remaining)


def _unit(v):
    norm = math.sqrt(sum(float(a) ** 2 for a in v))
    return [float(a) / max(norm, 1e-12) for a in v]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def kmeans(points, clusters, iters):
    """Spherical K-means exactly as documented: even-spread seeds, argmax assignment (lowest id on ties),
    centres = normalised member sums between iterations (a centre whose members are none or sum to zero
    stays), and after the last assignment every empty cluster takes the least-fitting non-anchor point."""
    m = len(points)
    if iters < 1:
        return [0] * m
    xs = [_unit(p) for p in points]
    centres = [xs[int(math.floor((i + 0.5) * m / clusters))] for i in range(clusters)]
    for it in range(iters):
        labels, fit = [], []
        for x in xs:
            sims = [_dot(x, c) for c in centres]
            best = 0
            for c in range(clusters):
                if sims[c] > sims[best]:
                    best = c
            labels.append(best)
            fit.append(sims[best])
        if it == iters - 1:
            break
        for c in range(clusters):
            total = [0.0] * len(xs[0])
            for j in range(m):
                if labels[j] == c:
                    total = [a + b for a, b in zip(total, xs[j])]
            norm = math.sqrt(sum(a * a for a in total))
            if norm > 0:
                centres[c] = [a / norm for a in total]
    empty = [c for c in range(clusters) if c not in labels]
    if empty:
        anchors = set()
        for c in range(clusters):
            members = [j for j in range(m) if labels[j] == c]
            if members:
                anchors.add(max(members, key=lambda j: (fit[j], -j)))
        movers = sorted((j for j in range(m) if j not in anchors), key=lambda j: (fit[j], j))
        for c, j in zip(empty, movers):
            labels[j] = c
    return labels


def merge(points, labels, weights, clusters, mode):
    """z_C = sum_j w_j z_j with w_j = IPS_j / sum_C IPS (mean) or IPS_j (sum)."""
    out = []
    for c in range(clusters):
        members = [j for j in range(len(points)) if labels[j] == c]
        mass = sum(weights[j] for j in members)
        acc = [0.0] * len(points[0])
        for j in members:
            w = weights[j] / mass if mode == "mean" else weights[j]
            acc = [a + w * float(v) for a, v in zip(acc, points[j])]
        out.append(acc)
    return out


def schedule(n, target, stages, cluster_frac, prune_only=False):
    """[(n_in, keep, clusters)] per stage, written out from the SPEC text."""
    final = int(math.floor(n * target + 0.5)) if isinstance(target, float) else target
    r = (final / n) ** (1 / stages)
    rows, cur = [], n
    for s in range(stages):
        nxt = final if s == stages - 1 else min(cur, max(final, int(math.floor(cur * r + 0.5))))
        if nxt >= cur:
            rows.append((cur, cur, 0))
            continue
        c = 0 if prune_only else min(nxt, max(1, int(math.floor(cluster_frac * nxt + 0.5))))
        rows.append((cur, nxt - c, c))
        cur = nxt
    return rows


def anyres_budget(stock, patches, tiles, target):
    """SPEC "Per-image budget", written out: (base crop's tokens, each tile's tokens, 0 = tiles dropped, count)."""
    def half_up(x):
        return int(math.floor(x + 0.5))

    if isinstance(target, float):
        b = half_up(target * patches)
        big_b = half_up(target * stock)
    else:
        b = target
        big_b = target
    if tiles == 0:                    # no tiles at all: only the base crop, capped at B
        return min(b, big_b), 0, min(b, big_b)
    t = min(b, math.floor((big_b - b - tiles) / tiles))
    if t < 1:                         # the tiles are dropped: only the base crop, capped at B
        return min(b, big_b), 0, min(b, big_b)
    return b, t, b + tiles * (t + 1)
