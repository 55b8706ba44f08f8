"""Qwen3-VL adapter (``Qwen3VLForConditionalGeneration`` / ``Qwen3VLModel``): Qwen2.5-VL's, where they differ.

What differs from Qwen2.5-VL (transformers 5.23), and is all this file holds:
* every ViT block attends over the whole frame (no windows), so the importance comes from
  the last block and the rows inside the tower are already in merged-token order;
* deepstack: the tower also returns one feature map per chosen block
  (``deepstack_features``), added to the image positions' hidden states in the first LLM
  layers. VMTC reduces them with the same selection, clusters and weights as the merged
  tokens. CMAI is unaffected: deepstack only adds to the residual stream of positions that
  are already typed as image, and attention stays the registered function;
* the prompt puts every video frame in its own run of placeholders (a timestamp between
  frames), so the compressed positions are looked up frame by frame; the video features
  go through ``get_image_features``, so the stage runs once, as a video.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLModel, Qwen3VLProcessor

from . import register_family
from .qwen2_5_vl import Qwen25VLAdapter, QwenPreset

_QWEN3_VISION_8B = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                        spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=4096,
                        num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24],
                        hidden_act="gelu_pytorch_tanh")
_QWEN3_ROPE = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20], "mrope_interleaved": True}

QWEN3_PRESETS: dict[str, QwenPreset] = {
    # unit tests: 4 ViT blocks with two deepstack taps, GQA in the LM
    "qwen3-vl-tiny": QwenPreset(
        vision=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=16, spatial_merge_size=2,
                    temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16,
                    deepstack_visual_indexes=[1, 2], hidden_act="gelu_pytorch_tanh"),
        text=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                   "mrope_interleaved": True}),
        image_side=128,
    ),
    # CPU benchmarks: the 8B's vision tower exactly, a small LM
    "qwen3-vl-mid": QwenPreset(
        vision=_QWEN3_VISION_8B | dict(out_hidden_size=1536),
        text=dict(vocab_size=32064, hidden_size=1536, intermediate_size=4608, num_hidden_layers=8,
                  num_attention_heads=12, num_key_value_heads=4, head_dim=128, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, rope_parameters=_QWEN3_ROPE),
        image_side=256,  # 16 x 16 patches, 64 LLM tokens: the real tower stays affordable on a CPU
    ),
    "qwen3-vl-8b": QwenPreset(
        vision=_QWEN3_VISION_8B,
        text=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                  rms_norm_eps=1e-6, rope_parameters=_QWEN3_ROPE),
        image_side=448,
    ),
}


@register_family
class Qwen3VLAdapter(Qwen25VLAdapter):
    name = "qwen3_vl"
    title = "Qwen3-VL"
    model_types = ("qwen3_vl",)
    presets = tuple(QWEN3_PRESETS)
    preset_table: ClassVar[dict[str, QwenPreset]] = QWEN3_PRESETS
    model_class: ClassVar[type] = Qwen3VLForConditionalGeneration
    core_class: ClassVar[type] = Qwen3VLModel
    config_class: ClassVar[type] = Qwen3VLConfig
    processor_class: ClassVar[type] = Qwen3VLProcessor
    video_runs_per_frame = True

    def full_attention_block(self, visual) -> int:
        return len(visual.blocks) - 1

    def group_index(self, visual, grid_thw: torch.Tensor) -> torch.Tensor:
        # no window permutation: row group g is merged token g
        rows = int((grid_thw.prod(-1) // visual.spatial_merge_size ** 2).sum())
        return torch.arange(rows, device=grid_thw.device)

    def feature_extras(self, output) -> tuple[tuple[torch.Tensor, ...], ...]:
        return tuple(tuple(level) for level in (getattr(output, "deepstack_features", None) or ()))

    def set_feature_extras(self, output, extras) -> None:
        if extras:
            output.deepstack_features = [tuple(level) for level in extras]
