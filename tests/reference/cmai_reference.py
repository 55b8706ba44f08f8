"""Slow, literal CMAI (shared/SPEC.md) used as the oracle for the fast path.

One full forward over a whole sequence, no cache: per sample, per text row,
in float64, with Python loops and torch.quantile, exactly as the equations
read. Registered as an attention implementation so the real model runs it.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

NAME = "reference_cmai"


class ReferenceCMAI:
    """Holds what the attention function needs for the next forward call."""

    def __init__(self, gammas, focus, discount=0.9, image_token_id=None):
        self.gammas = gammas
        self.focus = focus
        self.discount = discount
        self.image_token_id = image_token_id
        self.types = None  # per sample: list of "I" / "T" / "P"

    def set_inputs(self, input_ids, attention_mask):
        self.types = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            self.types.append(["P" if not m else ("I" if t == self.image_token_id else "T") for t, m in zip(ids, mask)])


def focus_scores(focus, a_t2i, a_t2t, discount):
    """F for every text row of one sample; rows/cols of a_t2t are text tokens in order."""
    m = a_t2i.shape[0]
    if focus == "tia":
        return a_t2i.clone()
    if focus == "neighborhood":
        a_t2n = torch.zeros_like(a_t2t)
        for j in range(m):
            for h in range(m):
                if h < j:
                    a_t2n[j, h] = a_t2t[j, h]
        return a_t2i + a_t2n @ a_t2i
    out = torch.zeros_like(a_t2i)
    for j in range(m):
        for h in range(j + 1):
            weight = 1.0 if focus == "sum" else discount ** (j - h)
            out[j] += weight * a_t2i[h]
    return out


def reference_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    ref: ReferenceCMAI = module._reference_cmai
    gamma = ref.gammas[module.layer_idx]
    b_size, heads, seq, dim = query.shape
    group = heads // key.shape[1]
    scaling = scaling if scaling is not None else dim ** -0.5
    out = torch.zeros(b_size, seq, heads, dim, dtype=torch.float64)
    for b in range(b_size):
        types = ref.types[b]
        q = query[b].double()
        k = key[b].double().repeat_interleave(group, dim=0)
        v = value[b].double().repeat_interleave(group, dim=0)
        logits = q @ k.transpose(-1, -2) * scaling                      # (H, S, S)
        # query j may see key k when k <= j (causal) and k is not padding
        not_pad = torch.tensor([t != "P" for t in types])
        allowed = torch.ones(seq, seq, dtype=torch.bool).tril() & not_pad[None, :]
        logits = logits.masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)         # padding query rows: all zero
        stock = weights @ v                                               # (H, S, D)
        out[b] = stock.transpose(0, 1)
        if gamma == 0:
            continue
        mean = weights.mean(dim=0)
        img = [i for i, t in enumerate(types) if t == "I"]
        txt = [i for i, t in enumerate(types) if t == "T"]
        if not img or not txt:
            continue
        a_t2i = mean[txt][:, img]
        a_t2t = mean[txt][:, txt]
        focus = focus_scores(ref.focus, a_t2i, a_t2t, ref.discount)
        for jj, j in enumerate(txt):
            visible = [c for c, pos in enumerate(img) if pos <= j]
            if not visible:
                continue
            tau = torch.quantile(focus[jj, visible], gamma)
            blocked = [img[c] for c in visible if focus[jj, c] < tau]
            row = logits[:, j].clone()
            row[:, blocked] = float("-inf")
            out[b, j] = torch.einsum("hs,hsd->hd", torch.softmax(row, dim=-1), v)
    return out.to(query.dtype), None


def install(model, ref: ReferenceCMAI):
    """Switch ``model``'s LM to the reference implementation; returns a function that undoes it."""
    AttentionInterface.register(NAME, reference_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    lm = model.model.language_model
    previous = lm.config._attn_implementation
    for layer in lm.layers:
        layer.self_attn._reference_cmai = ref
    model.set_attn_implementation({"text_config": NAME})

    def undo():
        for layer in lm.layers:
            del layer.self_attn._reference_cmai
        model.set_attn_implementation({"text_config": previous})

    return undo


def blocked_image_keys(focus, image_positions, text_positions, gamma):
    """C6-C7 for one sample, literally: per text row, the image columns below its gamma-quantile.

    focus: (text rows, image columns); image_positions / text_positions: absolute positions.
    Returns a bool list of lists (text rows x image columns).
    """
    out = []
    for jj, j in enumerate(text_positions):
        visible = [c for c, pos in enumerate(image_positions) if pos <= j]
        row = [False] * len(image_positions)
        if visible:
            tau = torch.quantile(focus[jj, visible], gamma)
            for c in visible:
                row[c] = bool(focus[jj, c] < tau)
        out.append(row)
    return out


def head_mean_attention(q, k, scaling, allowed):
    """C1 for one sample, literally: per head softmax over the allowed keys, then the mean over heads.

    q (H, R, D), k (Hkv, K, D) with H a multiple of Hkv, allowed (R, K) bool. float64.
    """
    heads, kv_heads = q.shape[0], k.shape[0]
    out = torch.zeros(q.shape[1], k.shape[1], dtype=torch.float64)
    for h in range(heads):
        kh = k[h // (heads // kv_heads)].double()
        for r in range(q.shape[1]):
            logits = (kh @ q[h, r].double()) * scaling
            logits[~allowed[r]] = float("-inf")
            out[r] += torch.softmax(logits, dim=0) / heads
    return out
