"""Per-model CMAI bookkeeping: token types of the running sequence, the per-call plan, the text-row store.

One ``CMAIState`` lives on a patched model. ``begin_call`` runs once per
forward call (before the decoder layers) and returns a ``CallPlan``: one
immutable object holding everything the layers share, so no layer repeats
work that depends only on the call and no layer reads tensor values back to
the host (the plan travels with the call into every layer, so a layer
recomputed under gradient checkpointing reads the plan of its own call).
What the plan holds for every layer at once: the text rows and their
positions, index maps (which query rows, which image keys, which text keys,
where a row's inhibited keys go in the fused mask), views of every layer's
row storage, and C6's positions for every layer's gamma (the gammas are known
when CMAI is bound and a call's visible image count is one of its host-side
counts, so the interpolation positions are host integers, computed once per
call). What also depends on the stock mask or the head shape (the causal
triangle, the query-row index) is built by the call's first layer and kept in
the call's workspace.

The cache rule (docs/method.md, C13): a new token's focus score needs the
head-averaged, pre-inhibition A_t2i rows of every earlier text token of the
same layer. A ``RowStore`` holds them per sequence: the rows' positions once,
every layer's A_t2i rows in one tensor. Each call writes its rows at slots
fixed by its plan, so writing them again (a recomputed layer) changes nothing.
A decode step leaves its rows in a per-layer buffer that the next call moves
into the store with one copy for all layers; until then the step's own slot
holds zeros, which is what the step's own focus score needs (C3: h < j).

Two kinds of plan:
* prefill (any call with more than one new position): one host read of a few
  counts (two when the text rows come in several chunks), rows grouped in
  chunks whose (batch x heads x rows x keys) block stays under a memory
  budget whatever the head count;
* decode (one new token per sample): no host read, a handful of ops shared by
  all layers, fixed shapes when the cache is static, so a decode step can run
  under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..errors import CMAIStateError  # noqa: F401 - re-exported: its first home
from .focus import (FocusScore, QuantilePositions, SelectedQuantile, TextPositions, get_focus,
                    host_quantile_positions, quantile_of_sorted, quantile_of_sorted_at, quantile_positions_per_gamma,
                    selected_quantile, sorted_rows)




# a sample without an image: no position is "after its first image"
NEVER = torch.iinfo(torch.long).max

# elements (batch x heads x rows x keys) of the float32 attention block prefill holds at once: a few MiB stay
# in a CPU's caches; a GPU prefers fewer, larger kernels
CHUNK_ELEMENTS = {"cpu": 1 << 21}
CHUNK_ELEMENTS_DEFAULT = 1 << 26
MIN_CHUNK_ROWS = 16
# row slots a dynamic store starts with (it grows by doubling)
MIN_CAPACITY = 64


def chunk_budget(device: torch.device) -> int:
    return CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS_DEFAULT)


def _new_positions_valid(attention_mask: Any, batch: int, past_len: int, q_len: int,
                         device: torch.device) -> torch.Tensor | None:
    """(B, Q) bool: which new positions are real tokens, from a 2-D padding mask or a prepared 4-D mask.

    None when there is no mask (every new position is a real token): the callers then skip the ops it would take.
    """
    if isinstance(attention_mask, dict):  # one prepared mask per attention type: any of them marks padding
        attention_mask = next((m for m in attention_mask.values() if m is not None), None)
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2 and attention_mask.shape[1] == past_len + q_len:
        new = attention_mask if past_len == 0 else attention_mask[:, past_len:]
        return new.to(device=device, dtype=torch.bool)
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


@dataclass(frozen=True)
class Images:
    """The image positions of a sequence, fixed by its prefill (all images arrive there)."""

    pos: torch.Tensor                 # (B, N) key index of each image slot; padded slots 0
    valid: torch.Tensor | None        # (B, N) real slots; None: every slot is real (every sample has N images)
    has_image: torch.Tensor           # (B,)
    every_sample_has_image: bool
    last: int | None = None           # the largest image position, when the plan needed it

    @property
    def count(self) -> int:
        return self.pos.shape[1]

    @property
    def padded(self) -> bool:
        """Some sample has fewer images than N."""
        return self.valid is not None


@dataclass(frozen=True)
class DecodeThreshold:
    """C6 for a decode row of one layer: every decode row sees every image key of its sample, so where the
    quantile reads the sorted focus scores is fixed for the whole generation."""

    lo: int | torch.Tensor      # host ints when every sample has N images, else (B, 1, 1, 1) tensors
    hi: int | torch.Tensor
    weight: torch.Tensor

    def __call__(self, score: torch.Tensor) -> torch.Tensor:
        """tau of (B, 1, 1, N) scores, (B, 1, 1, 1): the same order statistics and interpolation as C6."""
        if isinstance(self.lo, int):  # one partial selection instead of a sort
            return selected_quantile(score, self.lo, self.hi, score.shape[-1], self.weight)
        return quantile_of_sorted_at(score.sort(dim=-1).values, self.lo, self.hi, self.weight)


@dataclass(frozen=True)
class DecodeConstants:
    """What every decode step of a sequence shares: all its images arrived in the prefill."""

    img_index: torch.Tensor               # (B, 1, 1, N) key of each image slot; padded slots: a real text key
                                          # every decode row sees (never an image key: scatters there collide with none)
    img_pad: torch.Tensor | None          # (B, 1, N) float32 max on padded image slots (None: none padded)
    thresholds: dict[int, DecodeThreshold]
    every_sample_has_image: bool          # no sample's decode row keeps the stock kernel's output


@dataclass
class DecodeViews:
    """Buffers and views a sequence's decode steps share, made once per sequence (and again when a dynamic
    store grows), so a step takes no view op per layer.

    ``index`` (B, N + C) is the one gather index of a decode row: its image keys, then the key of every store
    slot (``store.pos`` is a view of its tail, so writing a slot's position updates it). ``found[layer]`` (B, N + C)
    receives the row's head-averaged weights at those keys; ``a_img`` / ``a_text`` are its two parts as (B, 1, .)
    views, ``rows`` the layer's stored rows (B, C, N). ``step_img`` (L, B, N) is every layer's A_t2i row of the last
    step, what the next call moves into the store.
    """

    index: torch.Tensor
    pos: torch.Tensor                     # (B, C) its tail: every slot's position (the store's ``pos``)
    found_all: torch.Tensor               # (L', B, N + C) the buffers below, one tensor
    found: dict[int, torch.Tensor]
    a_img: dict[int, torch.Tensor]
    a_text: dict[int, torch.Tensor]
    a_img4: dict[int, torch.Tensor]
    rows: dict[int, torch.Tensor]
    score: torch.Tensor                   # (B, 1, 1, N) scratch for F (shared by the layers, used one after another)
    score3: torch.Tensor                  # (B, 1, N) view of it
    step_img: torch.Tensor | None         # (L, B, N) the inhibited layers' rows of the last step (None: no layers)
    slot_rows: list[torch.Tensor] | None  # dynamic stores: per slot, every layer's row (L, B, N)
    slot_pos: list[torch.Tensor] | None   # dynamic stores: per slot, (B,) views of pos / valid / rank
    slot_valid: list[torch.Tensor] | None
    slot_rank: list[torch.Tensor] | None
    ones: torch.Tensor | None             # static stores: the all-True (B, 1, 1, K) mask base decode steps scatter into


class RowStore:
    """The text rows of one sequence (C13): where they are, and each layer's A_t2i rows.

    Positions, ranks and validity are shared by every layer; ``rows[layer]`` (B, capacity, N) float32 holds that
    layer's head-averaged, pre-inhibition weights of each text row on the image keys. The inhibited layers known
    when the store is made share one (L, B, capacity, N) tensor, so a call takes per-layer views of all of them with
    two ops and a decode step's rows go in with one copy. A dynamic cache lets the store grow by doubling (a decode
    step appends one row per sample; copying the whole store every step would be quadratic in the answer length); a
    static cache fixes the capacity to the cache length up front, so shapes never change.
    """

    def __init__(self, images: Images, pos: torch.Tensor, rank: torch.Tensor | None, valid: torch.Tensor,
                 text_count: torch.Tensor, static: bool, layers: list[int], length: int, seq_len: int):
        self.images = images
        self.static = static
        self.pos, self.rank, self.valid = pos, rank, valid      # (B, capacity); rank None when no focus reads it
        self.capacity = pos.shape[1]
        self.length = length            # rows filled (host side; a static store's decode steps count on the device)
        self.seq_len = seq_len          # positions of the sequence so far (host side)
        self.fill = torch.full((), length, dtype=torch.long, device=pos.device) if static else None
        self.text_count = text_count    # (B,) text tokens so far, per sample
        self.layers = list(layers)
        self.rows: dict[int, torch.Tensor] = {}
        self.all_rows: torch.Tensor | None = None       # (L, B, capacity, N) for ``layers``
        self.decode: DecodeConstants | None = None      # set by the sequence's prefill
        self.views: DecodeViews | None = None
        # the last decode step's rows wait in ``views.step_img`` for this slot (dynamic stores; a static store
        # keeps the slot on the device in ``pending_index`` and always moves them, see ``flush``)
        self.pending: int | None = None
        self.pending_layers: set[int] = set()
        self.pending_index: torch.Tensor | None = None
        self._allocate_rows(self.layers)

    # ------------------------------------------------------------------ rows
    def _allocate_rows(self, layers: list[int]) -> None:
        batch, capacity, n = self.pos.shape[0], self.capacity, self.images.count
        if not layers or capacity == 0 or n == 0:
            return
        self.all_rows = torch.zeros(len(layers), batch, capacity, n, device=self.pos.device)
        self.rows.update(zip(layers, self.all_rows.unbind(0)))

    def layer_rows(self, layer_idx: int) -> torch.Tensor:
        """This layer's row storage (B, capacity, N); a layer the store was not made for gets its own tensor."""
        rows = self.rows.get(layer_idx)
        if rows is None:   # (decode buffers made before take it up when the layer first decodes)
            rows = self.rows[layer_idx] = torch.zeros(self.pos.shape[0], self.capacity, self.images.count,
                                                      device=self.pos.device)
        return rows

    def reserve(self, length: int) -> None:
        """Room for ``length`` rows (dynamic caches: grow by doubling)."""
        if length <= self.capacity:
            return
        if self.static:
            raise CMAIStateError(f"the static cache holds {self.capacity} positions; CMAI was asked for "
                                 f"{length} text rows")
        self.flush()
        size = max(length, 2 * self.capacity, MIN_CAPACITY)
        used = self.length
        self.pos, self.valid = _grown(self.pos, size, used), _grown(self.valid, size, used)
        if self.rank is not None:
            self.rank = _grown(self.rank, size, used)
        old_all, old_rows = self.all_rows, self.rows
        self.capacity, self.rows, self.all_rows = size, {}, None
        self._allocate_rows(self.layers)
        if old_all is not None:
            self.all_rows[:, :, :used] = old_all[:, :, :used]
        for layer, rows in old_rows.items():
            if layer not in self.rows:   # layers outside the shared tensor
                self.rows[layer] = _grown(rows, size, used)
        self.views = None

    def known(self, stop: int | None = None) -> TextPositions:
        """Positions of the first ``stop`` rows (all slots when None)."""
        if stop is None:
            return TextPositions(self.pos, self.rank, self.valid)
        rank = None if self.rank is None else self.rank[:, :stop]
        return TextPositions(self.pos[:, :stop], rank, self.valid[:, :stop])

    # ------------------------------------------------------------------ decode buffers
    def decode_views(self, key_len: int | None = None) -> DecodeViews:
        """The buffers and views decode steps share (made on first use and after the store grows)."""
        if self.views is not None:
            return self.views
        images = self.images
        batch, n, capacity, device = self.pos.shape[0], images.count, self.capacity, self.pos.device
        index = torch.cat([self.decode.img_index.view(batch, n), self.pos], dim=1)
        found_all = torch.zeros(len(self._view_layers()), batch, n + capacity, device=device)
        score = torch.empty(batch, 1, 1, n, device=device)
        ones = None if key_len is None else torch.ones(batch, 1, 1, key_len, dtype=torch.bool, device=device)
        self.views = self._derive_views(index, found_all, score, ones)
        self.pos = self.views.pos    # a view of the gather index: a slot's position written once reaches both
        if self.static and self.pending_index is None:
            # the first step "moves" the zero buffer into its own, still empty, slot: harmless, and it lets every
            # compiled step run the same graph
            self.pending_index = torch.full((1,), self.length, dtype=torch.long, device=device)
        return self.views

    def traced_views(self) -> DecodeViews:
        """A compiled step's views: the same ones, taken inside its graph from the buffers themselves.

        ``torch.compile`` lifts every tensor a step reads from Python state as its own graph input. Views held in
        the store would enter as inputs aliasing the buffers the step writes, and AOTAutograd then rebuilds their
        common base on the host at every call (a "synthetic base": an ``empty`` and a ``set_`` per buffer, 6 host
        ops per decode step); views taken inside the graph cost nothing."""
        views = self.decode_views()
        return self._derive_views(views.index, views.found_all, views.score, views.ones)

    def _view_layers(self) -> list[int]:
        return [l for l in self.layers if l in self.rows] + [l for l in self.rows if l not in self.layers]

    def _derive_views(self, index, found_all, score, ones) -> DecodeViews:
        """Every view decode steps take of the store's buffers (``index``, ``found_all``, ``all_rows``)."""
        batch, n, capacity = index.shape[0], self.images.count, self.capacity
        layers = self._view_layers()
        found3 = found_all.view(len(layers), batch, 1, n + capacity)
        a_img_all, a_text_all = found3.split([n, capacity], dim=-1)
        shared = len(self.layers) if self.all_rows is not None else 0
        rows = dict(zip(self.layers, self.all_rows.unbind(0))) if shared else {}
        rows.update((l, self.rows[l]) for l in layers if l not in rows)   # layers outside the shared tensor
        pos = index[:, n:]
        return DecodeViews(
            index=index, pos=pos, found_all=found_all, found=dict(zip(layers, found_all.unbind(0))),
            a_img=dict(zip(layers, a_img_all.unbind(0))), a_text=dict(zip(layers, a_text_all.unbind(0))),
            a_img4=dict(zip(layers, a_img_all.unsqueeze(2).unbind(0))), rows=rows,
            score=score, score3=score.view(batch, 1, n),
            step_img=found_all[:shared, :, :n] if shared else None,
            slot_rows=None if self.static or not shared else self.all_rows.unbind(2),
            slot_pos=None if self.static else pos.unbind(1),
            slot_valid=None if self.static else self.valid.unbind(1),
            slot_rank=None if self.static or self.rank is None else self.rank.unbind(1),
            ones=ones)

    def flush(self, views: DecodeViews | None = None) -> None:
        """Move the last decode step's rows into the store (one copy for the shared layers); ``views``: a compiled
        step's own (``traced_views``)."""
        views = views or self.views
        if views is None:
            return
        if self.static:
            if self.pending_index is not None and views.step_img is not None:
                self.all_rows.index_copy_(2, self.pending_index, views.step_img.unsqueeze(2))
            for layer, rows in views.rows.items():
                if layer not in self.layers:
                    rows.index_copy_(1, self.pending_index, views.a_img[layer])
            return
        slot, self.pending = self.pending, None
        if slot is None:
            return
        written, self.pending_layers = self.pending_layers, set()
        shared = [l for l in self.layers if l in self.rows]
        if views.step_img is not None and written.issuperset(shared):
            views.slot_rows[slot].copy_(views.step_img)
            written = written.difference(shared)
        for layer in written:
            self.rows[layer][:, slot] = views.found[layer][:, :self.images.count]


