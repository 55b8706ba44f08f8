"""LLaVA-PruMerge and PruMerge+ as the authors' code computes them, as pure tensor functions.

Follows github 42Shawn/LLaVA-PruMerge, llava/model/multimodal_encoder/
clip_encoder.py, ``token_prune_merge_advanced`` (PruMerge) and
``token_prune_merge_advanced_plus`` (PruMerge+), quirks included; every
deliberate difference is named where it happens and in docs/methods.md.

What the wiring passes (LLaVA-1.5, CLIP ViT-L/14-336, 24 layers, feature layer -2):

* ``h = hidden_states[-2]``: the input of the LAST encoder layer (layers[-1]),
  which is also the hidden state LLaVA reads its features from.
* ``x = layers[-1].layer_norm1(h)``; ``cls_query = layers[-1].self_attn.q_proj(x)[:, 0]``
  (B, C) and ``keys = layers[-1].self_attn.k_proj(x)`` (B, 1 + N, C): the raw
  projection outputs (bias included, no head split, no attention scaling).
* ``features = h[:, 1:]`` (B, N, D): the patch features before the projector
  (the projector then runs on the reduced tokens).

The output is (B, M, D) tokens that replace the N patch features, M = kept + 1.
No transformers import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .precision import work_dtype

#: how many key-nearest tokens the official code merges into each kept token
NEIGHBOURS = 32
#: the official ``reduction_ratio`` default (fixed-count path; 576 patches keep 72)
DEFAULT_RATIO = 1 / 8


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), idx (B, ...) -> x[b, idx[b, ...]] of shape (B, ..., D)."""
    flat = idx.reshape(idx.shape[0], -1)
    out = x.gather(1, flat.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return out.view(*idx.shape, x.shape[-1])


# --------------------------------------------------------------------------- attention and ratio

def cls_attention(cls_query: torch.Tensor, keys: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """CLS-to-patch attention as PruMerge forms it: one head over the full width.

    cls_query (B, C), keys (B, 1 + N, C) (CLS first). Softmax over all 1 + N keys
    (CLS included) of q . k * scale, then the CLS column is dropped. The official
    scale is C ** -0.5 with C the feature width, which for CLIP equals the q/k
    width (1024 for ViT-L), so ``scale=None`` uses the query width. Returns (B, N)
    in float32 (float64 for float64 inputs).
    """
    if cls_query.dim() != 2 or keys.dim() != 3:
        raise ValueError(f"PruMerge wants cls_query (B, C) and keys (B, 1+N, C), got {tuple(cls_query.shape)} "
                         f"and {tuple(keys.shape)}")
    if keys.shape[0] != cls_query.shape[0] or keys.shape[-1] != cls_query.shape[-1]:
        raise ValueError(f"PruMerge: cls_query {tuple(cls_query.shape)} does not match keys {tuple(keys.shape)}")
    if keys.shape[1] < 2:
        raise ValueError(f"PruMerge needs CLS plus at least one patch key, got {keys.shape[1]} keys")
    dtype = work_dtype(cls_query, keys)
    scale = cls_query.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bc,bnc->bn", cls_query.to(dtype), keys.to(dtype)) * scale
    return logits.softmax(dim=-1)[:, 1:]


def adaptive_ratio(attn: torch.Tensor) -> float:
    """PruMerge's adaptive reduction ratio: the share of IQR outliers in the WHOLE batch.

    attn (B, N). The official code flattens the batch's CLS attention (as
    float32), takes the 25th / 75th percentiles (linear interpolation) of all
    B * N values together, and counts the values strictly above Q3 + 1.5 * IQR.
    The ratio is that count / (B * N), so one sample's token count depends on
    the other images of its batch (a quirk kept on purpose).
    """
    if attn.dim() != 2 or attn.numel() == 0:
        raise ValueError(f"PruMerge attention must be (B, N) and non-empty, got {tuple(attn.shape)}")
    flat = attn.detach().to(torch.float32).flatten()
    q1 = torch.quantile(flat, 0.25)
    q3 = torch.quantile(flat, 0.75)
    upper = q3 + 1.5 * (q3 - q1)
    count = int((flat > upper).sum())
    return count / flat.numel()


def _check_ratio(ratio: float) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"PruMerge ratio must be in (0, 1], got {ratio!r}")


def _uniform_samples(num_patches: int, ratio: float, adaptive: bool) -> list[int]:
    """PruMerge+'s spatial samples, before the adaptive path filters them.

    step = int(1 / ratio). Adaptive path: 0, step // 3, 2 * (step // 3), ...;
    fixed path: step // 2, step // 2 + step, ... Both stop before position
    575 in the official code, which hardcodes the 576 patches of CLIP-L/336;
    we stop before ``num_patches - 1`` (the same for 576 patches).
    """
    step = int(1 / ratio)
    stride = int(step / 3) if adaptive else step
    start = 0 if adaptive else int(step / 2)
    if stride < 1:
        # the official torch.arange fails with step 0 here
        raise ValueError(f"PruMerge+ cannot sample uniformly at ratio {ratio:.4g}: its sampling step "
                         f"int(int(1/ratio){' / 3' if adaptive else ''}) is 0")
    return list(range(start, num_patches - 1, stride))


def token_count(num_patches: int, ratio: float = DEFAULT_RATIO, plus: bool = False) -> int:
    """Output token count of the fixed-count (non-adaptive) path, for the placeholder count.

    PruMerge: int(N * ratio) kept + 1 merged token. PruMerge+: the same plus the
    uniform samples (duplicates of kept tokens included, as the official fixed
    path does not filter them). 576 patches at the default 1/8: 73 and 145.
    The adaptive path's count is only known after the tower ran.
    """
    if num_patches < 1:
        raise ValueError(f"PruMerge needs at least one patch token, got {num_patches}")
    _check_ratio(ratio)
    kept = int(num_patches * ratio)
    if plus:
        kept += len(_uniform_samples(num_patches, ratio, adaptive=False))
        if kept > num_patches:
            raise ValueError(f"PruMerge+ at ratio {ratio:.4g} picks {kept} tokens, more than the "
                             f"{num_patches} patches; use a ratio of 1/2 or less")
    return kept + 1


# --------------------------------------------------------------------------- selection

def select(attn: torch.Tensor, *, plus: bool = False, adaptive: bool = True,
           ratio: float = DEFAULT_RATIO) -> tuple[torch.Tensor, float]:
    """Which patch tokens PruMerge(+) keeps, in the official output order.

    attn (B, N) CLS attention. Returns (idx (B, K) long, ratio used).

    * k = int(N * r), r = ``adaptive_ratio(attn)`` (adaptive) or ``ratio``; the
      k most attended tokens in descending attention order (official
      ``topk(sorted=True)``; ties, which topk leaves unspecified, go to the
      lower index).
    * PruMerge+ appends uniform samples (``_uniform_samples``): the adaptive
      path drops samples already kept, the fixed path appends them all, so a
      token can appear twice (it is then merged and emitted twice, as
      officially).

    Adaptive PruMerge+ takes one image at a time: the official code filters
    the samples against the whole batch's kept set and then fails to
    concatenate for B > 1, so B > 1 is refused here.
    """
    if attn.dim() != 2 or attn.shape[1] < 1:
        raise ValueError(f"PruMerge attention must be (B, N) with N >= 1, got {tuple(attn.shape)}")
    B, N = attn.shape
    if adaptive:
        if plus and B != 1:
            raise ValueError(f"adaptive PruMerge+ takes one image at a time (the official code fails on a "
                             f"batch), got a batch of {B}; use adaptive=False to batch")
        ratio = adaptive_ratio(attn)
    else:
        _check_ratio(ratio)
    k = int(N * ratio)
    order = torch.sort(attn, dim=-1, descending=True, stable=True).indices[:, :k]
    if not plus:
        return order, ratio
    if adaptive and ratio == 0:
        # the official int(1 / reduction_ratio) divides by zero here
        raise ValueError("adaptive PruMerge+ found no IQR outlier, so its sampling step int(1/ratio) is undefined")
    samples = torch.tensor(_uniform_samples(N, ratio, adaptive), dtype=torch.long, device=attn.device)
    if adaptive:
        taken = torch.zeros(N, dtype=torch.bool, device=attn.device)
        taken[order[0]] = True
        samples = samples[~taken[samples]]
    idx = torch.cat([order, samples.unsqueeze(0).expand(B, -1)], dim=1)
    if idx.shape[1] > N:
        raise ValueError(f"PruMerge+ at ratio {ratio:.4g} picks {idx.shape[1]} tokens, more than the {N} patches")
    return idx, ratio


def complement(idx: torch.Tensor, num_patches: int) -> torch.Tensor:
    """The pruned positions as the official ``complement_idx`` lists them, (B, N - K), ascending.

    Without duplicates in idx (B, K) this is exactly the positions not in idx.
    The official routine zeroes the kept entries of arange(N), sorts, and drops
    the first K values, so each duplicate in idx also drops the lowest pruned
    position: with d duplicates the d lowest pruned positions are left out
    (of the merge candidates and of the extra token). Reproduced here; it only
    happens on the fixed PruMerge+ path.
    """
    B, K = idx.shape
    if K > num_patches:
        raise ValueError(f"cannot keep {K} of {num_patches} tokens")
    kept = torch.zeros(B, num_patches, dtype=torch.bool, device=idx.device).scatter(1, idx, True)
    dups = K - kept.sum(-1, keepdim=True)                                            # (B, 1)
    free = torch.sort(kept.long(), dim=-1, stable=True).indices                      # pruned ascending, kept last
    pos = torch.arange(num_patches - K, device=idx.device).unsqueeze(0) + dups
    return free.gather(1, pos)


# --------------------------------------------------------------------------- merge

def merge(features: torch.Tensor, patch_keys: torch.Tensor, attn: torch.Tensor, idx: torch.Tensor,
          neighbours: int = NEIGHBOURS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each kept token absorbs its key-nearest tokens; the pruned ones make one extra token.

    features (B, N, D) patch features; patch_keys (B, N, C) patch keys (CLS
    dropped); attn (B, N) CLS attention; idx (B, K) kept positions in output
    order (``select``). For kept entry i the candidates are ALL other entries:
    the other kept entries (in idx order) then the pruned positions
    (``complement``); the ``neighbours`` of largest key cosine similarity
    (ties: earlier in that list) are added with their CLS attention as
    weights, unnormalised: y_i = x_i + sum_j a_j x_j. The extra token is
    sum_p a_p x_p over the pruned positions. Returns (y (B, K + 1, D) in
    features.dtype, neighbour positions (B, K, m), pruned positions
    (B, N - K)); m = ``neighbours`` (0 when K = 0).
    """
    if features.dim() != 3 or patch_keys.dim() != 3:
        raise ValueError(f"PruMerge wants features (B, N, D) and patch keys (B, N, C), got "
                         f"{tuple(features.shape)} and {tuple(patch_keys.shape)}")
    B, N, D = features.shape
    if patch_keys.shape[:2] != (B, N) or attn.shape != (B, N):
        raise ValueError(f"PruMerge: features {tuple(features.shape)}, patch keys {tuple(patch_keys.shape)} and "
                         f"attention {tuple(attn.shape)} disagree on (B, N)")
    if idx.dim() != 2 or idx.shape[0] != B:
        raise ValueError(f"PruMerge kept indices must be (B, K) with B={B}, got {tuple(idx.shape)}")
    K = idx.shape[1]
    if K > 0 and not 1 <= neighbours <= N - 1:
        # the official topk(k=32) fails when fewer than 32 other tokens exist
        raise ValueError(f"PruMerge merges {neighbours} neighbours but a token has only {N - 1} others")
    dtype = work_dtype(features, attn)
    x, a = features.to(dtype), attn.to(dtype)
    pruned = complement(idx, N)
    extra = (_gather_rows(x, pruned) * a.gather(1, pruned).unsqueeze(-1)).sum(1, keepdim=True)
    if K == 0:
        return extra.to(features.dtype), idx.new_zeros((B, 0, 0)), pruned
    # candidates in the official order: kept entries (idx order), then pruned ascending
    order = torch.cat([idx, pruned], dim=1)                                          # (B, N)
    kn = torch.nn.functional.normalize(_gather_rows(patch_keys.to(work_dtype(patch_keys)), order), dim=-1)
    sim = kn[:, :K] @ kn.transpose(1, 2)                                             # (B, K, N)
    self_entry = torch.arange(K, device=idx.device)
    sim[:, self_entry, self_entry] = float("-inf")                                   # a token is not its own candidate
    pick = torch.sort(sim, dim=-1, descending=True, stable=True).indices[:, :, :neighbours]
    near = order.gather(1, pick.flatten(1)).view(B, K, neighbours)                  # positions
    absorbed = (_gather_rows(x, near) * a.gather(1, near.flatten(1)).view(B, K, neighbours, 1)).sum(2)
    y = _gather_rows(x, idx) + absorbed
    return torch.cat([y, extra], dim=1).to(features.dtype), near, pruned


# --------------------------------------------------------------------------- the method

@dataclass
class PruMergeRecord:
    """What PruMerge(+) did, in patch positions (CLS excluded), for visualisation."""

    attention: torch.Tensor    # (B, N) CLS attention
    ratio: float               # reduction ratio used: the IQR outlier share (adaptive) or the given one
    kept: torch.Tensor         # (B, K) positions of the first K output tokens, in output order
    neighbours: torch.Tensor   # (B, K, m) positions merged into each kept token
    pruned: torch.Tensor       # (B, N - K) positions summed into the last output token


def prumerge_from_attention(features: torch.Tensor, patch_keys: torch.Tensor, attn: torch.Tensor, *,
                            plus: bool = False, adaptive: bool = True, ratio: float = DEFAULT_RATIO,
                            neighbours: int = NEIGHBOURS) -> tuple[torch.Tensor, PruMergeRecord]:
    """PruMerge(+) given the CLS attention (B, N) and patch keys (B, N, C) directly.

    See ``prumerge``; this entry lets tests (and wirings that already hold the
    attention) skip ``cls_attention``.
    """
    idx, used = select(attn, plus=plus, adaptive=adaptive, ratio=ratio)
    out, near, pruned = merge(features, patch_keys, attn, idx, neighbours)
    return out, PruMergeRecord(attn, used, idx, near, pruned)


def prumerge(features: torch.Tensor, cls_query: torch.Tensor, keys: torch.Tensor, *, plus: bool = False,
             adaptive: bool = True, ratio: float = DEFAULT_RATIO,
             neighbours: int = NEIGHBOURS) -> tuple[torch.Tensor, PruMergeRecord]:
    """LLaVA-PruMerge (``plus=False``) or PruMerge+ (``plus=True``) on one batch.

    features (B, N, D): the patch features LLaVA would project (CLS dropped);
    cls_query (B, C) and keys (B, 1 + N, C): q_proj / k_proj outputs of the
    LAST encoder layer on its layer-normed input (module docstring).
    ``adaptive=True`` (the official default) sets the kept count from the IQR
    outliers of the whole batch (``adaptive_ratio``); ``adaptive=False`` keeps
    int(N * ratio) tokens, the same count for every image (``token_count``).

    Returns (tokens (B, K + 1, D) in features.dtype: kept tokens in descending
    attention order (PruMerge+: then its uniform samples), each plus its
    attention-weighted neighbours, and last the attention-weighted sum of the
    pruned tokens; record).
    """
    if features.dim() != 3:
        raise ValueError(f"PruMerge features must be (B, N, D), got {tuple(features.shape)}")
    if keys.dim() != 3 or keys.shape[1] != features.shape[1] + 1:
        raise ValueError(f"PruMerge keys must be (B, 1+N, C) with CLS first; features have N={features.shape[1]}, "
                         f"keys are {tuple(keys.shape)}")
    attn = cls_attention(cls_query, keys)
    return prumerge_from_attention(features, keys[:, 1:], attn, plus=plus, adaptive=adaptive, ratio=ratio,
                                   neighbours=neighbours)


def ratio_for_count(num_patches: int, count: int, plus: bool = False) -> float:
    """The official ``reduction_ratio`` at which the fixed path hands the LLM ``count`` tokens (or fewer).

    The official code takes a ratio r, not a count: it keeps int(N * r) tokens
    (PruMerge+ adds int(1 / r)-spaced samples) and appends one merged token.
    For a token budget we run the official path at r = (k + 1/2) / N, the
    midpoint that makes int(N * r) = k with no float doubt, with k the largest
    kept count whose output (``token_count``) does not exceed ``count``:
    k = count - 1 for PruMerge; for PruMerge+ the output grows about twice as
    fast as k, so some budgets are met one token short.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise ValueError(f"PruMerge needs a budget of at least 2 tokens (one kept + the merged one), got {count!r}")
    if count > num_patches + 1:
        raise ValueError(f"PruMerge budget {count} exceeds the {num_patches} patches + 1 merged token")
    for kept in range(min(count - 1, num_patches), 0, -1):
        ratio = min(1.0, (kept + 0.5) / num_patches)   # all patches: r = 1 exactly
        try:
            if token_count(num_patches, ratio, plus) <= count:
                return ratio
        except ValueError:  # PruMerge+ picking more tokens than there are patches
            continue
    raise ValueError(f"PruMerge{'+' if plus else ''} cannot hand the LLM {count} tokens or fewer from "
                     f"{num_patches} patches")
