"""The one LLaVA assembler, and a fresh LLaVA-1.5 from hub parts (training stage 1).

``assemble_llava(vision, image_processor, lm, tokenizer)`` joins a vision tower and a causal LM with a fresh
2-layer GELU projector, wired as LLaVA-1.5 (features of encoder layer -2, CLS dropped), into a stock
``LlavaForConditionalGeneration`` and ``LlavaProcessor``: every LLaVA focusvlm builds goes through it
(``compose_llava`` below, and the demo model's builders in ``focusvlm.models.demo.assemble``).

``compose_llava(vision, lm)`` loads the vision tower (a CLIP or CLIP-vision checkpoint: hub id or folder) and
the language model with its tokenizer and assembles them. Save the result with ``save_pretrained`` and it loads
back with ``from_pretrained``. The processor gets an ``<image>`` token added to the tokenizer (the LM's
embeddings grow to match, padded to a multiple of 64 like llava-hf's) and a chat template that renders
LLaVA-1.5's ``vicuna_v1`` conversation, so a model trained in that format is prompted the same way at
evaluation time.
"""

from __future__ import annotations

from typing import Any

import torch

from . import IMAGE_TOKEN

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


INITS = ("projector", "model", "none")


def assemble_llava(vision: Any, image_processor: Any, lm: Any, tokenizer: Any, *, chat_template: str | None,
                   seed: int = 0, init: str = "projector", pad_vocab_to: int | None = None,
                   zero_image_row: bool = False):
    """(``LlavaForConditionalGeneration``, ``LlavaProcessor``): ``vision`` + a fresh 2-layer GELU projector + ``lm``.

    ``vision``: a CLIP vision model, whose weights the LLaVA gets, or only its config (a tower drawn at random;
    ``init="model"``). ``tokenizer`` gets ``<image>`` as a special token when it lacks it; the LM's embeddings
    grow to the tokenizer (rounded up to a multiple of ``pad_vocab_to``) when they are fewer. ``init`` says what
    is drawn from ``torch.manual_seed(seed)``:

    * ``"projector"``: the projector alone, by nn.Linear's own initialisation (LLaVA-1.5's fresh mlp2x_gelu).
      The tower's and the LM's modules become the LLaVA's own and nothing else is allocated (parts of any size);
      the LM grows before the draw.
    * ``"model"``: transformers initialises the whole LLaVA, then the LM grows and the tower's and the LM's
      weights are copied over it; the projector (and a tower given as a config) keep that draw. The demo
      model's scheme: the same inputs give bit-identical weights, so shipped deltas can be applied later.
    * ``"none"``: as ``"model"`` without the draw: the projector's memory is left uninitialised, for a caller
      that loads its weights next (initialising a 135M-parameter LLaVA costs seconds of CPU).

    ``zero_image_row``: zero the ``<image>`` embedding row. It never reaches the LM as an input (features replace
    it); with tied embeddings its output logit is then 0.
    """
    from transformers import LlavaConfig, LlavaProcessor

    if init not in INITS:
        raise ValueError(f"assemble_llava: init must be one of {', '.join(INITS)}, not {init!r}")
    tower = vision if isinstance(vision, torch.nn.Module) else None
    vision_config = vision.config if tower is not None else vision
    if tower is None and init != "model":
        raise ValueError("assemble_llava: a tower given as a config is drawn at random: use init='model'")
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text_config = lm.config
    if init == "projector":
        _grow_embeddings(lm, len(tokenizer), pad_vocab_to)
    else:  # the LLaVA is built at the grown size; the LM grows after the draw
        rows = lm.get_input_embeddings().weight.shape[0]
        text_config.vocab_size = rows if rows >= len(tokenizer) else _rounded(len(tokenizer), pad_vocab_to)
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_id=image_token_id,
                         projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default",
                         image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
                         tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)))
    if init == "projector":
        model = _move_parts(config, tower, lm, seed)
    else:
        model = _copy_parts(config, tower, lm, len(tokenizer), pad_vocab_to, seed, draw=init == "model")
    if zero_image_row:
        with torch.no_grad():
            model.get_input_embeddings().weight[image_token_id].zero_()
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=vision_config.patch_size, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=chat_template)
    return model, processor


def _rounded(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def _grow_embeddings(lm: Any, tokens: int, pad_to_multiple_of: int | None) -> None:
    if tokens > lm.get_input_embeddings().weight.shape[0]:
        lm.resize_token_embeddings(tokens, pad_to_multiple_of=pad_to_multiple_of, mean_resizing=False)


def _move_parts(config: Any, tower: Any, lm: Any, seed: int):
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = tower
    model.model.language_model = lm.model
    model.lm_head = lm.lm_head
    torch.manual_seed(seed)  # nn.Linear's own initialisation, as LLaVA-1.5's fresh mlp2x_gelu projector
    model.model.multi_modal_projector = type(model.model.multi_modal_projector)(config).to(lm.dtype)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"assemble_llava: parts left unloaded: {left[:5]}")
    return model


def _copy_parts(config: Any, tower: Any, lm: Any, tokens: int, pad_to_multiple_of: int | None, seed: int,
                draw: bool):
    from transformers import LlavaForConditionalGeneration

    from ..hfcompat import no_weight_init

    torch.manual_seed(seed)
    if draw:
        model = LlavaForConditionalGeneration(config)
    else:
        with no_weight_init():  # every weight but the projector's is copied in below, the projector's by the caller
            model = LlavaForConditionalGeneration(config)
    if tower is not None:
        model.model.vision_tower.load_state_dict(tower.state_dict())
    _grow_embeddings(lm, tokens, pad_to_multiple_of)  # after the draw: new rows come from the seeded stream
    missing, unexpected = model.model.language_model.load_state_dict(lm.model.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"assemble_llava: LM weights did not fit: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    else:
        model.lm_head.load_state_dict(lm.lm_head.state_dict())
    return model


def compose_llava(vision: str, lm: str, *, dtype: torch.dtype = torch.float32, seed: int = 0,
                  chat_template: str | None = VICUNA_V1_CHAT_TEMPLATE, **load_kwargs: Any):
    """(model, processor): vision tower + LM loaded from the hub or folders, ``assemble_llava``d (a fresh
    projector drawn from ``seed``, embeddings padded to a multiple of 64), in eval mode."""
    from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(vision, dtype=dtype, **load_kwargs)
    image_processor = AutoImageProcessor.from_pretrained(vision, **load_kwargs)
    causal = AutoModelForCausalLM.from_pretrained(lm, dtype=dtype, **load_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(lm, **load_kwargs)
    if tokenizer.pad_token is None:
        # LLaVA-1.5 pads with <unk> for Vicuna; labels and the attention mask ignore padding either way
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    model, processor = assemble_llava(tower, image_processor, causal, tokenizer, chat_template=chat_template,
                                      seed=seed, pad_vocab_to=64)
    if getattr(causal, "generation_config", None) is not None:
        model.generation_config = causal.generation_config
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), processor
