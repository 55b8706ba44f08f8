"""Qwen2.5-VL adapter (``Qwen2_5_VLForConditionalGeneration`` / ``Qwen2_5_VLModel``).

Hook points (transformers 5.23):
* image positions: ``input_ids`` equal to ``image_token_id`` in a call that carries images
  (``pixel_values``, or ``mm_encoder_outputs["image"]``, which ``generate()`` computes before
  the prefill and passes instead of pixels), likewise ``video_token_id`` with videos;
* CMAI needs nothing else: the 3-D rope and rope deltas are computed by the stock model
  from an unchanged token layout;
* VMTC (one stage after the 2x2 merger, SPEC "Other model families"): instance-level
  wrappers of the core's ``get_image_features`` / ``get_video_features`` reduce the merged
  tokens; a forward pre-hook on the last full-attention ViT block captures that block's
  input so the importance can be computed from its own q/k (SDPA returns no weights);
  an instance-level ``get_rope_index`` gives the compressed layout the positions its
  tokens come from (it rewrites the prompt into the stock layout, calls the stock
  function, and reads the kept positions back, so the family's own position rules,
  video time intervals included, are never copied); and, because ``generate()`` computes
  positions before it encodes the pixels, an instance-level
  ``_prepare_position_ids_for_generation`` encodes them first (once: it hands the
  features on as ``mm_encoder_outputs``);
* processor: instance-level ``replace_image_token`` / ``replace_video_token`` /
  ``_get_num_multimodal_tokens`` emit the compressed count per frame, a function of
  ``image_grid_thw`` and the target only.
* loading: without torchvision the processor loads images-only (``processors.load_processor``);
* ``focusvlm show``: the processor's flattened patches are put back into the picture
  (``patches_to_image``) and drawn on the merged-token grid, one cell per 2x2 patches.
Every hook returns its undo; the stock classes are never modified. Qwen3-VL
(``qwen3_vl.py``) subclasses this adapter and changes only what differs.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel,
                          Qwen2_5_VLProcessor)

from .. import hfcompat
from . import register_family
from .base import (CallInputs, FamilyAdapter, MergedCall, MergedResult, MergerStage, ShownCrop,
                   UnsupportedModelError, override_on_instance)

# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class QwenPreset:
    """A random-weight model shape; ``image_side`` is the square image (pixels) ``bench`` feeds it."""

    vision: dict[str, Any]
    text: dict[str, Any]
    image_side: int


# token ids of the tiny presets (the test tokenizer uses the same ones)
TINY_TOKENS = dict(image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503)
# the released checkpoints' ids
REAL_TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                   vision_end_token_id=151653)

_QWEN25_VISION_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                         spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=3584,
                         fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu")
_QWEN25_TEXT_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                       rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                           "mrope_section": [16, 24, 24]})

QWEN25_PRESETS: dict[str, QwenPreset] = {
    # unit tests: 4 ViT blocks (two of them full attention), windows of 2x2 merged tokens, GQA in the LM
    "qwen2.5-vl-tiny": QwenPreset(
        vision=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=14, spatial_merge_size=2,
                    temporal_patch_size=2, window_size=56, out_hidden_size=64, fullatt_block_indexes=[1, 3],
                    tokens_per_second=2, hidden_act="silu"),
        text=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=None, eos_token_id=None,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        image_side=112,
    ),
    # CPU benchmarks: the 7B's vision tower exactly, a small LM of the same shape family
    "qwen2.5-vl-mid": QwenPreset(
        vision=_QWEN25_VISION_7B | dict(out_hidden_size=1536),
        text=dict(vocab_size=32064, hidden_size=1536, intermediate_size=8960, num_hidden_layers=8,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  bos_token_id=None, eos_token_id=None,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
        image_side=224,  # 16 x 16 patches, 64 LLM tokens: the real tower stays affordable on a CPU
    ),
    "qwen2.5-vl-7b": QwenPreset(vision=_QWEN25_VISION_7B, text=_QWEN25_TEXT_7B, image_side=448),
}


def _with_overrides(preset: QwenPreset, overrides: dict[str, Any]) -> dict[str, Any]:
    """Text-config overrides (``bench --vision-only`` swaps in a token LM); the 3-D rope sections are
    re-split for a new head size in the released models' proportions (16:24:24 of 64)."""
    text = {**preset.text, **overrides}
    half = (text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]) // 2
    rope = dict(text["rope_parameters"])
    if sum(rope["mrope_section"]) != half:
        side = 3 * half // 8
        rope["mrope_section"] = [half - 2 * side, side, side]
    text["rope_parameters"] = rope
    return text


