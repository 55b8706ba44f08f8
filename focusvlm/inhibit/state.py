"""Per-model CMAI bookkeeping: token types of the running sequence, the per-call plan, the text-row store.

One ``CMAIState`` lives on a patched model. ``begin_call`` runs once per
forward call (before the decoder layers) and returns a ``CallPlan``: one
immutable object holding every index tensor the layers share, so the
per-layer attention code does no host synchronisation and no layer sees a
different plan (the plan travels with the call into every layer, so a layer
recomputed under gradient checkpointing reads the plan of its own call).

The cache rule (docs/method.md, C13): a new token's focus score needs the
head-averaged, pre-inhibition A_t2i rows of every earlier text token of the
same layer. A ``RowStore`` holds them per sequence: the rows' positions once,
the A_t2i rows per layer. Each call writes its rows at slots fixed by its
plan, so writing them again (a recomputed layer) changes nothing.

Two kinds of plan:
* prefill (any call with more than one new position): text rows found with
  one host synchronisation, grouped in chunks whose (batch x heads x rows x
  keys) block stays under a memory budget whatever the head count;
* decode (one new token per sample): no host synchronisation, a handful of
  ops shared by all layers, fixed shapes when the cache is static, so a
  decode step can run under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .focus import (FocusScore, QuantilePositions, TextPositions, get_focus, quantile_of_sorted,
                    quantile_positions)


class CMAIStateError(RuntimeError):
    """The CMAI bookkeeping cannot follow what the model was asked to do."""


# a sample without an image: no position is "after its first image"
NEVER = torch.iinfo(torch.long).max

# elements (batch x heads x rows x keys) of the float32 attention block prefill holds at once: a few MiB stay
# in a CPU's caches; a GPU prefers fewer, larger kernels
CHUNK_ELEMENTS = {"cpu": 1 << 21}
CHUNK_ELEMENTS_DEFAULT = 1 << 26
MIN_CHUNK_ROWS = 16


def chunk_budget(device: torch.device) -> int:
    return CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS_DEFAULT)


def _new_positions_valid(attention_mask: Any, batch: int, past_len: int, q_len: int,
                         device: torch.device) -> torch.Tensor:
    """(B, Q) bool: which new positions are real tokens, from a 2-D padding mask or a prepared 4-D mask."""
    if isinstance(attention_mask, dict):  # one prepared mask per attention type: any of them marks padding
        attention_mask = next((m for m in attention_mask.values() if m is not None), None)
    if attention_mask is None:
        return torch.ones(batch, q_len, dtype=torch.bool, device=device)
    if attention_mask.dim() == 2 and attention_mask.shape[1] == past_len + q_len:
        return attention_mask[:, past_len:].to(device=device, dtype=torch.bool)
    if attention_mask.dim() == 4 and attention_mask.shape[2] == q_len and attention_mask.shape[3] >= past_len + q_len:
        # a padding position hides its own key: the diagonal tells real tokens from padding
        rows = torch.arange(q_len, device=attention_mask.device)
        diagonal = attention_mask[:, 0, rows, past_len + rows].expand(batch, q_len)
        if diagonal.dtype != torch.bool:
            diagonal = diagonal > torch.finfo(diagonal.dtype).min / 2
        return diagonal.to(device)
    raise CMAIStateError(
        f"CMAI needs a 2-D attention mask covering past and new positions ({batch}x{past_len + q_len}) or a 4-D "
        f"one over the new positions, got shape {tuple(attention_mask.shape)}")


def first_true_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of each row's True entries, in order, padded to the batch maximum (one host sync).

    Returns (idx (B, M), valid (B, M)); padded slots point at index 0.
    """
    counts = mask.sum(dim=1)
    width = int(counts.max()) if mask.numel() else 0
    # a stable sort on "not mask" lists the True positions first, in their original order
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=mask.device).unsqueeze(0) < counts.unsqueeze(1)
    return order.masked_fill(~valid, 0), valid


