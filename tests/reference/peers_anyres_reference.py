"""Slow literal oracles for the peer methods on AnyRes images (LLaVA-NeXT, LLaVA-OneVision).

VisionZip: its official LLaVA-NeXT layout, restated step by step from dvlab-research/VisionZip
visionzip/llava_arch.py (``prepare_inputs_labels_for_multimodal_visionzip``, "spatial_unpad" branch,
and ``restore_image_features_sorted``), with the hard-coded 24 x 24 patch grid as a parameter.
DivPrune: vbdi/divprune runs its selection on the whole packed image sequence of LLaVA-1.6
(``img_feature_len = image_features[0].shape[0]``); the selection itself is ``peers_reference.divprune_image``.
FastV: the float64 pruned model of ``peers_reference`` on a sequence whose image rows are given (an AnyRes
image's packed features, newlines included, at its placeholder positions).
"""

from __future__ import annotations

import torch

from .peers_reference import fastv_pruned_forward


# --------------------------------------------------------------------------- VisionZip (LLaVA-NeXT)

def visionzip_restore(tile_features, keep_idx, width, height, grid):
    """``restore_image_features_sorted`` for one image's tiles.

    tile_features (T, d + c, D): each tile's tokens as the tower returns them (CLS, the other dominant
    tokens in sequence order, then the contextual ones); keep_idx (T, d): each tile's kept positions
    [0 (CLS), top-k patch positions + 1] in any order; width / height: tiles across / down; grid (gh, gw).
    """
    gh, gw = grid
    T, total, D = tile_features.shape
    num_keep = keep_idx.shape[1]
    num_extra = total - num_keep
    assert width * height == T
    # every tile's kept patches (CLS dropped), sorted, as indices into its gh x gw patches
    restore = [sorted(int(i) for i in keep_idx[t])[1:] for t in range(T)]
    restore = [[i - 1 for i in row] for row in restore]
    restored = torch.zeros(T, gh * gw, D, dtype=tile_features.dtype)
    mask = torch.zeros(T, gh * gw, dtype=torch.bool)
    for t in range(T):
        for i in restore[t]:
            mask[t, i] = True
    # kept_features = image_feature[:, 1:num_keep]: tile by tile, each in its sequence (= ascending) order
    for t in range(T):
        slot = 1
        for i in range(gh * gw):
            if mask[t, i]:
                restored[t, i] = tile_features[t, slot]
                slot += 1
    # view(height, width, gh, gw) -> permute to (height, gh, width, gw) -> one (height*gh, width*gw) grid
    big = torch.zeros(height * gh, width * gw, D, dtype=tile_features.dtype)
    big_mask = torch.zeros(height * gh, width * gw, dtype=torch.bool)
    for r in range(height):
        for c in range(width):
            t = r * width + c
            for i in range(gh):
                for j in range(gw):
                    big[r * gh + i, c * gw + j] = restored[t, i * gw + j]
                    big_mask[r * gh + i, c * gw + j] = mask[t, i * gw + j]
    # grid_with_newline = restored_features (the newline column is built but never attached)
    selected = [big[y, x] for y in range(height * gh) for x in range(width * gw) if big_mask[y, x]]
    cls = [tile_features[t, 0] for t in range(T)]
    extra = [tile_features[t, total - num_extra + e] for t in range(T) for e in range(num_extra)]
    return torch.stack(selected + cls + extra)


def visionzip_anyres_image(crop_features, keep_idx, tiles, grid, newline):
    """One image in the "spatial_unpad" branch: crop_features (1 + T, d + c, D) with the base crop first;
    keep_idx (1 + T, d); tiles (rows, cols) = (num_patch_height, num_patch_width)."""
    rows, cols = tiles
    if crop_features.shape[0] > 1:
        base = crop_features[0]
        restored = visionzip_restore(crop_features[1:], keep_idx[1:], cols, rows, grid)
        return torch.cat([base, restored], dim=0)
    return torch.cat([crop_features[0], newline[None].to(crop_features.dtype)], dim=0)


# --------------------------------------------------------------------------- FastV on a packed image

def fastv_pruned_forward_rows(model, input_ids, image_rows, k, ratio):
    """``peers_reference.fastv_pruned_forward`` with the image rows given: input_ids (L,) of one unpadded
    sample, image_rows (n, D) the features the stock model places at its n image placeholders (in order)."""
    return fastv_pruned_forward(model, input_ids, None, k, ratio, image_rows=image_rows)
