"""Tiny LLaVA-NeXT / LLaVA-OneVision processors built offline (no download) for the AnyRes tests.

The tokenizer is word-level (``tokenizers``): ids below 64 are words, <image> = 511 and <video> = 510,
matching the ``next-tiny`` / ``onevision-tiny`` presets. Each processor carries a chat template in its
family's format (Vicuna for NeXT, ChatML for OneVision) written with the tiny vocabulary.
"""

from __future__ import annotations

import numpy as np

IMAGE_ID, VIDEO_ID = 511, 510
WORDS = [f"w{i}" for i in range(40)]
TEMPLATE_WORDS = ["USER", "ASSISTANT", ":", "system", "user", "assistant", "\n"]

# Vicuna v1 as llava-v1.6-vicuna uses it: "USER: <image>\n... ASSISTANT:"
NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER : ' }}{% else %}{{ 'ASSISTANT : ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image> ' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ ' ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT :' }}{% endif %}"
)

# ChatML as llava-onevision-qwen2 uses it: "<|im_start|>user <image>\n...<|im_end|><|im_start|>assistant"
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|> ' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image> ' }}{% elif item['type'] == 'video' %}{{ '<video> ' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ ' <|im_end|> ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|> assistant' }}{% endif %}"
)


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"] + WORDS + TEMPLATE_WORDS)}
    vocab["<image>"] = IMAGE_ID
    vocab["<video>"] = VIDEO_ID
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
                                   additional_special_tokens=["<image>", "<video>", "<|im_start|>", "<|im_end|>"])
    fast.padding_side = "left"
    return fast


def next_processor(pinpoints=None):
    """LlavaNextProcessor for the ``next-tiny`` preset: 56 px crops, 14 px patches, the preset's pinpoints."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    from focusvlm.models.llava_next import PRESETS

    pinpoints = pinpoints or PRESETS["next-tiny"].pinpoints
    images = LlavaNextImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                        image_grid_pinpoints=[list(p) for p in pinpoints])
    return LlavaNextProcessor(image_processor=images, tokenizer=word_tokenizer(), patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=NEXT_CHAT_TEMPLATE)


def onevision_processor(pinpoints=None):
    """LlavaOnevisionProcessor for the ``onevision-tiny`` preset (no video processor: it needs torchvision)."""
    from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor

    from focusvlm.models.llava_onevision import PRESETS

    pinpoints = pinpoints or PRESETS["onevision-tiny"].pinpoints
    images = LlavaOnevisionImageProcessorPil(size={"height": 56, "width": 56},
                                             image_grid_pinpoints=[list(p) for p in pinpoints])

    class ImagesOnlyOnevisionProcessor(LlavaOnevisionProcessor):
        # transformers' video processors need torchvision, which the test environment lacks; videos are
        # fed to the model as tensors instead, so the processor is built without one
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImagesOnlyOnevisionProcessor(image_processor=images, tokenizer=word_tokenizer(), video_processor=None,
                                        num_image_tokens=16, vision_feature_select_strategy="full",
                                        chat_template=ONEVISION_CHAT_TEMPLATE)


def random_images(sizes, seed=0):
    """uint8 HWC images of the given (h, w) sizes."""
    rs = np.random.RandomState(seed)
    return [rs.randint(0, 255, (h, w, 3), dtype=np.uint8) for h, w in sizes]