class RowStore:
    """The text rows of one sequence (C13): where they are, and each layer's A_t2i rows.

    Positions, ranks and validity are shared by every layer and written once per call; ``rows[layer]``
    holds that layer's head-averaged, pre-inhibition weights of each text row on the image keys,
    (B, 1, capacity, N) float32 (the extra axis is the head axis decode steps keep). A dynamic cache lets the store grow by doubling (a decode step appends one
    row per sample; copying the whole store every step would be quadratic in the answer length); a static
    cache fixes the capacity to the cache length up front, so shapes never change.
    """

    def __init__(self, batch: int, images: "Images", capacity: int, static: bool, device: torch.device):
        self.images = images
        self.static = static
        self.capacity = capacity
        self.length = 0                 # rows filled (host side; dynamic caches only)
        self.seq_len = 0                # positions of the sequence so far (host side; dynamic caches only)
        self.fill = torch.zeros((), dtype=torch.long, device=device)   # rows filled, on the device
        self.pos = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        self.rank = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.text_count = torch.zeros(batch, dtype=torch.long, device=device)  # text tokens so far, per sample
        self.rows: dict[int, torch.Tensor] = {}
        self.decode: DecodeConstants | None = None   # set by the sequence's prefill

    def reserve(self, length: int) -> None:
        """Room for ``length`` rows (dynamic caches: grow by doubling)."""
        if length <= self.capacity:
            return
        if self.static:
            raise CMAIStateError(f"the static cache holds {self.capacity} positions; CMAI was asked for "
                                 f"{length} text rows")
        size = max(length, 2 * self.capacity, 64)
        self.pos, self.rank, self.valid = (_grown(t, size, self.length) for t in (self.pos, self.rank, self.valid))
        self.capacity = size

    def layer_rows(self, layer_idx: int) -> torch.Tensor:
        """This layer's row storage, allocated (or grown to the store's capacity) on first use."""
        rows = self.rows.get(layer_idx)
        if rows is None or rows.shape[2] != self.capacity:
            fresh = torch.zeros(self.pos.shape[0], 1, self.capacity, self.images.count, dtype=torch.float32,
                                device=self.pos.device)
            if rows is not None:
                fresh[:, :, :rows.shape[2]] = rows
            rows = self.rows[layer_idx] = fresh
        return rows

    def known(self, stop: int | None = None) -> TextPositions:
        """Positions of the first ``stop`` rows (all slots when None)."""
        if stop is None:
            return TextPositions(self.pos, self.rank, self.valid)
        return TextPositions(self.pos[:, :stop], self.rank[:, :stop], self.valid[:, :stop])


def _grown(t: torch.Tensor, size: int, used: int) -> torch.Tensor:
    out = torch.zeros((t.shape[0], size) + t.shape[2:], dtype=t.dtype, device=t.device)
    out[:, :used] = t[:, :used]
    return out


@dataclass(frozen=True)
class Images:
    """The image positions of a sequence, fixed by its prefill (all images arrive there)."""

    pos: torch.Tensor          # (B, N) key index of each image slot; padded slots 0
    valid: torch.Tensor        # (B, N) real slots
    padded: bool               # some sample has fewer images than N
    last: int                  # the largest image position (-1 without images)
    first: torch.Tensor        # (B,) position of the first image; NEVER without one
    has_image: torch.Tensor    # (B,)

    @property
    def count(self) -> int:
        return self.pos.shape[1]


@dataclass(frozen=True)
class DecodeThreshold:
    """C6 for a decode row of one layer: every decode row sees every image key of its sample, so where the
    quantile reads the sorted focus scores is fixed for the whole generation."""

    lo: int | torch.Tensor      # host ints when every sample has N images, else (B, 1, 1, 1) tensors
    hi: int | torch.Tensor
    weight: torch.Tensor

    def __call__(self, score: torch.Tensor) -> torch.Tensor:
        """tau of (B, 1, 1, N) scores, (B, 1, 1, 1): the same order statistics and interpolation as C6."""
        if isinstance(self.lo, int):  # two selections instead of a sort
            x_lo = score.kthvalue(self.lo + 1, dim=-1, keepdim=True).values
            if self.hi == self.lo:
                return x_lo
            return torch.lerp(x_lo, score.kthvalue(self.hi + 1, dim=-1, keepdim=True).values, self.weight)
        return quantile_of_sorted(score.sort(dim=-1).values, QuantilePositions(self.lo, self.hi, self.weight))


