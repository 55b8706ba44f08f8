"""Offline tiny LLaVA pieces for the training tests: a byte-level BPE tokenizer trained on the spot
(so merges across turn boundaries are real), a processor for random_llava('tiny'), little datasets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

IMAGE_ID = 511  # random_llava('tiny'): vocab 512, <image> = the last id
ASSETS = Path(__file__).resolve().parents[2] / "focusvlm" / "assets"

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = """A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful,
detailed, and polite answers to the user's questions. USER: ASSISTANT: What is in the picture? A cat sits on
a red sofa next to a cup of coffee. Describe the image in detail. The astronaut is standing in front of a flag.
How many people are there? There are two people. What colour is the cat? The cat is grey and white with stripes.
Is it day or night? It is day; the sky is bright and blue. Answer briefly. Yes. No. Thank you! You are welcome.
Write a short poem about the sea. The sea is wide, the waves roll in, the gulls cry out above the wind.
system user assistant im_start im_end hello world the a an of to in is on with for at by from and or not
"""


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=IMAGE_ID, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS] * 3, trainer)
    size = tok.get_vocab_size()
    if size < IMAGE_ID:
        tok.add_special_tokens([f"<extra_{i}>" for i in range(IMAGE_ID - size)])
    tok.add_special_tokens(["<image>"])
    assert tok.token_to_id("<image>") == IMAGE_ID
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<image>", "<|im_start|>", "<|im_end|>"])
    return fast


def processor(chat_template: str | None = CHATML):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    images = CLIPImageProcessorPil(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer(), patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=chat_template)


def model(seed: int = 0):
    from focusvlm.models.factory import random_llava

    m = random_llava("tiny", seed=seed)
    m.config.text_config.pad_token_id = 0
    return m


def save_tiny(folder: Path, seed: int = 0) -> Path:
    """A from_pretrained-loadable tiny LLaVA + processor."""
    m, p = model(seed), processor()
    m.save_pretrained(folder)
    p.save_pretrained(folder)
    return folder


QUESTIONS = [("What is in the picture?", "A cat sits on a red sofa."),
             ("Describe the image in detail.", "The astronaut is standing in front of a flag."),
             ("What colour is the cat?", "The cat is grey and white with stripes."),
             ("Is it day or night?", "It is day; the sky is bright and blue."),
             ("How many people are there?", "There are two people.")]


def images(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for src in sorted(ASSETS.glob("*.jpg")):
        shutil.copy(src, folder / src.name)
        names.append(src.name)
    return names


def dataset(folder: Path, n: int = 12, text_every: int = 4, multi_turn: bool = True, name: str = "data.json",
            captions: bool = False) -> Path:
    """n LLaVA records over the bundled images; every ``text_every``-th one text-only."""
    pics = images(folder / "images")
    recs = []
    for i in range(n):
        q, a = QUESTIONS[i % len(QUESTIONS)]
        if captions:
            recs.append({"id": f"c{i}", "image": pics[i % len(pics)],
                         "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                           {"from": "gpt", "value": f"{a} ({pics[i % len(pics)][:-4]})"}]})
            continue
        conv = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        if multi_turn and i % 2:
            q2, a2 = QUESTIONS[(i + 1) % len(QUESTIONS)]
            conv += [{"from": "human", "value": q2}, {"from": "gpt", "value": a2}]
        rec = {"id": f"s{i}", "conversations": conv}
        if text_every and i % text_every == text_every - 1:
            recs.append(rec)
            continue
        rec["image"] = pics[i % len(pics)]
        conv[0]["value"] = ("<image>\n" if i % 3 else "") + q + ("" if i % 3 else "\n<image>")
        recs.append(rec)
    path = folder / name
    path.write_text(json.dumps(recs, indent=1))
    return path
