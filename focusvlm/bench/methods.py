"""Benchmark methods by name: what each switches on for the model.

A benchmark method is a FocusConfig plus, for ``eager``, the attention
implementation. Every registered method (``focusvlm.methods``) is available
by name, with an optional value after a colon (its ``cli_arg``), and methods
combine with ``+``:
    stock            the unpatched model (the reference every ratio divides by)
    eager            stock with eager attention (what most token-reduction repos need)
    vmtc[:target]    e.g. vmtc:0.25, vmtc:192
    cmai[:gamma_max] e.g. cmai:0.6
    spd[:factor], prumerge[:budget], ...   (``focusvlm bench --help`` lists them all)
    vmtc:0.25+cmai:0.5
Bare names use the method's own config defaults (one default per method).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, FocusConfig
from ..methods import UnknownMethodError, all_methods, get_method

DEFAULT_METHODS = ("stock", "eager", "spd", "prumerge:0.5", "vmtc", "cmai", "vmtc+cmai")


@dataclass(frozen=True)
class Method:
    name: str
    config: FocusConfig
    attn_implementation: str | None = None   # None: keep the model's own

    @property
    def is_stock(self) -> bool:
        return self.config.is_stock and self.attn_implementation is None


def parse_method(spec: str) -> Method:
    """``"vmtc:0.25+cmai"`` -> Method. Raises ValueError naming the bad part."""
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
    return Method(spec, FocusConfig(**sections), attn)


def parse_methods(text: str | list[str]) -> list[Method]:
    specs = text.split(",") if isinstance(text, str) else list(text)
    methods = [parse_method(s) for s in specs if s.strip()]
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"a method is listed twice: {names}")
    if not methods:
        raise ValueError("no benchmark method given")
    # stock first: it is the reference of every ratio, and measuring it first costs nothing
    methods.sort(key=lambda m: not m.is_stock)
    return methods
