"""GlobalCom2 (thumbnail-guided compression of AnyRes crops) as the authors' code computes it, as pure tensor
functions.

Follows github xuyang-liu16/GlobalCom2: llava/model/llava_arch.py (``compress_thumbnail``,
``generate_scale_for_crop_features``, ``compress_crops`` with ``extract_actual_dimensions``,
``get_actual_crop_dimensions``, ``interpolate_and_split_cls_attn_scores``, ``select_topk_crop_features``,
and their caller in ``prepare_inputs_labels_for_multimodal``) and
llava/model/multimodal_encoder/apply_customvit.py (the CLIP attention that also returns
``attn_scores``: the PRE-softmax logits ``(q * scale) . k`` averaged over heads; the caller reads the
CLS row of the LAST encoder layer's scores, without the CLS column).

Per image of LLaVA-NeXT's AnyRes input (a base crop = the "thumbnail", plus tiles in raster order):

1. the thumbnail keeps its ``int(P * ratio)`` patches with the largest CLS score, in score order;
2. each tile gets a retention ratio from the thumbnail: the thumbnail's scores summed over the patch
   region that covers the tile, softmax with a temperature (10), ``ratio * (1 + s - mean(s))``,
   capped at 1;
3. each tile is unpadded (the patches that show the image, not the processor's padding); its
   unpadded patches are ranked by its own CLS scores plus the thumbnail's scores bilinearly
   resized to the unpadded grid (each L2-normalised over the tile) and the top ``int(n * ratio_t)``
   are kept;
4. packing: the thumbnail's kept tokens, then the tiles laid out on the full padded grid (every
   grid row ends with ``image_newline``, padded rows included), where a tile's kept token is put
   at the grid slot whose index equals its index among the tile's UNPADDED tokens (not at its own
   patch); empty slots are dropped.

Generalised from the LLaVA-NeXT-7B shapes the official code hard-codes (a square 24 x 24 grid of
576 patches, ``int(N ** 0.5)``): every function takes the crop's patch ``grid`` (rows, cols).
No transformers import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .precision import work_dtype
import torch.nn.functional as F

#: official ``retention_ratio`` (llava_arch.py) and the softmax temperature of the per-tile ratios
DEFAULT_RATIO = 0.25
DEFAULT_TEMPERATURE = 10.0
#: what ranks the tokens: the official pre-softmax logits, or (a named variant) attention probabilities
SCORES = ("logits", "softmax")
#: the thumbnail's kept tokens in score order (official) or in raster order (a named variant)
THUMBNAIL_ORDERS = ("score", "position")
#: where a tile's kept token goes: the slot of its index among the unpadded tokens (official), or its own
#: patch in the stock unpadded layout (a named variant: a newline per unpadded row only)
PLACEMENTS = ("unpadded_index", "position")


def _descending(values: torch.Tensor) -> torch.Tensor:
    """Indices sorting the last dim from largest to smallest; equal values keep their order (the earlier wins)."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices


# --------------------------------------------------------------------------- scores