def _static_buffers(store: RowStore) -> list[torch.Tensor | None]:
    """Every tensor a static store's decode steps read or write, in a fixed order (``store.pos`` is a view of
    ``views.index``; ``rows`` are views of ``all_rows``)."""
    views, decode, images = store.views, store.decode, store.images
    out = [views.index, store.valid, store.rank, store.fill, store.text_count, store.all_rows, store.pending_index,
           views.found_all, views.score, views.ones, decode.img_index, decode.img_pad, images.pos, images.valid,
           images.has_image]
    for threshold in decode.thresholds.values():
        out += [threshold.weight] + [t for t in (threshold.lo, threshold.hi) if isinstance(t, torch.Tensor)]
    return out


def _held_tensors(store: RowStore) -> list[torch.Tensor]:
    """Every tensor object a static store's decode steps reach: the buffers and each view of them held in the
    store (``torch.compile`` lifts each one it reads as its own graph input)."""
    views = store.views
    out = [t for t in _static_buffers(store) if t is not None] + [store.pos] + list(store.rows.values())
    for per_layer in (views.found, views.a_img, views.a_text, views.a_img4, views.rows):
        out += list(per_layer.values())
    out += [t for t in (views.score3, views.step_img) if t is not None]
    return out


def _mark_static_addresses(store: RowStore) -> None:
    """Mark a static store's tensors as fixed-address graph inputs, as transformers marks its static KV cache.

    A compiled decode step writes these buffers in place (the step's slot, the counters, each layer's row);
    under ``mode="reduce-overhead"`` inductor records CUDA graphs only when every input it mutates is such a
    static input, and otherwise runs the step without graphs (on an H200 this left CMAI's compiled decode at
    3.13x stock's graphed one: RESULTS.md, issue 29). The pool keeps these buffers from one sequence to the next,
    so their addresses do not change."""
    mark = getattr(getattr(torch, "_dynamo", None), "mark_static_address", None)
    if mark is None or torch.compiler.is_compiling():
        return
    for t in _held_tensors(store):
        mark(t)


