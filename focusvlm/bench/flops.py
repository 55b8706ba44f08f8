"""Analytic prefill FLOPs of a LLaVA-1.5-style model (vision tower, projector, LLM, CMAI).

Conventions (stated once so every figure can be checked by hand):
* a multiply-add counts 2 FLOPs; a linear layer on T tokens is 2 * T * in * out;
* norms, activations, softmax, biases and sorting are not counted (they are
  memory-bound and small next to the matmuls);
* vision attention is bidirectional: Q.K^T and A.V are 2 * T^2 * d each;
* LLM attention is causal and counted as the half that is needed:
  Q.K^T and A.V are T^2 * d each (what FlashAttention-style kernels do);
* the LM head runs on the last position only (generate's prefill keeps one logit row).

VMTC changes the token count inside a layer: self-attention sees the layer's
input tokens, the MLP its output tokens (SPEC: compression sits between the
two), so a layer is described by the pair (tokens_in, tokens_out).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass(frozen=True)
class VisionShape:
    image_size: int
    patch_size: int
    hidden: int
    intermediate: int
    layers: int
    channels: int = 3

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_config(cls, cfg: Any) -> "VisionShape":
        return cls(cfg.image_size, cfg.patch_size, cfg.hidden_size, cfg.intermediate_size,
                   cfg.num_hidden_layers, getattr(cfg, "num_channels", 3))


@dataclass(frozen=True)
class TextShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_config(cls, cfg: Any) -> "TextShape":
        heads = cfg.num_attention_heads
        return cls(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, heads,
                   getattr(cfg, "num_key_value_heads", None) or heads, cfg.vocab_size)


def vit_layer_flops(d: int, inter: int, t_in: int, t_out: int | None = None) -> int:
    """One pre-norm ViT layer: attention on ``t_in`` tokens, MLP on ``t_out`` (VMTC may shrink in between)."""
    t_out = t_in if t_out is None else t_out
    qkv_o = 2 * t_in * d * d * 4            # q, k, v, o projections
    attention = 2 * t_in * t_in * d * 2     # Q.K^T and A.V, bidirectional
    mlp = 2 * t_out * d * inter * 2         # fc1, fc2
    return qkv_o + attention + mlp


def vmtc_stage_flops(d: int, t_in: int, keep: int, clusters: int, iters: int) -> int:
    """Extra work of one VMTC stage (estimate): CLS importance and spherical K-means.

    Importance re-projects q (CLS only) and k (all tokens) and scores the CLS row;
    K-means costs a (redundant x clusters) similarity per iteration plus the
    centroid update; the weighted merge is one pass over the redundant tokens.
    """
    importance = 2 * d * d + 2 * t_in * d * d + 2 * t_in * d
    redundant = max(t_in - 1 - keep, 0)     # CLS never takes part
    kmeans = iters * (2 * redundant * clusters * d + 2 * redundant * d) if clusters else 0
    merge = 2 * redundant * d
    return importance + kmeans + merge


def vision_flops(v: VisionShape, schedule: Sequence[tuple[int, int]] | None = None,
                 vmtc_stages: Sequence[tuple[int, int, int, int]] = ()) -> int:
    """Patch embedding + every encoder layer (+ VMTC's own work), per image.

    schedule: (tokens_in, tokens_out) of each layer, CLS included; None = stock
        (patches + 1 everywhere).
    vmtc_stages: (tokens_in, keep, clusters, iters) of each compressing layer.
    """
    tokens = v.patches + 1
    schedule = list(schedule) if schedule is not None else [(tokens, tokens)] * v.layers
    embed = 2 * v.patches * v.channels * v.patch_size ** 2 * v.hidden
    layers = sum(vit_layer_flops(v.hidden, v.intermediate, a, b) for a, b in schedule)
    extra = sum(vmtc_stage_flops(v.hidden, *stage) for stage in vmtc_stages)
    return embed + layers + extra


def projector_flops(v: VisionShape, t: TextShape, visual_tokens: int) -> int:
    """LLaVA-1.5's 2-layer MLP projector on the tokens that reach the LLM."""
    return 2 * visual_tokens * v.hidden * t.hidden + 2 * visual_tokens * t.hidden * t.hidden


def llm_layer_flops(t: TextShape, seq: int) -> int:
    """One Llama decoder layer over ``seq`` positions (causal attention, SwiGLU MLP)."""
    kv = t.kv_heads * t.head_dim
    proj = 2 * seq * t.hidden * (2 * t.hidden + 2 * kv)     # q, o full width; k, v GQA width
    attention = 2 * seq * seq * t.hidden                   # causal half: seq^2*d for Q.K^T, same for A.V
    mlp = 2 * seq * t.hidden * t.intermediate * 3           # gate, up, down
    return proj + attention + mlp


def llm_prefill_flops(t: TextShape, seq: int, layer_seq: Sequence[int] | None = None) -> int:
    """All decoder layers over ``seq`` positions plus the LM head on the last one.

    layer_seq: positions each decoder layer runs on, when a method removes
    tokens inside the LLM (FastV); None = ``seq`` in every layer.
    """
    if layer_seq is None:
        return t.layers * llm_layer_flops(t, seq) + 2 * t.hidden * t.vocab
    if len(layer_seq) != t.layers:
        raise ValueError(f"layer_seq lists {len(layer_seq)} layers, the LLM has {t.layers}")
    return sum(llm_layer_flops(t, s) for s in layer_seq) + 2 * t.hidden * t.vocab


def cmai_flops(t: TextShape, seq: int, text_rows: int, image_tokens: int, inhibited_layers: int) -> int:
    """CMAI's extra work per inhibited layer (docs/method.md C1-C5): what the stock kernel does not give.

    The fused attention call replaces the stock one at the same cost, so the extra is the text rows'
    head-averaged attention (C1: Q.K^T of each text row against the keys it sees, the last ``text_rows``
    of ``seq`` positions, causal) and the neighbourhood product A_t2n @ A_t2i (C4: each row against the
    text rows before it, over the image columns).
    """
    scores = 2 * t.hidden * (text_rows * (seq - text_rows) + text_rows * (text_rows + 1) // 2)
    focus = 2 * image_tokens * (text_rows * (text_rows - 1) // 2)
    return inhibited_layers * (scores + focus)


@dataclass
class PrefillFlops:
    vision: int
    projector: int
    llm: int
    cmai: int
    batch: int = 1
    detail: dict[str, Any] = field(default_factory=dict)
    selection: int = 0   # the vision / LLM-side methods' own choosing (scores, similarities), beyond their layers

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.llm + self.cmai + self.selection

    def as_dict(self) -> dict[str, Any]:
        return {"vision": self.vision, "projector": self.projector, "llm": self.llm, "cmai": self.cmai,
                "selection": self.selection, "total": self.total, "batch": self.batch, **self.detail}


def prefill_flops(v: VisionShape, t: TextShape, *, prompt_tokens: int, visual_tokens: int, batch: int = 1,
                  vision_schedule: Sequence[tuple[int, int]] | None = None,
                  vmtc_stages: Sequence[tuple[int, int, int, int]] = (), cmai_layers: int = 0,
                  llm_layer_seq: Sequence[int] | None = None, crops: int = 1, selection: int = 0) -> PrefillFlops:
    """Time-to-first-token FLOPs of ``batch`` samples: one image + ``prompt_tokens`` text tokens each.

    llm_layer_seq: positions per decoder layer when tokens leave inside the LLM (FastV).
    ``crops``: tower passes per image (AnyRes models encode a base crop and every tile).
    ``selection``: a method's own selection work per image (``Method.selection_flops``).
    """
    seq = prompt_tokens + visual_tokens
    return PrefillFlops(
        vision=batch * crops * vision_flops(v, vision_schedule, vmtc_stages),
        projector=batch * projector_flops(v, t, visual_tokens),
        llm=batch * llm_prefill_flops(t, seq, llm_layer_seq),
        cmai=batch * cmai_flops(t, seq, prompt_tokens, visual_tokens, cmai_layers),
        batch=batch, detail={"seq_len": seq}, selection=batch * selection)


# --------------------------------------------------------------------------- towers with a patch merger (Qwen)

def merger_tower_flops(vc: Any, grids: Sequence[Sequence[int]]) -> int:
    """Qwen2.5-VL / Qwen3-VL vision tower on inputs of patch grids (t, h, w), merger(s) included.

    Same conventions as above. Patch embedding is a linear on C*T*p*p values per patch; every
    block projects q, k, v, o and runs its MLP on every patch (Qwen2.5's MLP is gated: 3
    matrices; Qwen3's is not: 2). Attention spans one frame in full-attention blocks (all of
    Qwen3's; Qwen2.5's ``fullatt_block_indexes``) and one window of ``window_size`` pixels
    elsewhere. Each merger (the main one, and Qwen3's deepstack ones) is a 2-layer MLP on the
    merged tokens: 4d -> 4d -> out (deepstack: 4d -> 4d -> out as well).
    """
    d, inter, depth = vc.hidden_size, vc.intermediate_size, vc.depth
    merge, patch = vc.spatial_merge_size, vc.patch_size
    unit = merge * merge
    gated = hasattr(vc, "fullatt_block_indexes")
    full_blocks = set(vc.fullatt_block_indexes) if gated else set(range(depth))
    mergers = 1 + len(getattr(vc, "deepstack_visual_indexes", None) or ())
    side = vc.window_size // merge // patch if gated else None
    total = 0
    for t, h, w in grids:
        patches = t * h * w
        frame = h * w
        hm, wm = h // merge, w // merge
        windows = [] if side is None else [unit * min(side, hm - y) * min(side, wm - x)
                                           for y in range(0, hm, side) for x in range(0, wm, side)]
        total += 2 * patches * vc.in_channels * vc.temporal_patch_size * patch * patch * d
        for block in range(depth):
            total += 2 * patches * d * d * 4 + 2 * patches * d * inter * (3 if gated else 2)
            spans = [frame] if block in full_blocks else windows
            total += t * sum(2 * span * span * d * 2 for span in spans)
        merged = patches // unit
        total += mergers * (2 * merged * (unit * d) ** 2 + 2 * merged * unit * d * vc.out_hidden_size)
    return total


def merged_vmtc_flops(vc: Any, grids: Sequence[Sequence[int]], stages: Sequence[tuple[int, int, int, int]]) -> int:
    """VMTC's own work after the merger (estimate): the last full-attention block's q/k re-projected
    and its attention scored over each frame, then K-means over the redundant merged tokens and the merge.
    ``stages``: (merged tokens in, kept, clusters, k-means iterations) of each input's frames, as a bound
    method's ``stage_plan(merged_tokens)`` lists them."""
    d, out = vc.hidden_size, vc.out_hidden_size
    total = 0
    for (t, h, w), (n_in, keep, clusters, iters) in zip(grids, stages):
        frame = h * w
        total += 2 * t * frame * d * d * 2 + t * 2 * frame * frame * d
        redundant = n_in - keep
        if clusters:
            total += t * iters * (2 * redundant * clusters * out + 2 * redundant * out) + t * 2 * redundant * out
    return total


def merger_prefill_flops(vc: Any, t: TextShape, *, grids: Sequence[Sequence[int]], prompt_tokens: int,
                         visual_tokens: int, batch: int = 1, vmtc: int = 0, cmai_layers: int = 0) -> PrefillFlops:
    """Time-to-first-token FLOPs of a merger tower + LLM: ``batch`` samples of one image (``grids[0]``) each.
    The merger is counted in ``vision`` (``projector`` is 0); ``vmtc``: VMTC's own FLOPs per image."""
    seq = prompt_tokens + visual_tokens
    return PrefillFlops(
        vision=batch * (merger_tower_flops(vc, grids[:1]) + vmtc),
        projector=0,
        llm=batch * llm_prefill_flops(t, seq),
        cmai=batch * cmai_flops(t, seq, prompt_tokens, visual_tokens, cmai_layers),
        batch=batch, detail={"seq_len": seq})