def cls_scores(query: torch.Tensor, keys: torch.Tensor, heads: int, scale: float,
               kind: str = "logits") -> torch.Tensor:
    """The CLS row of a layer's attention scores over the patches, averaged over heads.

    query (B, C): the CLS token's q_proj output; keys (B, 1 + N, C): the k_proj outputs (CLS first);
    ``heads`` heads of C / heads channels, ``scale`` the layer's attention scale.
    kind "logits" (official ``attn_scores``): per head (q * scale) . k, the mean over heads, before any
    softmax. "softmax": per head the softmax over all 1 + N keys first, then the mean.
    Returns (B, N): the CLS column dropped.
    """
    if kind not in SCORES:
        raise ValueError(f"GlobalCom2 scores must be one of {SCORES}, got {kind!r}")
    if query.dim() != 2 or keys.dim() != 3 or keys.shape[0] != query.shape[0] or keys.shape[2] != query.shape[1]:
        raise ValueError(f"query (B, C) and keys (B, 1 + N, C) expected, got {tuple(query.shape)} and "
                         f"{tuple(keys.shape)}")
    B, C = query.shape
    if heads < 1 or C % heads:
        raise ValueError(f"{C} channels do not split into {heads} heads")
    dtype = work_dtype(query, keys)
    q = query.to(dtype).view(B, heads, C // heads) * scale
    k = keys.to(dtype).view(B, keys.shape[1], heads, C // heads)
    logits = torch.einsum("bhd,bthd->bht", q, k)
    if kind == "softmax":
        logits = logits.softmax(-1)
    return logits.mean(1)[:, 1:]


# --------------------------------------------------------------------------- the thumbnail

def thumbnail_count(num_patches: int, ratio: float) -> int:
    """Tokens the thumbnail keeps: ``int(num_patches * ratio)`` (official ``compress_thumbnail``)."""
    return int(num_patches * ratio)


def thumbnail_keep(scores: torch.Tensor, ratio: float, order: str = "score") -> torch.Tensor:
    """scores (B, P) of the thumbnails -> (B, int(P * ratio)) kept patch positions.

    order "score" (official): by descending score; "position": the same set in raster order.
    """
    if order not in THUMBNAIL_ORDERS:
        raise ValueError(f"GlobalCom2 thumbnail order must be one of {THUMBNAIL_ORDERS}, got {order!r}")
    keep = _descending(scores)[:, :thumbnail_count(scores.shape[1], ratio)]
    return keep.sort(dim=1).values if order == "position" else keep


# --------------------------------------------------------------------------- per-tile retention ratios

def tile_regions(grid: tuple[int, int], tiles: tuple[int, int], device=None) -> torch.Tensor:
    """(P,) the tile whose ratio each thumbnail patch counts towards (official ``generate_scale_for_crop_features``).

    The thumbnail's grid is cut into ``tiles`` (rows, cols) blocks of ``max(grid_rows // rows, 1)`` x
    ``max(grid_cols // cols, 1)`` patches; the last block row / column takes the remainder. Official: a
    square ``int(N ** 0.5)`` side for both; here each axis has its own length.
    """
    (gh, gw), (rows, cols) = grid, tiles
    ph, pw = max(gh // rows, 1), max(gw // cols, 1)
    ti = torch.clamp(torch.arange(gh, device=device) // ph, max=rows - 1)
    tj = torch.clamp(torch.arange(gw, device=device) // pw, max=cols - 1)
    return (ti[:, None] * cols + tj[None, :]).flatten()


def tile_ratios(base_scores: torch.Tensor, grid: tuple[int, int], tiles: tuple[int, int],
                ratio: float = DEFAULT_RATIO, temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """(rows * cols,) float64 retention ratio of each tile, from the thumbnail's scores (P,).

    Sums per tile region, softmax of (sum - max) / temperature (denominator + 1e-8),
    ``ratio * (1 + s - mean(s))`` capped at 1.0; all ``ratio`` if the softmax sums to 0.
    In float64, as the official numpy code.
    """
    T = tiles[0] * tiles[1]
    region = tile_regions(grid, tiles, base_scores.device)
    sums = torch.zeros(T, dtype=torch.float64, device=base_scores.device)
    sums.index_add_(0, region, base_scores.to(torch.float64))
    e = torch.exp((sums - sums.max()) / temperature)
    soft = e / (e.sum() + 1e-8)
    if soft.sum() == 0:
        return torch.full((T,), float(ratio), dtype=torch.float64, device=base_scores.device)
    return torch.clamp(ratio * (1 + soft - soft.mean()), max=1.0)


# --------------------------------------------------------------------------- unpadding and the global guide

def unpad_mask(image_size: tuple[int, int], tiles: tuple[int, int], grid: tuple[int, int],
               device=None) -> torch.Tensor:
    """(T, P) bool: the patches of each tile (raster order of tiles, then of patches) that show the image.

    ``image_size`` (height, width) of the original image. The tiles form a (rows * gh) x (cols * gw)
    grid; the image was resized into it keeping its aspect ratio and centred, so whole rows (or
    columns) at both ends are padding: ``new = int(side * scale)``, ``pad = (full - new) // 2`` as in
    the official ``compress_crops`` (``int``; transformers' ``unpad_image`` rounds to 7 decimals first).
    """
    (h, w), (rows, cols), (gh, gw) = image_size, tiles, grid
    H, W = rows * gh, cols * gw
    big = torch.zeros(H, W, dtype=torch.bool, device=device)
    if w / h > W / H:
        pad = (H - int(h * (W / w))) // 2
        big[pad:H - pad, :] = True
    else:
        pad = (W - int(w * (H / h))) // 2
        big[:, pad:W - pad] = True
    return big.view(rows, gh, cols, gw).permute(0, 2, 1, 3).reshape(rows * cols, gh * gw)


def _extent(rows_or_cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first index, length) of the True span along the last dim of a bool tensor; (0, 0) when none."""
    n = rows_or_cols.shape[-1]
    idx = torch.arange(n, device=rows_or_cols.device)
    first = torch.where(rows_or_cols, idx, n).amin(-1)
    last = torch.where(rows_or_cols, idx, -1).amax(-1)
    any_ = rows_or_cols.any(-1)
    return torch.where(any_, first, 0), torch.where(any_, last - first + 1, 0)


def tile_global_scores(base_scores: torch.Tensor, mask: torch.Tensor, tiles: tuple[int, int],
                       grid: tuple[int, int]) -> torch.Tensor:
    """(T, P): the thumbnail's scores resized to the unpadded area, read back at each tile's unpadded patches
    (0 at padding). Official ``interpolate_and_split_cls_attn_scores``:

    the thumbnail's (gh, gw) scores are resized bilinearly (align_corners=False) to the bounding box of
    the unpadded area; tile (i, j) reads the block that starts at the summed widths of tiles (i, 0..j-1)
    and the summed heights of tiles (0..i-1, 0) (the FIRST tile of each earlier row: a row whose first
    tile is all padding does not advance, as in the official code), of its own unpadded height x width.
    """
    (rows, cols), (gh, gw) = tiles, grid
    T, P = mask.shape
    valid = mask.view(rows, cols, gh, gw)
    y0, th = _extent(valid.any(3))                    # (rows, cols) first valid row / count in each tile
    x0, tw = _extent(valid.any(2))
    big = valid.permute(0, 2, 1, 3).reshape(rows * gh, cols * gw)
    _, cur_h = _extent(big.any(1)[None])
    _, cur_w = _extent(big.any(0)[None])
    cur_h, cur_w = int(cur_h), int(cur_w)
    dtype = work_dtype(base_scores)
    if cur_h == 0 or cur_w == 0:   # nothing of the image left in the tiles (the official code would fail here)
        return torch.zeros(T, P, dtype=dtype, device=mask.device)
    resized = F.interpolate(base_scores.to(dtype).view(1, 1, gh, gw), size=(cur_h, cur_w), mode="bilinear",
                            align_corners=False)[0, 0]
    col_off = torch.cumsum(tw, 1) - tw                # widths of the tiles before, in the same row
    row_off = (torch.cumsum(th[:, 0], 0) - th[:, 0])[:, None].expand(rows, cols)
    if bool(((row_off + th > cur_h) | (col_off + tw > cur_w)).any()):
        raise ValueError("GlobalCom2: a tile's unpadded block runs past the resized thumbnail scores")
    ys = torch.arange(gh, device=mask.device).view(1, 1, gh, 1)
    xs = torch.arange(gw, device=mask.device).view(1, 1, 1, gw)
    r = (row_off[..., None, None] + ys - y0[..., None, None]).clamp(0, max(cur_h - 1, 0))
    c = (col_off[..., None, None] + xs - x0[..., None, None]).clamp(0, max(cur_w - 1, 0))
    out = resized[r, c].reshape(T, P)
    return torch.where(mask, out, torch.zeros((), dtype=out.dtype, device=out.device))


# --------------------------------------------------------------------------- selection and packing

def tile_counts(mask: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
    """(T,) tokens each tile keeps: ``int(unpadded * ratio_t)`` (float64, as the official Python floats)."""
    return torch.floor(mask.sum(1).to(torch.float64) * ratios.to(torch.float64)).long()


def tile_keep(local: torch.Tensor, global_: torch.Tensor, mask: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
    """(T, P) bool: the patches each tile keeps (official ``select_topk_crop_features``).

    local (T, P): each tile's own CLS scores; global_ (T, P): ``tile_global_scores``; both are
    L2-normalised over the tile's unpadded patches (eps 1e-12, as ``F.normalize``) and added; the
    ``tile_counts`` largest unpadded patches are kept (ties: the earlier patch).
    """
    dtype = work_dtype(local, global_)
    zero = torch.zeros((), dtype=dtype, device=local.device)

    def normalised(x: torch.Tensor) -> torch.Tensor:
        x = torch.where(mask, x.to(dtype), zero)
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)

    combined = (normalised(local) + normalised(global_)).masked_fill(~mask, float("-inf"))
    order = _descending(combined)
    take = torch.arange(mask.shape[1], device=mask.device)[None] < tile_counts(mask, ratios)[:, None]
    return torch.zeros_like(mask).scatter(1, order, take)


def place_tiles(features: torch.Tensor, kept: torch.Tensor, mask: torch.Tensor, tiles: tuple[int, int],
                grid: tuple[int, int], newline: torch.Tensor, placement: str = "unpadded_index") -> torch.Tensor:
    """The tiles' kept tokens as the LLM receives them: (n, D).

    features (T, P, D) per tile (raster order of tiles), kept / mask (T, P). The tiles form the full
    (rows * gh) x (cols * gw) grid, each grid row followed by ``newline`` (D,); the kept tokens and
    the newlines are read in raster order, empty slots dropped.
    placement "unpadded_index" (official): a kept token goes to the slot of its tile whose index is its
    index among the tile's unpadded patches, and every grid row, padded or not, gets a newline.
    "position": it stays at its own patch, and only unpadded rows get a newline (the stock layout
    with the dropped tokens left out).
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"GlobalCom2 placement must be one of {PLACEMENTS}, got {placement!r}")
    (rows, cols), (gh, gw) = tiles, grid
    T, P, D = features.shape
    t_idx, p_idx = kept.nonzero(as_tuple=True)
    slot = (mask.cumsum(1) - 1)[t_idx, p_idx] if placement == "unpadded_index" else p_idx
    placed = features.new_zeros(T, P, D)
    filled = torch.zeros(T, P, dtype=torch.bool, device=features.device)
    placed[t_idx, slot] = features[t_idx, p_idx]
    filled[t_idx, slot] = True
    H, W = rows * gh, cols * gw
    grid_feats = placed.view(rows, cols, gh, gw, D).permute(0, 2, 1, 3, 4).reshape(H, W, D)
    grid_filled = filled.view(rows, cols, gh, gw).permute(0, 2, 1, 3).reshape(H, W)
    if placement == "unpadded_index":
        newlines = torch.ones(H, dtype=torch.bool, device=features.device)
    else:
        newlines = mask.view(rows, cols, gh, gw).permute(0, 2, 1, 3).reshape(H, W).any(1)
    newline = newline.to(features.device, features.dtype)
    grid_feats = torch.cat([grid_feats, newline.expand(H, 1, D)], dim=1)
    grid_filled = torch.cat([grid_filled, newlines[:, None]], dim=1)
    return grid_feats[grid_filled]


# --------------------------------------------------------------------------- one image, and many

@dataclass(frozen=True)
class GlobalCom2Record:
    """What GlobalCom2 kept of one image (for ``focusvlm show`` and the tests).

    tiles: (rows, cols) of tiles; (0, 0) for an image sent as one crop (kept whole).
    base_kept: (k,) thumbnail patches kept, in the order they are packed.
    ratios: (T,) float64 retention ratio of each tile.
    valid: (T, P) bool unpadded patches of each tile.
    kept: (T, P) bool patches each tile keeps (their own positions, whatever the placement).
    """

    tiles: tuple[int, int]
    base_kept: torch.Tensor
    ratios: torch.Tensor
    valid: torch.Tensor
    kept: torch.Tensor

    @property
    def tokens(self) -> int:
        """Image tokens packed for the LLM, newlines excluded."""
        return int(self.base_kept.numel()) + int(self.kept.sum())


def globalcom2_image(crops: torch.Tensor, scores: torch.Tensor, tiles: tuple[int, int], grid: tuple[int, int],
                     image_size: tuple[int, int], newline: torch.Tensor, *, ratio: float = DEFAULT_RATIO,
                     temperature: float = DEFAULT_TEMPERATURE, thumbnail_order: str = "score",
                     placement: str = "unpadded_index",
                     base_kept: torch.Tensor | None = None) -> tuple[torch.Tensor, GlobalCom2Record]:
    """One image: crops (1 + T, P, D) (thumbnail first, tiles in raster order), scores (1 + T, P) -> its packed
    tokens (n, D) and record. A lone crop (no tiles) is kept whole and followed by one newline, as the
    official code does. ``base_kept``: the thumbnail's kept positions when already chosen (batched)."""
    P = crops.shape[1]
    if crops.shape[0] == 1:
        empty = torch.zeros(0, P, dtype=torch.bool, device=crops.device)
        record = GlobalCom2Record((0, 0), torch.arange(P, device=crops.device),
                                  torch.zeros(0, dtype=torch.float64), empty, empty)
        return torch.cat([crops[0], newline.to(crops.device, crops.dtype)[None]]), record
    if tiles[0] * tiles[1] != crops.shape[0] - 1 or grid[0] * grid[1] != P or scores.shape != crops.shape[:2]:
        raise ValueError(f"GlobalCom2: crops {tuple(crops.shape)} / scores {tuple(scores.shape)} do not match "
                         f"{tiles[0]}x{tiles[1]} tiles of {grid[0]}x{grid[1]} patches plus the thumbnail")
    if base_kept is None:
        base_kept = thumbnail_keep(scores[:1], ratio, thumbnail_order)[0]
    ratios = tile_ratios(scores[0], grid, tiles, ratio, temperature)
    mask = unpad_mask(image_size, tiles, grid, crops.device)
    guide = tile_global_scores(scores[0], mask, tiles, grid)
    kept = tile_keep(scores[1:], guide, mask, ratios)
    packed = torch.cat([crops[0][base_kept], place_tiles(crops[1:], kept, mask, tiles, grid, newline, placement)])
    return packed, GlobalCom2Record(tuple(tiles), base_kept, ratios.detach(), mask, kept)


def globalcom2(crops: list[torch.Tensor], scores: list[torch.Tensor], tiles: list[tuple[int, int]],
               grid: tuple[int, int], image_sizes: list[tuple[int, int]], newline: torch.Tensor, *,
               ratio: float = DEFAULT_RATIO, temperature: float = DEFAULT_TEMPERATURE,
               thumbnail_order: str = "score",
               placement: str = "unpadded_index") -> tuple[list[torch.Tensor], list[GlobalCom2Record]]:
    """Every image of a forward: per image its crops (1 + T_i, P, D) and their CLS scores (1 + T_i, P), its
    (rows, cols) tiles and (height, width) size. The thumbnails are ranked in one batch; each image's tiles
    in one batch of their own (images differ in tiles and padding). Returns the packed tokens and the
    record of each image."""
    if not crops:
        return [], []
    thumbs = thumbnail_keep(torch.stack([s[0] for s in scores]), ratio, thumbnail_order)
    out, records = [], []
    for i, (c, s, t, size) in enumerate(zip(crops, scores, tiles, image_sizes)):
        packed, record = globalcom2_image(c, s, t, grid, size, newline, ratio=ratio, temperature=temperature,
                                          thumbnail_order=thumbnail_order, placement=placement,
                                          base_kept=thumbs[i])
        out.append(packed)
        records.append(record)
    return out, records
