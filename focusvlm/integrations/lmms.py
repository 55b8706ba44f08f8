"""lmms-eval plugin: ``--model focusvlm`` runs lmms-eval's task catalogue with any focusvlm method.

Install with ``pip install focusvlm[lmms]``; focusvlm's package metadata
declares the entry point (group ``lmms_eval.models``)::

    focusvlm = "focusvlm.integrations.lmms:manifest"

which lmms-eval (>= 0.5, checked on 0.7.3) reads when it builds its model
registry. Then, on one process or several::

    lmms-eval --model focusvlm \
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,focus_config=focus.yaml \
        --tasks gqa,mme --batch_size 1
    accelerate launch --num_processes 2 -m lmms_eval --model focusvlm ...

Each process loads the model on its own device (``cuda:<local rank>``, or the
CPU) and answers the documents lmms-eval assigns to its rank. ``pretrained``
takes a checkpoint of any supported family (LLaVA-1.5, LLaVA-NeXT,
LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL) by hub id or folder; prompts come from
the model's own chat template, and the processor emits the placeholder count
the configured vision method leaves (tests/integrations/test_lmms_families.py).

What a task may ask for: ``until`` (stop strings: generation stops there and
the answer is cut before them) and ``max_new_tokens`` per request; several
images per request. Answers are greedy, so a task that asks for sampling
(``do_sample: true`` or ``temperature > 0``) or beam search (``num_beams > 1``)
is refused with an error rather than silently answered greedily. Only
generation tasks are supported (``generate_until``).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

MODEL_ID = "focusvlm"
CLASS_PATH = "focusvlm.integrations.lmms.FocusVLMLmms"
MODEL_ARGS = ("pretrained", "focus_config", "device", "dtype", "batch_size", "max_new_tokens", "max_batch_size",
              "compile")

# generation kwargs a greedy decoder follows by construction; anything else is named in a warning
_GREEDY_NEUTRAL = {"top_p", "top_k", "use_cache", "repetition_penalty_disabled"}


class UnsupportedGeneration(ValueError):
    """A task asks for generation settings the plugin cannot follow (sampling, beams)."""


def manifest():
    """The entry-point payload: lmms-eval's ModelManifest for ``--model focusvlm``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


def greedy_settings(gen_kwargs: dict | None, default_max_new_tokens: int,
                    warned: set[str] | None = None) -> tuple[int, tuple[str, ...]]:
    """(max_new_tokens, stop strings) of a request's generation kwargs; refuses what greedy decoding can't do."""
    kw = dict(gen_kwargs or {})
    if kw.get("do_sample"):
        raise UnsupportedGeneration("the task asks for sampling (do_sample: true); focusvlm's lmms-eval model "
                                    "decodes greedily only: set do_sample: false in the task's generation_kwargs")
    temperature = kw.get("temperature")
    if temperature is not None and float(temperature) > 0:
        raise UnsupportedGeneration(f"the task asks for temperature {temperature} (sampling in lmms-eval); "
                                    "focusvlm's lmms-eval model decodes greedily only: set temperature: 0")
    beams = kw.get("num_beams")
    if beams is not None and int(beams) > 1:
        raise UnsupportedGeneration(f"the task asks for beam search (num_beams: {beams}); focusvlm's lmms-eval "
                                    "model decodes greedily only: set num_beams: 1")
    until = kw.get("until")
    stops = (until,) if isinstance(until, str) else tuple(until or ())
    if not all(isinstance(s, str) for s in stops):
        raise UnsupportedGeneration(f"until must be a string or a list of strings, got {until!r}")
    max_new = kw.get("max_new_tokens")
    max_new = default_max_new_tokens if max_new is None else int(max_new)
    if max_new < 1:
        raise UnsupportedGeneration(f"max_new_tokens must be >= 1, got {max_new}")
    unknown = sorted(set(kw) - {"until", "max_new_tokens", "do_sample", "temperature", "num_beams"} - _GREEDY_NEUTRAL)
    if warned is not None and set(unknown) - warned:
        new = sorted(set(unknown) - warned)
        warned.update(new)
        print(f"focusvlm lmms model: warning: ignoring generation kwargs {new} (greedy decoding with "
              "max_new_tokens and until only)", file=sys.stderr)
    return max_new, tuple(s for s in stops if s)


def request_images(visuals: Any) -> list:
    """The PIL images of one request (any number); anything else (video, audio) is refused by name."""
    from PIL import Image

    from ..runtime import load_image

    if visuals is None:
        return []
    items = visuals if isinstance(visuals, (list, tuple)) else [visuals]
    images = []
    for v in items:
        if v is None:
            continue
        if isinstance(v, Image.Image):
            images.append(v.convert("RGB"))
        elif isinstance(v, str) and v.lower().endswith((".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")):
            images.append(load_image(v))
        else:
            raise UnsupportedGeneration(f"focusvlm's lmms-eval model takes images only; the task gave a "
                                        f"{type(v).__name__} ({str(v)[:60]!r})")
    return images


def process_world(accelerator: Any = None) -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed's group when there is one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if accelerator is not None:
        return accelerator.process_index, accelerator.num_processes
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def process_device(device: str | None, rank: int, world_size: int) -> str | None:
    """The device of this process: ``cuda:<local rank>`` (or the CPU) unless one was named.

    A bare ``cuda`` under several processes is made per-process as well."""
    import torch

    if device is None or (world_size > 1 and str(device) == "cuda"):
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    return device


