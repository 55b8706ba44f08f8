"""VisionZip (dominant + contextual tokens) as the authors' code computes it, as pure tensor functions.

Follows github dvlab-research/VisionZip: visionzip/clip_encoder.py
(``CLIPVisionTower_VisionZip.forward``), visionzip/utils.py (the patched CLIP
attention that also returns the head-averaged keys, and ``apply_info``, which
stores them for encoder layer 22 only) and visionzip/main.py (``visionzip``:
the user's ``dominant`` count includes the CLS token).

What the wiring passes (LLaVA-1.5, CLIP ViT-L/14-336, 24 layers, feature layer -2),
all from encoder layer L = layers[-2], the layer whose output LLaVA reads:

* ``hidden = hidden_states[-2]`` (B, 1 + N, D): that layer's output, CLS included.
* ``cls_attn``: the CLS row of that layer's attention probabilities,
  (B, H, 1 + N) (``attentions[-2][:, :, 0]``), or ``multihead_cls_attention``
  on its q_proj / k_proj outputs when attention weights are not materialised.
* ``metric`` (B, 1 + N, Dh): that layer's keys averaged over heads:
  ``head_mean_keys(layers[-2].self_attn.k_proj(layers[-2].layer_norm1(hidden_states[-3])), H)``.

The output (B, dominant + contextual, D) replaces the patch features before
the projector; it contains the CLS token (one of the "dominant" tokens).
No transformers import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .precision import work_dtype

#: the README's LLaVA-1.5 setting: 64 tokens = 54 dominant (CLS included) + 10 contextual
DEFAULT_DOMINANT = 54
DEFAULT_CONTEXTUAL = 10


def split_budget(budget: int) -> tuple[int, int]:
    """The (dominant, contextual) split of a total token budget.

    The repository states only 64 = 54 + 10 (README). Other budgets keep that
    proportion: dominant = round(budget * 54 / 64) (halves up), contextual the
    rest, at least one of each; this gives 192 = 162 + 30 and 128 = 108 + 20.
    That extension is ours: the code fixes no split for budgets other than 64.
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 2:
        raise ValueError(f"VisionZip budget must be an int >= 2 (one dominant, one contextual), got {budget!r}")
    dominant = int(budget * DEFAULT_DOMINANT / (DEFAULT_DOMINANT + DEFAULT_CONTEXTUAL) + 0.5)
    dominant = min(max(dominant, 1), budget - 1)
    return dominant, budget - dominant


def token_count(num_patches: int, dominant: int = DEFAULT_DOMINANT, contextual: int = DEFAULT_CONTEXTUAL) -> int:
    """Output token count (dominant + contextual), after checking the pair fits 1 + ``num_patches`` tokens."""
    _check_counts(num_patches + 1, dominant, contextual)
    return dominant + contextual


def _check_counts(seq: int, dominant: int, contextual: int) -> None:
    for name, v in (("dominant", dominant), ("contextual", contextual)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"VisionZip {name} must be an int >= 1, got {v!r}")
    if dominant + contextual > seq:
        raise ValueError(f"VisionZip dominant={dominant} + contextual={contextual} exceeds the {seq} tokens "
                         f"(CLS + patches) of the layer")


