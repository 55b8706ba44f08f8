"""Slow literal oracles for the peer methods (PruMerge(+), VisionZip, DivPrune, FastV).

Each function walks through the official computation step by step, one image
at a time, with Python loops and float64 tensors, so a reader can hold it
against the cited source. Tie rules the official code leaves to torch.topk
(unspecified) are fixed the same way as in focusvlm: the earlier entry wins.
"""

from __future__ import annotations

import numpy as np
import torch

F64 = torch.float64


def _descending(values):
    """Indices of ``values`` from largest to smallest; equal values keep list order."""
    return sorted(range(len(values)), key=lambda i: -values[i])


# --------------------------------------------------------------------------- PruMerge(+)
# github 42Shawn/LLaVA-PruMerge, llava/model/multimodal_encoder/clip_encoder.py:
# outlier_dectection, complement_idx, CLIPVisionTower.token_prune_merge_advanced(_plus)

def prumerge_attention(q, k):
    """q, k: (T, C) projections of one image (row 0 = CLS). The whole T x T attention
    matrix with scale C^-0.5, softmax per row, then row 0 without the CLS column."""
    q, k = q.to(F64), k.to(F64)
    C = q.shape[1]
    rows = []
    for t in range(q.shape[0]):
        logits = [float(q[t] @ k[s]) * C ** -0.5 for s in range(k.shape[0])]
        top = max(logits)
        e = [np.exp(v - top) for v in logits]
        rows.append([v / sum(e) for v in e])
    return rows[0][1:]


def outlier_ratio(batch_attn):
    """batch_attn: list of per-image attention lists. numpy percentiles of the flattened float32 batch."""
    a = np.asarray(batch_attn, dtype=np.float32).flatten()
    q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
    upper = q3 + 1.5 * (q3 - q1)
    return len(np.where(a > upper)[0]) / len(a)


def complement_idx(idx, n):
    """Zero the entries idx of arange(n), sort, drop the first len(idx) values."""
    a = list(range(n))
    for i in idx:
        a[i] = 0
    return sorted(a)[len(idx):]


def prumerge_indices(batch_attn, plus, adaptive, ratio):
    """Kept positions per image in the official order, and the ratio used."""
    N = len(batch_attn[0])
    if adaptive:
        ratio = outlier_ratio(batch_attn)
    k = int(N * ratio)
    idx = [_descending(a)[:k] for a in batch_attn]
    if not plus:
        return idx, ratio
    step_length = int(1 / ratio)
    if adaptive:
        assert len(batch_attn) == 1
        seq = list(range(0, N - 1, int(step_length / 3)))   # official: range end 575 for N = 576
        flat = [i for row in idx for i in row]
        return [idx[0] + [x for x in seq if x not in flat]], ratio
    seq = list(range(int(step_length / 2), N - 1, int(step_length)))
    return [row + seq for row in idx], ratio


def prumerge_image(x, keys, attn, idx, neighbours):
    """One image. x (N, D) features, keys (N, C) patch keys, attn list (N), idx kept list.
    Returns (tokens list of tensors, neighbour positions per kept token, pruned positions)."""
    x, keys = x.to(F64), keys.to(F64)
    N = x.shape[0]
    compl = complement_idx(idx, N)
    x_others = [x[i] for i in idx]
    a_others = [attn[i] for i in idx]
    kn_others = [keys[i] / max(float(keys[i].norm()), 1e-12) for i in idx]
    non_topk = [x[i] for i in compl]
    non_topk_attn = [attn[i] for i in compl]
    non_topk_kn = [keys[i] / max(float(keys[i].norm()), 1e-12) for i in compl]
    out, near = [], []
    for i in range(len(idx)):
        rest_x = x_others[:i] + x_others[i + 1:] + non_topk
        rest_a = a_others[:i] + a_others[i + 1:] + non_topk_attn
        rest_k = kn_others[:i] + kn_others[i + 1:] + non_topk_kn
        rest_pos = idx[:i] + idx[i + 1:] + compl
        sims = [float(kn_others[i] @ r) for r in rest_k]
        chosen = _descending(sims)[:neighbours]
        weighted = sum((rest_x[j] * rest_a[j] for j in chosen), torch.zeros_like(x[0]))
        out.append(x_others[i] + weighted)
        near.append([rest_pos[j] for j in chosen])
    extra = sum((t * w for t, w in zip(non_topk, non_topk_attn)), torch.zeros_like(x[0]))
    out.append(extra)
    return out, near, compl


