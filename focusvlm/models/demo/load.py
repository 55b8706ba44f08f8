"""The demo models by name, rebuilt offline: ``load_named_demo("demo" | "demo-focus" | "demo-random")``.

``load_demo(folder)`` rebuilds a shipped twin (``ship``'s format): tower + projector loaded strictly, each
LoRA pair merged into its LM weight, ``W + scale * B @ A`` (``lora_delta``), so the result is an ordinary
``LlavaForConditionalGeneration`` (no peft at inference) that focusvlm patches as any other.
``random_demo_model`` builds ``demo-random`` once into the cache and loads it from there.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from . import DEMO_MODELS, DEMO_TWINS, DEMO_WEIGHTS_DIR, demo_twin_dir
from .assemble import LMFactory, build_random_demo, demo_llava
from .cache import build_once, demo_cache_dir
from .lm import smollm2_cache_key
from .ship import META_FILE, WEIGHTS_FILE, DemoWeightsError, read_meta
from .vision import fresh_tower, tower_image_processor, vision_config_from_dict


def load_named_demo(name: str):
    """(model, processor) of a no-download model name (``DEMO_MODELS``)."""
    if name == "demo-random":
        return random_demo_model()
    if name not in DEMO_TWINS:
        raise ValueError(f"unknown demo model {name!r}; use one of {', '.join(DEMO_MODELS)}")
    twin = DEMO_TWINS[name]
    if not (demo_twin_dir(twin) / META_FILE).is_file():
        raise ValueError(f"the {name} twin is not shipped in this version (only 'demo' is; see "
                         f"{DEMO_WEIGHTS_DIR / 'MODEL_CARD.md'}); train it with `make demo-model`")
    return demo_model(twin)


def demo_model(twin: str = "stock"):
    """The embedded default (model, processor): the easy-VQA-trained demo LLaVA, rebuilt offline from the
    GGUF LM and the shipped tower / projector / LoRA (``load_demo``, a few seconds)."""
    model, processor = load_demo(demo_twin_dir(twin))
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor


def random_demo_model(cache: bool = True):
    """The random-vision demo (model, processor). Built once (a few seconds once the LM is cached, see
    ``lm.smollm2_lm``) into ``cache.demo_cache_dir()``, then loaded from there (~2 s); published like the LM
    cache, so concurrent first loads (pytest-xdist workers) are safe."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if cache:
        folder = demo_cache_dir()

        def write(tmp: Path) -> None:
            built, built_processor = build_random_demo()
            built.save_pretrained(tmp)
            built_processor.save_pretrained(tmp)

        build_once(folder, write, {"lm": smollm2_cache_key()})
        model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(folder)
    else:
        model, processor = build_random_demo()
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor


# --------------------------------------------------------------------------- a shipped twin

def load_demo(folder: str | Path, lm_factory: LMFactory | None = None):
    """(model in eval mode, processor) from packed demo weights + the GGUF LM (or ``lm_factory()``), offline."""
    folder = Path(folder)
    meta = read_meta(folder)
    # Loading is copies and element-wise sums over ~135M numbers: memory-bound work that a second intra-op thread
    # hardly speeds up, while on a busy machine (more runnable threads than cores) every parallel op waits at
    # OpenMP's barrier for a descheduled thread: the demo loaded in ~2.7 s on one thread and 12-19 s on two
    # on a loaded two-core machine. One thread gives the same numbers (nothing here sums across threads).
    with _intra_op_threads(1):
        return _load_demo(folder, meta, lm_factory)


@contextlib.contextmanager
def _intra_op_threads(n: int):
    before = torch.get_num_threads()
    if before <= n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _load_demo(folder: Path, meta: dict[str, Any], lm_factory: LMFactory | None):
    from safetensors.torch import load_file

    tensors = load_file(str(folder / WEIGHTS_FILE))
    tower = fresh_tower(vision_config_from_dict(meta["vision_config"]))
    _load_exact(tower, _strip(tensors, "vision_tower."), "vision tower")
    lm, tokenizer = lm_factory() if lm_factory is not None else (None, None)
    # the projector is loaded just below, so composing skips all random initialisation (bit-identical result)
    model, processor = demo_llava(tower, tower_image_processor(int(meta["image_size"])), lm=lm, tokenizer=tokenizer,
                                  init_projector=False)
    _load_exact(model.model.multi_modal_projector, _strip(tensors, "multi_modal_projector."), "projector")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("lora."):
            name, part = key[len("lora."):].rsplit(".", 1)
            pairs.setdefault(name, {})[part] = value
    broken = [n for n, ab in pairs.items() if set(ab) != {"A", "B"}]
    if broken:
        raise DemoWeightsError(f"{folder / WEIGHTS_FILE}: LoRA pairs incomplete for {broken[:3]}")
    merge_lora(model, {n: (ab["A"], ab["B"]) for n, ab in pairs.items()}, float(meta["lora"]["scale"]))
    return model.eval(), processor


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _load_exact(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DemoWeightsError(f"shipped {what} weights do not fit: missing {missing[:4]}, unexpected {unexpected[:4]}")


# --------------------------------------------------------------------------- LoRA merged

def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """LoRA's weight update, ``scale * B @ A`` (out, in); scale = alpha / r (alpha / sqrt(r) with rsLoRA)."""
    if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
        raise DemoWeightsError(f"LoRA shapes do not chain: A {tuple(a.shape)}, B {tuple(b.shape)}")
    return scale * (b.double() @ a.double())


@torch.no_grad()
def merge_lora(model: torch.nn.Module, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float) -> None:
    """Add ``lora_delta`` to each named linear layer's weight, in place (computed in fp64, stored in the weight's dtype).

    Bit for bit ``W <- (W.double() + lora_delta(A, B, scale)).to(W.dtype)``, but the fp64 work runs in one buffer
    reused across layers rather than three fresh full-size temporaries per layer: allocating and first-touching
    those was most of the demo's load time on a busy machine (the test compares with the formula above).
    """
    modules = dict(model.named_modules())
    targets: dict[str, torch.nn.Linear] = {}
    for name, (a, b) in pairs.items():
        target = modules.get(name)
        if not isinstance(target, torch.nn.Linear):
            raise DemoWeightsError(f"the shipped LoRA names {name}, which this model does not have as a linear layer")
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise DemoWeightsError(f"LoRA shapes do not chain: A {tuple(a.shape)}, B {tuple(b.shape)}")
        if (b.shape[0], a.shape[1]) != tuple(target.weight.shape):
            raise DemoWeightsError(f"LoRA delta {(b.shape[0], a.shape[1])} does not fit {name} "
                                   f"{tuple(target.weight.shape)}")
        targets[name] = target
    if not targets:
        return
    buffer = torch.empty(max(t.weight.numel() for t in targets.values()), dtype=torch.float64)
    for name, (a, b) in pairs.items():
        weight = targets[name].weight
        delta = buffer[: weight.numel()].view(weight.shape)
        torch.mm(b.double(), a.double(), out=delta)  # fp16/fp32 -> fp64 is exact, as lora_delta's .float().double()
        delta.mul_(scale)  # = lora_delta: scale * (B @ A) in fp64
        delta.add_(weight)  # = W.double() + delta (fp64 addition is commutative, so the same bits)
        weight.copy_(delta)  # one rounding to the weight's dtype, as .to(W.dtype)
