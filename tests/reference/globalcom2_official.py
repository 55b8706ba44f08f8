"""Slow literal oracle of GlobalCom2 (github xuyang-liu16/GlobalCom2), one image at a time.

Walks through the official computation step by step with Python loops, numpy float64 for the per-tile
ratios (as the official code) and float64 tensors elsewhere, so a reader can hold it against the source:
* apply_customvit.py, ``CustomCLIPAttention.forward``: ``attn_scores`` = the mean over heads of
  ``(q_proj(x) * scale) @ k_proj(x)^T`` per head, BEFORE the softmax; the caller reads
  ``attn_maps[-1][:, 0, 1:]`` (last encoder layer, CLS row, patch columns);
* llava_arch.py: ``compress_thumbnail``, ``generate_scale_for_crop_features``,
  ``extract_actual_dimensions``, ``get_actual_crop_dimensions``,
  ``interpolate_and_split_cls_attn_scores`` (bilinear resize written out by hand here, as
  ``F.interpolate(mode="bilinear", align_corners=False)`` defines it), ``select_topk_crop_features``,
  ``compress_crops`` and the branch of ``prepare_inputs_labels_for_multimodal`` that calls them.

Shapes are the official ones: a square crop grid (``side = int(N ** 0.5)``), ``original_size`` as
(width, height) and the tile grid as (num_patch_width, num_patch_height), as the official
``get_anyres_image_grid_shape`` returns them. Where the official code leaves the order of equal scores to
``torch.topk`` / ``torch.argsort`` (unspecified), the earlier entry wins, as in focusvlm.
"""

from __future__ import annotations

import math

import numpy as np
import torch

F64 = torch.float64


def _descending(values):
    """Indices of ``values`` from largest to smallest; equal values keep list order."""
    return sorted(range(len(values)), key=lambda i: -values[i])


# --------------------------------------------------------------------------- apply_customvit.py

def cls_logits(q, k, heads, scale):
    """q, k: (T, C) q_proj / k_proj outputs of one crop (row 0 = CLS). attn_scores[0, 1:]: for each patch
    key s, the mean over heads of (q_h[0] * scale) . k_h[s]."""
    q, k = q.to(F64), k.to(F64)
    T, C = q.shape
    d = C // heads
    row = []
    for s in range(1, T):
        per_head = []
        for h in range(heads):
            qh = q[0, h * d:(h + 1) * d] * scale
            per_head.append(float(qh @ k[s, h * d:(h + 1) * d]))
        row.append(sum(per_head) / heads)
    return row


def cls_softmax(q, k, heads, scale):
    """The named variant: per head the softmax over all T keys of the CLS row, then the mean over heads."""
    q, k = q.to(F64), k.to(F64)
    T, C = q.shape
    d = C // heads
    acc = [0.0] * T
    for h in range(heads):
        logits = [float((q[0, h * d:(h + 1) * d] * scale) @ k[s, h * d:(h + 1) * d]) for s in range(T)]
        top = max(logits)
        e = [math.exp(v - top) for v in logits]
        for s in range(T):
            acc[s] += e[s] / sum(e) / heads
    return acc[1:]


# --------------------------------------------------------------------------- llava_arch.py

def compress_thumbnail(base_feature, base_scores, ratio):
    """Top int(N * ratio) of the thumbnail by score, in score order: (features, indices)."""
    N = len(base_scores)
    top_k = int(N * ratio)
    order = _descending(list(base_scores))[:top_k]
    return [base_feature[i] for i in order], order