def _static_layout(store: RowStore) -> tuple:
    """What must agree for one static store's buffers to serve another sequence: shapes, dtypes, devices, the
    layers, and the host-side facts a compiled step is specialised on."""
    decode = store.decode
    tensors = tuple(None if t is None else (tuple(t.shape), t.dtype, t.device) for t in _static_buffers(store))
    hosts = tuple((layer, t.lo if isinstance(t.lo, int) else None, t.hi if isinstance(t.hi, int) else None)
                  for layer, t in decode.thresholds.items())
    return (tensors, hosts, tuple(store.layers), tuple(store.views.rows), store.capacity,
            decode.every_sample_has_image, store.images.every_sample_has_image)


def _grown(t: torch.Tensor, size: int, used: int) -> torch.Tensor:
    out = torch.zeros((t.shape[0], size) + t.shape[2:], dtype=t.dtype, device=t.device)
    out[:, :used] = t[:, :used]
    return out


@dataclass(frozen=True)
class RowChunk:
    """Text rows of a prefill call processed together (slots [start, stop) of the plan's rows), and every index
    map its layers share."""

    start: int
    stop: int
    key_stop: int                  # no row of the chunk sees a key at or beyond this index (an upper bound)
    key_first_hidden: int          # nor does causality hide a key below this one from any of its rows
    visible_count: int | None      # image keys every real row of the chunk sees, when they all see as many
    q_pos: torch.Tensor            # (B, R) positions of its rows
    q_valid: torch.Tensor | None   # (B, R) real rows (None: all real)
    slot: torch.Tensor             # (B, R) query row of each within the call
    img_index: torch.Tensor        # (B, R, N) key of each image slot for each row (padded slots: the row's own key)
    img_gather: torch.Tensor       # img_index, clamped below key_stop (the keys C1 computes)
    visible: torch.Tensor | None   # (B, R, N) C6's visible set (None: every slot, for every row)
    invisible: torch.Tensor | None  # its complement
    text_index: torch.Tensor | None  # (B, R, known) key of every known text row, for every row
    relation: torch.Tensor | None  # (B, R, known) the focus variant's weights
    # (sample, query row, key) of every (row, image slot) pair in the fused mask: padded rows and slots point at
    # pairs no real one writes (they write the stock value there), so one indexed write serves all
    write_index: tuple[torch.Tensor, ...]
    rows_out: dict[int, torch.Tensor]       # per layer: (B, R, N) where the rows' A_t2i go
    rows_known: dict[int, torch.Tensor]     # per layer: (B, known, N) every row known so far, these included
    thresholds: dict[int, Callable[[torch.Tensor], torch.Tensor]]  # per layer: C6 of (B, R, N) masked scores


