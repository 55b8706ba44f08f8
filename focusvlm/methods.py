"""The method registry: every reduction focusvlm can switch on, by name.

A method is one module that defines its config dataclass and a ``Method``
subclass decorated with ``@register_method``. The registry is what
``FocusConfig`` (its sections), ``patch`` (how to bind it), ``focusvlm bench
--methods`` (``name:arg`` parsing) and ``focusvlm show`` (its panels) iterate;
none of them names a method. Adding a method = one module + its name in
``BUILTIN_MODULES`` (or an import of the module by the user, for a plug-in).

Two sides:
* ``"vision"``: reduces the image tokens before the LLM (VMTC, SPD, PruMerge,
  ...). At most one per model; it tells the processor how many placeholders
  an image gets.
* ``"llm"``: acts inside the language model (CMAI, ...). At most one per model.

Nothing here imports transformers: a method reaches the model only through
its family adapter (``focusvlm.models``). Every method has the same shape:
its tensor functions in one module (``compress/NAME.py`` on the vision side,
``inhibit/NAME.py`` on the LLM side) and the method in ``NAME_method.py``
beside them: config, hooks, counts and its own ``show`` panels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from .errors import ConfigError
from .registry import Registry

# modules whose import registers the built-in methods, in the order they are listed
BUILTIN_MODULES = ("focusvlm.inhibit.cmai_method", "focusvlm.compress.vmtc_method", "focusvlm.compress.spd_method",
                   "focusvlm.compress.prumerge_method", "focusvlm.compress.visionzip_method",
                   "focusvlm.compress.divprune_method", "focusvlm.inhibit.fastv_method",
                   "focusvlm.compress.globalcom2_method", "focusvlm.compress.hired_method")


class UnknownMethodError(ConfigError):
    """No registered method has this name."""


@dataclass(frozen=True)
class SelectionShape:
    """What a method's own selection work depends on, per image (``Method.selection_flops``; focusvlm bench).

    crops: tower passes (1, or AnyRes' base crop + tiles); patches: patch tokens per crop (CLS not included);
    vision_width / llm_width: the tower's and the language model's hidden sizes; stock_tokens: the image tokens
    the stock model hands the LLM; kept_tokens: those the method hands it; sequence: the stock prompt's length.
    """

    crops: int
    patches: int
    vision_width: int
    llm_width: int
    stock_tokens: int
    kept_tokens: int
    sequence: int


class Method:
    """One reduction bound to one model; ``remove`` restores the stock model exactly.

    Class attributes every method declares:
        name: the FocusConfig section, YAML key and CLI name ("vmtc").
        config_class: its validated, frozen config dataclass.
        side: "vision" or "llm".
        summary: one line for ``--help`` and error messages.
        cli_arg: the config field that ``name:VALUE`` sets on the command line (None: takes no value); a bare
            ``name`` is ``default_config()``.
    """

    name: ClassVar[str]
    config_class: ClassVar[type]
    side: ClassVar[str]
    summary: ClassVar[str] = ""
    cli_arg: ClassVar[str | None] = None

    def __init__(self, model: Any, adapter: Any, config: Any, processor: Any | None = None):
        self.model, self.adapter, self.config = model, adapter, config
        self._undo: list[Callable[[], None]] = []
        self.records: list[Any] = []   # what the last recorded forward kept for ``panels``

    def on_remove(self, undo: Callable[[], None]) -> None:
        """Queue the exact undo of one change this method made; ``remove`` runs them newest first."""
        self._undo.append(undo)

    @classmethod
    def default_config(cls) -> Any:
        return cls.config_class()

    @classmethod
    def parse(cls, value: str | None) -> Any:
        """The config for ``name`` or ``name:VALUE`` on the command line."""
        if value is None or value == "":
            return cls.default_config()
        if cls.cli_arg is None:
            raise ConfigError(f"method {cls.name!r} takes no value, got {cls.name}:{value}")
        return cls.config_class(**{**_fields(cls.default_config()), cls.cli_arg: _number(value, cls.name)})

    def remove(self, processor: Any | None = None) -> None:
        """Undo every change, newest first: the model is stock again."""
        while self._undo:
            self._undo.pop()()
        self.records = []

    # -- what a benchmark needs to know of a config, without binding it (``focusvlm bench``) --
    @classmethod
    def fit_to_model(cls, config: Any, model: Any, adapter: Any) -> Any:
        """``config`` shrunk to what a small (random-weight preset) model can run; unchanged by default."""
        return config

    @classmethod
    def inhibited_layers(cls, config: Any, num_layers: int) -> int:
        """LLM layers in which the method computes an extra attention term (the FLOP count's share)."""
        return 0

    @classmethod
    def selection_flops(cls, config: Any, shape: SelectionShape) -> int:
        """FLOPs of the method's own choosing per image (scores, similarities), beyond the layers it runs in; 0 when
        the bench's FLOP model already counts it (VMTC's stages, CMAI's attention term) or it is negligible."""
        return 0

    @classmethod
    def llm_layer_tokens(cls, config: Any, num_layers: int, prompt_tokens: int, image_tokens: int) -> list[int] | None:
        """Sequence length each LLM layer runs at in the prefill, when the method changes it (None: unchanged)."""
        return None


class VisionMethod(Method):
    """A vision-side reduction. Besides binding, it answers how many tokens leave it.

    ``record = True`` makes the next forward keep what ``panels`` needs to
    draw it (``focusvlm show``).
    """

    side = "vision"
    record: bool = False

    def output_patches(self, grid: tuple[int, int]) -> int:
        """Patch tokens one image (or crop) of ``grid`` patches hands the LLM."""
        raise NotImplementedError

    def image_tokens(self, grid: tuple[int, int] | None = None) -> int:
        """Tokens per image (of ``grid`` patches; default the tower's own) that reach the LLM."""
        geometry = self.adapter.tower_geometry(self.model)
        return self.output_patches(grid or geometry.grid) + (1 if geometry.keeps_cls else 0)

    def panels(self, sample: int = 0) -> list[Any]:
        """``focusvlm.viz.Panel``s of the last recorded forward (empty: nothing to draw)."""
        return []

    def stage_plan(self, merged_tokens: int | None = None) -> list[tuple[int, int, int, int]]:
        """(tokens in, kept, clusters, k-means iterations) per compressing stage, for the FLOP count;
        ``merged_tokens``: of the one stage after a merger tower (Qwen) that hands the LLM this many tokens."""
        return []


# what focusvlm.compile_model marks on a model it compiled ({"backend", "mode", "tower", "decode", "prefill"}): a
# method reads it at call time to take its compiled form (CMAI's per-layer prefill math)
COMPILED_ATTR = "_focusvlm_compiled"

METHODS: Registry[type[Method]] = Registry("method", modules=BUILTIN_MODULES, error=UnknownMethodError)


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if cls.side not in ("vision", "llm"):
        raise ValueError(f"method {cls.name!r}: side must be 'vision' or 'llm', got {cls.side!r}")
    METHODS.add(cls.name, cls, origin=cls.__module__)
    return cls


def all_methods() -> dict[str, type[Method]]:
    """Every registered method by name: built-ins in ``BUILTIN_MODULES`` order, then plug-ins as registered."""
    return dict(METHODS.items())


def list_methods() -> list[str]:
    """Names of every registered method."""
    return METHODS.names()


def get_method(name: str) -> type[Method]:
    return METHODS.get(name)


def _fields(config: Any) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def _number(text: str, method: str) -> float | int:
    """``"0.5"`` -> 0.5, ``"192"`` -> 192 (counts are whole numbers above 1)."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"method {method!r}: {text!r} is not a number") from None
    return int(value) if value.is_integer() and value > 1 else value
