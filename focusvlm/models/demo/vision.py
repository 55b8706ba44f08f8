"""The demo's vision tower: CLIP architecture at easy-VQA's 64x64 (64 patch tokens + CLS, so VMTC applies and
has redundancy to remove), and the 336 px random tower of ``demo-random``.

* ``tower_config``: its ``CLIPVisionConfig``; ``tower_image_processor``: CLIP preprocessing at its size.
* ``contrastive_clip``: the tower paired with a tiny CLIP text encoder, for CLIP-style pretraining
  (``focusvlm.demo.tower``); ``clip_vision_part`` takes the tower back out.
* ``save_tower`` / ``load_tower`` / ``fresh_tower``: the tower as a folder (``config.json``,
  ``model.safetensors``, ``preprocessor_config.json``) and back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# 64 patch tokens of a 64x64 easy-VQA picture; small (0.32 M parameters, 1.3 MB) so that tower + projector + LoRA
# stay far below the 25 MB budget and pretraining takes minutes on two CPU cores. Six layers so VMTC's default
# four stages fit before layer -2. (Width 128 learned shape no better per step and cost twice as much.)
TOWER = dict(image_size=64, patch_size=8, hidden_size=64, intermediate_size=256, num_hidden_layers=6,
             num_attention_heads=4, projection_dim=64)
TEXT = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
# demo-random's tower: LLaVA-1.5's 336 px / 14 px geometry (576 image tokens), narrow, never trained
RANDOM_TOWER = dict(image_size=336, patch_size=14, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                    num_attention_heads=8, projection_dim=256)


def tower_config(**overrides: Any):
    """The demo tower's ``CLIPVisionConfig`` (``TOWER`` with ``overrides``)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**{**TOWER, **overrides})


def vision_config_from_dict(values: dict[str, Any]):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**values)


def contrastive_clip(vision_config, vocab_size: int, eos_token_id: int, pad_token_id: int, max_words: int,
                     seed: int = 0, **text: Any):
    """A ``CLIPModel``: the tower of ``vision_config`` and a tiny text encoder over a word vocabulary.

    The text encoder pools at the first ``eos_token_id`` (the caption's end), as CLIP does.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    text_config = CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=max_words,
                                 eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=pad_token_id,
                                 projection_dim=vision_config.projection_dim, **{**TEXT, **text})
    config = CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
                        projection_dim=vision_config.projection_dim)
    torch.manual_seed(seed)
    return CLIPModel(config)


def clip_vision_part(clip) -> Any:
    """The ``CLIPVisionModel`` inside a ``CLIPModel`` (the module LLaVA's ``vision_tower`` is)."""
    return clip.vision_model


def tower_image_processor(size: int):
    """CLIP preprocessing at the tower's resolution: resize the short side to ``size``, centre-crop,
    CLIP's mean/std. easy-VQA pictures are already ``size`` x ``size``, so for them only the
    normalisation acts; other pictures (e.g. the README demo) are brought to the same geometry."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def save_tower(vision_model, image_processor, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vision_model.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    return folder


def load_tower(folder: str | Path):
    """(``CLIPVisionModel``, image processor) saved by ``save_tower``."""
    from transformers import CLIPImageProcessorPil, CLIPVisionModel

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no config.json: not a saved demo tower")
    return CLIPVisionModel.from_pretrained(folder, dtype=torch.float32).eval(), \
        CLIPImageProcessorPil.from_pretrained(folder)


def fresh_tower(vision_config):
    """A ``CLIPVisionModel`` of ``vision_config`` (weights to be loaded by the caller)."""
    from transformers import CLIPVisionModel

    return CLIPVisionModel(vision_config).eval()
