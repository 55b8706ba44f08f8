"""CMAI attention for one decoder layer: one fused attention call, its mask inhibited on text rows.

Equation numbers refer to docs/method.md. Per layer and forward call:

1. the text rows' head-averaged, pre-inhibition attention A (C1) is computed
   in chunks of rows (and of heads when needed), so no (B, H, Qt, K) float32
   tensor is ever held: memory stays under a fixed budget whatever the head
   count and prompt length; it needs no gradient (it only picks keys);
2. the focus score (C2-C5, C10-C12) and threshold (C6) give the inhibited
   image keys of each text row (C7);
3. ONE attention call computes every row (C8): the stock kernel with a mask
   that is the stock mask everywhere except on text rows, where the
   inhibited image keys are hidden. Rows the method leaves alone (image rows,
   text before the first image) therefore come out of the stock kernel with
   the stock mask values: bit-identical to the stock model where the kernel
   allows (CPU SDPA and eager); no row is computed twice.

On a CPU the stock SDPA call for an unpadded prompt is a causal flash call
that skips the blocks above the diagonal; passing a mask instead would lose
that. The flash CPU kernel accepts a causal flag and an additive mask
together, so the fused call keeps the stock kernel, the causal skipping and
its bits, and adds only -inf at the inhibited keys.

A decode step (one text row per sample) takes a lean path: a few ops per
layer on (B, 1, K) tensors, precomputed per-call indices, no host
synchronisation, fixed shapes under a static cache. Its per-head
probabilities are small, so C8 reuses them when no sample needs the stock
kernel's bits.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from .focus import inhibition_mask, matmul, quantile_positions
from .state import CallPlan, CMAIState, DecodeThreshold, RowChunk, chunk_budget

# the plan travels with the forward call as a keyword argument the language model hands to every layer
PLAN_KWARG = "focusvlm_cmai_plan"

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BACKEND = 1  # torch.nn.attention.SDPBackend.FLASH_ATTENTION, as torch._fused_sdp_choice reports it


class LayerLink:
    """What a patched attention module needs: the shared state, its own gamma, the stock function."""

    def __init__(self, state: CMAIState, gamma: float, base: Callable, implementation: str = "sdpa"):
        self.state = state
        self.gamma = gamma
        self.base = base
        self.implementation = implementation
        # the stock functions that take a 4-D mask (flash / flex kernels take none or their own)
        self.takes_mask = implementation in ("sdpa", "eager")


def cmai_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs):
    """Attention function registered with transformers' AttentionInterface."""
    link: LayerLink = module._focusvlm_cmai
    plan: CallPlan | None = kwargs.pop(PLAN_KWARG, None) or link.state.plan
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    want_weights = bool(kwargs.get("output_attentions"))
    if link.gamma <= 0.0 or plan is None:
        if want_weights:
            return explicit_attention(query, key, value, stock_allowed(attention_mask, query, key), scaling,
                                      kwargs.get("dropout", 0.0), module.training)
        return link.base(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if plan.q_len != query.shape[2]:
        raise RuntimeError(f"CMAI planned a call of {plan.q_len} new positions but layer {module.layer_idx} got "
                           f"{query.shape[2]}: the language model was called without the patched model's inputs")
    if plan.decode is not None:
        return _decode_attention(link, plan, module, query, key, value, attention_mask, scaling, kwargs, want_weights)
    return _prefill_attention(link, plan, module, query, key, value, attention_mask, scaling, kwargs, want_weights)


# --------------------------------------------------------------------------- prefill

def head_mean_attention(q_rows: torch.Tensor, key: torch.Tensor, scaling: float, hidden: torch.Tensor | None,
                        budget: int, hidden_from: int = 0) -> torch.Tensor:
    """C1 for some query rows: softmax(q k^T * scaling, hidden keys -inf) averaged over heads, (B, R, Kc) float32.

    q_rows (B, H, R, D), key (B, Hkv, Kc, D) (GQA: each key head serves H / Hkv query heads);
    ``hidden`` (B, R, Kc - hidden_from) marks the keys each row must not see among keys ``hidden_from`` and
    later (every row sees the earlier ones). Heads are taken a few key heads at a time so the float32 block
    stays under ``budget`` elements.
    """
    b, h, r, d = q_rows.shape
    hkv, kc = key.shape[1], key.shape[2]
    group = h // hkv
    hidden = None if hidden is None else hidden.unsqueeze(1)      # (B, 1, R, Kc - hidden_from)
    step = max(1, min(hkv, budget // max(1, b * group * r * kc)))
    total = None
    for k0 in range(0, hkv, step):
        k1 = min(hkv, k0 + step)
        # scale the few query rows, not the (R x Kc) scores: a pass over a D-wide tensor instead of a Kc-wide one
        qg = (q_rows[:, k0 * group:k1 * group] * scaling).reshape(b, k1 - k0, group * r, d)
        scores = torch.matmul(qg, key[:, k0:k1].transpose(-1, -2)).view(b, (k1 - k0) * group, r, kc)
        scores = scores.float() if scores.dtype != torch.float32 else scores
        if hidden is not None:
            scores[..., hidden_from:].masked_fill_(hidden, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if step == hkv:
            return probs.mean(dim=1)
        part = probs.sum(dim=1)
        total = part if total is None else total.add_(part)
    return total.div_(h)


def _chunk_hidden(plan: CallPlan, chunk: RowChunk, stock_mask: torch.Tensor | None) -> tuple[torch.Tensor | None, int]:
    """Keys the chunk's text rows do not see in the stock model (causal + padding), as (hidden, hidden_from)."""
    s, e, kc = chunk.start, chunk.stop, chunk.key_stop
    q_pos = plan.query.pos[:, s:e]
    if stock_mask is None:
        # causal only: every key below the chunk's first row is seen by all its rows, so only the short
        # triangle beyond it needs masking
        lo = chunk.key_first_hidden
        if lo >= kc:
            return None, kc
        hidden = torch.arange(lo, kc, device=q_pos.device) > q_pos.unsqueeze(-1)
        hidden_from = lo
    elif stock_mask.dim() == 4:
        batch = torch.arange(q_pos.shape[0], device=q_pos.device).unsqueeze(1)
        rows = stock_mask[batch, 0, plan.slot[:, s:e], :kc]
        # an additive mask: its minimum (or -inf) hides a key, anything else keeps it
        hidden = ~rows if rows.dtype == torch.bool else rows <= torch.finfo(rows.dtype).min / 2
        hidden_from = 0
    else:  # a 2-D padding mask (flash-style implementations)
        hidden = (torch.arange(kc, device=q_pos.device) > q_pos.unsqueeze(-1)) | ~stock_mask[:, None, :kc].bool()
        hidden_from = 0
    if chunk.take is not None:  # padded slots see every key: their row stays finite and is never used
        hidden = hidden & plan.query.valid[:, s:e].unsqueeze(-1)
    return hidden, hidden_from


def _prefill_attention(link, plan: CallPlan, module, query, key, value, stock_mask, scaling, kwargs, want_weights):
    layer, gamma, focus = module.layer_idx, link.gamma, plan.focus
    images = plan.images
    batch, heads, _, dim = query.shape
    fused = FusedMask.for_layer(link, plan, stock_mask, query, key, want_weights, kwargs.get("dropout", 0.0))
    count = plan.query.pos.shape[1]
    if plan.keep_rows:
        rows_store = plan.store.layer_rows(layer)[:, 0]                   # (B, C, N), shared with later calls
        known_pos = plan.store.pos
    else:
        rows_store = torch.zeros(batch, count, images.count, device=query.device)
        known_pos = plan.query.pos
    start = plan.row_start
    budget = chunk_budget(query.device)
    with torch.no_grad():
        for chunk in plan.chunks:
            s, e, kc = chunk.start, chunk.stop, chunk.key_stop
            q_pos = plan.query.pos[:, s:e]
            slot = plan.slot[:, s:e]
            q_rows = query.gather(2, slot[:, None, :, None].expand(batch, heads, e - s, dim))
            hidden, hidden_from = _chunk_hidden(plan, chunk, stock_mask)
            a = head_mean_attention(q_rows, key[:, :, :kc], scaling, hidden, budget, hidden_from)   # (B, R, Kc) C1
            # C6's visible set: image keys at or before the row (padded image slots and rows: none)
            visible = (images.valid.unsqueeze(1) & (images.pos.unsqueeze(1) <= q_pos.unsqueeze(2))
                       & plan.query.valid[:, s:e].unsqueeze(2))            # (B, R, N)
            if images.padded:
                # padded image slots point at the row's own key: never an image key, so writes there collide with none
                img_index = torch.where(images.valid.unsqueeze(1), images.pos.unsqueeze(1), q_pos.unsqueeze(2))
            else:
                img_index = images.pos.unsqueeze(1).expand(batch, e - s, images.count)
            # image keys beyond the chunk's last row (a later image) are invisible to all its rows
            a_img = a.gather(2, img_index if images.last < kc else img_index.clamp(max=kc - 1))
            a_img = a_img * visible                                         # C2 (0 where the row cannot see)
            rows_store[:, start + s:start + e] = a_img
            known = start + e
            a_text = None
            if focus.reads_text_attention:
                # every row known so far (earlier calls, earlier chunks, this chunk) sits at a key below kc
                a_text = a.gather(2, known_pos[:, None, :known].expand(batch, e - s, known))
            relation = None if plan.relation is None else plan.relation[:, s:e, :known]
            score = focus.score(a_img, a_text, rows_store[:, :known], relation)   # C5 / C10-C12
            blocked = inhibition_mask(score, visible, gamma, chunk.visible_count)  # C6, C7
            hide = torch.zeros(batch, e - s, fused.width, dtype=torch.bool, device=query.device)
            fused.write(chunk, hide.scatter_(2, img_index, blocked))
    return fused.attend(link, module, query, key, value, scaling, kwargs)


class FusedMask:
    """The mask of a layer's single attention call (C8): stock values, inhibited keys hidden on text rows.

    kind "causal": the CPU flash kernel's causal flag carries the stock mask; the tensor is additive, zero
        except -inf at inhibited keys (the stock call had no mask: an unpadded prompt);
    kind "bool": a boolean mask, the stock one (or causal + padding) with inhibited keys cleared;
    kind "additive": the stock additive mask (eager) with the stock's fill value at inhibited keys.
    Every text row is rewritten on every layer, so one tensor serves all layers of a call in inference.
    """

    def __init__(self, kind: str, tensor: torch.Tensor, base: torch.Tensor | None, fill: Any, width: int):
        self.kind, self.tensor, self.base, self.fill, self.width = kind, tensor, base, fill, width

    @classmethod
    def for_layer(cls, link: LayerLink, plan: CallPlan, stock_mask, query, key, want_weights: bool,
                  dropout: float) -> "FusedMask":
        batch, q_len, k_len = query.shape[0], query.shape[2], key.shape[2]
        reuse = not torch.is_grad_enabled()   # autograd may keep a layer's mask for backward: never overwrite it
        ws = plan.workspace.masks
        if (stock_mask is None and link.implementation == "sdpa" and not want_weights and _FLASH_CPU is not None
                and query.device.type == "cpu" and _picks_flash(query, key, dropout)):
            width = q_len  # stock SDPA crops an empty static cache's keys to the queries for its causal call
            tensor = ws.get("causal") if reuse else None
            if tensor is None:
                tensor = torch.zeros(batch, 1, q_len, width, dtype=query.dtype, device=query.device)
                if reuse:
                    ws["causal"] = tensor
            return cls("causal", tensor, None, float("-inf"), width)
        if stock_mask is not None and stock_mask.dim() == 4 and stock_mask.dtype != torch.bool:
            tensor = ws.get("additive") if reuse else None
            if tensor is None:
                tensor = stock_mask.clone()
                if reuse:
                    ws["additive"] = tensor
            return cls("additive", tensor, stock_mask, torch.finfo(stock_mask.dtype).min, k_len)
        base = ws.get("bool_base")
        if base is None:
            base = stock_allowed(stock_mask, query, key)
            ws["bool_base"] = base
        tensor = ws.get("bool") if reuse else None
        if tensor is None:
            tensor = base.expand(batch, 1, q_len, k_len).clone()
            if reuse:
                ws["bool"] = tensor
        return cls("bool", tensor, base, False, k_len)

    def write(self, chunk: RowChunk, hide: torch.Tensor) -> None:
        """Install one chunk's text rows: ``hide`` (B, R, width) marks their inhibited keys."""
        hide = hide.reshape(-1, self.width)
        if chunk.take is not None:
            hide = hide.index_select(0, chunk.take)
        if self.kind == "causal":
            rows = torch.zeros(hide.shape, dtype=self.tensor.dtype, device=hide.device).masked_fill_(hide, self.fill)
        elif self.kind == "bool":
            rows = self.base.expand(self.tensor.shape)[chunk.mask_sample, 0, chunk.mask_row] & ~hide
        else:
            rows = self.base[chunk.mask_sample, 0, chunk.mask_row].masked_fill(hide, self.fill)
        self.tensor[chunk.mask_sample, 0, chunk.mask_row] = rows

    def attend(self, link: LayerLink, module, query, key, value, scaling, kwargs):
        dropout = kwargs.get("dropout", 0.0)
        if kwargs.get("output_attentions"):
            return explicit_attention(query, key, value, self.tensor, scaling, dropout, module.training)
        if self.kind == "causal":
            group = query.shape[1] // key.shape[1]
            key, value = _repeat_kv(key[:, :, :self.width], group), _repeat_kv(value[:, :, :self.width], group)
            out = _FLASH_CPU(query, key, value, dropout, True, attn_mask=self.tensor, scale=scaling)[0]
            return out.transpose(1, 2).contiguous(), None
        if link.takes_mask:
            return link.base(module, query, key, value, self.tensor, scaling=scaling, **kwargs)
        return _sdpa(query, key, value, self.tensor, scaling, dropout), None


def _picks_flash(query: torch.Tensor, key: torch.Tensor, dropout: float) -> bool:
    """Whether SDPA would run the stock (unmasked, causal) call on the flash kernel: then ours may too."""
    try:
        return torch._fused_sdp_choice(query, key, key, None, dropout, True, scale=None,
                                       enable_gqa=query.shape[1] != key.shape[1]) == _FLASH_BACKEND
    except (RuntimeError, TypeError):
        return False


def _repeat_kv(t: torch.Tensor, group: int) -> torch.Tensor:
    if group == 1:
        return t
    b, h, s, d = t.shape
    return t[:, :, None].expand(b, h, group, s, d).reshape(b, h * group, s, d)


def _sdpa(query, key, value, allowed, scaling, dropout) -> torch.Tensor:
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, dropout_p=dropout, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous()


def stock_allowed(stock_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The stock mask as (B or 1, 1, Q, K) bool: what every row may attend to without CMAI."""
    q_len, k_len = query.shape[2], key.shape[2]
    if stock_mask is not None and stock_mask.dim() == 4:
        return stock_mask if stock_mask.dtype == torch.bool else stock_mask > torch.finfo(stock_mask.dtype).min / 2
    # no mask: causal. Queries are the last q_len keys, except in a prefill into an empty static cache, where the
    # keys run on past the queries (stock SDPA crops them there, as transformers only skips the mask then)
    diagonal = 0 if q_len > 1 else k_len - q_len
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(diagonal=diagonal)
    causal = causal.view(1, 1, q_len, k_len)
    if stock_mask is not None:  # 2-D padding mask
        causal = causal & stock_mask[:, None, None, :k_len].bool()
    return causal


def explicit_attention(query, key, value, mask: torch.Tensor, scaling: float, dropout: float, training: bool):
    """Attention with its weights, as transformers' eager attention computes them (for output_attentions)."""
    group = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, group), _repeat_kv(value, group)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


# --------------------------------------------------------------------------- decode

def _decode_attention(link, plan: CallPlan, module, query, key, value, stock_mask, scaling, kwargs, want_weights):
    """One new text row per sample: the same equations on (B, 1, ...) tensors, every index precomputed."""
    step, store, layer = plan.decode, plan.store, module.layer_idx
    batch, heads, _, dim = query.shape
    group = heads // key.shape[1]
    with torch.no_grad():
        q = query * scaling
        if torch.compiler.is_compiling():
            queries = q if group == 1 else q.view(batch, key.shape[1], group, dim)
            scores = matmul(queries, key.transpose(-1, -2))
        elif group == 1:
            scores = torch.einsum("bhqd,bhkd->bhqk", q, key)                            # (B, H, 1, K)
        else:
            scores = torch.einsum("bhgd,bhkd->bhgk", q.view(batch, key.shape[1], group, dim), key)
        raw = scores
        if stock_mask is not None:  # C1 masks keys the stock way: padding, and a static cache's empty slots
            scores = (torch.where(stock_mask, scores, float("-inf")) if stock_mask.dtype == torch.bool
                      else scores + stock_mask)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        a = probs.mean(dim=(1, 2), keepdim=True)                                              # (B, 1, 1, K) C1
        constants = step.constants
        a_img = a.gather(-1, constants.img_index)                                             # (B, 1, 1, N) C2
        rows = store.layer_rows(layer)                                                        # (B, 1, C, N)
        rows.index_copy_(2, step.write_index, a_img)                                          # C13
        a_text = a.gather(-1, step.text_index) if plan.focus.reads_text_attention else None
        if constants.img_pad is not None:  # padded image slots rank last and are never inhibited
            a_img = a_img + constants.img_pad
        score = plan.focus.score(a_img, a_text, rows, plan.relation)                         # C5 / C10-C12
        threshold = constants.thresholds.get(layer)
        if threshold is None:  # a state built without the model's gammas (direct use of the layer function)
            at = quantile_positions(store.images.valid.sum(dim=1).view(batch, 1, 1), link.gamma, store.images.count)
            threshold = constants.thresholds[layer] = DecodeThreshold(at.lo, at.hi, at.weight)
        kept = score >= threshold(score)                                                      # C6, C7
        if stock_mask is None:
            base = plan.workspace.masks.get("ones")
            if base is None:
                base = plan.workspace.masks["ones"] = torch.ones(batch, 1, 1, key.shape[2], dtype=torch.bool,
                                                                 device=query.device)
            mask = base.scatter(-1, constants.img_index, kept)
        else:
            if stock_mask.shape[0] != batch:  # a mask shared by the batch
                stock_mask = stock_mask.expand(batch, *stock_mask.shape[1:])
            if stock_mask.dtype == torch.bool:
                mask = stock_mask.scatter(-1, constants.img_index, kept)
            else:
                fill = torch.finfo(stock_mask.dtype).min
                mask = stock_mask.scatter(-1, constants.img_index, torch.where(kept, 0.0, fill).to(stock_mask.dtype))
    dropout = kwargs.get("dropout", 0.0)
    if want_weights:
        return explicit_attention(query, key, value, mask, scaling, dropout, module.training)
    if constants.every_sample_has_image and not torch.is_grad_enabled() and not (module.training and dropout):
        # C8 from the scores C1 already computed: their softmax over the allowed keys, then one small matmul
        # with V instead of a second attention call that reads every cached key again (no sample needs the
        # stock kernel's bits: every one has an image, so every decode row is inhibited). Two ops; renormalising
        # the C1 probabilities instead would take three
        masked = torch.where(mask, raw, float("-inf")) if mask.dtype == torch.bool else raw + mask
        weights = torch.softmax(masked, dim=-1, dtype=torch.float32)
        if weights.dtype != value.dtype:
            weights = weights.to(value.dtype)
        out = matmul(weights, value)                                                          # (B, Hkv, g, D)
        return out.view(batch, heads, 1, dim).transpose(1, 2), None
    if link.takes_mask:
        return link.base(module, query, key, value, mask, scaling=scaling, **kwargs)
    return _sdpa(query, key, value, mask, scaling, dropout), None


__all__ = ["LayerLink", "PLAN_KWARG", "cmai_attention_forward", "explicit_attention", "head_mean_attention",
           "stock_allowed"]