def generate_scale_for_crop_features(base_scores, num_patch_width, num_patch_height, base_scale, temperature):
    N = len(base_scores)
    side_length = int(N ** 0.5)
    patch_width = max(side_length // num_patch_width, 1)
    patch_height = max(side_length // num_patch_height, 1)
    num_patches = num_patch_width * num_patch_height
    sums = np.zeros(num_patches)
    for idx, score in enumerate(base_scores):
        i, j = divmod(idx, side_length)
        patch_i = min(i // patch_height, num_patch_height - 1)
        patch_j = min(j // patch_width, num_patch_width - 1)
        sums[patch_i * num_patch_width + patch_j] += float(score)
    shifted = (sums - np.max(sums)) / temperature
    e = np.exp(shifted)
    soft = e / (np.sum(e) + 1e-8)
    if np.sum(soft) == 0:
        return [base_scale] * num_patches
    scales = base_scale * (1 + soft - np.mean(soft))
    return np.clip(scales, None, 1.0).tolist()


def unpad_grid(num_patch_width, num_patch_height, width, height, original_size):
    """The (H, W) bool grid of compress_crops: True where the resized image is, False at the padding."""
    original_width, original_height = original_size
    current_height, current_width = num_patch_height * height, num_patch_width * width
    mask = [[False] * current_width for _ in range(current_height)]
    if original_width / original_height > current_width / current_height:
        scale_factor = current_width / original_width
        new_height = int(original_height * scale_factor)
        padding = (current_height - new_height) // 2
        for y in range(padding, current_height - padding):
            mask[y] = [True] * current_width
    else:
        scale_factor = current_height / original_height
        new_width = int(original_width * scale_factor)
        padding = (current_width - new_width) // 2
        for y in range(current_height):
            for x in range(padding, current_width - padding):
                mask[y][x] = True
    return mask


def extract_actual_dimensions(mask):
    """(width, height) of the bounding box of the True entries."""
    rows = [y for y, r in enumerate(mask) if any(r)]
    cols = [x for x in range(len(mask[0])) if any(r[x] for r in mask)]
    if not rows or not cols:
        return 0, 0
    return cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1


def tile_masks(mask, num_patch_width, num_patch_height, width, height):
    """Per tile (raster order) the list of its height*width mask entries (raster order inside the tile)."""
    out = []
    for i in range(num_patch_height):
        for j in range(num_patch_width):
            out.append([mask[i * height + y][j * width + x] for y in range(height) for x in range(width)])
    return out


def get_actual_crop_dimensions(tiles, width, height):
    """(width, height) of each tile's True bounding box; (0, 0) for a tile with none."""
    dims = []
    for m in tiles:
        ys = [p // width for p, v in enumerate(m) if v]
        xs = [p % width for p, v in enumerate(m) if v]
        dims.append((0, 0) if not ys else (max(xs) + 1 - min(xs), max(ys) + 1 - min(ys)))
    return dims


def bilinear_resize(grid, out_h, out_w):
    """F.interpolate(bilinear, align_corners=False) of a 2-D list: source = (dst + 0.5) * in / out - 0.5,
    clamped at 0; the upper neighbour clamped at the last index."""
    in_h, in_w = len(grid), len(grid[0])

    def source(dst, n_in, n_out):
        s = max((dst + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = int(s)
        hi = lo + 1 if lo < n_in - 1 else lo
        return lo, hi, s - lo

    out = []
    for y in range(out_h):
        y0, y1, ly = source(y, in_h, out_h)
        row = []
        for x in range(out_w):
            x0, x1, lx = source(x, in_w, out_w)
            top = (1 - lx) * grid[y0][x0] + lx * grid[y0][x1]
            bottom = (1 - lx) * grid[y1][x0] + lx * grid[y1][x1]
            row.append((1 - ly) * top + ly * bottom)
        out.append(row)
    return out


def interpolate_and_split(base_scores, cur_width, cur_height, num_patch_width, num_patch_height, crop_dimensions):
    side = int(len(base_scores) ** 0.5)
    grid = [[float(base_scores[y * side + x]) for x in range(side)] for y in range(side)]
    resized = bilinear_resize(grid, cur_height, cur_width)
    per_tile = []
    current_h = 0
    for i in range(num_patch_height):
        current_w = 0
        for j in range(num_patch_width):
            index = i * num_patch_width + j
            if index >= len(crop_dimensions):
                break
            crop_width, crop_height = crop_dimensions[index]
            per_tile.append([resized[y][x] for y in range(current_h, min(current_h + crop_height, cur_height))
                             for x in range(current_w, min(current_w + crop_width, cur_width))])
            current_w += crop_width
        if i * num_patch_width < len(crop_dimensions):
            current_h += crop_dimensions[i * num_patch_width][1]
    return per_tile


def l2_normalise(values):
    norm = math.sqrt(sum(v * v for v in values))
    return [v / max(norm, 1e-12) for v in values]


def select_topk(unpad_scores, global_scores, scales):
    """Per tile: indices (among its unpadded tokens) of the int(N * scale) largest combined scores."""
    picks = []
    for local, glob, scale in zip(unpad_scores, global_scores, scales):
        N = len(local)
        top_k = int(N * scale)
        assert len(glob) == N, "the official code would fail: scores of different lengths"
        combined = [a + b for a, b in zip(l2_normalise(local), l2_normalise(glob))]
        picks.append(_descending(combined)[:top_k])
    return picks


def compress_crops(tile_features, tile_scores, base_scores, num_patch_width, num_patch_height, width, height,
                   original_size, scales, newline):
    """tile_features (T, P, D), tile_scores (T, P) lists/tensors -> list of packed tokens (D,) tensors, and the
    kept positions (own patch positions) per tile."""
    mask = unpad_grid(num_patch_width, num_patch_height, width, height, original_size)
    cur_width, cur_height = extract_actual_dimensions(mask)
    tiles = tile_masks(mask, num_patch_width, num_patch_height, width, height)
    dims = get_actual_crop_dimensions(tiles, width, height)
    unpad_feats = [[tile_features[t][p] for p in range(len(m)) if m[p]] for t, m in enumerate(tiles)]
    unpad_scores = [[float(tile_scores[t][p]) for p in range(len(m)) if m[p]] for t, m in enumerate(tiles)]
    positions = [[p for p in range(len(m)) if m[p]] for m in tiles]
    global_scores = interpolate_and_split(base_scores, cur_width, cur_height, num_patch_width, num_patch_height,
                                          dims)
    picks = select_topk(unpad_scores, global_scores, scales)
    # the kept token with unpadded index idx goes to slot idx of its tile's full grid
    slots = [dict() for _ in tiles]
    for t, idx_list in enumerate(picks):
        for idx in idx_list:
            if idx < width * height:
                slots[t][idx] = unpad_feats[t][idx]
    out = []
    for Y in range(num_patch_height * height):
        for X in range(num_patch_width * width):
            t = (Y // height) * num_patch_width + X // width
            p = (Y % height) * width + X % width
            if p in slots[t]:
                out.append(slots[t][p])
        out.append(newline)
    kept_positions = [sorted(positions[t][i] for i in idx_list) for t, idx_list in enumerate(picks)]
    return out, kept_positions, tiles


def official_image(crop_features, crop_scores, original_size, num_patch_width, num_patch_height, newline,
                   ratio=0.25, temperature=10.0):
    """One image through the official branch: crop_features (1 + T, N, D) projected tokens, crop_scores
    (1 + T, N) CLS logits (``cls_logits`` per crop), original_size (width, height).
    Returns (packed (n, D) tensor, thumbnail kept indices, per-tile scales, per-tile kept positions)."""
    if len(crop_features) == 1:
        return torch.cat([crop_features[0], newline[None]]), None, None, None
    base_tokens, base_idx = compress_thumbnail(crop_features[0], crop_scores[0], ratio)
    scales = generate_scale_for_crop_features(crop_scores[0], num_patch_width, num_patch_height, ratio, temperature)
    side = int(len(crop_scores[0]) ** 0.5)
    tiles, kept, _ = compress_crops(crop_features[1:], crop_scores[1:], crop_scores[0], num_patch_width,
                                    num_patch_height, side, side, original_size, scales, newline)
    return torch.stack(base_tokens + tiles), base_idx, scales, kept