def load_focus_model(pretrained: str, focus_config: str | None, device: str, dtype: str | None,
                     compile: bool | str = False):
    """(device, FocusConfig, model, HFGenerator): the checkpoint loaded and patched with the focus config file;
    ``compile`` (model_args ``compile=True``): the compiled path (``focusvlm.compile_model``)."""
    from ..api import patch
    from ..config import FocusConfig
    from ..runtime import HFGenerator, load_model, resolve_device_dtype

    device, dt = resolve_device_dtype(str(device), dtype)
    config = FocusConfig.load(focus_config) if focus_config else FocusConfig()
    model, processor = load_model(pretrained, device, dt)
    if not config.is_stock:
        patch(model, config, processor)
    if str(compile).lower() in ("1", "true", "yes"):   # model_args arrive as strings
        from ..compiling import compile_model

        compile_model(model)
    elif str(compile).lower() not in ("0", "false", "no", ""):
        raise ValueError(f"focusvlm lmms model: compile must be true or false, got {compile!r}")
    return device, config, model, HFGenerator(model, processor)


def generation_batches(settings: Sequence[tuple[int, tuple[str, ...]]],
                       batch_size: int) -> list[tuple[int, tuple[str, ...], list[int]]]:
    """(max_new_tokens, stops, request indices) batches of at most ``batch_size`` requests.

    One batch holds requests with the same answer length and stop strings, so none gets more
    tokens (or other stops) than it asked for; groups come in order of first appearance."""
    groups: dict[tuple[int, tuple[str, ...]], list[int]] = {}
    for i, key in enumerate(settings):
        groups.setdefault(key, []).append(i)
    return [(max_new, stops, idx[start:start + batch_size])
            for (max_new, stops), idx in groups.items() for start in range(0, len(idx), batch_size)]


class _FocusVLMModel:
    """What FocusVLMLmms does; ``_build_class`` puts lmms-eval's base class under it when lmms-eval asks."""

    is_simple = True

    def __init__(self, pretrained: str = "demo", focus_config: str | None = None, device: str | None = None,
                 dtype: str | None = None, batch_size: int | str = 1, max_new_tokens: int = 128,
                 max_batch_size: int | None = None, compile: bool | str = False, **kwargs: Any) -> None:
        super().__init__()  # lmms-eval's lmms
        if kwargs:
            raise ValueError(f"focusvlm lmms model: unknown model_args {sorted(kwargs)}; "
                             f"known: {', '.join(MODEL_ARGS)}")
        from accelerate import Accelerator

        # the evaluator reads .accelerator, .device, .rank and .world_size to shard documents and
        # gather results. The process group is the truth: on a CPU-only machine under torchrun,
        # accelerate's state reports a single process although the group has several
        self.accelerator = Accelerator()
        self._rank, self._world_size = process_world(self.accelerator)
        device = process_device(device, self._rank, self._world_size)
        self._device, self.focus_config, self._model, self.generator = load_focus_model(
            pretrained, focus_config, device, dtype, compile)
        self.batch_size_per_gpu = int(batch_size)
        self.default_max_new_tokens = int(max_new_tokens)
        self._warned: set[str] = set()
        if self._rank == 0:
            print(f"focusvlm lmms model: {pretrained} with {self.focus_config.describe()} on "
                  f"{self._world_size} process(es)", file=sys.stderr)

    @property
    def device(self):
        return self._device

    @property
    def model(self):
        return self._model

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def _request(self, req) -> tuple[str, list, int, tuple[str, ...]]:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
        doc = self.task_dict[task][split][doc_id]
        images = request_images(doc_to_visual(doc) if doc_to_visual is not None else None)
        # the chat template places the images; a literal <image> marker in the text would be a second copy
        text = context.replace("<image>", "").strip() if images else context
        max_new, stops = greedy_settings(gen_kwargs, self.default_max_new_tokens, self._warned)
        return text, images, max_new, stops

    def generate_until(self, requests) -> list[str]:
        from tqdm import tqdm

        items = [self._request(req) for req in requests]  # refuse bad settings before generating anything
        out: list[str | None] = [None] * len(items)
        bar = tqdm(total=len(items), disable=self._rank != 0, desc="focusvlm")
        for max_new, stops, chunk in generation_batches([item[2:] for item in items], self.batch_size_per_gpu):
            gens = self.generator.generate([items[i][0] for i in chunk], [items[i][1] for i in chunk],
                                           max_new, stop=list(stops))
            for i, g in zip(chunk, gens):
                out[i] = g.text
                self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), g.text)
            bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]

    def loglikelihood(self, requests):
        raise NotImplementedError("focusvlm's lmms-eval model supports generation tasks only")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("focusvlm's lmms-eval model supports single-round generation only")


def _build_class():
    from lmms_eval.api.model import lmms

    class FocusVLMLmms(_FocusVLMModel, lmms):
        """lmms-eval "simple" model around a focusvlm-patched model (greedy, left-padded batches)."""

    FocusVLMLmms.__module__ = __name__
    FocusVLMLmms.__qualname__ = "FocusVLMLmms"
    return FocusVLMLmms


def __getattr__(name: str):
    # built on first access so importing this module never needs lmms-eval
    if name == "FocusVLMLmms":
        cls = _build_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


__all__: Sequence[str] = ("manifest", "greedy_settings", "request_images", "UnsupportedGeneration", "MODEL_ID",
                          "CLASS_PATH")