@dataclass(frozen=True)
class DecodeConstants:
    """What every decode step of a sequence shares: all its images arrived in the prefill."""

    img_index: torch.Tensor               # (B, 1, 1, N) key of each image slot; padded slots: a real text key
                                          # every decode row sees (never an image key: scatters there collide with none)
    img_pad: torch.Tensor | None          # (B, 1, 1, N) float32 max on padded image slots (None: none padded)
    thresholds: dict[int, DecodeThreshold]
    every_sample_has_image: bool          # no sample's decode row keeps the stock kernel's output

    @classmethod
    def build(cls, images: Images, spare_key: torch.Tensor, gammas: list[float] | None) -> "DecodeConstants":
        batch, count = images.pos.shape
        shape = (batch, 1, 1, count)
        thresholds: dict[int, DecodeThreshold] = {}
        if images.padded:
            img_index = torch.where(images.valid, images.pos, spare_key.unsqueeze(1)).view(shape)
            # the largest float, not +inf: a sample without images then has the threshold lerp(max, max) = max,
            # where lerp(inf, inf) would be NaN and fail every comparison
            img_pad = torch.zeros(shape, device=images.pos.device).masked_fill_(
                ~images.valid.view(shape), torch.finfo(torch.float32).max)
            seen = images.valid.sum(dim=1).view(batch, 1, 1)
        else:
            img_index, img_pad, seen = images.pos.view(shape), None, torch.tensor(count)
        for layer, gamma in enumerate(gammas or []):
            if gamma > 0:
                at = quantile_positions(seen, gamma, count)
                if images.padded:
                    thresholds[layer] = DecodeThreshold(at.lo, at.hi, at.weight)
                else:  # same float arithmetic as the prefill's threshold, read back once per sequence
                    thresholds[layer] = DecodeThreshold(int(at.lo), int(at.hi), at.weight.to(images.pos.device))
        return cls(img_index, img_pad, thresholds, bool(images.has_image.all()))


@dataclass(frozen=True)
class RowChunk:
    """Text rows of a prefill call processed together (slots [start, stop) of the plan's rows)."""

    start: int
    stop: int
    key_stop: int                  # no row of the chunk sees a key at or beyond this index
    key_first_hidden: int          # nor does causality hide a key below this one from any of its rows
    visible_count: int | None      # image keys every real row of the chunk sees, when they all see as many
    mask_sample: torch.Tensor      # (n,) sample of each real row of the chunk
    mask_row: torch.Tensor         # (n,) its query row within the call
    take: torch.Tensor | None      # (n,) which of the chunk's B x (stop - start) slots are real; None: all


@dataclass(frozen=True)
class DecodeStep:
    """What a decode step (one new text token per sample) adds to the plan."""

    write_index: torch.Tensor        # (1,) store slot of this step's rows
    text_index: torch.Tensor         # (B, 1, 1, C) key of each stored text row (0 in empty slots)
    constants: DecodeConstants


