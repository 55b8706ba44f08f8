"""Slow literal oracle for HiRED (github hasanar1f/HiRED), one image and one crop at a time.

Each function walks through the official computation step by step, as written in the repository's
``transformers/src/transformers/models/llava_next/modeling_llava_next.py``:

* ``ViT_Attn_Hook.get_attn``: q/k projection outputs (hooked) split into heads, q k^T * d^-0.5,
  softmax over every key;
* ``HiRED_token_selection`` + ``HiRED_sub_img_budgets``: the budgets and the per-crop top-k;
* ``pack_HiRED_image_features`` with ``image_newline=None``: mask the base crop, lay the tiles out on
  the tile grid, unpad mask and features alike, keep the masked tokens;

and ``.../llava/modeling_llava.py`` (``HiRED_token_selection`` of the single-crop version).

Scores are float64 here; the ratio of ``HiRED_sub_img_budgets`` is float32 on purpose (the official
int64 / int64 tensor division gives float32). Ties that ``torch.topk`` leaves unspecified go to the
earlier position, as in focusvlm. Where the official code needs N divisible by the tile count (its
reshape), the documented generalisation is spelled out as a loop: token p votes for tile p * T // N.
The tile grid is laid out as the stock model of the checked transformers does it (rows, cols) =
select_best_resolution // crop; the repository's vendored 4.42.dev0 swapped the two names, which
differs only on non-square tile grids.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def _topk_positions(values, k):
    """Positions of the k largest of ``values`` (a list), ties to the earlier position."""
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return order[:k]


# --------------------------------------------------------------------------- ViT_Attn_Hook.get_attn

def cls_attention_row(query_out, key_out, heads):
    """query_out, key_out: (T, C) q_proj / k_proj outputs of one crop (token 0 = CLS). Returns (heads, T):
    the CLS row of every head's softmax(q k^T * d^-0.5)."""
    T, C = query_out.shape
    d = C // heads
    rows = []
    for h in range(heads):
        q = query_out[0, h * d:(h + 1) * d].to(F64)
        logits = []
        for t in range(T):
            k = key_out[t, h * d:(h + 1) * d].to(F64)
            logits.append(float((q * k).sum()) * d ** -0.5)
        top = max(logits)
        e = [math.exp(v - top) for v in logits]
        rows.append([v / sum(e) for v in e])
    return torch.tensor(rows, dtype=F64)


def summed_scores(rows, n):
    """``attn[:, 0, -n:]`` summed over heads: rows (heads, T) -> list of n floats."""
    return [float(sum(rows[h, rows.shape[1] - n + j] for h in range(rows.shape[0]))) for j in range(n)]


# --------------------------------------------------------------------------- HiRED_sub_img_budgets

