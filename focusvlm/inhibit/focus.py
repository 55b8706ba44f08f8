"""CMAI as pure tensor functions: focus scores, quantile thresholds, inhibition.

Equation numbers (C1 ...) refer to docs/method.md. Shapes used throughout
(one decoder layer, one forward call):
    B   batch
    Qt  text query rows inhibited in this call (padded per batch)
    N   image key slots of each sample (padded to the batch maximum)
    T   text rows known so far in this layer: earlier calls' and this call's

All weights here are head-averaged, pre-inhibition attention weights (C1, C2).
Nothing in this file imports transformers.

A focus score (C3-C5, C10-C12) is a registered ``FocusScore``: ``relation``
says how each new text row weighs every known text row; it depends only on
positions, so it is computed once per forward call and shared by every layer.
``score`` combines it with one layer's weights.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from ..registry import Registry


@torch.library.custom_op("focusvlm::matmul", mutates_args=())
def _opaque_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.matmul(a, b)


@_opaque_matmul.register_fake
def _(a, b):
    return a.new_empty(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1]))


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.matmul; under torch.compile an opaque call to it. Inductor turns a decode step's one-row products
    into loops of its own, which on a CPU run slower than the BLAS call they replace."""
    return _opaque_matmul(a, b) if torch.compiler.is_compiling() else torch.matmul(a, b)


@dataclass(frozen=True)
class TextPositions:
    """Where text rows sit: the new rows of a call, or every row known so far."""

    pos: torch.Tensor    # (B, T) absolute position of each row
    rank: torch.Tensor   # (B, T) index among the sample's text tokens (text before the image counts)
    valid: torch.Tensor  # (B, T) bool: real rows (batches pad per-sample counts)


class FocusScore:
    """One way of turning text-row attention into a text-to-image focus score F (C5, C10-C12)."""

    name: ClassVar[str]
    # score() reads a_text, the new rows' weights on earlier text rows (gathering it costs a pass over A)
    reads_text_attention: ClassVar[bool] = False
    # relation() reads the rows' text ranks (positions alone do not give them): the state keeps ranks only then
    reads_rank: ClassVar[bool] = False
    # a decode step computes relation() (step_weights may read it); a variant whose decode F needs none says False
    decode_relation: ClassVar[bool] = True

    def relation(self, query: TextPositions, known: TextPositions, discount: float) -> torch.Tensor | None:
        """Per-call weights of every known row for every new row, (B, Qt, T); None when unused."""
        return None

    def score(self, a_img: torch.Tensor, a_text: torch.Tensor | None, rows: torch.Tensor,
              relation: torch.Tensor | None) -> torch.Tensor:
        """F of the new rows, (B, Qt, N), from their A_t2i rows ``a_img`` (B, Qt, N), their weights on the known
        text rows ``a_text`` (B, Qt, T), the known rows' A_t2i ``rows`` (B, T, N) and ``relation``."""
        raise NotImplementedError

    def step_weights(self, a_text: torch.Tensor | None, relation: torch.Tensor | None) -> torch.Tensor | None:
        """A decode row's F as ``a_img + step_weights @ earlier_rows`` (None: F = a_img), or NotImplemented.

        The decode step keeps its own A_t2i row out of the store until the next call, and every store slot that
        holds no earlier real text row of the sample is zero, so the weights need not exclude them: every
        variant whose own row enters F with weight 1 (C4/C5, C10, C11, C12 with rank gap 0) fits.
        """
        return NotImplemented


FOCUS_VARIANTS: Registry[FocusScore] = Registry("focus variant")


def register_focus(name: str) -> Callable[[type[FocusScore]], type[FocusScore]]:
    """Class decorator: make a FocusScore selectable as ``CMAIConfig(focus=name)``."""

    def add(cls: type[FocusScore]) -> type[FocusScore]:
        cls.name = name
        FOCUS_VARIANTS.add(name, cls(), origin=cls.__module__)
        return cls
    return add


def get_focus(name: str) -> FocusScore:
    return FOCUS_VARIANTS.get(name)


