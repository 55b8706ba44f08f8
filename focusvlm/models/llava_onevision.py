"""LLaVA-OneVision adapter (``LlavaOnevisionForConditionalGeneration``: SigLIP tower, AnyRes up to 9 crops).

Subclasses the LLaVA-NeXT adapter (AnyRes packing of reduced crops, processor counts, image
features); what differs:
* modalities: images (``pixel_values``) and videos (``pixel_values_videos``, ``<video>``
  placeholders), so CMAI types video frame positions as image positions too;
* the SigLIP tower has no CLS token: VMTC ranks patches by the attention they receive
  (``VMTCConfig.importance="auto"`` picks it), stages swap ``SiglipEncoderLayer`` instances;
* videos: frames go through the same tower and projector, then a 2x2 bilinear pooling that needs
  the full patch grid. Vision-side methods reduce image crops only: while the core's
  ``get_video_features`` runs (an instance-level wrapper sets a flag), the tower stages and the
  projector hook pass tokens through untouched, so video placeholder counts stay stock;
* multi-image prompts: the processor gives each image of a multi-image sample one crop (no
  tiles); reduced, it is packed as the stock model packs it: the crop, then one newline;
* stock packing downsizes the tile grid when it exceeds ``anyres_max_9`` (bilinear); reduced crops
  have no grid, so they are packed without that step (SPEC: "otherwise as LLaVA-NeXT").
* loading: the video processor needs torchvision; without it the processor loads images-only
  (``processors.load_processor``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel, LlavaOnevisionProcessor

from .. import hfcompat
from . import register_family
from .base import TowerStage, UnsupportedModelError
from .llava import StagedEncoderForward, _vision_model
from .llava_next import AnyResPreset, LlavaNextAdapter, anyres_stock_tokens, build_random, packed_length

SiglipEncoderLayer = hfcompat.encoder_layer_class("siglip")


class StagedSiglipEncoderLayer(StagedEncoderForward, SiglipEncoderLayer):
    """A SigLIP encoder layer that runs one in-tower stage between attention and MLP.

    Never constructed: stock layers have their ``__class__`` swapped to it (it stays a
    ``SiglipEncoderLayer``, which hidden-state capture matches on).
    """


def _video_guard(core) -> tuple[Callable[[], bool], Callable[[], None]]:
    """(in_video, undo): ``in_video()`` is true while the core encodes video frames.

    One instance-level wrapper of ``get_video_features`` serves every hook that asks (counted);
    ``functools.wraps`` keeps the signature generate() inspects to pick its arguments.
    """
    guard = core.__dict__.get("_focusvlm_video_guard")
    if guard is None:
        stock = core.get_video_features
        guard = {"users": 0, "depth": 0}

        @functools.wraps(stock)
        def get_video_features(*args: Any, **kwargs: Any):
            guard["depth"] += 1
            try:
                return stock(*args, **kwargs)
            finally:
                guard["depth"] -= 1

        core.get_video_features = get_video_features
        core._focusvlm_video_guard = guard
    guard["users"] += 1

    def undo() -> None:
        guard["users"] -= 1
        if guard["users"] == 0:
            core.__dict__.pop("get_video_features", None)
            core.__dict__.pop("_focusvlm_video_guard", None)
    return (lambda: guard["depth"] > 0), undo


# --------------------------------------------------------------------------- presets

_SIGLIP_SO400M_384 = dict(image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304,
                          num_hidden_layers=26, num_attention_heads=16, layer_norm_eps=1e-6, vision_use_head=False)
_QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152128, max_position_embeddings=32768, rms_norm_eps=1e-6)
# the checkpoint's pinpoints: every (h, w) in multiples of 384 from 1x1 to 6x6 tiles
_OV_PINPOINTS = [[384 * r, 384 * c] for r in range(1, 7) for c in range(1, 7)]
_OV_TOKENS = dict(image_token_index=151646, video_token_index=151647)

PRESETS: dict[str, AnyResPreset] = {
    # unit tests: 4x4 patches per 56 px crop, the real 6x6 pinpoint pattern scaled by 56/384, GQA in the LM
    "onevision-tiny": AnyResPreset(
        vision=dict(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                    num_attention_heads=4, vision_use_head=False),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=8192),
        pinpoints=[[56 * r, 56 * c] for r in range(1, 7) for c in range(1, 7)],
        extra=dict(image_token_index=511, video_token_index=510)),
    # CPU benchmarks: the real image geometry (384 px crops of 27x27 patches, the real pinpoints), small LM
    "onevision-mid": AnyResPreset(
        vision=dict(image_size=384, patch_size=14, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                    num_attention_heads=8, vision_use_head=False),
        text=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=152128, max_position_embeddings=32768),
        pinpoints=_OV_PINPOINTS, extra=_OV_TOKENS),
    # llava-hf/llava-onevision-qwen2-7b-ov-hf's architecture (random weights)
    "llava-onevision-qwen2-7b": AnyResPreset(vision=_SIGLIP_SO400M_384, text=_QWEN2_7B, pinpoints=_OV_PINPOINTS,
                                             extra=_OV_TOKENS),
}


def llava_onevision_config(preset: str = "onevision-tiny", **text_overrides: Any):
    """The LlavaOnevisionConfig of a preset (SigLIP last layer, every token kept, anyres_max_9)."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    return LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**p.vision),
                                text_config=Qwen2Config(**{**p.text, **text_overrides}),
                                vision_feature_layer=-1, vision_feature_select_strategy="full",
                                vision_aspect_ratio="anyres_max_9", image_grid_pinpoints=[list(x) for x in p.pinpoints],
                                projector_hidden_act="gelu", **p.extra)


