"""What every command and integration needs to run a model, below cli/, eval/, bench/.

* ``load_model(source)``: the stock model and processor of any supported family, from
  a no-download name (``"demo"``, ``"demo-focus"``, ``"demo-random"``), a local folder or a hub id, with one-line errors
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
from typing import Any, Sequence

from .models.demo import DEMO_NAMES  # the models that need no download (a light import: no torch)

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


def _env_offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = 2.0) -> tuple[bool, str]:
    """(can a TCP connection to the hub endpoint open within ``timeout`` s, why not).

    One short probe instead of huggingface_hub's retries with backoff (about 27 s
    end to end) when the machine has no route to the hub.
    """
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return True, ""
    url = urlparse(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True, ""
    except OSError as exc:
        return False, f"{endpoint} unreachable: {exc.strerror or exc}"


def check_model_source(source: str) -> Path | None:
    """The local folder ``source`` names (validated), or None for a hub id. No torch, no transformers.

    Raises a one-line ModelLoadError for a missing folder or one that holds no saved model.
    """
    if source in DEMO_NAMES:
        return None
    if not isinstance(source, str) or not source.strip():
        raise ModelLoadError(f"model source must be 'demo', a folder or a hub id, got {source!r}")
    path = Path(source).expanduser()
    # a hub id is "name" or "owner/name"; anything else that is not on disk is a mistyped path
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source
    if path.exists() or looks_local:
        if not path.is_dir():
            what = "is a file, not a model folder" if path.exists() else "not found"
            raise ModelLoadError(f"model folder {what}: {source}")
        if not (path / "config.json").is_file():
            inside = sorted(p.name for p in path.iterdir())[:6]
            raise ModelLoadError(f"{source} holds no config.json, so it is not a saved model"
                                 + (f" (it has: {', '.join(inside)})" if inside else " (the folder is empty)"))
        return path
    return None


class _HubOffline:
    """Within the block, huggingface_hub behaves as under HF_HUB_OFFLINE=1 (cache only, no retries)."""

    def __enter__(self):
        from huggingface_hub import constants

        self._constants, self._old = constants, constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True
        return self

    def __exit__(self, *exc):
        self._constants.HF_HUB_OFFLINE = self._old
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:240]


def _checkpoint_config(source: str, offline: bool):
    """The checkpoint's config, or a one-line ModelLoadError naming what is wrong."""
    from .models import read_checkpoint_config

    folder = check_model_source(source)
    if folder is not None:
        try:
            return read_checkpoint_config(folder)
        except Exception as exc:  # a broken config.json: name the file
            raise ModelLoadError(f"{folder / 'config.json'}: {_first_line(exc)}") from None
    try:
        if offline:
            with _HubOffline():
                return read_checkpoint_config(source, local_files_only=True)
        return read_checkpoint_config(source)
    except Exception as exc:  # hub errors come in many types; the message is what matters
        if offline:
            why = "HF_HUB_OFFLINE is set" if _env_offline() else hub_reachable()[1] or "the hub is unreachable"
            raise ModelLoadError(f"{source}: no local folder of that name, and not in the local Hugging Face cache "
                                 f"while the hub is offline ({why}); download it first or pass a local folder") from None
        raise ModelLoadError(f"{source}: no local folder of that name, and the hub could not provide it "
                             f"({_first_line(exc)})") from None


def load_model(source: str, device: Any = None, dtype: Any = None, *, device_map: Any = None,
               attn_implementation: str | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """(stock model in eval mode, processor) of any supported family; padding side left for batching.

    ``source``: a no-download name ("demo", "demo-focus", "demo-random"), a local folder or a hub id. ``dtype``: a torch dtype, its name, "auto" or None
    (the device's default). Raises ModelLoadError / UnsupportedModelError with one line. A hub id
    while the hub cannot be reached (HF_HUB_OFFLINE, or a 2 s connection probe fails) is looked up
    in the local cache only, so it fails in seconds rather than after the hub client's retries.
    """
    if source in DEMO_NAMES:
        from .models.demo.load import load_named_demo

        dev, dt = resolve_device_dtype(None if device is None else str(device), dtype)
        model, processor = load_named_demo(source)
        model = model.to(device=dev, dtype=dt)
    else:
        folder = check_model_source(source)
        offline = folder is None and (_env_offline() or not hub_reachable()[0])
        from .models import adapter_for_type

        config = _checkpoint_config(source, offline)
        adapter = adapter_for_type(getattr(config, "model_type", None))
        extra = dict(kwargs)
        if device_map is not None:
            extra["device_map"] = device_map
        if attn_implementation is not None:
            extra["attn_implementation"] = attn_implementation
        if device is None and device_map is None:
            device = resolve_device_dtype(None, None)[0]
        dt = "auto" if dtype == "auto" else resolve_device_dtype(None if device is None else str(device), dtype)[1]
        try:
            if offline:
                with _HubOffline():
                    model, processor = adapter.load(source, dtype=dt, device=None if device_map is not None else device,
                                                    **extra)
            else:
                model, processor = adapter.load(source, dtype=dt, device=None if device_map is not None else device,
                                                **extra)
        except (OSError, ValueError, KeyError) as exc:  # missing weights / processor files, broken files
            raise ModelLoadError(f"{source}: the config loaded but the model or its processor did not "
                                 f"({_first_line(exc)})") from None
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"  # right padding would put pad tokens between prompt and answer
    return model.eval(), processor


def set_progress_bars(enabled: bool) -> None:
    """Switch transformers' and the hub client's progress bars ("Loading weights", downloads) on or off."""
    from transformers import logging as hf_logging

    if enabled:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()


def context_length(model: Any) -> int | None:
    """The language model's context length (``max_position_embeddings`` of the text config), if known."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else getattr(config, "text_config", config)
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def check_max_new_tokens(model: Any, max_new_tokens: int, prompt_tokens: int = 0) -> None:
    """Raise a one-line ValueError when the answer cannot fit the model's context length."""
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    limit = context_length(model)
    if limit is None:
        return
    if prompt_tokens + max_new_tokens > limit:
        where = f"{prompt_tokens} prompt tokens + " if prompt_tokens else ""
        room = f"at most {limit - prompt_tokens}" if prompt_tokens < limit else "none left"
        raise ValueError(f"--max-new-tokens {max_new_tokens}: {where}{max_new_tokens} new tokens exceed the model's "
                         f"context length of {limit} tokens (max_position_embeddings); {room} for the answer")


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


def to_messages(prompt: str | list[dict], with_image: bool | int) -> list[dict]:
    """Chat messages of a user prompt with ``with_image`` images (True = 1) before the text."""
    if not isinstance(prompt, str):
        return prompt
    content = [{"type": "image"} for _ in range(int(with_image))] + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}]


