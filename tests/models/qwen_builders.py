"""Tiny Qwen2.5-VL / Qwen3-VL models, raw inputs and processors, built offline (shared by the Qwen tests).

Raw inputs follow the processors' layout: ``<|vision_start|>`` + placeholders + ``<|vision_end|>``
per image; a Qwen2.5 video is one such run, a Qwen3 video one run per frame with a
timestamp token before it. Grids are in patches, (h, w) or (t, h, w), even sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from focusvlm.models import adapter_for_preset
from focusvlm.models.qwen2_5_vl import TINY_TOKENS

IMAGE, VIDEO, START, END = (TINY_TOKENS[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                      "vision_end_token_id"))
PRESETS = {"qwen2_5_vl": "qwen2.5-vl-tiny", "qwen3_vl": "qwen3-vl-tiny"}


def tiny_model(preset: str, seed: int = 0, dtype=torch.float32, attn_implementation: str = "sdpa"):
    return adapter_for_preset(preset).random_model(preset, seed=seed, dtype=dtype,
                                                   attn_implementation=attn_implementation)


@dataclass
class QwenBatch:
    """Raw model inputs plus what the tests need to cut one sample out again."""

    inputs: dict
    pixel_rows: list[tuple[int, int]] = field(default_factory=list)       # per sample: image rows (start, end)
    video_rows: list[tuple[int, int]] = field(default_factory=list)
    image_items: list[tuple[int, int]] = field(default_factory=list)      # per sample: image grid indices
    video_items: list[tuple[int, int]] = field(default_factory=list)

    def sample(self, i: int) -> dict:
        """Sample ``i`` alone, unpadded."""
        keep = self.inputs["attention_mask"][i].bool()
        out = {k: self.inputs[k][i][keep][None] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
        for kind, rows, items, px, grid in (("image", self.pixel_rows, self.image_items, "pixel_values",
                                             "image_grid_thw"),
                                            ("video", self.video_rows, self.video_items, "pixel_values_videos",
                                             "video_grid_thw")):
            a, b = items[i]
            if b > a:
                out[px] = self.inputs[px][rows[i][0]:rows[i][1]]
                out[grid] = self.inputs[grid][a:b]
        return out


def make_inputs(model, layouts, seed: int = 0, tokens_per_frame: Callable[[int, int], int] | None = None) -> QwenBatch:
    """Left-padded raw inputs. A layout is a list of segments: an int (that many random text tokens),
    ("img", (h, w)) or ("vid", (t, h, w)). ``tokens_per_frame(h, w)`` gives the placeholders per frame
    (default: the stock count, h * w / 4)."""
    gen = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    width = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    per_frame = tokens_per_frame or (lambda h, w: (h // 2) * (w // 2))
    per_frame_video_runs = model.config.model_type == "qwen3_vl"
    rows, types = [], []
    pixels = {"image": [], "video": []}
    grids = {"image": [], "video": []}
    batch = QwenBatch({})
    counts = {"image": 0, "video": 0}
    rows_at = {"image": 0, "video": 0}

    def text(n):
        return torch.randint(1, IMAGE - 10, (n,), generator=gen).tolist()

    for layout in layouts:
        ids: list[int] = []
        first = dict(counts)
        first_rows = dict(rows_at)
        for seg in layout:
            if isinstance(seg, int):
                ids += text(seg)
                continue
            kind, grid = seg
            kind = "image" if kind == "img" else "video"
            t, h, w = (1, *grid) if kind == "image" else grid
            token = IMAGE if kind == "image" else VIDEO
            n = per_frame(h, w)
            if kind == "video" and per_frame_video_runs:
                for _ in range(t):
                    ids += text(1) + [START] + [token] * n + [END]
            else:
                ids += [START] + [token] * (t * n) + [END]
            pixels[kind].append(torch.randn(t * h * w, width, generator=gen))
            grids[kind].append([t, h, w])
            counts[kind] += 1
            rows_at[kind] += t * h * w
        rows.append(ids)
        batch.image_items.append((first["image"], counts["image"]))
        batch.video_items.append((first["video"], counts["video"]))
        batch.pixel_rows.append((first_rows["image"], rows_at["image"]))
        batch.video_rows.append((first_rows["video"], rows_at["video"]))
    length = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, length - len(r):] = torch.tensor(r)
        mask[i, length - len(r):] = 1
    types = (input_ids == IMAGE).long() + 2 * (input_ids == VIDEO).long()
    out = {"input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": types}
    if pixels["image"]:
        out["pixel_values"] = torch.cat(pixels["image"])
        out["image_grid_thw"] = torch.tensor(grids["image"])
    if pixels["video"]:
        out["pixel_values_videos"] = torch.cat(pixels["video"])
        out["video_grid_thw"] = torch.tensor(grids["video"])
    batch.inputs = out
    return batch


def visual_mask(inputs: dict) -> torch.Tensor:
    """Positions that receive image or video features in a call with these inputs."""
    ids = inputs["input_ids"]
    mask = torch.zeros_like(ids, dtype=torch.bool)
    if "pixel_values" in inputs:
        mask |= ids == IMAGE
    if "pixel_values_videos" in inputs:
        mask |= ids == VIDEO
    return mask


# --------------------------------------------------------------------------- processors

SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>"]
SPECIAL_IDS = dict(zip(SPECIALS, [START, END, IMAGE, VIDEO, 504, 505]))
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|> ' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|vision_start|> <|image_pad|> <|vision_end|> ' }}"
    "{% elif item['type'] == 'video' %}{{ '<|vision_start|> <|video_pad|> <|vision_end|> ' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ ' <|im_end|> ' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|> assistant ' }}{% endif %}"
)


def tiny_processor(family: str):
    """The family's processor for the tiny preset: word-level tokenizer (w0..w39, the vision specials at
    the model's ids), the Qwen2-VL image processor (patch 14 for Qwen2.5, 16 for Qwen3, merge 2), left padding.

    torchvision is not installed here and Qwen's video processors need it, so the processor is built
    without one (videos in tests are raw inputs; the video count logic is called directly)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>"] + [f"w{i}" for i in range(40)])}
    vocab.update(SPECIAL_IDS)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<|im_end|>", additional_special_tokens=SPECIALS)
    fast.padding_side = "left"
    patch = 14 if family == "qwen2_5_vl" else 16
    images = Qwen2VLImageProcessorPil(min_pixels=(2 * patch) ** 2, max_pixels=(2 * patch) ** 2 * 36, patch_size=patch,
                                      merge_size=2, temporal_patch_size=2)
    base = Qwen2_5_VLProcessor if family == "qwen2_5_vl" else Qwen3VLProcessor

    class NoVideoProcessor(base):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return NoVideoProcessor(image_processor=images, tokenizer=fast, video_processor=None, chat_template=CHAT_TEMPLATE)


def random_images(sizes, seed: int = 0):
    rs = np.random.RandomState(seed)
    return [rs.randint(0, 255, (h, w, 3), dtype=np.uint8) for h, w in sizes]