def random_llava_onevision(preset: str = "onevision-tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
                           attn_implementation: str = "sdpa", **text_overrides: Any):
    """A LLaVA-OneVision model of the preset's shape with seeded random weights, in eval mode."""
    return build_random(LlavaOnevisionForConditionalGeneration, llava_onevision_config(preset, **text_overrides),
                        seed, dtype, attn_implementation)


# --------------------------------------------------------------------------- the adapter

@register_family
class LlavaOnevisionAdapter(LlavaNextAdapter):
    name = "llava_onevision"
    title = "LLaVA-OneVision"
    model_types = ("llava_onevision",)
    presets = tuple(PRESETS)
    model_class = LlavaOnevisionForConditionalGeneration

    def core(self, model):
        if isinstance(model, LlavaOnevisionForConditionalGeneration):
            return model.model
        if isinstance(model, LlavaOnevisionModel):
            return model
        return None

    def modalities(self, module):
        return ((module.config.image_token_id, ("pixel_values",), "image"),
                (module.config.video_token_id, ("pixel_values_videos",), "video"))

    # ------------------------------------------------------------------ vision side
    def add_tower_stage(self, model, layer_idx: int, stage: TowerStage) -> Callable[[], None]:
        core = self.core(model)
        layer = _vision_model(core).encoder.layers[layer_idx]
        if type(layer) is not SiglipEncoderLayer:
            raise UnsupportedModelError(f"encoder layer {layer_idx} is a {type(layer).__name__}, expected a "
                                        "stock SiglipEncoderLayer")
        in_video, undo_guard = _video_guard(core)

        def images_only(layer_: Any, normed: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            return z if in_video() else stage(layer_, normed, z)

        layer._focusvlm_stage = images_only
        layer.__class__ = StagedSiglipEncoderLayer

        def undo() -> None:
            layer.__class__ = SiglipEncoderLayer
            del layer._focusvlm_stage
            undo_guard()
        return undo

    def tower_cls_qk(self, layer, normed):
        raise UnsupportedModelError(f"{self.title}: the SigLIP tower has no CLS token")

    def reduce_projector_input(self, model, reduce):
        core = self.core(model)
        projector = core.multi_modal_projector
        stock_forward = projector.forward
        in_video, undo_guard = _video_guard(core)

        # no CLS token to set aside; video frames keep their grid for the stock pooling
        def forward(features: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return stock_forward(features if in_video() else reduce(features), *args, **kwargs)

        projector.forward = forward

        def undo() -> None:
            del projector.forward
            undo_guard()
        return undo

    # ------------------------------------------------------------------ processor
    def _replacement_count(self, processor, per_crop: int, image_inputs: dict, image_idx: int) -> int:
        # a sample with several images gets no tiles per image (the processor's multi-image mode)
        start = 0
        for n in image_inputs["batch_num_images"]:
            if image_idx < start + n:
                if n != 1:
                    return packed_length(per_crop, 0)
                break
            start += n
        return super()._replacement_count(processor, per_crop, image_inputs, image_idx)

    def _image_tiles(self, processor, image_inputs: dict, image_idx: int) -> int:
        start = 0
        for n in image_inputs["batch_num_images"]:
            if image_idx < start + n:
                if n != 1:
                    return 0   # a sample with several images: one crop per image (multi-image mode)
                break
            start += n
        return super()._image_tiles(processor, image_inputs, image_idx)

    def _crops_per_image(self, core, image_sizes, batch_num_images=None):
        # a sample with several images gets one crop per image (multi-image mode), as get_image_features cuts
        crops = super()._crops_per_image(core, image_sizes)
        if batch_num_images is None:
            return crops
        alone = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
        return [c if single else 1 for c, single in zip(crops, alone)]

    def _stock_tokens(self, core, image_size, tiles, vision_aspect_ratio=None):
        # the stock packing shrinks a tile grid above anyres_max_N crops' worth of patches
        if tiles == 0:
            return super()._stock_tokens(core, image_size, tiles)
        vc = core.config.vision_config
        side = vc.image_size // vc.patch_size
        aspect = vision_aspect_ratio or core.config.vision_aspect_ratio
        return anyres_stock_tokens(image_size, core.config.image_grid_pinpoints, (vc.image_size,) * 2, (side, side),
                                   max_tiles=int(aspect.strip("anyres_max_")))

    # ------------------------------------------------------------------ building and loading
    def load(self, source, dtype=None, device=None, **kwargs):
        from .processors import load_processor

        model = self.model_class.from_pretrained(source, dtype=dtype, **kwargs)
        if device is not None and "device_map" not in kwargs:
            model = model.to(device)
        # OneVision's video processor needs torchvision; without it the processor handles images only
        return model.eval(), load_processor(source, LlavaOnevisionProcessor, self.title)

    def random_model(self, preset, seed=0, dtype=torch.float32, attn_implementation="sdpa", **overrides):
        return random_llava_onevision(preset, seed=seed, dtype=dtype, attn_implementation=attn_implementation,
                                      **overrides)