def _earlier(query: TextPositions, known: TextPositions) -> torch.Tensor:
    """(B, Qt, T) bool: known row h is a real text row strictly before query row j (h < j, C3)."""
    return known.valid.unsqueeze(1) & (known.pos.unsqueeze(1) < query.pos.unsqueeze(2))


def _up_to(query: TextPositions, known: TextPositions) -> torch.Tensor:
    """(B, Qt, T) bool: known row h is a real text row at or before query row j (h <= j)."""
    return known.valid.unsqueeze(1) & (known.pos.unsqueeze(1) <= query.pos.unsqueeze(2))


@register_focus("neighborhood")
class NeighborhoodFocus(FocusScore):
    """C3-C5: F_j = A_t2i[j] + sum_{h text, h < j} A[j, h] A_t2i[h]  (the paper's method)."""

    reads_text_attention = True
    decode_relation = False

    def relation(self, query, known, discount):
        return _earlier(query, known)

    def score(self, a_img, a_text, rows, relation):
        # C4 + C5: (A_t2n = weights on earlier text rows) @ A_t2i, added to A_t2i
        return a_img + matmul(a_text * relation, rows)

    def step_weights(self, a_text, relation):
        # the row's weight on its own key multiplies its own (not yet stored, zero) slot: no relation mask needed
        return a_text


@register_focus("tia")
class TextImageFocus(FocusScore):
    """C10: F_j = A_t2i[j]."""

    decode_relation = False

    def score(self, a_img, a_text, rows, relation):
        return a_img

    def step_weights(self, a_text, relation):
        return None


@register_focus("sum")
class SumFocus(FocusScore):
    """C11: F_j = sum_{h text, h <= j} A_t2i[h]."""

    def relation(self, query, known, discount):
        return _up_to(query, known).float()

    def score(self, a_img, a_text, rows, relation):
        return matmul(relation, rows)

    def step_weights(self, a_text, relation):
        return relation


@register_focus("discounted")
class DiscountedFocus(FocusScore):
    """C12: F_j = sum_{h text, h <= j} discount^(rank_j - rank_h) A_t2i[h]."""

    reads_rank = True

    def relation(self, query, known, discount):
        gap = (query.rank.unsqueeze(2) - known.rank.unsqueeze(1)).clamp(min=0).float()
        return torch.pow(discount, gap) * _up_to(query, known)

    def score(self, a_img, a_text, rows, relation):
        return matmul(relation, rows)

    def step_weights(self, a_text, relation):
        return relation


@dataclass(frozen=True)
class FocusInputs:
    """Everything a focus score may read for Qt new text rows (one layer)."""

    a_img: torch.Tensor          # (B, Qt, N) the new rows' A_t2i rows (C2)
    a_text: torch.Tensor | None  # (B, Qt, T) the new rows' weights on every known text row's key
    rows: torch.Tensor           # (B, T, N) A_t2i rows of every known text row, the new ones included
    query: TextPositions         # (B, Qt) the new rows
    known: TextPositions         # (B, T) the known rows


def focus_score(variant: str, inputs: FocusInputs, discount: float = 0.9) -> torch.Tensor:
    """Text-to-image focus score F of each new text row, shape (B, Qt, N) (C5, C10-C12)."""
    focus = get_focus(variant)
    return focus.score(inputs.a_img, inputs.a_text, inputs.rows, focus.relation(inputs.query, inputs.known, discount))


# --------------------------------------------------------------------------- thresholds (C6, C7)

@dataclass(frozen=True)
class QuantilePositions:
    """Where a linear-interpolation quantile reads a sorted row: lerp(sorted[lo], sorted[hi], weight)."""

    lo: torch.Tensor      # (..., 1) long
    hi: torch.Tensor      # (..., 1) long
    weight: torch.Tensor  # (..., 1) float


