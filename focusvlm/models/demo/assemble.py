"""The demo LLaVAs, put together by ``models.compose.assemble_llava`` with the demo's choices.

Those choices: SmolLM2 from the GGUF (``lm.smollm2_lm``) unless another LM is given, the ChatML chat template,
the whole LLaVA drawn from the seed before the parts are copied in (so the same inputs give bit-identical
weights and shipped deltas apply later), ``<|im_end|>`` as the end of an answer, left padding.

* ``demo_llava``: a tower + a fresh projector + an LM (what training starts from and loading rebuilds);
* ``build_trainable``: that, with the pretrained tower read from its folder;
* ``build_random_demo``: ``demo-random``, the same LM behind a seeded random 336 px tower.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..compose import assemble_llava
from .lm import smollm2_lm
from .vision import RANDOM_TOWER, load_tower, tower_config, tower_image_processor

LMFactory = Callable[[], tuple[Any, Any]]  # () -> (causal LM, tokenizer holding <image>)

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


def demo_llava(tower, image_processor, lm=None, tokenizer=None, seed: int = 0, init_projector: bool = True):
    """(``LlavaForConditionalGeneration``, ``LlavaProcessor``): ``tower``'s weights, a fresh seeded 2-layer
    GELU projector and ``lm`` (default: SmolLM2 from the GGUF) with its ``tokenizer``; the ``<image>`` row of the
    embeddings zeroed. Deterministic: the same inputs give bit-identical weights.

    ``init_projector=False`` leaves the projector's memory uninitialised, for a caller that loads its weights
    next (``load.load_demo``): the LLaVA is then built without running its random initialisation.
    """
    if lm is None:
        lm, tokenizer = smollm2_lm()
    if tokenizer is None:
        raise ValueError("demo_llava: give the tokenizer that goes with lm")
    model, processor = assemble_llava(tower, image_processor, lm, tokenizer, chat_template=DEMO_CHAT_TEMPLATE,
                                      seed=seed, init="model" if init_projector else "none", zero_image_row=True)
    return _chatml_generation(model, processor)


def build_trainable(tower_dir: str | Path, seed: int = 0, lm_factory: LMFactory | None = None):
    """(model, processor) ready for LLaVA's two stages: the pretrained tower from ``tower_dir``
    (``focusvlm.demo.tower.pretrain_tower``), a fresh seeded 2-layer GELU projector, SmolLM2 from the GGUF (or
    ``lm_factory()``), the ChatML chat template; every parameter trainable (the recipe freezes)."""
    tower, image_processor = load_tower(tower_dir)
    lm, tokenizer = lm_factory() if lm_factory is not None else (None, None)
    return demo_llava(tower, image_processor, lm=lm, tokenizer=tokenizer, seed=seed)


def build_random_demo():
    """(model, processor) of ``demo-random``: SmolLM2 behind a random CLIP tower at 336 px drawn from seed 0."""
    lm, tokenizer = smollm2_lm()
    size = RANDOM_TOWER["image_size"]
    model, processor = assemble_llava(tower_config(**RANDOM_TOWER), tower_image_processor(size), lm, tokenizer,
                                      chat_template=DEMO_CHAT_TEMPLATE, seed=0, init="model")
    return _chatml_generation(model, processor)


def _chatml_generation(model, processor):
    tokenizer = processor.tokenizer
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = end if end != tokenizer.unk_token_id else tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 2
    tokenizer.padding_side = "left"
    return model, processor