def head_mean_keys(keys: torch.Tensor, num_heads: int) -> torch.Tensor:
    """VisionZip's similarity metric: a layer's keys averaged over heads.

    keys (B, T, C) = k_proj output (bias included) -> (B, T, C / num_heads).
    """
    if keys.dim() != 3 or num_heads < 1 or keys.shape[-1] % num_heads:
        raise ValueError(f"keys (B, T, C) with C divisible by {num_heads} heads expected, got {tuple(keys.shape)}")
    B, T, C = keys.shape
    return keys.view(B, T, num_heads, C // num_heads).mean(2)


def multihead_cls_attention(cls_query: torch.Tensor, keys: torch.Tensor, num_heads: int,
                            scale: float | None = None) -> torch.Tensor:
    """The CLS row of a CLIP layer's attention probabilities, per head, from its q / k projections.

    cls_query (B, C) = q_proj output at CLS (unscaled), keys (B, T, C) = k_proj
    output. Per head: softmax over all T keys of q . k * head_dim ** -0.5 (CLIP's
    scale). Returns (B, H, T) in float32 (float64 for float64 inputs).
    """
    if cls_query.dim() != 2 or keys.dim() != 3 or keys.shape[0] != cls_query.shape[0] \
            or keys.shape[-1] != cls_query.shape[-1]:
        raise ValueError(f"cls_query (B, C) and keys (B, T, C) expected, got {tuple(cls_query.shape)} "
                         f"and {tuple(keys.shape)}")
    if num_heads < 1 or cls_query.shape[-1] % num_heads:
        raise ValueError(f"width {cls_query.shape[-1]} does not split into {num_heads} heads")
    B, T, C = keys.shape
    dh = C // num_heads
    dtype = work_dtype(cls_query, keys)
    q = cls_query.to(dtype).view(B, num_heads, dh)
    k = keys.to(dtype).view(B, T, num_heads, dh)
    logits = torch.einsum("bhd,bthd->bht", q, k) * (dh ** -0.5 if scale is None else scale)
    return logits.softmax(dim=-1)


@dataclass
class VisionZipRecord:
    """What VisionZip did, in positions of the layer's 1 + N tokens (0 = CLS)."""

    dominant: torch.Tensor     # (B, dominant) ascending, 0 first: the first output tokens
    contextual: torch.Tensor   # (B, contextual) positions of the contextual (target) tokens, output order
    merged: torch.Tensor       # (B, R) positions of the other tokens
    merged_into: torch.Tensor  # (B, R) which contextual token (0 .. contextual - 1) each of them joined


def visionzip(hidden: torch.Tensor, cls_attn: torch.Tensor, metric: torch.Tensor,
              dominant: int = DEFAULT_DOMINANT,
              contextual: int = DEFAULT_CONTEXTUAL) -> tuple[torch.Tensor, VisionZipRecord]:
    """Dominant tokens by CLS attention, the rest merged into contextual tokens by key similarity.

    hidden (B, 1 + N, D) layer output with CLS first; cls_attn (B, H, 1 + N)
    CLS-row attention probabilities per head (or (B, 1 + N) already summed
    over heads); metric (B, 1 + N, Dk) head-averaged keys.

    * Dominant: CLS plus the ``dominant - 1`` patches with the largest CLS
      attention summed over heads (ties: lower position), emitted in
      sequence order (CLS first).
    * Contextual: the remaining R' = 1 + N - dominant tokens, in sequence
      order, are split into ``contextual`` targets (every step-th one from the
      first, step = max(1, R' // contextual)) and the others; each other token
      joins the target of largest cosine similarity of metric (ties: lower
      target), and each contextual token is target + mean of its members
      (the target itself is not in that mean; no members: the target alone).

    Returns (tokens (B, dominant + contextual, D) in hidden.dtype; record).
    """
    if hidden.dim() != 3 or metric.dim() != 3:
        raise ValueError(f"VisionZip wants hidden (B, 1+N, D) and metric (B, 1+N, Dk), got "
                         f"{tuple(hidden.shape)} and {tuple(metric.shape)}")
    B, T, D = hidden.shape
    if cls_attn.dim() == 3:
        score = cls_attn.sum(1)
    elif cls_attn.dim() == 2:
        score = cls_attn
    else:
        raise ValueError(f"VisionZip cls_attn must be (B, H, 1+N) or (B, 1+N), got {tuple(cls_attn.shape)}")
    if score.shape != (B, T) or metric.shape[:2] != (B, T):
        raise ValueError(f"VisionZip: hidden {tuple(hidden.shape)}, cls_attn {tuple(cls_attn.shape)} and metric "
                         f"{tuple(metric.shape)} disagree on (B, 1+N)")
    _check_counts(T, dominant, contextual)
    dev = hidden.device

    top = torch.sort(score[:, 1:], dim=-1, descending=True, stable=True).indices[:, :dominant - 1] + 1
    is_dom = torch.zeros(B, T, dtype=torch.bool, device=dev)
    is_dom[:, 0] = True
    is_dom.scatter_(1, top, True)
    # stable sort of the flag: dominant positions first, each group in sequence order
    by_flag = torch.sort((~is_dom).long(), dim=-1, stable=True).indices
    dom_pos, rest_pos = by_flag[:, :dominant], by_flag[:, dominant:]                # (B, dominant), (B, R')

    rest = rest_pos.shape[1]
    step = max(1, rest // contextual)
    target_slot = torch.arange(0, rest, step, device=dev)[:contextual]            # slots in the rest list
    is_target = torch.zeros(rest, dtype=torch.bool, device=dev)
    is_target[target_slot] = True
    other_slot = (~is_target).nonzero().flatten()

    dtype = work_dtype(hidden, metric)
    x = hidden.to(dtype)
    m = metric.to(dtype)
    m = m / m.norm(dim=-1, keepdim=True)                                           # official: no epsilon
    tgt_pos, oth_pos = rest_pos[:, target_slot], rest_pos[:, other_slot]
    take = lambda t, pos: t.gather(1, pos.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # noqa: E731
    sim = take(m, oth_pos) @ take(m, tgt_pos).transpose(1, 2)                      # (B, R, c)
    assign = sim.argmax(dim=-1)                                                    # first maximum on ties
    onehot = torch.nn.functional.one_hot(assign, contextual).to(dtype)            # (B, R, c)
    counts = onehot.sum(1).clamp(min=1).unsqueeze(-1)
    ctx = take(x, tgt_pos) + onehot.transpose(1, 2) @ take(x, oth_pos) / counts
    out = torch.cat([take(x, dom_pos), ctx], dim=1).to(hidden.dtype)
    return out, VisionZipRecord(dom_pos, tgt_pos, oth_pos, assign)


# --------------------------------------------------------------------------- AnyRes (LLaVA-NeXT)
# Follows visionzip/llava_arch.py (``prepare_inputs_labels_for_multimodal_visionzip`` with
# mm_patch_merge_type "spatial_unpad", and ``restore_image_features_sorted``): every crop of an image
# (base crop and tiles) goes through the tower and ``visionzip`` on its own; the base crop's tokens are
# emitted as they are; the tiles' dominant patches (CLS excluded) are put back on the big patch grid the
# tiles form and read out in its raster order, then every tile's CLS token, then every tile's contextual
# tokens. No image_newline and no unpadding (the official code builds the newline column but never
# uses it). A lone crop (no tiles) is followed by one newline, as the official else branch does.

def anyres_token_count(tiles: int, dominant: int = DEFAULT_DOMINANT, contextual: int = DEFAULT_CONTEXTUAL) -> int:
    """Tokens of one AnyRes image of ``tiles`` tiles in the official layout: (1 + tiles) x (dominant +
    contextual); a lone crop (no tiles) gets one newline after it."""
    if isinstance(tiles, bool) or not isinstance(tiles, int) or tiles < 0:
        raise ValueError(f"VisionZip: tiles must be an int >= 0, got {tiles!r}")
    return (1 + tiles) * (dominant + contextual) + (0 if tiles else 1)


def tile_patch_order(dominant: torch.Tensor, tiles: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """The order in which the tiles' dominant patches are read off the big grid.

    dominant (T, d) = each tile's dominant positions (ascending, CLS = 0 first) in its layer's
    1 + gh x gw tokens; tiles = (rows, cols) of the tile grid (T = rows x cols, raster order);
    grid = (gh, gw) patches per tile. Returns a permutation of the T x (d - 1) dominant patches
    (tile-major, each tile's in ascending order) into the big grid's raster order.
    """
    rows, cols = tiles
    gh, gw = grid
    if dominant.dim() != 2 or dominant.shape[0] != rows * cols:
        raise ValueError(f"VisionZip: {rows}x{cols} tiles need dominant positions (tiles, d), got "
                         f"{tuple(dominant.shape)}")
    patch = dominant[:, 1:] - 1                                                     # (T, d - 1) patch index
    tile = torch.arange(rows * cols, device=dominant.device)[:, None]
    big_row = (tile // cols) * gh + patch // gw
    big_col = (tile % cols) * gw + patch % gw
    return torch.argsort((big_row * (cols * gw) + big_col).flatten())


def pack_anyres(crops: torch.Tensor, dominant: torch.Tensor, tiles: tuple[int, int], grid: tuple[int, int],
                newline: torch.Tensor) -> torch.Tensor:
    """One image's VisionZip crops in the official LLaVA-NeXT layout.

    crops (1 + T, d + c, D): each crop's ``visionzip`` output (dominant tokens first, CLS at 0, then
    the contextual tokens), usually projected; dominant (1 + T, d): the record's dominant positions
    of each crop (ascending, 0 first); tiles (rows, cols) with rows x cols = T; grid (gh, gw) patches
    per crop; newline (D,). Returns (anyres_token_count(T, d, c), D):
    base crop as it is, the tiles' dominant patches in big-grid raster order, each tile's CLS token,
    each tile's contextual tokens (tile by tile). A lone crop (T = 0): the crop, then ``newline``.
    """
    if crops.dim() != 3 or dominant.dim() != 2 or dominant.shape[0] != crops.shape[0]:
        raise ValueError(f"VisionZip: crops (1 + T, d + c, D) and dominant (1 + T, d) expected, got "
                         f"{tuple(crops.shape)} and {tuple(dominant.shape)}")
    d = dominant.shape[1]
    if d >= crops.shape[1] or bool((dominant[:, 0] != 0).any()):
        raise ValueError("VisionZip: every crop's dominant tokens start with CLS (position 0) and leave room for "
                         "at least one contextual token")
    if tiles[0] * tiles[1] != crops.shape[0] - 1:
        raise ValueError(f"VisionZip: {tiles[0]}x{tiles[1]} tiles but {crops.shape[0] - 1} tile crops")
    base, rest = crops[0], crops[1:]
    newline = newline.to(crops.device, crops.dtype)
    if rest.shape[0] == 0:
        return torch.cat([base, newline[None]], dim=0)
    order = tile_patch_order(dominant[1:], tiles, grid)
    patches = rest[:, 1:d].flatten(0, 1)[order]
    return torch.cat([base, patches, rest[:, 0], rest[:, d:].flatten(0, 1)], dim=0)
