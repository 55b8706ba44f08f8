"""Benchmark arms by name: what each switches on for the model.

An arm of the benchmark is a FocusConfig plus, for ``eager``, the attention
implementation. Every registered method (``focusvlm.methods``) is available
by name, with an optional value after a colon (its ``cli_arg``), and methods
combine with ``+`` into one arm (``focusvlm bench --methods`` takes a
comma-separated list of arms):
    stock            the unpatched model (the reference every ratio divides by)
    eager            stock with eager attention (what most token-reduction repos need)
    vmtc[:target]    e.g. vmtc:0.25, vmtc:192
    cmai[:gamma_max] e.g. cmai:0.6
    spd[:factor], prumerge[:budget], ...   (``focusvlm bench --help`` lists them all)
    vmtc:0.25+cmai:0.5
Bare names use the method's own config defaults (one default per method).

What the FLOP count needs to know of an arm's methods (a small tower's fit,
inhibited layers, per-layer LLM lengths) is asked of the method registry, so
no method is named here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator

from ..config import ConfigError, FocusConfig
from ..methods import Method, UnknownMethodError, all_methods, get_method

# the default of ``focusvlm bench --methods``
DEFAULT_METHODS = ("stock", "eager", "spd", "prumerge:0.5", "vmtc", "cmai", "vmtc+cmai")


@dataclass(frozen=True)
class BenchArm:
    """One arm of a benchmark: its name on the command line, the FocusConfig patched on, the attention kernel."""

    name: str
    config: FocusConfig
    attn_implementation: str | None = None   # None: keep the model's own

    @property
    def is_stock(self) -> bool:
        return self.config.is_stock and self.attn_implementation is None

    def methods(self) -> Iterator[tuple[type[Method], Any]]:
        """(registered method class, its config section) of every method the arm switches on."""
        for name, section in self.config.sections.items():
            yield get_method(name), section

    def fit_to_model(self, model: Any, adapter: Any) -> "BenchArm":
        """The arm with each method's config shrunk to what ``model`` (a small preset) can run."""
        changed = {}
        for cls, section in self.methods():
            fitted = cls.fit_to_model(section, model, adapter)
            if fitted != section:
                changed[cls.name] = fitted
        return dataclasses.replace(self, config=self.config.replace(**changed)) if changed else self

    def inhibited_layers(self, num_layers: int) -> int:
        """LLM layers in which the arm's methods compute an extra attention term."""
        return sum(cls.inhibited_layers(section, num_layers) for cls, section in self.methods())

    def selection_flops(self, shape: Any) -> int:
        """FLOPs per image of the arm's methods' own selection work (``Method.selection_flops``)."""
        return sum(cls.selection_flops(section, shape) for cls, section in self.methods())

    def llm_layer_tokens(self, num_layers: int, prompt_tokens: int, image_tokens: int) -> list[int] | None:
        """Sequence length of each LLM layer in the prefill when a method changes it (None: unchanged).
        At most one LLM-side method per arm, so at most one answers."""
        for cls, section in self.methods():
            tokens = cls.llm_layer_tokens(section, num_layers, prompt_tokens, image_tokens)
            if tokens is not None:
                return tokens
        return None


def parse_arm(spec: str) -> BenchArm:
    """``"vmtc:0.25+cmai"`` -> BenchArm. Raises ValueError naming the bad part."""
    spec = spec.strip()
    sections: dict[str, object] = {}
    attn = None
    for part in spec.split("+"):
        name, _, arg = part.strip().partition(":")
        if name == "stock" and not arg:
            continue
        if name == "eager" and not arg:
            attn = "eager"
            continue
        try:
            sections[name] = get_method(name).parse(arg or None)
        except UnknownMethodError:
            known = ", ".join(["stock", "eager"] + [f"{n}[:{c.cli_arg}]" if c.cli_arg else n
                                                    for n, c in all_methods().items()])
            raise ValueError(f"unknown benchmark method {part!r}; known: {known}, and '+' combinations") from None
        except ConfigError as exc:
            raise ValueError(f"method {part!r}: {exc}") from None
    return BenchArm(spec, FocusConfig(**sections), attn)


def parse_arms(text: str | list[str]) -> list[BenchArm]:
    """``"stock,vmtc,vmtc+cmai"`` (``--methods``) -> the arms, stock first."""
    specs = text.split(",") if isinstance(text, str) else list(text)
    arms = [parse_arm(s) for s in specs if s.strip()]
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"a method is listed twice: {names}")
    if not arms:
        raise ValueError("no benchmark method given")
    # stock first: it is the reference of every ratio, and measuring it first costs nothing
    arms.sort(key=lambda a: not a.is_stock)
    return arms
