"""A fresh LLaVA-1.5 from a CLIP vision tower and a causal LM (training stage 1).

``compose_llava(vision, lm)`` loads the vision tower (a CLIP or CLIP-vision
checkpoint: hub id or folder) and the language model with its tokenizer, and
joins them with a freshly initialised 2-layer GELU projector, wired as
LLaVA-1.5 (features of encoder layer -2, CLS dropped). The result is a stock
``LlavaForConditionalGeneration`` and ``LlavaProcessor``: save them with
``save_pretrained`` and they load back with ``from_pretrained``.

The processor gets an ``<image>`` token added to the tokenizer (the LM's
embeddings grow to match, padded to a multiple of 64 like llava-hf's) and a
chat template that renders LLaVA-1.5's ``vicuna_v1`` conversation, so a model
trained in that format is prompted the same way at evaluation time.
"""

from __future__ import annotations

from typing import Any

import torch

IMAGE_TOKEN = "<image>"

# vicuna_v1 as LLaVA-1.5 renders it: "{system} USER: <image>\n{q} ASSISTANT: {a}</s>USER: ..."
VICUNA_V1_CHAT_TEMPLATE = (
    "{% set sep2 = eos_token if eos_token is defined and eos_token else '</s>' %}"
    "{{ 'A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user\\'s questions. ' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ sep2 }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def compose_llava(vision: str, lm: str, *, dtype: torch.dtype = torch.float32, seed: int = 0,
                  chat_template: str | None = VICUNA_V1_CHAT_TEMPLATE, **load_kwargs: Any):
    """(model, processor): vision tower + LM + a fresh 2-layer GELU projector, LLaVA-1.5 wiring."""
    from transformers import (AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel,
                              LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

    tower = CLIPVisionModel.from_pretrained(vision, dtype=dtype, **load_kwargs)
    image_processor = AutoImageProcessor.from_pretrained(vision, **load_kwargs)
    causal = AutoModelForCausalLM.from_pretrained(lm, dtype=dtype, **load_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(lm, **load_kwargs)

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        # LLaVA-1.5 pads with <unk> for Vicuna; labels and the attention mask ignore padding either way
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    if len(tokenizer) > causal.get_input_embeddings().weight.shape[0]:
        causal.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)

    vc = tower.config
    text_config = causal.config
    config = LlavaConfig(vision_config=vc, text_config=text_config,
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default",
                         image_seq_length=(vc.image_size // vc.patch_size) ** 2,
                         tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)))
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = tower
    model.model.language_model = causal.model
    model.lm_head = causal.lm_head
    torch.manual_seed(seed)  # nn.Linear's own initialisation, as LLaVA-1.5's fresh mlp2x_gelu projector
    model.model.multi_modal_projector = type(model.model.multi_modal_projector)(config).to(dtype)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"compose_llava: parts left unloaded: {left[:5]}")
    if getattr(causal, "generation_config", None) is not None:
        model.generation_config = causal.generation_config
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vc.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=chat_template)
    return model.eval(), processor
