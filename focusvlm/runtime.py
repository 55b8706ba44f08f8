"""What every command and integration needs to run a model, below cli/, eval/, bench/.

* ``load_model(source)``: the stock model and processor of any supported family, from
  ``"demo"`` (the embedded model), a local folder or a hub id, with one-line errors
  for a missing path, an empty folder, an unknown family or an offline hub.
* ``resolve_device_dtype``: the device and the resolved dtype a run uses.
* ``load_image`` / ``open_image``: PIL images with the problem named.
* ``HFGenerator``: greedy, left-padded batched generation with the model's own chat template.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEMO = "demo"


class ModelLoadError(RuntimeError):
    """A checkpoint could not be loaded; the message says why in one line."""


def resolve_device_dtype(device: str | None, dtype: Any) -> tuple[Any, Any]:
    """(torch.device, torch.dtype): cuda when available, bf16 on GPU and fp32 on CPU unless told."""
    import torch

    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device}: CUDA is not available on this machine")
    if dtype is None or dtype == "auto":
        return dev, (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        return dev, getattr(torch, dtype)
    return dev, dtype


def _checkpoint_config(source: str):
    """The checkpoint's config, or a one-line ModelLoadError naming what is wrong."""
    from .models import read_checkpoint_config

    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        if not path.is_dir():
            raise ModelLoadError(f"model folder not found: {source}")
        if not (path / "config.json").is_file():
            inside = sorted(p.name for p in path.iterdir())[:6]
            raise ModelLoadError(f"{source} holds no config.json, so it is not a saved model"
                                 + (f" (it has: {', '.join(inside)})" if inside else " (the folder is empty)"))
        return read_checkpoint_config(path)
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or \
        os.environ.get("TRANSFORMERS_OFFLINE", "") not in ("", "0")
    try:
        return read_checkpoint_config(source, local_files_only=offline)
    except Exception as exc:  # hub errors come in many types; the message is what matters
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if offline:
            raise ModelLoadError(f"{source}: not in the local Hugging Face cache and the hub is offline "
                                 "(HF_HUB_OFFLINE is set); download it first or pass a local folder") from None
        raise ModelLoadError(f"{source}: could not load its config from the hub or a folder ({first[:200]})") from None


def load_model(source: str, device: Any = None, dtype: Any = None, *, device_map: Any = None,
               attn_implementation: str | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """(stock model in eval mode, processor) of any supported family; padding side left for batching.

    ``source``: "demo", a local folder or a hub id. ``dtype``: a torch dtype, its name, "auto" or None
    (the device's default). Raises ModelLoadError / UnsupportedModelError with one line.
    """
    import torch

    if source == DEMO:
        from .models.factory import demo_model

        dev, dt = resolve_device_dtype(None if device is None else str(device), dtype)
        model, processor = demo_model()
        model = model.to(device=dev, dtype=dt)
    else:
        from .models import adapter_for_type

        config = _checkpoint_config(source)
        adapter = adapter_for_type(getattr(config, "model_type", None))
        extra = dict(kwargs)
        if device_map is not None:
            extra["device_map"] = device_map
        if attn_implementation is not None:
            extra["attn_implementation"] = attn_implementation
        if device is None and device_map is None:
            device = resolve_device_dtype(None, None)[0]
        dt = "auto" if dtype == "auto" else resolve_device_dtype(None if device is None else str(device), dtype)[1]
        model, processor = adapter.load(source, dtype=dt, device=None if device_map is not None else device, **extra)
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"  # right padding would put pad tokens between prompt and answer
    return model.eval(), processor


def open_image(source: str):
    """A PIL image from a path or URL, with the problem named when it fails."""
    if source.startswith(("http://", "https://")):
        import urllib.request

        from PIL import Image

        try:
            with urllib.request.urlopen(source, timeout=30) as response:
                data = response.read()
        except OSError as exc:
            raise RuntimeError(f"could not download image {source}: {exc}") from exc
        try:
            return Image.open(io.BytesIO(data)).convert("RGB")
        except Exception as exc:
            raise ValueError(f"unreadable image at {source}: {exc}") from exc
    return load_image(source)


def load_image(image: Any):
    """PIL RGB image, or None for text-only samples. Raises with the path named."""
    if image is None:
        return None
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as exc:  # PIL raises several types for broken files
        raise ValueError(f"unreadable image {path}: {type(exc).__name__}: {exc}") from exc


def to_messages(prompt: str | list[dict], with_image: bool) -> list[dict]:
    if not isinstance(prompt, str):
        return prompt
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}]


@dataclass
class Generation:
    """One model answer, as a generator returns it."""
    text: str
    prompt_tokens: int = 0
    new_tokens: int = 0
    image_tokens: int = 0


class HFGenerator:
    """Greedy, left-padded batched generation with the model's own chat template."""

    def __init__(self, model: Any, processor: Any):
        self.model = model
        self.processor = processor
        tok = getattr(processor, "tokenizer", processor)
        if tok.padding_side != "left":
            tok.padding_side = "left"  # right padding would put pad tokens between prompt and answer
        self.tokenizer = tok
        gen = model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else tok.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.pad_id = gen.pad_token_id if gen.pad_token_id is not None else (
            tok.pad_token_id if tok.pad_token_id is not None else next(iter(self.eos_ids), 0))

    def generate(self, prompts, images, max_new_tokens) -> list[Generation]:
        import torch

        # the processor needs each batch to be all-image or all-text; split and restore the order
        groups: dict[bool, list[int]] = {True: [], False: []}
        for i, im in enumerate(images):
            groups[im is not None].append(i)
        out: list[Generation | None] = [None] * len(prompts)
        for with_image, idx in groups.items():
            if not idx:
                continue
            texts = [self.processor.apply_chat_template(to_messages(prompts[i], with_image),
                                                        add_generation_prompt=True, tokenize=False) for i in idx]
            kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
            if with_image:
                kwargs["images"] = [images[i] for i in idx]
            inputs = self.processor(**kwargs).to(self.model.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            with torch.inference_mode():
                seqs = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                           num_beams=1, pad_token_id=self.pad_id)
            new = seqs[:, inputs["input_ids"].shape[1]:].tolist()
            prompt_lens = inputs["attention_mask"].sum(dim=1).tolist()
            image_counts = (inputs["input_ids"] == self.model.config.image_token_id).sum(dim=1).tolist()
            for row, i in enumerate(idx):
                ids = new[row]
                n = next((k + 1 for k, t in enumerate(ids) if t in self.eos_ids), len(ids))
                text = self.tokenizer.decode(ids[:n], skip_special_tokens=True).strip()
                out[i] = Generation(text=text, prompt_tokens=int(prompt_lens[row]), new_tokens=n,
                                    image_tokens=int(image_counts[row]))
        return out  # type: ignore[return-value]