# --------------------------------------------------------------------------- the adapter


class _MergerState:
    """Per-model bookkeeping of the merger stage: what the last vision call of each modality produced."""

    def __init__(self) -> None:
        self.depth = 0                                   # nested feature calls (Qwen3's videos go through images)
        self.merge = 2                                   # the tower's spatial merge size
        self.captured: dict[str, Any] = {}
        self.recorded: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}   # modality -> (grid_thw, sources)


@register_family
class Qwen25VLAdapter(FamilyAdapter):
    name = "qwen2_5_vl"
    title = "Qwen2.5-VL"
    model_types = ("qwen2_5_vl",)
    presets = tuple(QWEN25_PRESETS)
    preset_table: ClassVar[dict[str, QwenPreset]] = QWEN25_PRESETS
    model_class: ClassVar[type] = Qwen2_5_VLForConditionalGeneration
    core_class: ClassVar[type] = Qwen2_5_VLModel
    config_class: ClassVar[type] = Qwen2_5_VLConfig
    processor_class: ClassVar[type] = Qwen2_5_VLProcessor
    reduces_after_merger = True
    # Qwen3's prompts put each video frame in its own run of placeholders (timestamps between frames)
    video_runs_per_frame: ClassVar[bool] = False

    def core(self, model):
        if isinstance(model, self.model_class):
            return model.model
        if isinstance(model, self.core_class):
            return model
        return None

    def vision_tower(self, model):
        return self.core(model).visual

    # ------------------------------------------------------------------ language side
    def call_inputs(self, module, args, kwargs) -> CallInputs:
        given = hfcompat.bound_arguments(module, args, kwargs)
        input_ids, embeds = given.get("input_ids"), given.get("inputs_embeds")
        encoded = hfcompat.encoder_outputs(given)
        carries = {module.config.image_token_id: given.get("pixel_values") is not None or encoded.get("image") is not None,
                   module.config.video_token_id: given.get("pixel_values_videos") is not None
                   or encoded.get("video") is not None}
        if input_ids is not None:
            # typed by what they receive: without pixels of a modality no position receives its features
            image_mask = torch.zeros_like(input_ids, dtype=torch.bool)
            for token, present in carries.items():
                if present:
                    image_mask |= input_ids == token
        elif embeds is not None:
            # the test get_placeholder_mask applies before features are scattered in
            image_mask = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
            for token, present in carries.items():
                if present:
                    marker = module.get_input_embeddings()(torch.tensor(token, device=embeds.device))
                    image_mask |= (embeds == marker).all(-1)
            past = hfcompat.cache_of(given)
            if not any(carries.values()) and (past is None or past.get_seq_length() == 0):
                from ..errors import CMAIStateError

                raise CMAIStateError(
                    "CMAI cannot find image positions in an inputs_embeds-only call: the vision features are "
                    "already merged. Pass input_ids (with <|image_pad|> / <|video_pad|> tokens) or inputs_embeds "
                    "holding those tokens' embeddings together with the pixels.")
        else:
            from ..errors import CMAIStateError

            raise CMAIStateError("CMAI needs input_ids or inputs_embeds")
        return CallInputs(image_mask, given.get("attention_mask"), hfcompat.cache_of(given))

    # ------------------------------------------------------------------ vision side: where and how to read the tower
    def tower_geometry(self, model):
        raise UnsupportedModelError(f"{self.title}: the vision tower has no fixed grid (dynamic resolution, a 2x2 "
                                    "merger), so in-tower methods (SPD, PruMerge) do not apply; VMTC runs after the "
                                    "merger, and a frame's token count comes from its grid (image_grid_thw)")

    def full_attention_block(self, visual) -> int:
        """Index of the last ViT block that attends over a whole frame (the rest use windows)."""
        indexes = list(visual.fullatt_block_indexes)
        if not indexes:
            raise UnsupportedModelError("the vision tower has no full-attention block (fullatt_block_indexes is empty)")
        return indexes[-1]

    def group_index(self, visual, grid_thw: torch.Tensor) -> torch.Tensor:
        """Merged token (raster order over the call) of each group of 4 rows inside the blocks: the window order."""
        window_index, _ = hfcompat.qwen2_5_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                                  window_size=visual.window_size, patch_size=visual.patch_size)
        return window_index.to(grid_thw.device)

    def feature_extras(self, output) -> tuple[tuple[torch.Tensor, ...], ...]:
        """Per-level tensors that ride along with the merged tokens (none for Qwen2.5)."""
        return ()

    def set_feature_extras(self, output, extras: tuple[tuple[torch.Tensor, ...], ...]) -> None:
        pass

    def _block_qk(self, block, hidden: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(q, k) of a ViT block with rotary applied, (S, heads, d), as its attention computes them."""
        attn = block.attn
        rotary = hfcompat.modeling_function(attn, "apply_rotary_pos_emb_vision")
        S = hidden.shape[0]
        q, k, _ = attn.qkv(block.norm1(hidden)).reshape(S, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = rotary(q, k, cos, sin)
        return q, k, attn.scaling

    # ------------------------------------------------------------------ vision side: the merger stage
    def add_merger_stage(self, model, stage: MergerStage) -> Callable[[], None]:
        core = self.core(model)
        visual = core.visual
        block = visual.blocks[self.full_attention_block(visual)]
        state = _MergerState()
        state.merge = visual.spatial_merge_size
        core._focusvlm_merger = state

        def grab(module, args, kwargs):
            state.captured = {"hidden": args[0] if args else kwargs["hidden_states"],
                              "segments": kwargs.get("cu_seqlens"), "rope": kwargs.get("position_embeddings")}

        def wrap(modality: str, grid_name: str):
            stock = getattr(core, f"get_{modality}_features")
            signature = inspect.signature(stock)

            @functools.wraps(stock)
            def features(*args, **kwargs):
                if state.depth:  # Qwen3's video call goes through the image one: reduce once, as a video
                    return stock(*args, **kwargs)
                grid = signature.bind(*args, **kwargs).arguments.get(grid_name)
                state.depth += 1
                handle = block.register_forward_pre_hook(grab, with_kwargs=True)
                try:
                    out = stock(*args, **kwargs)
                finally:
                    handle.remove()
                    state.depth -= 1
                captured, state.captured = state.captured, {}
                if not hasattr(out, "pooler_output") or not captured:
                    raise UnsupportedModelError(f"{self.title}: get_{modality}_features returned no pooled features "
                                                "or never ran the tower (return_dict=False is not supported)")
                self._reduce(visual, stage, state, out, grid, captured, modality)
                return out

            return features

        undo_items = []
        for modality, grid_name in (("image", "image_grid_thw"), ("video", "video_grid_thw")):
            name = f"get_{modality}_features"
            setattr(core, name, wrap(modality, grid_name))
            undo_items.append((core, name))
        stock_rope = core.get_rope_index
        core.get_rope_index = functools.wraps(stock_rope)(
            lambda *args, **kwargs: self._compressed_rope_index(stock_rope, state, *args, **kwargs))
        undo_items.append((core, "get_rope_index"))
        if isinstance(model, self.model_class):
            setattr(model, hfcompat.POSITION_IDS_HOOK, self._encode_then_position(model, core))
            undo_items.append((model, hfcompat.POSITION_IDS_HOOK))

        def undo() -> None:
            for owner, name in undo_items:
                owner.__dict__.pop(name, None)
            core.__dict__.pop("_focusvlm_merger", None)
        return undo

    def _reduce(self, visual, stage: MergerStage, state: _MergerState, out, grid: torch.Tensor, captured: dict,
                modality: str) -> None:
        """Run the stage on one call's merged tokens and put the result where the model reads it."""
        merge = visual.spatial_merge_size
        with torch.no_grad():  # the selection is not differentiable; the merged features below keep their graph
            block = visual.blocks[self.full_attention_block(visual)]
            q, k, scale = self._block_qk(block, captured["hidden"], captured["rope"])
            group_index = self.group_index(visual, grid)
        merged_grid = grid.clone()
        merged_grid[:, 1:] //= merge
        call = MergedCall(features=tuple(out.pooler_output), extras=self.feature_extras(out), grids=merged_grid,
                          q=q, k=k, scale=scale, segments=captured["segments"], group_index=group_index,
                          unit=merge * merge, modality=modality)
        result: MergedResult = stage(call)
        out.pooler_output = tuple(result.features)
        self.set_feature_extras(out, result.extras)
        state.recorded[modality] = (grid.detach().clone(), [s.detach() for s in result.sources])

    def _runs(self, state: _MergerState, modality: str, grid_thw: torch.Tensor | None, merge: int):
        """The vision runs (``VisionRun``) a prompt holds for ``modality``, in order, from the last vision call."""
        from ..compress.vmtc_merged import VisionRun

        if grid_thw is None:
            return iter(())
        if modality not in state.recorded:
            raise RuntimeError(f"VMTC positions: this call has {modality}s but no compressed {modality} features were "
                               "computed; pass the pixels to the patched model (or features computed by it)")
        grids, sources = state.recorded[modality]
        if grids.shape != grid_thw.shape or not torch.equal(grids.to(grid_thw.device), grid_thw):
            raise RuntimeError(f"VMTC positions: the {modality} grids of this call ({grid_thw.tolist()}) are not the "
                               f"ones last encoded ({grids.tolist()}); encode these {modality}s with the patched "
                               "model first")
        runs = []
        for (t, h, w), src in zip(grids.tolist(), sources):
            n = (h // merge) * (w // merge)
            if modality == "video" and self.video_runs_per_frame:
                for f in range(t):
                    inside = src[(src >= f * n) & (src < (f + 1) * n)]
                    runs.append(VisionRun(n, inside - f * n))
            else:
                runs.append(VisionRun(t * n, src))
        return iter(runs)

    def _compressed_rope_index(self, stock: Callable, state: _MergerState, input_ids: torch.Tensor,
                               mm_token_type_ids: torch.Tensor | None = None, image_grid_thw=None, video_grid_thw=None,
                               attention_mask: torch.Tensor | None = None, **kwargs):
        """The stock rope index of the compressed prompt: every token at its source's stock position.

        Rewrites each sample into the stock layout (each vision run back to its full length),
        runs the stock function on that, and reads each token's position at its source; rope
        deltas = max position + 1 - compressed length, as the stock defines them.
        """
        from ..compress.vmtc_merged import expand_to_stock_layout

        if mm_token_type_ids is None:
            raise ValueError("VMTC positions need mm_token_type_ids (the processor returns them)")
        merge = state.merge
        runs = {1: self._runs(state, "image", image_grid_thw, merge), 2: self._runs(state, "video", video_grid_thw, merge)}
        B, S = input_ids.shape
        valid = attention_mask.bool() if attention_mask is not None else torch.ones(B, S, dtype=torch.bool,
                                                                                    device=input_ids.device)
        layouts = [expand_to_stock_layout(mm_token_type_ids[b][valid[b]].cpu(), runs) for b in range(B)]
        width = max(len(types) for types, _ in layouts)
        stock_types = torch.zeros(B, width, dtype=mm_token_type_ids.dtype)
        stock_mask = torch.zeros(B, width, dtype=torch.long)
        for b, (types, _) in enumerate(layouts):
            if len(types):
                stock_types[b, width - len(types):] = types
                stock_mask[b, width - len(types):] = 1
        device = input_ids.device
        stock_positions, _ = stock(stock_types.to(device=device, dtype=input_ids.dtype),
                                   mm_token_type_ids=stock_types.to(device), image_grid_thw=image_grid_thw,
                                   video_grid_thw=video_grid_thw, attention_mask=stock_mask.to(device), **kwargs)
        positions = torch.zeros(3, B, S, dtype=input_ids.dtype, device=device)
        deltas = []
        for b, (types, index) in enumerate(layouts):
            length = len(index)
            if length == 0:
                deltas.append(0)
                continue
            mine = stock_positions[:, b, width - len(types) + index.to(device)]
            positions[:, b, valid[b]] = mine
            deltas.append(int(mine.max()) + 1 - length)
        return positions, torch.tensor(deltas, device=device).unsqueeze(1)

    def _encode_then_position(self, model, core) -> Callable:
        """generate() computes 3-D positions before it encodes the pixels; with VMTC the positions depend on the
        encoding, so encode first and hand the features on (generate then skips its own encoding)."""
        stock = getattr(type(model), hfcompat.POSITION_IDS_HOOK).__get__(model)

        def prepare(inputs_tensor, model_kwargs):
            encoded = dict(hfcompat.encoder_outputs(model_kwargs))
            for modality, pixels, grid in (("image", "pixel_values", "image_grid_thw"),
                                           ("video", "pixel_values_videos", "video_grid_thw")):
                if model_kwargs.get(pixels) is not None and encoded.get(modality) is None:
                    encode = getattr(core, f"get_{modality}_features")
                    encoded[modality] = encode(model_kwargs.pop(pixels), model_kwargs.get(grid), return_dict=True)
            if encoded:
                model_kwargs[hfcompat.ENCODER_OUTPUTS_ARG] = encoded
            return stock(inputs_tensor, model_kwargs)

        return prepare

    # ------------------------------------------------------------------ vision side: features, processor
    def image_features(self, model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """(images, tokens, hidden) of same-size images; ragged sizes come back as a list."""
        if image_grid_thw is None:
            raise ValueError(f"{self.title}: image features need image_grid_thw (the processor returns it)")
        out = self.core(model).get_image_features(pixel_values, image_grid_thw, return_dict=True)
        feats = list(out.pooler_output)
        return torch.stack(feats) if len({f.shape for f in feats}) == 1 else feats

    def shown_crops(self, model, processed):
        """One picture per image: its patches put back in place, drawn on the grid of merged tokens
        (one cell = merge x merge patches: the tokens VMTC ranks and the LLM receives here)."""
        vc = model.config.vision_config
        pixels, grids = processed["pixel_values"], processed["image_grid_thw"]
        m = vc.spatial_merge_size
        shown, start = [], 0
        for t, h, w in grids.tolist():
            rows = pixels[start:start + t * h * w]
            start += t * h * w
            picture = patches_to_image(rows, (t, h, w), vc.in_channels, vc.temporal_patch_size, vc.patch_size, m)
            shown.append(ShownCrop(picture, (h // m, w // m), t * h * w, merged=t * (h // m) * (w // m)))
        return {"pixel_values": pixels, "image_grid_thw": grids}, shown

    def patch_processor(self, model, processor, patches_for_grid):
        for name in ("replace_image_token", "replace_video_token", "_get_num_multimodal_tokens", "image_token",
                     "video_token", "image_processor"):
            if not hasattr(processor, name):
                raise UnsupportedModelError(f"the processor {type(processor).__name__} has no {name}; focusvlm "
                                            f"adjusts {self.title} processor placeholder counts")
        merge = getattr(processor.image_processor, "merge_size", None)
        tower_merge = self.core(model).visual.spatial_merge_size
        if merge != tower_merge:
            from ..errors import ConfigError

            raise ConfigError(f"processor merge_size={merge} does not match the vision tower's {tower_merge}")
        stock_image, stock_video = processor.replace_image_token, processor.replace_video_token
        stock_count = processor._get_num_multimodal_tokens
        p = processor

        def per_frame(grid) -> tuple[int, int]:
            """(stock, compressed) placeholders of one frame of a (t, h, w) patch grid."""
            _, h, w = (int(x) for x in grid)
            return (h // merge) * (w // merge), patches_for_grid((h // merge, w // merge))

        def replace_image_token(image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
            stock, new = per_frame(image_inputs["image_grid_thw"][image_idx])
            return _rescale_runs(stock_image(image_inputs, image_idx, **kwargs), p.image_token, stock, new)

        def replace_video_token(video_inputs: dict, video_idx: int, **kwargs: Any) -> str:
            stock, new = per_frame(video_inputs["video_grid_thw"][video_idx])
            return _rescale_runs(stock_video(video_inputs, video_idx, **kwargs), p.video_token, stock, new)

        def _get_num_multimodal_tokens(image_sizes=None, video_sizes=None, **kwargs: Any):
            # only the frame's token count is known here; the compressed count depends on nothing else,
            # so the grid handed on is (tokens, 1)
            data = stock_count(image_sizes=image_sizes, video_sizes=video_sizes, **kwargs)
            if getattr(data, "num_image_tokens", None) is not None:
                data.num_image_tokens = [patches_for_grid((n, 1)) for n in data.num_image_tokens]
            if video_sizes is not None and getattr(data, "num_video_tokens", None) is not None:
                videos_kwargs = p._merge_kwargs(**kwargs).get("videos_kwargs", {})
                tps = videos_kwargs.get("temporal_patch_size") or p.video_processor.temporal_patch_size
                counts = []
                for (frames, *_), n in zip(video_sizes, data.num_video_tokens):
                    t = (frames + -frames % tps) // tps
                    counts.append(t * patches_for_grid((n // t, 1)))
                data.num_video_tokens = counts
            return data

        return override_on_instance(processor, replace_image_token=replace_image_token,
                                    replace_video_token=replace_video_token,
                                    _get_num_multimodal_tokens=_get_num_multimodal_tokens)

    # ------------------------------------------------------------------ building and loading
    def config_for(self, preset: str, token_ids: dict[str, int] | None = None, **text_overrides: Any):
        """The model config of a preset (text-config overrides allowed)."""
        p = self._preset(preset)
        tokens = token_ids or (TINY_TOKENS if p.text["vocab_size"] < 1000 else REAL_TOKENS)
        vocab = {**p.text, **text_overrides}.get("vocab_size")
        if vocab is not None and max(tokens.values()) >= vocab:
            tokens = {k: vocab - 4 + i for i, k in enumerate(tokens)}  # a small vocabulary keeps its specials inside
        return self.config_class(vision_config=dict(p.vision), text_config=_with_overrides(p, text_overrides), **tokens)

    def _preset(self, preset: str) -> QwenPreset:
        if preset not in self.preset_table:
            raise ValueError(f"unknown {self.title} preset {preset!r}; known: {', '.join(self.preset_table)}")
        return self.preset_table[preset]

    def random_model(self, preset, seed=0, dtype=torch.float32, attn_implementation="sdpa", **overrides):
        config = self.config_for(preset, **overrides)
        config._attn_implementation = attn_implementation
        torch.manual_seed(seed)
        model = self.model_class(config).to(dtype)
        model.config.use_cache = True
        model._focusvlm_preset = preset  # bench reads the preset's image size from here
        return model.eval()

    def load(self, source, dtype=None, device=None, **kwargs):
        from .processors import load_processor

        model = self.model_class.from_pretrained(source, dtype=dtype, **kwargs)
        if device is not None and "device_map" not in kwargs:
            model = model.to(device)
        # transformers' Qwen video processors need torchvision; without it the processor handles images only
        return model.eval(), load_processor(source, self.processor_class, self.title)

    # ------------------------------------------------------------------ benchmark inputs
    def random_pixel_inputs(self, model, batch: int, generator: torch.Generator) -> dict[str, Any]:
        """``batch`` square images of the preset's bench size: flattened patches + ``image_grid_thw``."""
        vc = model.config.vision_config
        preset = getattr(model, "_focusvlm_preset", None)
        side = self.preset_table[preset].image_side if preset in self.preset_table else 448
        unit = vc.patch_size * vc.spatial_merge_size
        if side % unit:
            raise ValueError(f"bench image side {side} is not a multiple of patch x merge = {unit}")
        grid = side // vc.patch_size
        rows = grid * grid
        width = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        pixels = torch.randn(batch * rows, width, generator=generator)
        return {"pixel_values": pixels, "image_grid_thw": torch.tensor([[1, grid, grid]] * batch)}

    def prompt_inputs(self, model, input_ids: torch.Tensor) -> dict[str, Any]:
        cfg = model.config
        types = (input_ids == cfg.image_token_id).long() + 2 * (input_ids == cfg.video_token_id).long()
        return {"mm_token_type_ids": types}

    def step_inputs(self, model, attention_mask: torch.Tensor) -> dict[str, Any]:
        # without them the model numbers every position of the mask again (generate passes its own)
        position = attention_mask.long().cumsum(-1)[:, -1:] - 1                          # (B, 1): the new token's
        deltas = hfcompat.rope_deltas(self.core(model))
        position = position.unsqueeze(0).expand(3, -1, -1)
        if deltas is not None:
            position = position + deltas.repeat_interleave(position.shape[1] // deltas.shape[0], dim=0)
        return {"position_ids": position}


def patches_to_image(rows: torch.Tensor, grid_thw: tuple[int, int, int], channels: int, temporal: int, patch: int,
                     merge: int) -> torch.Tensor:
    """The first frame (channels, h * patch, w * patch) of one input, from the processor's flattened patches.

    Undoes the Qwen2-VL image processor's patch layout: rows (t * h * w, channels * temporal *
    patch * patch) in the order (t, h / merge, w / merge, merge, merge), each row (channels,
    temporal, patch, patch); an image repeats its frame over the temporal slices.
    """
    t, h, w = grid_thw
    x = rows.reshape(t, h // merge, w // merge, merge, merge, channels, temporal, patch, patch)
    x = x[0, :, :, :, :, :, 0]                      # (h/m, w/m, m, m, C, p, p): first frame, first slice
    x = x.permute(4, 0, 2, 5, 1, 3, 6)              # (C, h/m, m, p, w/m, m, p)
    return x.reshape(channels, h * patch, w * patch)


def _rescale_runs(text: str, token: str, stock: int, new: int) -> str:
    """Every run of ``token`` (k frames of ``stock`` placeholders each) becomes k frames of ``new``."""
    if stock == new:
        return text

    def one(match: re.Match) -> str:
        count = len(match.group(0)) // len(token)
        if count % stock:
            raise ValueError(f"a run of {count} placeholders is not a whole number of {stock}-token frames")
        return token * (count // stock * new)

    return re.sub(f"(?:{re.escape(token)})+", one, text)