# --------------------------------------------------------------------------- VisionZip
# github dvlab-research/VisionZip, visionzip/clip_encoder.py CLIPVisionTower_VisionZip.forward
# (metric: visionzip/utils.py CLIPAttention_forward returns the keys averaged over heads)

def visionzip_image(hidden, cls_attn_heads, metric, dominant, contextual):
    """hidden (T, D), cls_attn_heads (H, T) CLS rows, metric (T, Dk); dominant counts CLS.
    Returns (tokens, dominant positions, target positions, {other position: target number})."""
    hidden, metric = hidden.to(F64), metric.to(F64)
    T = hidden.shape[0]
    summed = [float(cls_attn_heads[:, t].to(F64).sum()) for t in range(1, T)]
    top = [i + 1 for i in _descending(summed)[:dominant - 1]]
    dom = [0] + top
    dom_sorted = [t for t in range(T) if t in dom]                  # masked_select keeps sequence order
    rest = [t for t in range(T) if t not in dom]
    step = max(1, len(rest) // contextual)
    target_slots = list(range(0, len(rest), step))[:contextual]
    targets = [rest[s] for s in target_slots]
    others = [rest[s] for s in range(len(rest)) if s not in target_slots]
    unit = {t: metric[t] / metric[t].norm() for t in rest}
    members = {j: [] for j in range(len(targets))}
    assign = {}
    for o in others:
        sims = [float(unit[o] @ unit[t]) for t in targets]
        best = max(range(len(targets)), key=lambda j: (sims[j], -j))  # argmax: first maximum
        members[best].append(o)
        assign[o] = best
    out = [hidden[t] for t in dom_sorted]
    for j, t in enumerate(targets):
        mem = members[j]
        mean = sum((hidden[o] for o in mem), torch.zeros_like(hidden[0])) / max(1, len(mem))
        out.append(hidden[t] + mean)
    return out, dom_sorted, targets, assign


# --------------------------------------------------------------------------- DivPrune
# github vbdi/divprune, LLaVA/llava/model/llava_arch.py: pairwise_cosine_similarity, DivPrune,
# and the caller in prepare_inputs_labels_for_multimodal (kept indices sorted)

def divprune_image(x, ratio=None, keep=None):
    """x (N, D). Returns (picks in selection order, kept positions sorted)."""
    x = x.to(F64)
    N = x.shape[0]
    terms = int(round(ratio * N)) if keep is None else keep
    unit = [x[i] / x[i].norm() for i in range(N)]
    # each pair's distance computed once, so d[i][j] == d[j][i] exactly (focusvlm's documented tie rule:
    # the mutual-nearest pair that ties for the first pick goes to the lower index)
    dist = [[0.0] * N for _ in range(N)]
    for i in range(N):
        for j in range(i, N):
            dist[i][j] = dist[j][i] = 1.0 - float(unit[i] @ unit[j])
    s = []
    for i in range(terms):
        if i == 0:
            scores = [sorted(dist[r][c] for r in range(N))[1] for c in range(N)]   # 2nd smallest per column
        else:
            scores = [min(dist[r][c] for r in s) for c in range(N)]
        s.append(max(range(N), key=lambda c: (scores[c], -c)))                   # argmax: first maximum
    return s, sorted(s)


# --------------------------------------------------------------------------- FastV
# github pkunlp-icler/FastV, src/FastV/llava-hf/transformers/src/transformers/models/llama/
# modeling_llama.py LlamaModel.fastv_forward (and the in-place path of src/transformers/.../modeling_llama.py)

def fastv_image(attn_layer, image_positions, ratio, last=None):
    """attn_layer (H, Q, Kv) of one sample; image_positions list. Head mean, last row,
    keep the round(n * (1 - R)) most attended image positions, sorted ascending."""
    H = attn_layer.shape[0]
    row = attn_layer.shape[1] - 1 if last is None else last
    avg = [sum(float(attn_layer[h, row, c]) for h in range(H)) / H for c in range(attn_layer.shape[2])]
    img_scores = [avg[p] for p in image_positions]
    n_keep = round(len(image_positions) * (1 - ratio))
    top = [image_positions[i] for i in _descending(img_scores)[:n_keep]]
    return sorted(top)


# --------------------------------------------------------------------------- FastV, the whole pruned model
# The official fastv_forward (KV-cache version) as a slow float64 re-statement on one unpadded sample:
# a Llama decoder written out (RMSNorm, rotary q/k, GQA, explicit causal softmax, SwiGLU), layer K - 1's
# attention matrix formed in full, the kept positions chosen with fastv_image, and layers K.. run on the
# kept positions only, with their ORIGINAL positions for the rotary angles and the causal rule.

def _rms(norm, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight.to(F64)


def _rotate(x, positions, inv_freq):
    angles = torch.tensor(positions, dtype=F64)[:, None] * inv_freq.to(F64)[None]     # (T, d/2)
    emb = torch.cat([angles, angles], dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * emb.cos() + rotated * emb.sin()


def _decoder_layer(layer, h, positions, inv_freq):
    """One Llama decoder layer on h (T, D) at ``positions``; returns (h, attention (H, T, T))."""
    attn = layer.self_attn
    d, T = attn.head_dim, h.shape[0]
    x = _rms(layer.input_layernorm, h)
    lin = lambda m, t: t @ m.weight.to(F64).T + (m.bias.to(F64) if m.bias is not None else 0)  # noqa: E731
    q = lin(attn.q_proj, x).view(T, -1, d).transpose(0, 1)                                     # (H, T, d)
    k = lin(attn.k_proj, x).view(T, -1, d).transpose(0, 1)
    v = lin(attn.v_proj, x).view(T, -1, d).transpose(0, 1)
    q, k = _rotate(q, positions, inv_freq), _rotate(k, positions, inv_freq)
    group = q.shape[0] // k.shape[0]
    probs, out = [], []
    for head in range(q.shape[0]):
        kv = head // group
        logits = q[head] @ k[kv].T * d ** -0.5
        allowed = torch.tensor([[pk <= pq for pk in positions] for pq in positions])
        p = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
        probs.append(p)
        out.append(p @ v[kv])
    h = h + lin(attn.o_proj, torch.cat(out, dim=-1))
    y = _rms(layer.post_attention_layernorm, h)
    mlp = layer.mlp
    h = h + lin(mlp.down_proj, torch.nn.functional.silu(lin(mlp.gate_proj, y)) * lin(mlp.up_proj, y))
    return h, torch.stack(probs)


def fastv_pruned_forward(model, input_ids, pixel_values, k, ratio, keep_image=None, image_rows=None):
    """Logits of a LLaVA model with FastV, one unpadded sample. input_ids (L,); pixel_values of its images.

    keep_image: the kept image positions to use instead of choosing them (a cached generation keeps the
    prompt's choice). image_rows (n, D): the features at the n image placeholders, given instead of encoded
    from pixel_values (AnyRes packings). Returns (logits (M, V) at the kept positions, kept positions, kept
    image positions).
    """
    core = model.model
    lm = core.language_model
    ids = input_ids.tolist()
    image_id = model.config.image_token_id
    with torch.no_grad():
        h = core.get_input_embeddings()(input_ids[None])[0].to(F64)
        images = [i for i, t in enumerate(ids) if t == image_id]
        if image_rows is not None:
            assert len(images) == image_rows.shape[0]
            h[images] = image_rows.to(F64)
        elif images:
            feats = core.get_image_features(pixel_values, vision_feature_layer=model.config.vision_feature_layer,
                                            vision_feature_select_strategy=model.config.vision_feature_select_strategy)
            h[images] = torch.cat(list(feats.pooler_output)).to(F64)
        inv_freq = lm.rotary_emb.inv_freq
        positions = list(range(len(ids)))
        attention = None
        for index, layer in enumerate(lm.layers):
            if index == k:
                if keep_image is None:
                    keep_image = fastv_image(attention, images, ratio) if images else []
                keep = sorted([p for p in positions if p not in images] + list(keep_image))
                h = h[[positions.index(p) for p in keep]]
                positions = keep
            h, attention = _decoder_layer(layer, h, positions, inv_freq)
        logits = _rms(lm.norm, h) @ model.lm_head.weight.to(F64).T
    return logits, positions, list(keep_image)