def _image_list(item: Any) -> list:
    """The images of one prompt: None -> [], one image -> [it], a list stays."""
    if item is None:
        return []
    return [im for im in item if im is not None] if isinstance(item, (list, tuple)) else [item]


def cut_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """``text`` up to the first occurrence of any stop string (leading whitespace ignored)."""
    text = text.lstrip()
    for s in stop or ():
        if s:
            text = text.split(s, 1)[0]
    return text.strip()


@dataclass
class Generation:
    """One model answer, as a generator returns it."""
    text: str
    prompt_tokens: int = 0
    new_tokens: int = 0
    image_tokens: int = 0


def _stop_criteria(tokenizer: Any, stop: Sequence[str], prompt_len: int):
    """Stop each row once its decoded answer holds a stop string.

    Decodes the answer so far instead of using transformers' ``stop_strings``, whose token
    tables assume sub-word vocabularies and fail on some tokenizers; the text is cut by
    :func:`cut_at_stop` afterwards either way.
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAtStrings(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            rows = input_ids[:, prompt_len:].tolist()
            hit = [any(s in tokenizer.decode(r, skip_special_tokens=True).lstrip() for s in stop) for r in rows]
            return torch.tensor(hit, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopAtStrings()])


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

    def generate(self, prompts, images, max_new_tokens, stop: Sequence[str] | None = None) -> list[Generation]:
        """Greedy answers. ``images[i]``: None (text only), an image, or a list of images for prompt i.
        ``stop``: strings that end an answer (generation stops there and the text is cut before them)."""
        import torch

        # the processor needs each batch to be all-image or all-text; split and restore the order
        per_prompt = [_image_list(im) for im in images]
        groups: dict[bool, list[int]] = {True: [], False: []}
        for i, ims in enumerate(per_prompt):
            groups[bool(ims)].append(i)
        stop = [s for s in (stop or ()) if s]
        out: list[Generation | None] = [None] * len(prompts)
        for with_image, idx in groups.items():
            if not idx:
                continue
            texts = [self.processor.apply_chat_template(to_messages(prompts[i], len(per_prompt[i])),
                                                        add_generation_prompt=True, tokenize=False) for i in idx]
            kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
            if with_image:
                kwargs["images"] = [im for i in idx for im in per_prompt[i]]
            inputs = self.processor(**kwargs).to(self.model.device)
            check_max_new_tokens(self.model, max_new_tokens, int(inputs["input_ids"].shape[1]))
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            with torch.inference_mode():
                extra = {"stopping_criteria": _stop_criteria(self.tokenizer, stop, inputs["input_ids"].shape[1])} \
                    if stop else {}
                seqs = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                           num_beams=1, pad_token_id=self.pad_id, **extra)
            new = seqs[:, inputs["input_ids"].shape[1]:].tolist()
            prompt_lens = inputs["attention_mask"].sum(dim=1).tolist()
            image_counts = (inputs["input_ids"] == self.model.config.image_token_id).sum(dim=1).tolist()
            for row, i in enumerate(idx):
                ids = new[row]
                if stop:  # a row that met a stop string early is filled with pad tokens to the batch's end
                    while ids and ids[-1] == self.pad_id and ids[-1] not in self.eos_ids:
                        ids = ids[:-1]
                n = next((k + 1 for k, t in enumerate(ids) if t in self.eos_ids), len(ids))
                text = self.tokenizer.decode(ids[:n], skip_special_tokens=True).strip()
                if stop:
                    text = cut_at_stop(text, stop)
                out[i] = Generation(text=text, prompt_tokens=int(prompt_lens[row]), new_tokens=n,
                                    image_tokens=int(image_counts[row]))
        return out  # type: ignore[return-value]