@dataclass
class CallWorkspace:
    """Scratch a call's layers may share in inference (never under autograd): built by the first layer."""

    masks: dict[Any, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class CallPlan:
    """Everything every decoder layer needs for one forward call; built once by ``begin_call``."""

    store: RowStore
    q_len: int                       # new positions in this call
    query: TextPositions             # (B, Qt) the text rows to inhibit in this call
    slot: torch.Tensor | None        # (B, Qt) their query row within the call (decode: None, the only row)
    row_start: int                   # store slot of the call's first row (prefill)
    relation: torch.Tensor | None    # (B, Qt, T) the focus variant's per-call weights (decode: (B, 1, 1, C))
    focus: FocusScore
    chunks: tuple[RowChunk, ...]     # prefill only
    decode: DecodeStep | None        # decode only
    keep_rows: bool                  # rows go to the store (a cache may continue the sequence)
    workspace: CallWorkspace

    @property
    def images(self) -> Images:
        return self.store.images


class CMAIState:
    """Token types of the running sequence and its text-row store, for one patched model."""

    def __init__(self, focus: str, discount: float, gammas: list[float] | None = None, num_heads: int = 32):
        self.focus = get_focus(focus)
        self.discount = discount
        self.gammas = list(gammas) if gammas is not None else None
        self.num_heads = num_heads
        self.reset()

    def reset(self) -> None:
        self.store: RowStore | None = None
        self.plan: CallPlan | None = None   # the latest call's plan (a layer reads it when none is handed over)

    # ------------------------------------------------------------------ entry
    def begin_call(self, image_mask: torch.Tensor, attention_mask: torch.Tensor | None, past_len: Any,
                   max_cache_len: int | None = None, keep_rows: bool = True) -> CallPlan | None:
        """Plan a forward call over ``image_mask.shape[1]`` new positions (image_mask: those receiving image features).

        ``past_len`` is the cache length (an int, or a 0-d tensor for a static cache); ``max_cache_len`` the
        static cache's capacity (None: dynamic). Returns the plan (also kept as ``self.plan``); None when
        nothing in this call is inhibited.
        """
        q_len = image_mask.shape[1]
        if isinstance(past_len, torch.Tensor) and q_len > 1 and not torch.compiler.is_compiling():
            past_len = int(past_len)  # prefill-like calls may synchronise; decode steps must not
        decode = q_len == 1 and not (isinstance(past_len, int) and past_len == 0)
        if decode:
            plan = self._decode_plan(image_mask, past_len)
        else:
            if torch.compiler.is_compiling():
                raise CMAIStateError(COMPILED_PREFILL_ERROR)
            plan = self._prefill_plan(image_mask, attention_mask, int(past_len), max_cache_len, keep_rows)
        self.plan = plan
        return plan

    # ------------------------------------------------------------------ prefill
    def _prefill_plan(self, image_mask, attention_mask, past_len, max_cache_len, keep_rows):
        batch, q_len = image_mask.shape
        device = image_mask.device
        new_valid = _new_positions_valid(attention_mask, batch, past_len, q_len, device)
        if past_len == 0:
            self.store = self._new_store(image_mask & new_valid, max_cache_len, device)
        else:
            if self.store is not None and self.store.static:
                # compiled decode steps count on the device only: catch the host-side counters up
                self.store.length, self.store.seq_len = int(self.store.fill), past_len
            self._check_continuation(past_len)
            if bool(image_mask.any()):
                raise CMAIStateError("CMAI needs all image tokens in the first forward call of a sequence "
                                     "(prefill); this call adds image tokens to an existing cache.")
        store = self.store
        images = store.images
        text = new_valid & ~image_mask
        positions = past_len + torch.arange(q_len, device=device)
        # text before a sample's first image sees no image: its output stays the stock kernel's
        redo = text & (positions.unsqueeze(0) > images.first.unsqueeze(1))
        rank = store.text_count.unsqueeze(1) + text.cumsum(dim=1) - 1
        store.text_count = store.text_count + text.sum(dim=1)
        store.seq_len = past_len + q_len
        if past_len == 0 and images.count:
            # a key every decode row sees and no image occupies: the sample's last prompt text token, or the
            # first generated token's own position when the prompt holds no text
            text_key = torch.where(text, positions, -1).amax(dim=1)
            spare = torch.where(text_key >= 0, text_key, past_len + q_len)
            store.decode = DecodeConstants.build(images, spare, self.gammas)
        slot, slot_valid = first_true_indices(redo)
        count = slot.shape[1]
        if count == 0 or images.count == 0:
            return None
        query = TextPositions(slot + past_len, rank.gather(1, slot), slot_valid)
        keep_rows = keep_rows or past_len > 0
        row_start = store.length if keep_rows else 0
        if keep_rows:
            stop = row_start + count
            store.reserve(stop)
            for dst, src in ((store.pos, query.pos), (store.rank, query.rank), (store.valid, query.valid)):
                dst[:, row_start:stop] = src
            store.length = stop
            store.fill.fill_(stop)
            known = store.known(stop)
        else:
            known = query
        return CallPlan(store=store, q_len=q_len, query=query, slot=slot, row_start=row_start,
                        relation=self.focus.relation(query, known, self.discount), focus=self.focus,
                        chunks=self._chunks(query, slot, past_len + q_len, device), decode=None,
                        keep_rows=keep_rows, workspace=CallWorkspace())

    def _new_store(self, image_mask: torch.Tensor, max_cache_len: int | None, device: torch.device) -> RowStore:
        batch = image_mask.shape[0]
        img_pos, img_valid = first_true_indices(image_mask)
        has_image = img_valid.any(dim=1) if img_valid.shape[1] else torch.zeros(batch, dtype=torch.bool, device=device)
        first = (torch.where(has_image, img_pos[:, 0], NEVER) if img_valid.shape[1]
                 else torch.full((batch,), NEVER, dtype=torch.long, device=device))
        last = int(img_pos.masked_fill(~img_valid, -1).max()) if img_valid.numel() else -1
        images = Images(pos=img_pos, valid=img_valid, padded=not bool(img_valid.all()), last=last, first=first,
                        has_image=has_image)
        static = max_cache_len is not None
        return RowStore(batch, images, max_cache_len if static else 0, static, device)

    def _check_continuation(self, past_len: int) -> None:
        store = self.store
        if store is None or past_len != store.seq_len:
            tracked = 0 if store is None else store.seq_len
            raise CMAIStateError(
                f"CMAI saw a cache of {past_len} positions but tracked {tracked}: the cache was cropped, "
                "reordered or reused across sequences. Start generation with a fresh cache "
                "(beam search, contrastive search and assisted decoding are not supported).")

    def _chunks(self, query: TextPositions, slot: torch.Tensor, keys: int, device) -> tuple[RowChunk, ...]:
        """Row chunks of the text rows: (B x heads x rows x keys) under the budget, one host sync for all."""
        batch, count = slot.shape
        size = max(MIN_CHUNK_ROWS, chunk_budget(device) // max(1, batch * self.num_heads * keys))
        bounds = [(s, min(s + size, count)) for s in range(0, count, size)]
        images = self.store.images
        valid = query.valid
        last_pos = query.pos.masked_fill(~valid, -1)
        first_pos = query.pos.masked_fill(~valid, keys)
        seen = (images.valid.unsqueeze(1) & (images.pos.unsqueeze(1) <= query.pos.unsqueeze(2))).sum(dim=2)
        most, least = seen.masked_fill(~valid, -1), seen.masked_fill(~valid, images.count + 1)
        facts = torch.stack([torch.stack([last_pos[:, s:e].amax() + 1, first_pos[:, s:e].amin() + 1,
                                          valid[:, s:e].all().long(), most[:, s:e].amax(), least[:, s:e].amin()])
                             for s, e in bounds])
        samples = torch.arange(batch, device=device).unsqueeze(1)
        chunks = []
        for (s, e), (key_stop, first_hidden, full, most_seen, least_seen) in zip(bounds, facts.tolist()):
            sample = samples.expand(batch, e - s).reshape(-1)
            row = slot[:, s:e].reshape(-1)
            take = None
            if not full:
                take = query.valid[:, s:e].reshape(-1).nonzero().squeeze(1)
                sample, row = sample[take], row[take]
            key_stop = max(int(key_stop), 1)
            chunks.append(RowChunk(s, e, key_stop, min(int(first_hidden), key_stop),
                                   int(most_seen) if most_seen == least_seen else None, sample, row, take))
        return tuple(chunks)

    # ------------------------------------------------------------------ decode
    def _decode_plan(self, image_mask, past_len) -> CallPlan | None:
        """One new token per sample, all text: no host sync, shapes fixed by the store."""
        store = self.store
        compiling = torch.compiler.is_compiling()
        if store is None:
            if isinstance(past_len, torch.Tensor):
                return None  # a static cache filled before patching: nothing to continue
            self._check_continuation(past_len)
        if not store.static:
            if compiling:
                raise CMAIStateError(COMPILED_DYNAMIC_ERROR)
            self._check_continuation(int(past_len))
            store.reserve(store.length + 1)
            store.length += 1
            store.seq_len += 1
        images = store.images
        if images.count == 0:
            store.text_count.add_(1)
            return None
        batch = image_mask.shape[0]
        device = store.pos.device
        if isinstance(past_len, torch.Tensor):
            new_pos = past_len.to(device=device, dtype=torch.long).reshape(1, 1).expand(batch, 1)
        else:
            new_pos = torch.full((batch, 1), past_len, dtype=torch.long, device=device)
        # copies, not views: the store's counters move on below, the plan's facts must not
        query = TextPositions(new_pos, store.text_count.view(batch, 1).clone(), images.has_image.view(batch, 1))
        write_index = store.fill.view(1).clone()
        for dst, src in ((store.pos, query.pos), (store.rank, query.rank), (store.valid, query.valid)):
            dst.index_copy_(1, write_index, src)
        relation = self.focus.relation(query, store.known(), self.discount)
        if relation is not None:
            relation = relation.unsqueeze(1)                                  # (B, 1, 1, C)
        step = DecodeStep(write_index=write_index, text_index=store.pos.view(batch, 1, 1, store.capacity),
                          constants=store.decode)
        store.fill.add_(1)
        store.text_count.add_(1)
        return CallPlan(store=store, q_len=1, query=query, slot=None, row_start=0,
                        relation=relation, focus=self.focus, chunks=(), decode=step, keep_rows=True,
                        workspace=CallWorkspace())


COMPILED_PREFILL_ERROR = (
    "focusvlm CMAI plans a prefill (a call with more than one new position) with data-dependent shapes, so it "
    "cannot run inside torch.compile(fullgraph=True). Run the prefill eagerly and compile the decode steps: "
    "transformers' generate does exactly this with cache_implementation='static' and a compile_config, or call the "
    "eager model for the prompt and the compiled forward for each new token.")
COMPILED_DYNAMIC_ERROR = (
    "focusvlm CMAI under torch.compile needs a static cache (its text-row store is preallocated to the cache "
    "length); use cache_implementation='static' or pass a StaticCache.")


__all__ = ["CMAIState", "CMAIStateError", "CallPlan", "DecodeStep", "Images", "RowChunk", "RowStore",
           "first_true_indices"]