def tile_votes(spatial_distribution, tiles, split="rows", grid=None, tile_grid=None):
    """Per tile, how many of the base crop's early top tokens vote for it (``sum_img_mask``)."""
    n = len(spatial_distribution)
    if split == "rows" and n % tiles == 0:
        # the official reshape(num_patch_height, num_patch_width, -1).sum(-1).reshape(-1): T contiguous slices
        mask = torch.tensor(spatial_distribution).reshape(tiles, -1)
        return [int(mask[t].sum()) for t in range(tiles)]
    counts = [0] * tiles
    if split == "rows":       # the generalisation where the official reshape fails
        for p in range(n):
            if spatial_distribution[p]:
                counts[p * tiles // n] += 1
        return counts
    gh, gw = grid
    R, C = tile_grid
    for y in range(gh):
        for x in range(gw):
            if spatial_distribution[y * gw + x]:
                r = 0
                while (r + 1) * gh <= y * R:      # the tile row whose band holds patch row y
                    r += 1
                c = 0
                while (c + 1) * gw <= x * C:
                    c += 1
                counts[r * C + c] += 1
    return counts


def sub_img_budgets(counts, sub_img_budget, num_vision_tokens):
    sum_img_mask = torch.tensor(counts)                        # int64, like the official bool sums
    budget_ratio = sum_img_mask / sum_img_mask.sum()           # float32: torch's int / int division
    num_topk_others = (budget_ratio * sub_img_budget).int()
    return [int(v) for v in torch.clamp(num_topk_others, max=num_vision_tokens)]


# --------------------------------------------------------------------------- HiRED_token_selection

def hired_masks(top_scores, bottom_scores, token_budget_rate, alpha, split="rows", grid=None, tile_grid=None):
    """One image. top_scores / bottom_scores: per crop (base first) a list of N head-summed CLS scores of the
    early (``vit_top_layer``) / final (``vit_bottom_layer``) layer. ``token_budget_rate``: the official rate
    (float) or, focusvlm's extension, a per-image token count (int). Returns (masks (C, N) bool, budgets)."""
    num_patch = len(bottom_scores)
    num_vision_tokens = len(bottom_scores[0])
    mask = torch.zeros(num_patch, num_vision_tokens, dtype=torch.bool)
    if isinstance(token_budget_rate, float) and token_budget_rate >= 1.0:
        return torch.ones_like(mask), [num_vision_tokens] * num_patch
    if isinstance(token_budget_rate, int):
        num_total_budget = token_budget_rate
    else:
        num_total_budget = int(num_patch * num_vision_tokens * token_budget_rate)
    full_img_budget = min(int(num_total_budget * alpha), num_vision_tokens)
    total_sub_img_budget = min(num_total_budget - full_img_budget, (num_patch - 1) * num_vision_tokens)
    for j in _topk_positions(bottom_scores[0], full_img_budget):
        mask[0, j] = True
    budgets = [full_img_budget] + [0] * (num_patch - 1)
    if total_sub_img_budget > 0:
        spatial_distribution = [False] * num_vision_tokens
        for j in _topk_positions(top_scores[0], int(num_vision_tokens * (1 - alpha))):
            spatial_distribution[j] = True
        counts = tile_votes(spatial_distribution, num_patch - 1, split, grid, tile_grid)
        for i, num_topk_other in enumerate(sub_img_budgets(counts, total_sub_img_budget, num_vision_tokens)):
            budgets[i + 1] = num_topk_other
            for j in _topk_positions(bottom_scores[i + 1], num_topk_other):
                mask[i + 1, j] = True
    return mask, budgets


# --------------------------------------------------------------------------- pack_HiRED_image_features

def unpad_image(tensor, original_size):
    """The stock unpad_image of the checked transformers (the vendored 4.42 one truncates with int() where
    this rounds to 7 digits first): crop the padding the processor added around the resized image."""
    original_height, original_width = [int(v) for v in original_size]
    current_height, current_width = tensor.shape[-2:]
    if original_width / original_height > current_width / current_height:
        new_height = int(round(original_height * (current_width / original_width), 7))
        padding = (current_height - new_height) // 2
        return tensor[..., padding:current_height - padding, :]
    new_width = int(round(original_width * (current_height / original_height), 7))
    padding = (current_width - new_width) // 2
    return tensor[..., :, padding:current_width - padding]


def tile_grid(image_size, pinpoints, crop):
    from transformers.image_processing_utils import select_best_resolution

    best_h, best_w = select_best_resolution([int(v) for v in image_size], pinpoints)
    return best_h // crop, best_w // crop


def pack_hired(image_feature, mask, image_size, pinpoints, crop, side):
    """image_feature (C, N, D), mask (C, N) bool -> the packed (kept, D) features of one image."""
    base = image_feature[0][mask[0]]
    if image_feature.shape[0] == 1:
        return base
    rows, cols = tile_grid(image_size, pinpoints, crop)
    feats = image_feature[1:].view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).contiguous()
    feats = feats.flatten(1, 2).flatten(2, 3)                                    # (D, rows*side, cols*side)
    other = mask[1:].view(rows, cols, side, side).permute(0, 2, 1, 3).contiguous()
    other = other.flatten(0, 1).flatten(1, 2)                                    # (rows*side, cols*side)
    feats = unpad_image(feats, image_size)
    other = unpad_image(other, image_size)
    kept = feats.flatten(1, 2)[:, other.flatten()].transpose(0, 1)
    return torch.cat([base, kept], dim=0)


# --------------------------------------------------------------------------- single crop (modeling_llava.py)

def hired_single(bottom_scores, token_budget_rate):
    """LLaVA-1.5: positions kept (ascending) of one image's N head-summed final-layer scores."""
    n = len(bottom_scores)
    if isinstance(token_budget_rate, float) and token_budget_rate >= 1.0:
        return list(range(n))
    num_topk = min(n, token_budget_rate if isinstance(token_budget_rate, int) else int(n * token_budget_rate))
    return sorted(_topk_positions(bottom_scores, num_topk))