@dataclass(frozen=True)
class DecodeStep:
    """What a decode step (one new text token per sample) adds to the plan."""

    write_index: int | torch.Tensor  # store slot of this step's rows (host int; (1,) tensor for static stores)
    index: torch.Tensor              # (B, N + C) image keys, then the key of every stored text row
    constants: DecodeConstants
    views: DecodeViews
    ones: torch.Tensor | None        # (B, 1, 1, K) all-True mask base of static stores (others: made by a layer)


@dataclass
class CallWorkspace:
    """What a call's layers may share and build on first use: the first layer that knows the stock mask, the head
    count or the head size fills it (scratch masks are reused only in inference, never under autograd)."""

    masks: dict[Any, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CallPlan:
    """Everything every decoder layer needs for one forward call; built once by ``begin_call``."""

    store: RowStore
    q_len: int                       # new positions in this call
    query_source: TextPositions | Callable[[], TextPositions]   # the text rows to inhibit (built on demand)
    slot: torch.Tensor | None        # (B, Qt) their query row within the call (decode: None, the only row)
    row_start: int                   # store slot of the call's first row (prefill)
    relation: torch.Tensor | None    # (B, Qt, T) the focus variant's per-call weights (decode: (B, 1, C))
    focus: FocusScore
    chunks: tuple[RowChunk, ...]     # prefill only
    decode: DecodeStep | None        # decode only
    keep_rows: bool                  # rows go to the store (a cache may continue the sequence)
    workspace: CallWorkspace
    batch_index: torch.Tensor | None = None   # (B, 1, 1) sample index (prefill)
    gammas: dict[int, float] = field(default_factory=dict)   # inhibited layers known to the plan

    @property
    def images(self) -> Images:
        return self.store.images

    @property
    def query(self) -> TextPositions:
        source = self.query_source
        return source if isinstance(source, TextPositions) else source()


class CMAIState:
    """Token types of the running sequence and its text-row store, for one patched model."""

    def __init__(self, focus: str, discount: float, gammas: list[float] | None = None, num_heads: int = 32):
        self.focus = get_focus(focus)
        self.discount = discount
        self.gammas = list(gammas) if gammas is not None else None
        self.num_heads = num_heads
        self.compiled_prefill: str | None = None   # the backend, per call from compile_model's mark (cmai_wiring)
        self.reset()

    def reset(self) -> None:
        self.store: RowStore | None = None
        self.plan: CallPlan | None = None   # the latest call's plan (a layer reads it when none is handed over)
        self._static_pool: RowStore | None = None  # the last static store: its buffers serve the next sequence

    @property
    def inhibited(self) -> dict[int, float]:
        return {l: g for l, g in enumerate(self.gammas or []) if g > 0}

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
        self._memo: dict[Any, Any] = {}    # what this call computes once for several purposes
        batch, q_len = image_mask.shape
        device = image_mask.device
        new_valid = _new_positions_valid(attention_mask, batch, past_len, q_len, device)
        fresh = past_len == 0
        rows = self._fresh_rows(image_mask, new_valid) if fresh else self._continued_rows(image_mask, new_valid, past_len)
        text, redo_count, count, least_rows, images, slot = (rows.text, rows.redo_count, rows.count, rows.least_rows,
                                                            rows.images, rows.slot)
        rows_padded = count > 0 and least_rows < count
        slot_valid = None
        if rows_padded:
            slot_valid = torch.arange(count, device=device) < redo_count.unsqueeze(1)
            # a padded slot must point at a query row no real slot of its sample points at (the fused mask gets
            # one indexed write for all): row 0 of a fresh sequence is never a row after an image; a continuation
            # keeps what its sort put there, the sample's other (padding) positions, each once
            if fresh:
                slot = slot.masked_fill(~slot_valid, 0)
        if slot is not None:
            q_pos = slot if fresh else slot + past_len
            q_rank = None
            if self.focus.reads_rank:
                rank = text.cumsum(dim=1) - 1 if fresh else self.store.text_count.unsqueeze(1) + text.cumsum(dim=1) - 1
                q_rank = rank.gather(1, slot)
            valid = slot_valid if slot_valid is not None else torch.ones(batch, count, dtype=torch.bool, device=device)
            query = TextPositions(q_pos, q_rank, valid)
        if fresh:
            store = self._new_store(images, query if slot is not None else None, count, rows.text_count,
                                    max_cache_len, keep_rows, batch, device)
            self.store = store
            if images.count:
                store.decode = self._decode_constants(images, text, q_len, device)
                if store.static:
                    store.decode_views(max_cache_len)
                    store = self.store = self._reuse_static_buffers(store)
        else:
            store = self.store
            store.text_count = rows.text_count
        store.seq_len = past_len + q_len
        if slot is None or images.count == 0:
            return None
        keep_rows = keep_rows or not fresh
        row_start = store.length if keep_rows and not fresh else 0
        known = self._keep_rows(store, query, row_start, count, fresh) if keep_rows else query
        relation = self.focus.relation(query, known, self.discount)
        return self._finish_prefill(store, query, slot, relation, row_start, keep_rows, count, least_rows,
                                    rows.uniform, self.inhibited, past_len, q_len, fresh, device)

    def _fresh_rows(self, image_mask, new_valid) -> "_CallRows":
        """The first call of a sequence: its images and its text rows after an image, with one read-back."""
        device, q_len = image_mask.device, image_mask.shape[1]
        img = image_mask if new_valid is None else image_mask & new_valid
        text = ~image_mask if new_valid is None else new_valid ^ img
        seen = img.cumsum(dim=1)                                     # images at or before each position
        redo = text & (seen > 0)      # text after its sample's first image; text before it sees no image
        img_count = seen[:, -1]
        redo_count = redo.sum(dim=1)
        between = (redo & (seen < img_count.unsqueeze(1))).sum()     # rows that do not see every image yet
        img_range, redo_range = torch.aminmax(img_count), torch.aminmax(redo_count)
        # the call's one read-back: shapes (images, rows) and which code paths apply
        n_img, least_img, count, least_rows, between = torch.stack(
            [img_range.max, img_range.min, redo_range.max, redo_range.min, between]).tolist()
        text_count = text.sum(dim=1)
        found = self._images(img, img_count, redo, n_img, least_img)
        images, slot = found.images, None
        if n_img and count:   # each sample's rows follow its images in the sort's order
            if images.valid is None:
                slot = found.order[:, n_img:n_img + count]
            else:
                first = img_count.unsqueeze(1) + torch.arange(count, device=device)
                slot = found.order.gather(1, first.clamp(max=q_len - 1))
        uniform = n_img if (images.valid is None and between == 0) else None
        return _CallRows(text, redo_count, count, least_rows, images, slot, text_count, uniform)

    def _continued_rows(self, image_mask, new_valid, past_len) -> "_CallRows":
        """A later call (a decode step, a chunk): text rows only, every sample's images came before."""
        store = self._continue(past_len)
        text = ~image_mask if new_valid is None else new_valid & ~image_mask
        redo = text & store.images.has_image.unsqueeze(1)        # every sample's images came before this call
        redo_count = redo.sum(dim=1)
        redo_range = torch.aminmax(redo_count)
        facts = [image_mask.sum(), redo_range.max, redo_range.min]
        if store.static:  # compiled decode steps count on the device only: catch the host-side counters up
            facts.append(store.fill)
        facts = torch.stack(facts).tolist()
        if facts[0]:
            raise CMAIStateError("CMAI needs all image tokens in the first forward call of a sequence "
                                 "(prefill); this call adds image tokens to an existing cache.")
        count, least_rows = facts[1], facts[2]
        if store.static:
            store.length = facts[3]
        slot = None
        if count:   # a stable sort lists each sample's rows first, in order (the width came with the facts)
            slot = (~redo).to(torch.uint8).sort(dim=1, stable=True).indices[:, :count]
        uniform = None if store.images.padded else store.images.count
        return _CallRows(text, redo_count, count, least_rows, store.images, slot, store.text_count + text.sum(dim=1),
                         uniform)

    @staticmethod
    def _keep_rows(store, query, row_start, count, fresh) -> TextPositions:
        """Append this call's rows to the store (a fresh store already holds them); the rows they relate to."""
        stop = row_start + count
        if not fresh:
            store.reserve(stop)
            for dst, src in ((store.pos, query.pos), (store.rank, query.rank), (store.valid, query.valid)):
                if dst is not None:
                    dst[:, row_start:stop] = src
        store.length = stop
        if store.static:
            store.fill.fill_(stop)
            if not fresh and store.views is not None:
                # the rows the buffer held are in the store (flushed above); the next step's first move then
                # writes zeros into that step's own, still empty, slot
                store.views.found_all.zero_()
                store.pending_index.fill_(stop)
        return query if fresh else store.known(stop)

    def _images(self, img, img_count, redo, n_img, least_img) -> "_FoundImages":
        """Image slots of a fresh sequence from one stable sort that lists, per sample, its images, then its text
        rows after the first image (the plan slices both out of it)."""
        batch, device = img.shape[0], img.device
        has_image = img_count > 0
        if n_img == 0:
            empty = torch.zeros(batch, 0, dtype=torch.long, device=device)
            return _FoundImages(Images(empty, None, has_image, False), empty)
        order = torch.where(img, 0, torch.where(redo, 1, 2)).sort(dim=1, stable=True).indices
        pos = order[:, :n_img]
        valid = None
        if least_img < n_img:
            valid = torch.arange(n_img, device=device) < img_count.unsqueeze(1)
            pos = pos.masked_fill(~valid, 0)
        return _FoundImages(Images(pos, valid, has_image, least_img > 0), order)

    def _new_store(self, images, query, count, text_count, max_cache_len, keep_rows, batch, device):
        static = max_cache_len is not None
        keep = keep_rows and query is not None
        capacity = max_cache_len if static else (max(count, MIN_CAPACITY) if keep else 0)
        if static and keep and count > capacity:
            raise CMAIStateError(f"the static cache holds {capacity} positions; CMAI was asked for {count} text rows")
        if keep:
            pad = (0, capacity - count)
            pos, valid = F.pad(query.pos, pad), F.pad(query.valid, pad)
            rank = F.pad(query.rank, pad) if query.rank is not None else None
        else:
            pos = torch.zeros(batch, capacity, dtype=torch.long, device=device)
            valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
            rank = torch.zeros(batch, capacity, dtype=torch.long, device=device) if self.focus.reads_rank else None
        layers = list(self.inhibited) if images.count else []
        # the rows of this call are its first (slots [0, count)), written by its layers
        return RowStore(images, pos, rank, valid, text_count, static, layers, count if keep else 0, 0)

    def _reuse_static_buffers(self, store: RowStore) -> RowStore:
        """The previous static store, refilled with ``store``'s contents, when their layouts match; else ``store``
        (kept for the next sequence).

        A static cache's decode steps read only these buffers, so with the same ones from one ``generate`` call
        to the next every step reads the same addresses: a compiled step is not traced again and a CUDA graph
        recorded by an earlier call stays valid. The prefill's temporaries are still made per call.
        """
        old = self._static_pool
        if old is None or _static_layout(old) != _static_layout(store):
            self._static_pool = store
            _mark_static_addresses(store)
            return store
        for dst, src in zip(_static_buffers(old), _static_buffers(store)):
            if dst is not None:
                dst.copy_(src)
        old.images = Images(old.images.pos, old.images.valid, old.images.has_image,
                            store.images.every_sample_has_image, store.images.last)
        old.length, old.seq_len = store.length, store.seq_len
        old.pending, old.pending_layers = None, set()
        return old

    def _decode_constants(self, images: Images, text: torch.Tensor, q_len: int, device) -> DecodeConstants:
        batch, count = images.pos.shape
        shape = (batch, 1, 1, count)
        img_pad = None
        if images.padded:
            # a key every decode row sees and no image occupies: the sample's last prompt text token, or the
            # first generated token's own position when the prompt holds no text
            positions = torch.arange(q_len, device=device)
            text_key = torch.where(text, positions, -1).amax(dim=1)
            spare = torch.where(text_key >= 0, text_key, q_len)
            img_index = torch.where(images.valid, images.pos, spare.unsqueeze(1)).view(shape)
            # the largest float, not +inf: a sample without images then has the threshold lerp(max, max) = max,
            # where lerp(inf, inf) would be NaN and fail every comparison
            img_pad = torch.zeros(batch, 1, count, device=device).masked_fill_(
                ~images.valid.view(batch, 1, count), torch.finfo(torch.float32).max)
            seen = images.valid.sum(dim=1).view(batch, 1, 1, 1)
            layers = self.inhibited
            at = quantile_positions_per_gamma(seen.squeeze(-1), list(layers.values()), count) if layers else []
            thresholds = {l: DecodeThreshold(p.lo, p.hi, p.weight) for l, p in zip(layers, at)}
        else:
            img_index = images.pos.view(shape)
            thresholds = {l: DecodeThreshold(s.lo, s.hi, s.weight)
                          for l, s in self._selections(count, self.inhibited, device).items()}
        return DecodeConstants(img_index, img_pad, thresholds, images.every_sample_has_image)

    def _selections(self, count: int, gammas: dict[int, float], device) -> dict[int, SelectedQuantile]:
        """C6 positions of every layer for rows that all see ``count`` image keys: host integers, and the
        interpolation weights in one small tensor made once per call (prefill rows and the decode rows that
        follow usually see as many keys: they share it)."""
        memo = self._memo.get((count, tuple(gammas.items())))
        if memo is not None:
            return memo
        at = {l: host_quantile_positions(count, g, count) for l, g in gammas.items()}
        found = {}
        if at:
            weights = torch.tensor([w for _, _, w in at.values()], dtype=torch.float32, device=device).unbind(0)
            found = {l: SelectedQuantile(lo, hi, count, w) for (l, (lo, hi, _)), w in zip(at.items(), weights)}
        self._memo[(count, tuple(gammas.items()))] = found
        return found

    def _continue(self, past_len: int) -> RowStore:
        store = self.store
        self._check_continuation(past_len)
        store.flush()
        return store

    def _check_continuation(self, past_len: int) -> None:
        store = self.store
        tracked = None if store is None else store.seq_len
        if store is not None and store.static and isinstance(past_len, int):
            tracked = past_len   # a static store's decode steps count on the device; the prefill catches up
        if store is None or past_len != tracked:
            raise CMAIStateError(
                f"CMAI saw a cache of {past_len} positions but tracked {0 if store is None else store.seq_len}: the "
                "cache was cropped, reordered or reused across sequences. Start generation with a fresh cache "
                "(beam search, contrastive search and assisted decoding are not supported).")

    def _finish_prefill(self, store, query, slot, relation, row_start, keep_rows, count, least_rows, uniform,
                        gammas, past_len, q_len, fresh, device) -> CallPlan:
        """Chunks of rows and the index maps of each: all that the layers share."""
        batch = slot.shape[0]
        rows_padded = least_rows < count
        bounds, facts, images = self._chunk_key_ranges(store.images, query, count, rows_padded, past_len + q_len,
                                                       batch, device)
        if keep_rows:
            known_pos, all_rows = store.pos, store.all_rows
            layers = store.layers if all_rows is not None else []
        else:   # rows needed within the call only: one scratch every layer reuses, each rewriting it before reading
            known_pos = query.pos
            all_rows = torch.zeros(1, batch, count, images.count, device=device)
            layers = None
        selections = self._selections(uniform, gammas, device) if uniform is not None else {}
        batch_index = torch.arange(batch, device=device).view(batch, 1, 1)
        single = len(bounds) == 1
        chunks = []
        for (s, e), (key_stop, first_hidden) in zip(bounds, facts):
            whole = single and s == 0 and e == count
            q_pos = query.pos if whole else query.pos[:, s:e]
            chunk_slot = slot if whole else slot[:, s:e]
            padded_here = rows_padded and least_rows < e
            q_valid = None
            if padded_here:
                q_valid = query.valid if whole else query.valid[:, s:e]
            n = images.count
            if images.valid is None:
                img_index = images.pos.unsqueeze(1).expand(batch, e - s, n)
            else:
                # padded image slots point at the row's own key: never an image key, so writes there collide with none
                img_index = torch.where(images.valid.unsqueeze(1), images.pos.unsqueeze(1), q_pos.unsqueeze(2))
            # image keys beyond the chunk's last row (a later image) are invisible to all its rows
            clamp = images.last is not None and images.last >= key_stop
            img_gather = img_index.clamp(max=key_stop - 1) if clamp else img_index
            visible = invisible = None
            if uniform is None or padded_here:
                visible = _visible_images(images, q_pos, q_valid)
                invisible = ~visible
            known = row_start + e
            text_index = None
            if self.focus.reads_text_attention:
                # every row known so far (earlier calls, earlier chunks, this chunk) sits at a key below key_stop
                text_index = (known_pos if known == known_pos.shape[1] else known_pos[:, :known]).unsqueeze(1).expand(
                    batch, e - s, known)
            chunk_relation = None
            if relation is not None:
                chunk_relation = relation if (whole and known == relation.shape[2]) else relation[:, s:e, :known]
            write_index = (batch_index, chunk_slot.unsqueeze(-1), img_index)
            out_views, known_views = _row_views(all_rows, layers, row_start, s, e)
            if uniform is not None:
                thresholds = dict(selections)
            else:
                counts = visible.sum(dim=-1)
                at = quantile_positions_per_gamma(counts, list(gammas.values()), n) if gammas else []
                thresholds = {l: SortedQuantile(p) for l, p in zip(gammas, at)}
            chunks.append(RowChunk(s, e, key_stop, min(first_hidden, key_stop), uniform, q_pos, q_valid, chunk_slot,
                                   img_index, img_gather, visible, invisible, text_index, chunk_relation, write_index,
                                   out_views, known_views, thresholds))
        if images is not store.images:
            store.images = images
        return CallPlan(store=store, q_len=q_len, query_source=query, slot=slot, row_start=row_start,
                        relation=relation, focus=self.focus, chunks=tuple(chunks), decode=None, keep_rows=keep_rows,
                        workspace=CallWorkspace(), batch_index=batch_index, gammas=gammas)

    def _chunk_key_ranges(self, images, query, count, rows_padded, keys, batch, device):
        """Row chunks sized to the attention budget, each with (key stop, first key hidden from a row); the images
        with their last position filled in when that took a read-back."""
        size = max(MIN_CHUNK_ROWS, chunk_budget(device) // max(1, batch * self.num_heads * keys))
        bounds = [(s, min(s + size, count)) for s in range(0, count, size)]
        if len(bounds) == 1:
            # one chunk: the call's keys bound it (its last row is usually the call's last position), and its rows
            # see every key below the first of them: no read-back needed for either
            return bounds, [(keys, 0)], images
        # the second (and last) read-back: each chunk's key range
        last_pos = query.pos if not rows_padded else query.pos.masked_fill(~query.valid, -1)
        first_pos = query.pos if not rows_padded else query.pos.masked_fill(~query.valid, keys)
        parts = [images.pos.amax() if images.count else torch.zeros((), dtype=torch.long, device=device)]
        for s, e in bounds:
            parts += [last_pos[:, s:e].amax(), first_pos[:, s:e].amin()]
        values = torch.stack(parts).tolist()
        images = Images(images.pos, images.valid, images.has_image, images.every_sample_has_image, values[0])
        return bounds, [(max(values[1 + 2 * i] + 1, 1), values[2 + 2 * i] + 1) for i in range(len(bounds))], images

    # ------------------------------------------------------------------ decode
    def _decode_plan(self, image_mask, past_len) -> CallPlan | None:
        """One new token per sample, all text: no host sync, shapes fixed by the store."""
        store = self.store
        if store is None:
            if isinstance(past_len, torch.Tensor):
                return None  # a static cache filled before patching: nothing to continue
            self._check_continuation(past_len)
        images = store.images
        if not store.static:
            if torch.compiler.is_compiling():
                raise CMAIStateError(COMPILED_DYNAMIC_ERROR)
            self._check_continuation(int(past_len))
        if images.count == 0:   # nothing to inhibit; the counters move on (on the device for a static store)
            if store.static:
                store.text_count.add_(1)
            else:
                store.seq_len += 1
                store.text_count = store.text_count + 1
            return None
        if store.static:
            return self._static_decode_plan(store, image_mask, past_len)
        past_len = int(past_len)
        batch = image_mask.shape[0]
        store.flush()
        store.reserve(store.length + 1)
        views = store.decode_views()
        slot = store.length
        # the row's position, rank and validity, each written with one op into a view made once per sequence
        views.slot_pos[slot].fill_(past_len)
        views.slot_valid[slot].copy_(images.has_image)
        if views.slot_rank is not None:
            views.slot_rank[slot].copy_(store.text_count)
        rank = store.text_count
        store.text_count = rank + 1            # a new tensor: ``rank`` stays this row's rank
        store.length += 1
        store.seq_len += 1
        store.pending = slot
        has_image = images.has_image

        def query() -> TextPositions:
            return TextPositions(torch.full((batch, 1), past_len, dtype=torch.long, device=rank.device),
                                 rank.view(batch, 1), has_image.view(batch, 1))

        relation = None
        source: TextPositions | Callable[[], TextPositions] = query
        if self._needs_step_relation():
            source = query()
            relation = self.focus.relation(source, store.known(), self.discount)   # (B, 1, C)
        step = DecodeStep(write_index=slot, index=views.index, constants=store.decode, views=views, ones=None)
        return CallPlan(store=store, q_len=1, query_source=source, slot=None, row_start=0, relation=relation,
                        focus=self.focus, chunks=(), decode=step, keep_rows=True, workspace=CallWorkspace(),
                        gammas=self.inhibited)

    def _static_decode_plan(self, store: RowStore, image_mask, past_len) -> CallPlan:
        """A static store's step: counters and slots on the device (the step may be compiled), fixed shapes."""
        images = store.images
        batch = image_mask.shape[0]
        device = store.pos.device
        views = store.traced_views() if torch.compiler.is_compiling() else store.decode_views()
        store.flush(views)
        if isinstance(past_len, torch.Tensor):
            new_pos = past_len.to(device=device, dtype=torch.long).reshape(1, 1).expand(batch, 1)
        else:
            new_pos = torch.full((batch, 1), past_len, dtype=torch.long, device=device)
        # copies, not views: the store's counters move on below, the plan's facts must not
        query = TextPositions(new_pos, store.text_count.view(batch, 1).clone(), images.has_image.view(batch, 1))
        write_index = store.fill.view(1).clone()
        known = TextPositions(views.pos, store.rank, store.valid)
        for dst, src in ((known.pos, query.pos), (known.rank, query.rank), (known.valid, query.valid)):
            if dst is not None:
                dst.index_copy_(1, write_index, src)
        relation = self.focus.relation(query, known, self.discount) if self._needs_step_relation() else None
        store.pending_index.copy_(write_index)
        store.fill.add_(1)
        store.text_count.add_(1)
        if not torch.compiler.is_compiling():
            store.seq_len += 1
        step = DecodeStep(write_index=write_index, index=views.index, constants=store.decode, views=views,
                          ones=views.ones)
        return CallPlan(store=store, q_len=1, query_source=query, slot=None, row_start=0, relation=relation,
                        focus=self.focus, chunks=(), decode=step, keep_rows=True, workspace=CallWorkspace(),
                        gammas=self.inhibited)

    def _needs_step_relation(self) -> bool:
        return self.focus.decode_relation


def _visible_images(images: "Images", q_pos: torch.Tensor, q_valid: torch.Tensor | None) -> torch.Tensor:
    """(B, rows, N) C6's visible set: the real image keys at or before each real row."""
    visible = images.pos.unsqueeze(1) <= q_pos.unsqueeze(2)
    if images.valid is not None:
        visible = visible & images.valid.unsqueeze(1)
    if q_valid is not None:
        visible = visible & q_valid.unsqueeze(2)
    return visible


def _row_views(all_rows: torch.Tensor, layers: list[int] | None, row_start: int, s: int, e: int):
    """Per layer, the store's slice a chunk of rows writes (out) and the rows known by its end (known); one
    shared scratch (key None) when the rows live within the call only."""
    if layers is None:
        return {None: all_rows[0][:, s:e]}, {None: all_rows[0][:, :e]}
    if not layers:
        return {}, {}
    a, b = row_start + s, row_start + e
    return dict(zip(layers, all_rows[:, :, a:b].unbind(0))), dict(zip(layers, all_rows[:, :, :b].unbind(0)))


@dataclass
class _CallRows:
    """What one call's token types say: its text rows after an image (``slot``), and the facts read back once."""

    text: torch.Tensor                 # (B, Q) real text positions of the call
    redo_count: torch.Tensor           # (B,) text rows after an image, per sample
    count: int                         # the most rows a sample has (the plan's width)
    least_rows: int
    images: "Images"
    slot: torch.Tensor | None          # (B, count) query index of each row; None: no row
    text_count: torch.Tensor           # (B,) real text tokens so far, this call included
    uniform: int | None                # image keys every row sees, when all see the same number


@dataclass(frozen=True)
class _FoundImages:
    images: Images
    order: torch.Tensor   # (B, Q) per sample: its images, then its text rows after the first image, then the rest


@dataclass(frozen=True)
class SortedQuantile:
    """C6 for rows that see different numbers of image keys: a sort, then the precomputed positions."""

    at: QuantilePositions

    def __call__(self, masked: torch.Tensor) -> torch.Tensor:
        return quantile_of_sorted(sorted_rows(masked), self.at)


COMPILED_PREFILL_ERROR = (
    "focusvlm CMAI plans a prefill (a call with more than one new position) with data-dependent shapes, so it "
    "cannot run inside torch.compile(fullgraph=True). Run the prefill eagerly and compile the decode steps: "
    "transformers' generate does exactly this with cache_implementation='static' and a compile_config, or call the "
    "eager model for the prompt and the compiled forward for each new token.")
COMPILED_DYNAMIC_ERROR = (
    "focusvlm CMAI under torch.compile needs a static cache (its text-row store is preallocated to the cache "
    "length); use cache_implementation='static' or pass a StaticCache.")


__all__ = ["CMAIState", "CMAIStateError", "CallPlan", "DecodeConstants", "DecodeStep", "DecodeThreshold",
           "DecodeViews", "Images", "RowChunk", "RowStore", "first_true_indices"]