def quantile_positions(count: torch.Tensor, q: float, width: int, dtype: torch.dtype = torch.float32) -> QuantilePositions:
    """Positions of the q-quantile in rows holding ``count`` valid entries (sorted first), of ``width`` slots."""
    rank = q * (count - 1).clamp(min=0).to(dtype)
    lo = rank.floor()
    weight = rank - lo
    lo = lo.long().clamp(max=width - 1)
    hi = rank.ceil().long().clamp(max=width - 1)
    return QuantilePositions(lo.unsqueeze(-1), hi.unsqueeze(-1), weight.unsqueeze(-1))


def quantile_positions_per_gamma(count: torch.Tensor, gammas: list[float], width: int) -> list[QuantilePositions]:
    """``quantile_positions(count, gamma, width)`` for every gamma at once (float32): one pass of small ops per call
    instead of one per layer. A float32 tensor of gammas times the float32 counts rounds exactly as the scalar
    gamma does (the scalar is converted to float32 before the multiplication)."""
    gamma = torch.tensor(gammas, dtype=torch.float32, device=count.device).view(-1, *([1] * (count.dim() + 1)))
    rank = gamma * (count - 1).clamp(min=0).to(torch.float32).unsqueeze(-1)     # (L, ..., 1)
    lo = rank.floor()
    weight = rank - lo
    lo = lo.long().clamp(max=width - 1)
    hi = rank.ceil().long().clamp(max=width - 1)
    return [QuantilePositions(*at) for at in zip(lo.unbind(0), hi.unbind(0), weight.unbind(0))]


def _float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def host_quantile_positions(count: int, q: float, width: int) -> tuple[int, int, float]:
    """``quantile_positions`` for a count the host knows: (lo, hi, weight) with the same float32 arithmetic, so
    no device work and no read-back. float32(q) * float32(count - 1) is exact in double (24 + 24 significant bits)
    and rounds once to float32, as the device multiplication does; floor, ceil and the fraction are exact."""
    rank = _float32(_float32(q) * _float32(float(max(count - 1, 0))))
    lo, hi = math.floor(rank), math.ceil(rank)
    return min(lo, width - 1), min(hi, width - 1), rank - lo


@dataclass(frozen=True)
class SelectedQuantile:
    """C6 for rows that each hold ``count`` valid entries among ``width`` (the others +inf): the interpolation
    positions are host integers, so the two order statistics come from one partial selection, with no sort of
    the whole row and no read-back. Same values, same ``torch.lerp`` as ``masked_quantile``."""

    lo: int
    hi: int
    width: int
    weight: torch.Tensor      # 0-d float32 on the values' device

    @classmethod
    def build(cls, count: int, q: float, width: int, device: torch.device | str = "cpu") -> "SelectedQuantile":
        lo, hi, w = host_quantile_positions(count, q, width)
        return cls(lo, hi, width, torch.tensor(w, dtype=torch.float32, device=device))

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        """The quantile of each row of ``values`` (..., width), shape (..., 1)."""
        return selected_quantile(values, self.lo, self.hi, self.width, self.weight)


def selected_quantile(values: torch.Tensor, lo: int, hi: int, width: int, weight: torch.Tensor) -> torch.Tensor:
    """``SelectedQuantile``'s computation as a plain function: code that torch.compile traces calls this rather
    than building the (frozen dataclass) object inside the graph, which dynamo of torch 2.11 cannot trace."""
    if lo == hi:   # an exact rank: lerp(x, x, 0) is x
        return values.kthvalue(lo + 1, dim=-1, keepdim=True).values
    if hi + 1 <= width - lo:   # from the small end: the hi + 1 smallest, ascending, end with both statistics
        small = values.topk(hi + 1, dim=-1, largest=False, sorted=True).values
        _, x_lo, x_hi = small.split([lo, 1, 1], dim=-1)
    else:                      # from the large end: the width - lo largest, descending, end with them
        large = values.topk(width - lo, dim=-1, largest=True, sorted=True).values
        _, x_hi, x_lo = large.split([width - lo - 2, 1, 1], dim=-1)
    return torch.lerp(x_lo, x_hi, weight)


def quantile_of_sorted(ordered: torch.Tensor, at: QuantilePositions) -> torch.Tensor:
    """The quantile of rows sorted ascending, shape (..., 1)."""
    return quantile_of_sorted_at(ordered, at.lo, at.hi, at.weight)


