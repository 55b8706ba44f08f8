"""Per-model CMAI state: token types of the running sequence and cached text rows.

One ``CMAIState`` lives on a patched model. ``begin_call`` runs once per
forward call (before the decoder layers) and turns input ids + padding mask
into index tensors that every layer reuses, so the per-layer attention code
does no host synchronisation. Each inhibited layer appends the
pre-inhibition A_t2i rows of its new text tokens to ``layer_rows`` so that
later decode steps see exactly what a full forward would (shared/SPEC.md:
generation with a KV cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class CMAIStateError(RuntimeError):
    """The CMAI bookkeeping cannot follow what the model was asked to do."""


@dataclass
class TextRows:
    """Head-averaged, pre-inhibition text-to-image rows of one layer's text tokens."""

    rows: torch.Tensor   # (B, T, N) float32
    pos: torch.Tensor    # (B, T) absolute positions
    valid: torch.Tensor  # (B, T) real rows (prefill pads per-sample counts)
    rank: torch.Tensor   # (B, T) index among the sample's text tokens


def _first_true_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of each row's True entries, in order, padded to the batch maximum.

    Returns (idx (B, M), valid (B, M)); padded slots point at index 0.
    """
    counts = mask.sum(dim=1)
    width = int(counts.max()) if mask.numel() else 0
    # a stable sort on "not mask" lists the True positions first, in their original order
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=mask.device).unsqueeze(0) < counts.unsqueeze(1)
    return order.masked_fill(~valid, 0), valid


class CMAIState:
    def __init__(self, focus: str, discount: float):
        self.focus = focus
        self.discount = discount
        self.reset()

    def reset(self) -> None:
        self.seq_len = 0
        self.active = False             # any image in the batch
        self.img_pos = self.img_valid = self.first_image = None
        self.has_rows = False
        self.text_count = None          # (B,) text tokens seen so far
        self.layer_rows: dict[int, RowBuffer] = {}

    def begin_call(self, image_mask: torch.Tensor, attention_mask: torch.Tensor | None, past_len: int) -> None:
        """Record token types for a forward call over ``image_mask.shape[1]`` new positions."""
        batch, q_len = image_mask.shape
        device = image_mask.device
        if past_len == 0:
            self.reset()
        elif past_len != self.seq_len:
            raise CMAIStateError(
                f"CMAI saw a cache of {past_len} positions but tracked {self.seq_len}: the cache was cropped, "
                "reordered or reused across sequences. Start generation with a fresh cache "
                "(beam search, contrastive search and assisted decoding are not supported).")
        elif self.active and bool(image_mask.any()):
            raise CMAIStateError("CMAI needs all image tokens in the first forward call of a sequence "
                                 "(prefill); this call adds image tokens to an existing cache.")
        total = past_len + q_len
        if attention_mask is None:
            key_valid = torch.ones(batch, total, dtype=torch.bool, device=device)
        else:
            if attention_mask.dim() != 2 or attention_mask.shape[1] != total:
                raise CMAIStateError(
                    f"CMAI needs a 2-D attention mask covering past and new positions ({batch}x{total}), "
                    f"got shape {tuple(attention_mask.shape)}")
            key_valid = attention_mask.to(device=device, dtype=torch.bool)
        new_valid = key_valid[:, past_len:]
        text = new_valid & ~image_mask

        if past_len == 0:
            self.img_pos, self.img_valid = _first_true_indices(image_mask & new_valid)
            self.active = self.img_pos.shape[1] > 0
            self.text_count = torch.zeros(batch, dtype=torch.long, device=device)
            # text before a sample's first image sees no image: its output stays the stock kernel's
            never = torch.iinfo(torch.long).max  # a sample without images never gets rows redone, decode included
            self.first_image = torch.where(self.img_valid[:, 0], self.img_pos[:, 0], never) if self.active else None
        if not self.active:
            self.has_rows = False
            self.seq_len = total
            return

        positions = past_len + torch.arange(q_len, device=device)
        redo = text & (positions.unsqueeze(0) > self.first_image.unsqueeze(1))
        rank = self.text_count.unsqueeze(1) + text.cumsum(dim=1) - 1
        slot, slot_valid = _first_true_indices(redo)
        self.q_slot = slot                      # (B, Qt) row index within this call
        self.q_valid = slot_valid
        self.q_pos = slot + past_len            # absolute positions
        self.q_rank = rank.gather(1, slot)      # index among the sample's text tokens
        self.text_count = self.text_count + text.sum(dim=1)
        self.has_rows = slot.shape[1] > 0
        # flat (sample, slot) pairs of the real rows, for writing outputs back without a sync
        self.write_b, self.write_slot = slot_valid.nonzero(as_tuple=True)
        self.write_row = slot[self.write_b, self.write_slot]
        # decode steps are all text: the stock kernel's output would be thrown away
        self.all_text = slot.shape[1] == q_len and bool(slot_valid.all())
        # masks every layer of this call shares (computed once here, not once per layer)
        keys = torch.arange(total, device=device)
        allowed = key_valid[:, None, :] & (keys[None, None, :] <= self.q_pos[:, :, None])   # (B, Qt, K)
        allowed |= ~slot_valid[:, :, None]  # padded slots may see no key at all; keep them finite, they are dropped
        self.hidden_keys = ~allowed
        self.visible = (self.img_valid[:, None, :] & (self.img_pos[:, None, :] <= self.q_pos[:, :, None])
                        & slot_valid[:, :, None])                                       # (B, Qt, N)
        self.img_index = self.img_pos[:, None, :].expand(-1, slot.shape[1], -1)
        self.seq_len = total

    def extend_rows(self, layer_idx: int, new: TextRows) -> TextRows:
        """All text rows of this layer (cached + new); the cache keeps them for later calls."""
        buffer = self.layer_rows.get(layer_idx)
        if buffer is None:
            buffer = self.layer_rows[layer_idx] = RowBuffer()
        return buffer.append(new)


class RowBuffer:
    """Text rows of one layer in preallocated storage that doubles when full.

    A decode step appends one row per sample; concatenating onto the whole
    cache every step would copy it every step (quadratic in the answer length).
    """

    def __init__(self) -> None:
        self.store: TextRows | None = None
        self.length = 0

    def append(self, new: TextRows) -> TextRows:
        fields = (new.rows, new.pos, new.valid, new.rank)
        end = self.length + new.pos.shape[1]
        capacity = 0 if self.store is None else self.store.pos.shape[1]
        if end > capacity:
            size = max(end, 2 * capacity, 64)
            grown = [torch.zeros((t.shape[0], size) + t.shape[2:], dtype=t.dtype, device=t.device) for t in fields]
            if self.store is not None:
                for dst, src in zip(grown, (self.store.rows, self.store.pos, self.store.valid, self.store.rank)):
                    dst[:, :self.length] = src[:, :self.length]
            self.store = TextRows(*grown)
        for dst, src in zip((self.store.rows, self.store.pos, self.store.valid, self.store.rank), fields):
            dst[:, self.length:end] = src
        self.length = end
        return TextRows(*(t[:, :end] for t in (self.store.rows, self.store.pos, self.store.valid, self.store.rank)))
