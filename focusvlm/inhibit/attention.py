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

Everything that depends only on the call (index maps, the causal triangle,
C6's interpolation positions for every layer's gamma, views of the row
store) comes from the call's plan (state.py) or is built by the first layer
that needs it and kept in the call's workspace; no layer reads a tensor value
back to the host.

A decode step (one text row per sample) takes a lean path: a dozen ops per
layer on (B, 1, K) tensors, buffers and views made once per sequence, no host
synchronisation, fixed shapes under a static cache. One gather takes the
row's weights on the image keys and on every stored text row; F is one fused
multiply-add; the threshold one partial selection; C8 one attention call with
the inhibited mask. (Renormalising C1's probabilities instead of that call
reads the keys once less, which a CPU notices at long contexts, but takes
three ops where the call takes one: on a GPU, where a decode step is bound by
kernel launches, the call wins.)
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from .focus import SelectedQuantile, matmul, quantile_positions_per_gamma
from .state import CallPlan, CMAIState, DecodeThreshold, RowChunk, SortedQuantile, chunk_budget

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
    return _head_mean(q_rows, key, scaling, None if hidden is None else hidden.unsqueeze(1), budget, hidden_from)


def _head_mean(q_rows, key, scaling, hidden, budget, hidden_from):
    """``head_mean_attention`` with ``hidden`` already (B, 1, R, W): the per-call shape the plan keeps."""
    b, h, r, d = q_rows.shape
    hkv, kc = key.shape[1], key.shape[2]
    group = h // hkv
    step = max(1, min(hkv, budget // max(1, b * group * r * kc)))
    if step == hkv:   # every head in one block (the usual case): no slicing, no reshaping when there is no GQA
        # scale the few query rows, not the (R x Kc) scores: a pass over a D-wide tensor instead of a Kc-wide one
        qg = q_rows * scaling
        if group > 1:
            qg = qg.view(b, hkv, group * r, d)
        scores = torch.matmul(qg, key.transpose(-1, -2))
        if group > 1:
            scores = scores.view(b, h, r, kc)
        scores = scores.float() if scores.dtype != torch.float32 else scores
        if hidden is not None:
            (scores if hidden_from == 0 else scores[..., hidden_from:]).masked_fill_(hidden, float("-inf"))
        return torch.softmax(scores, dim=-1).mean(dim=1)
    total = None
    for k0 in range(0, hkv, step):
        k1 = min(hkv, k0 + step)
        qg = (q_rows[:, k0 * group:k1 * group] * scaling).reshape(b, k1 - k0, group * r, d)
        scores = torch.matmul(qg, key[:, k0:k1].transpose(-1, -2)).view(b, (k1 - k0) * group, r, kc)
        scores = scores.float() if scores.dtype != torch.float32 else scores
        if hidden is not None:
            scores[..., hidden_from:].masked_fill_(hidden, float("-inf"))
        part = torch.softmax(scores, dim=-1).sum(dim=1)
        total = part if total is None else total.add_(part)
    return total.div_(h)


def _chunk_hidden(chunk: RowChunk, stock_mask: torch.Tensor | None, batch_index: torch.Tensor,
                  ) -> tuple[torch.Tensor | None, int]:
    """Keys the chunk's text rows do not see in the stock model (causal + padding), as ((B, 1, R, W), hidden_from)."""
    kc, q_pos = chunk.key_stop, chunk.q_pos
    if stock_mask is None:
        # causal only: every key below the chunk's first row is seen by all its rows, so only the short
        # triangle beyond it needs masking
        lo = chunk.key_first_hidden
        if lo >= kc:
            return None, kc
        hidden = torch.arange(lo, kc, device=q_pos.device) > q_pos.unsqueeze(-1)
        hidden_from = lo
    elif stock_mask.dim() == 4:
        rows = stock_mask[batch_index.view(-1, 1), 0, chunk.slot, :kc] if stock_mask.shape[0] > 1 else \
            stock_mask[0, 0, chunk.slot, :kc]
        # an additive mask: its minimum (or -inf) hides a key, anything else keeps it
        hidden = ~rows if rows.dtype == torch.bool else rows <= torch.finfo(rows.dtype).min / 2
        hidden_from = 0
    else:  # a 2-D padding mask (flash-style implementations)
        hidden = (torch.arange(kc, device=q_pos.device) > q_pos.unsqueeze(-1)) | ~stock_mask[:, None, :kc].bool()
        hidden_from = 0
    if chunk.q_valid is not None:  # padded slots see every key: their row stays finite and is never used
        hidden = hidden & chunk.q_valid.unsqueeze(-1)
    return hidden.unsqueeze(1), hidden_from


def _shared(plan: CallPlan, key: Any, build: Callable[[], Any]) -> Any:
    """What every layer of the call would build alike: built by the first, kept in the call's workspace."""
    found = plan.workspace.masks.get(key)
    if found is None:
        found = plan.workspace.masks[key] = build()
    return found


def _row_views(plan: CallPlan, chunk: RowChunk, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(where the chunk's A_t2i rows go, every row known so far) of one layer."""
    out = chunk.rows_out.get(layer if plan.keep_rows else None)
    if out is not None:
        return out, chunk.rows_known[layer if plan.keep_rows else None]
    # a layer the plan was not made for (a state built without the model's gammas)
    rows = plan.store.layer_rows(layer)
    a, b = plan.row_start + chunk.start, plan.row_start + chunk.stop
    return rows[:, a:b], rows[:, :b]


def _late_threshold(plan: CallPlan, chunk: RowChunk, gamma: float, layer: int) -> Callable:
    """C6 of a layer the plan has no positions for (a state built without the model's gammas)."""
    n = plan.images.count
    if chunk.visible_count is not None:
        found = SelectedQuantile.build(chunk.visible_count, gamma, n, chunk.q_pos.device)
    else:
        found = SortedQuantile(quantile_positions_per_gamma(chunk.visible.sum(dim=-1), [gamma], n)[0])
    chunk.thresholds[layer] = found
    return found


def _prefill_attention(link, plan: CallPlan, module, query, key, value, stock_mask, scaling, kwargs, want_weights):
    layer, focus = module.layer_idx, plan.focus
    batch, heads, _, dim = query.shape
    fused = FusedMask.for_layer(link, plan, stock_mask, query, key, want_weights, kwargs.get("dropout", 0.0))
    fused.plan = plan
    budget = chunk_budget(query.device)
    with torch.no_grad():
        for i, chunk in enumerate(plan.chunks):
            kc = chunk.key_stop
            q_index = _shared(plan, ("q_index", i, heads, dim),
                              lambda: chunk.slot[:, None, :, None].expand(batch, heads, chunk.stop - chunk.start, dim))
            # keyed by the stock mask (every layer of a call gets the same one); the entry holds it, so its id stays
            hidden, hidden_from, _ = _shared(plan, ("hidden", i, id(stock_mask)),
                                             lambda: (*_chunk_hidden(chunk, stock_mask, plan.batch_index), stock_mask))
            keys = key if kc == key.shape[2] else key[:, :, :kc]
            out, known_rows = _row_views(plan, chunk, layer)
            threshold = chunk.thresholds.get(layer) or _late_threshold(plan, chunk, link.gamma, layer)
            args = (query, keys, scaling, q_index, hidden, hidden_from, budget, chunk.img_gather, chunk.visible,
                    chunk.text_index if focus.reads_text_attention else None)
            rest = (known_rows, chunk.relation, chunk.invisible, threshold, focus)
            backend = link.state.compiled_prefill
            if backend:   # the rows leave the compiled region as an output (a graph input view cannot take them)
                blocked, a_img = compiled_chunk(backend)(*args, None, *rest)
                out.copy_(a_img)
            else:
                blocked = chunk_blocked(*args, out, *rest)
            fused.write(plan, i, chunk, blocked)
    return fused.attend(link, module, query, key, value, scaling, kwargs)


def chunk_blocked(query, keys, scaling, q_index, hidden, hidden_from, budget, img_gather, visible, text_index, out,
                  known_rows, relation, invisible, threshold, focus) -> torch.Tensor:
    """C1-C7 of one chunk of text rows in one layer: which image keys each row stops attending to, (B, R, N) bool.

    A pure function of its tensors and the plan's per-call constants (index maps, hidden keys, quantile
    positions), so that the compiled path can compile it regionally (``compiled_chunk``). The rows' A_t2i go
    into ``out`` (the layer's row store); with ``out=None`` (compiled) they are returned: (blocked, rows).
    """
    q_rows = query.gather(2, q_index)
    a = _head_mean(q_rows, keys, scaling, hidden, budget, hidden_from)     # (B, R, Kc) C1
    if out is None:   # compiled: the rows are an output, not written into the store (an input view of it)
        a_img = a.gather(2, img_gather) if visible is None else a.gather(2, img_gather) * visible
        # the rows known so far end with this chunk's: the focus score reads them as they are now
        known_rows = torch.cat([known_rows[:, :known_rows.shape[1] - a_img.shape[1]], a_img], dim=1)
    elif visible is None:   # C2, written straight into the layer's rows
        a_img = torch.gather(a, 2, img_gather, out=out)
    else:                   # C2, 0 where the row cannot see the key (padded slots and rows included)
        a_img = torch.mul(a.gather(2, img_gather), visible, out=out)
    a_text = a.gather(2, text_index) if text_index is not None else None
    score = focus.score(a_img, a_text, known_rows, relation)           # C5 / C10-C12
    if invisible is not None:   # C6 ranks only the image keys the row sees
        score = score.masked_fill(invisible, float("inf"))
    # C7: keys below the row's quantile; an unseen key (+inf) never is, whatever the threshold
    blocked = score < threshold(score)
    return blocked if out is not None else (blocked, a_img)


_COMPILED: dict[str, Callable] = {}


def compiled_chunk(backend: str) -> Callable:
    """``chunk_blocked`` through torch.compile, made once per process and backend: dynamic over the prompt's
    length and the number of text rows, so a new prompt does not recompile (SPEC "Compiled and fused paths")."""
    found = _COMPILED.get(backend)
    if found is None:
        found = _COMPILED[backend] = torch.compile(chunk_blocked, dynamic=True, backend=backend)
    return found


class FusedMask:
    """The mask of a layer's single attention call (C8): stock values, inhibited keys hidden on text rows.

    kind "causal": the CPU flash kernel's causal flag carries the stock mask; the tensor is additive, zero
        except -inf at inhibited keys (the stock call had no mask: an unpadded prompt);
    kind "bool": a boolean mask, the stock one (or causal + padding) with inhibited keys cleared;
    kind "additive": the stock additive mask (eager) with the stock's fill value at inhibited keys.
    Every (text row, image slot) pair is rewritten on every layer, so one tensor serves all layers of a call in
    inference; a layer writes its pairs with one indexed write at positions the plan fixed.
    """

    def __init__(self, kind: str, tensor: torch.Tensor, base: torch.Tensor | None, fill: Any, width: int,
                 rows: torch.Tensor):
        self.kind, self.tensor, self.base, self.fill, self.width = kind, tensor, base, fill, width
        self.rows = rows   # the tensor as (B, Q, width): what the indexed writes address
        self.plan: CallPlan | None = None

    @classmethod
    def for_layer(cls, link: LayerLink, plan: CallPlan, stock_mask, query, key, want_weights: bool,
                  dropout: float) -> "FusedMask":
        batch, q_len, k_len = query.shape[0], query.shape[2], key.shape[2]
        reuse = not torch.is_grad_enabled()   # autograd may keep a layer's mask for backward: never overwrite it
        ws = plan.workspace.masks
        if (stock_mask is None and link.implementation == "sdpa" and not want_weights and _FLASH_CPU is not None
                and query.device.type == "cpu"
                and _shared(plan, ("flash", tuple(query.shape), tuple(key.shape), query.dtype, dropout),
                            lambda: _picks_flash(query, key, dropout))):
            width = q_len  # stock SDPA crops an empty static cache's keys to the queries for its causal call
            found = ws.get("causal") if reuse else None
            if found is None:
                tensor = torch.zeros(batch, 1, q_len, width, dtype=query.dtype, device=query.device)
                found = (tensor, tensor.view(batch, q_len, width))
                if reuse:
                    ws["causal"] = found
            return cls("causal", found[0], None, float("-inf"), width, found[1])
        if stock_mask is not None and stock_mask.dim() == 4 and stock_mask.dtype != torch.bool:
            found = ws.get("additive") if reuse else None
            if found is None:
                tensor = stock_mask.expand(batch, *stock_mask.shape[1:]).clone()
                found = (tensor, tensor.view(batch, tensor.shape[2], tensor.shape[3]))
                if reuse:
                    ws["additive"] = found
            return cls("additive", found[0], stock_mask, torch.finfo(stock_mask.dtype).min, k_len, found[1])
        base = ws.get("bool_base")
        if base is None:
            base = stock_allowed(stock_mask, query, key)
            ws["bool_base"] = base
        found = ws.get("bool") if reuse else None
        if found is None:
            tensor = base.expand(batch, 1, q_len, k_len).clone()
            found = (tensor, tensor.view(batch, q_len, k_len))
            if reuse:
                ws["bool"] = found
        return cls("bool", found[0], base, False, k_len, found[1])

    def _pair_values(self, plan: CallPlan, i: int, chunk: RowChunk) -> torch.Tensor:
        """The stock mask's values at the chunk's (row, image slot) pairs (zeros for the causal kind)."""
        if self.kind == "causal":
            n = plan.images.count
            return torch.zeros(plan.batch_index.shape[0], chunk.stop - chunk.start, n, dtype=self.tensor.dtype,
                               device=self.tensor.device)
        b, s, k = chunk.write_index
        base = self.base.expand(b.shape[0], 1, *self.base.shape[2:])
        return base[b, 0, s, k]

    def write(self, plan: CallPlan, i: int, chunk: RowChunk, blocked: torch.Tensor) -> None:
        """Install one chunk's text rows: ``blocked`` (B, R, N) marks their inhibited image slots."""
        stock, _ = _shared(plan, ("pairs", i, self.kind, id(self.base)),
                           lambda: (self._pair_values(plan, i, chunk), self.base))
        self.rows.index_put_(chunk.write_index, stock.masked_fill(blocked, self.fill))

    def attend(self, link: LayerLink, module, query, key, value, scaling, kwargs):
        dropout = kwargs.get("dropout", 0.0)
        if kwargs.get("output_attentions"):
            return explicit_attention(query, key, value, self.tensor, scaling, dropout, module.training)
        if self.kind == "causal":
            heads, kv_heads = query.shape[1], key.shape[1]
            if key.shape[2] != self.width:
                key, value = key[:, :, :self.width], value[:, :, :self.width]
            if heads != kv_heads:   # the flash kernel takes no GQA: each query head's key head, one op per tensor
                head_of = _shared(self.plan, ("kv_head", heads, kv_heads),
                                  lambda: torch.arange(heads, device=key.device) // (heads // kv_heads))
                key, value = key.index_select(1, head_of), value.index_select(1, head_of)
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
    """One new text row per sample: the same equations on (B, 1, ...) tensors, every index and buffer precomputed."""
    step, store, layer = plan.decode, plan.store, module.layer_idx
    views, constants = step.views, step.constants
    batch, heads = query.shape[:2]
    group = heads // key.shape[1]
    compiling = torch.compiler.is_compiling()
    if layer not in views.found:
        _late_decode_layer(store, views, layer, compiling)
    with torch.no_grad():
        a = _decode_text_attention(query, key, stock_mask, scaling, compiling)              # (B, K) C1
        # C2 and the weights on every stored text row (C13) in one gather, into the buffer the next call stores
        found = views.found[layer]
        if compiling:
            found.copy_(a.gather(1, step.index))
        else:
            torch.gather(a, 1, step.index, out=found)
            store.pending_layers.add(layer)
        score = _decode_focus_score(plan, layer, compiling)
        threshold = constants.thresholds.get(layer) or _late_decode_threshold(plan, layer, link.gamma, score.device)
        kept = score >= threshold(score)                                                      # C6, C7
        mask = _decode_mask(plan, kept, stock_mask, batch, key)
    dropout = kwargs.get("dropout", 0.0)
    if want_weights:
        return explicit_attention(query, key, value, mask, scaling, dropout, module.training)
    if constants.every_sample_has_image and not (module.training and dropout):
        # C8 in one attention call (no sample needs the stock kernel's bits: every one has an image, so every
        # decode row is inhibited); GQA without repeating the keys
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                             enable_gqa=group > 1)
        return out.transpose(1, 2), None
    if link.takes_mask:
        return link.base(module, query, key, value, mask, scaling=scaling, **kwargs)
    return _sdpa(query, key, value, mask, scaling, dropout), None


def _decode_text_attention(query, key, stock_mask, scaling, compiling: bool) -> torch.Tensor:
    """(B, K) C1: the decode row's attention over every key, averaged over heads (GQA without repeating keys)."""
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    q = query * scaling
    if compiling:
        scores = matmul(q if group == 1 else q.view(batch, kv_heads, group, dim), key.transpose(-1, -2))
    elif group == 1:
        scores = torch.einsum("bhqd,bhkd->bhqk", q, key)                            # (B, H, 1, K)
    else:
        scores = torch.einsum("bhgd,bhkd->bhgk", q.view(batch, kv_heads, group, dim), key)
    if stock_mask is not None:  # C1 masks keys the stock way: padding, and a static cache's empty slots
        scores = (torch.where(stock_mask, scores, float("-inf")) if stock_mask.dtype == torch.bool
                  else scores + stock_mask)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).mean(dim=(1, 2))


def _decode_focus_score(plan: CallPlan, layer: int, compiling: bool) -> torch.Tensor:
    """(B, 1, 1, N) the decode row's focus score of every image key (C4, C5; C10-C12 by the variant)."""
    step, focus = plan.decode, plan.focus
    views, constants = step.views, step.constants
    a_img = views.a_img[layer]                                                            # (B, 1, N)
    if constants.img_pad is not None:  # padded image slots rank last and are never inhibited
        a_img = a_img + constants.img_pad
    weights = focus.step_weights(views.a_text[layer], plan.relation)
    if weights is None:                                                                   # C10
        return views.a_img4[layer] if constants.img_pad is None else a_img.unsqueeze(1)
    if weights is NotImplemented:   # a registered variant: its own score over the rows, this one's included
        rows = views.rows[layer].clone()
        if isinstance(step.write_index, int):
            rows[:, step.write_index] = views.a_img[layer][:, 0]
        else:
            rows.index_copy_(1, step.write_index, views.a_img[layer])
        return focus.score(a_img, views.a_text[layer], rows, plan.relation).unsqueeze(1)
    if compiling:
        # a sum over the rows, not a bmm: inductor fuses it into the kernel that computes the weights (C1, C2),
        # where a bmm would be one more kernel launch per layer
        return (a_img + (weights.transpose(-1, -2) * views.rows[layer]).sum(dim=1, keepdim=True)).unsqueeze(1)
    # C4 + C5 (C11, C12): a_img + weights @ earlier rows, one fused op into a buffer of fixed shape
    torch.baddbmm(a_img, weights, views.rows[layer], out=views.score3)
    return views.score


def _decode_mask(plan: CallPlan, kept: torch.Tensor, stock_mask, batch: int, key: torch.Tensor) -> torch.Tensor:
    """The stock mask with the image keys each row does not keep masked out (C7)."""
    step, constants = plan.decode, plan.decode.constants
    if stock_mask is None:   # the call's all-True base, made by its first layer
        ones = step.ones if step.ones is not None else _shared(
            plan, "ones", lambda: torch.ones(batch, 1, 1, key.shape[2], dtype=torch.bool, device=key.device))
        return ones.scatter(-1, constants.img_index, kept)
    if stock_mask.shape[0] != batch:  # a mask shared by the batch
        stock_mask = stock_mask.expand(batch, *stock_mask.shape[1:])
    if stock_mask.dtype == torch.bool:
        return stock_mask.scatter(-1, constants.img_index, kept)
    fill = torch.finfo(stock_mask.dtype).min
    return stock_mask.scatter(-1, constants.img_index, torch.where(kept, 0.0, fill).to(stock_mask.dtype))


def _late_decode_layer(store, views, layer: int, compiling: bool) -> None:
    """Decode buffers for a layer the store was not made for (a state built without the model's gammas)."""
    if compiling:
        raise RuntimeError(f"CMAI: layer {layer} has no decode buffers; bind CMAI with the model's gammas "
                           "(focusvlm.patch) before compiling")
    rows = store.layer_rows(layer)
    batch, n = rows.shape[0], store.images.count
    found = torch.zeros(batch, views.index.shape[1], device=rows.device)
    a_img, a_text = found.view(batch, 1, -1).split([n, found.shape[1] - n], dim=-1)
    views.found[layer], views.a_img[layer], views.a_text[layer] = found, a_img, a_text
    views.a_img4[layer], views.rows[layer] = a_img.unsqueeze(1), rows


def _late_decode_threshold(plan: CallPlan, layer: int, gamma: float, device) -> DecodeThreshold:
    images, constants = plan.images, plan.decode.constants
    n = images.count
    if images.valid is None:
        select = SelectedQuantile.build(n, gamma, n, device)
        found = DecodeThreshold(select.lo, select.hi, select.weight)
    else:
        at = quantile_positions_per_gamma(images.valid.sum(dim=1).view(-1, 1, 1), [gamma], n)[0]
        found = DecodeThreshold(at.lo, at.hi, at.weight)
    constants.thresholds[layer] = found
    return found


__all__ = ["LayerLink", "PLAN_KWARG", "cmai_attention_forward", "explicit_attention", "head_mean_attention",
           "stock_allowed"]