def quantile_of_sorted_at(ordered: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                          weight: torch.Tensor) -> torch.Tensor:
    """``quantile_of_sorted`` with the positions as tensors (no ``QuantilePositions`` built in traced code)."""
    # torch.lerp is what torch.quantile uses, so ties at exact ranks agree bit for bit
    return torch.lerp(ordered.gather(-1, lo), ordered.gather(-1, hi), weight)


def sorted_rows(values: torch.Tensor) -> torch.Tensor:
    """``values`` sorted along the last axis (float32): the same values in the same order as ``Tensor.sort``.

    Large inputs are sorted as integers: a float's bit pattern, with the magnitude bits flipped for negative
    numbers, orders exactly like the float, and CPU torch sorts integers with a radix sort, about three times
    faster than its float comparison sort.
    """
    if values.dtype != torch.float32 or values.numel() < 4096:
        return values.sort(dim=-1).values
    return _float_order(_float_order(values.view(torch.int32)).sort(dim=-1, stable=True).values).view(torch.float32)


def _float_order(bits: torch.Tensor) -> torch.Tensor:
    """An involution on int32 bit patterns of floats that makes integer order equal float order."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def masked_quantile(values: torch.Tensor, valid: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row quantile over the entries where ``valid`` is True (C6).

    Same definition as ``torch.quantile(..., interpolation="linear")`` applied
    to each row's valid entries, but batched over rows that hold different
    numbers of valid entries, and free of torch.quantile's input-size limit.
    Rows with no valid entry get +inf (callers never use them).
    """
    ordered = sorted_rows(values.masked_fill(~valid, float("inf")))
    count = valid.sum(dim=-1)
    tau = quantile_of_sorted(ordered, quantile_positions(count, q, values.shape[-1], values.dtype)).squeeze(-1)
    return tau.masked_fill(count == 0, float("inf"))


def uniform_quantile(values: torch.Tensor, count: int, q: float) -> torch.Tensor:
    """C6's q-quantile of the ``count`` smallest entries of every row (the rest are +inf), shape (..., 1).

    For rows that all hold the same number of valid entries (C6's visible set is the same size for every
    text row after the last image): a partial selection of the two order statistics the quantile
    interpolates between, instead of a full sort; same values, same interpolation as ``masked_quantile``.
    """
    if count == 0:
        return values.new_full(values.shape[:-1] + (1,), float("inf"))
    if values.dtype != torch.float32:   # the host positions reproduce float32 arithmetic only
        at = quantile_positions(torch.tensor(count), q, values.shape[-1], values.dtype)
        weight = at.weight.to(values.device).view(())
        return SelectedQuantile(int(at.lo), int(at.hi), values.shape[-1], weight)(values)
    return SelectedQuantile.build(count, q, values.shape[-1], values.device)(values)


def inhibition_mask(focus: torch.Tensor, visible: torch.Tensor, gamma: float,
                    visible_count: int | None = None) -> torch.Tensor:
    """Image keys each text row stops attending to: F below the row's gamma-quantile (C7).

    The quantile runs over the image keys the row can see; a row that sees no
    image key is left alone. ``visible_count``: every row that matters sees
    that many keys (lets the threshold be selected rather than sorted).
    """
    if visible_count is None:
        tau = masked_quantile(focus, visible, gamma).unsqueeze(-1)
    else:  # every row sees visible_count image keys (the caller knows): select instead of sorting
        tau = uniform_quantile(focus.masked_fill(~visible, float("inf")), visible_count, gamma)
    return visible & (focus < tau)


__all__ = ["FOCUS_VARIANTS", "FocusInputs", "FocusScore", "QuantilePositions", "SelectedQuantile", "TextPositions",
           "quantile_of_sorted_at", "selected_quantile",
           "focus_score", "get_focus", "host_quantile_positions", "inhibition_mask", "masked_quantile", "matmul",
           "quantile_of_sorted", "quantile_positions", "quantile_positions_per_gamma", "register_focus",
           "sorted_rows", "uniform_quantile"]
