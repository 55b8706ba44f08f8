"""A saved tiny LLaVA checkpoint folder (random weights, word-level tokenizer, chat template), offline.

Loads through the same path as a real checkpoint (``focusvlm.runtime.load_model(folder)``) in
about a second, so CLI and lmms-eval runs can be tested end to end on a busy CPU. Answers are
random words ``w0 w17 ...`` separated by spaces (useful to test stop strings).
"""

from __future__ import annotations

from pathlib import Path

IMAGE_ID = 511
CHAT_TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
                 "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
                 "{% if add_generation_prompt %}w1 {% endif %}")


def tiny_processor():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>"] + [f"w{i}" for i in range(IMAGE_ID - 2)]
    vocab = {w: i for i, w in enumerate(words)}
    vocab["<image>"] = IMAGE_ID
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins word tokens with single spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=["<image>"])
    images = CLIPImageProcessorPil(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112})
    return LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def save_tiny_llava(folder: str | Path, seed: int = 0, eos_token_id: int | None = None) -> Path:
    """Write the tiny checkpoint into ``folder`` and return it. ``eos_token_id`` None: never stops early."""
    from focusvlm.models.llava import random_llava

    folder = Path(folder)
    model = random_llava("tiny", seed=seed)
    model.config.image_token_id = IMAGE_ID
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return folder
