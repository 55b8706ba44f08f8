"""Tiny Qwen2.5-VL / Qwen3-VL / LLaVA-NeXT / LLaVA-OneVision checkpoints saved as folders, offline.

A folder holds what a hub checkpoint holds: config, weights, tokenizer, chat template and
``processor_config.json`` with the processor class, the image processor's settings and (Qwen,
OneVision) a video processor section. torchvision is absent here and transformers' video
processors need it, so the processor is written by focusvlm's images-only variant of the stock
class (``focusvlm.models.processors``), which saves as the stock class; the video section is then
added by hand, as a real checkpoint has one. Loading goes through ``focusvlm.runtime.load_model``
like any checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import anyres_builders as ab
import qwen_builders as qb

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "llava_next", "llava_onevision")

# the settings section a released checkpoint's processor_config.json carries for its video processor
_VIDEO_SECTIONS = {
    "qwen2_5_vl": {"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": 14, "merge_size": 2,
                   "temporal_patch_size": 2},
    "qwen3_vl": {"video_processor_type": "Qwen3VLVideoProcessor", "patch_size": 16, "merge_size": 2,
                 "temporal_patch_size": 2},
    "llava_onevision": {"video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": 56, "width": 56}},
}


def builder_processor(family: str):
    """The offline test processor of ``family`` (as the family's own tests build it)."""
    if family in qb.PRESETS:
        return qb.tiny_processor(family)
    return ab.next_processor() if family == "llava_next" else ab.onevision_processor()


def tiny_family_model(family: str, seed: int = 0):
    if family in qb.PRESETS:
        return qb.tiny_model(qb.PRESETS[family], seed=seed)
    if family == "llava_next":
        from focusvlm.models.llava_next import random_llava_next

        return random_llava_next("next-tiny", seed=seed)
    from focusvlm.models.llava_onevision import random_llava_onevision

    return random_llava_onevision("onevision-tiny", seed=seed)


def stock_processor_class(family: str) -> type:
    import transformers

    return getattr(transformers, {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor",
                                  "llava_next": "LlavaNextProcessor",
                                  "llava_onevision": "LlavaOnevisionProcessor"}[family])


def save_processor(family: str, folder: Path, processor=None) -> None:
    """Write ``family``'s test processor into ``folder`` as a checkpoint would have it."""
    from focusvlm.models.processors import images_only_class

    p = processor or builder_processor(family)
    if family not in _VIDEO_SECTIONS:  # LLaVA-NeXT has no video processor: saved as it is
        p.save_pretrained(folder)
        return
    settings = {k: getattr(p, k) for k in ("num_image_tokens", "vision_feature_select_strategy") if hasattr(p, k)}
    images_only_class(stock_processor_class(family))(image_processor=p.image_processor, tokenizer=p.tokenizer,
                                                     chat_template=p.chat_template, **settings).save_pretrained(folder)
    path = Path(folder) / "processor_config.json"
    config = json.loads(path.read_text())
    config["video_processor"] = _VIDEO_SECTIONS[family]
    path.write_text(json.dumps(config, indent=2))


def answer_in_words(model, tokenizer) -> None:
    """Zero the LM head rows of every id but the words w0..w39, so a greedy random model answers in
    decodable words ("w12 w3 ...") and never emits an end-of-sequence or placeholder id (answers run to
    max_new_tokens unless a stop string ends them). With tied embeddings the same rows of the input
    embeddings become zero, which only touches tokens the model never has to tell apart here."""
    words = torch.tensor([tokenizer.convert_tokens_to_ids(f"w{i}") for i in range(40)])
    head = model.get_output_embeddings().weight
    silent = torch.ones(head.shape[0], dtype=torch.bool)
    silent[words] = False
    with torch.no_grad():
        head[silent] = 0


def save_checkpoint(family: str, folder: Path, seed: int = 0, words: bool = False) -> Path:
    """A tiny ``family`` checkpoint in ``folder`` (model + processor); ``words``: see ``answer_in_words``."""
    folder = Path(folder)
    model = tiny_family_model(family, seed)
    processor = builder_processor(family)
    if words:
        answer_in_words(model, processor.tokenizer)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.save_pretrained(folder)
    save_processor(family, folder, processor)
    return folder
