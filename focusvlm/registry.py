"""One registry helper for every pluggable kind: methods, model families, focus scores, benchmarks.

A registry maps names to entries. Built-ins are named by strings, so listing
them imports nothing until first use (``import focusvlm`` stays light) and no
low layer has to import the higher modules that define them:

* ``modules``: modules whose import registers their entries (a decorator at
  the definition); they are imported, in order, the first time the registry
  is read, and their entries keep that order whatever else was imported first;
* ``lazy``: ``{"name": "module:attribute"}`` entries resolved one by one when
  asked for (a benchmark whose data loader is heavy).

A plug-in registers the same way at run time (``registry.add`` or the
decorator). Names are unique: registering under a taken name fails, unless
it is the same definition run again (a module reload makes a new class of
the same qualified name, which replaces the old one).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, *, modules: tuple[str, ...] = (), lazy: dict[str, str] | None = None,
                 error: type[Exception] = ValueError):
        self.kind = kind                      # "method", "model family" ...: the word of the error messages
        self.modules = tuple(modules)
        self._lazy: dict[str, str] = dict(lazy or {})
        self._entries: dict[str, T] = {}
        self._origin: dict[str, str] = {}     # name -> module that registered it (orders built-ins)
        self._error = error
        self._loaded = False

    # ------------------------------------------------------------------ adding
    def add(self, name: str, entry: T, origin: str | None = None) -> T:
        """Register ``entry`` under ``name``; ``origin`` (its defining module) keeps built-ins in order."""
        origin = origin or _class(entry).__module__
        if origin not in self.modules:
            self._load_builtins()  # built-ins first, so a plug-in never reorders them
        existing = self._entries.get(name)
        if existing is not None and (_class(existing) is _class(entry) or _qualname(existing) != _qualname(entry)):
            raise ValueError(f"a {self.kind} named {name!r} is registered twice ({self._origin[name]})")
        self._entries[name] = entry
        self._origin[name] = origin
        self._lazy.pop(name, None)
        return entry

    def add_lazy(self, name: str, target: str) -> None:
        """Register ``"module:attribute"`` under ``name``, imported when first asked for."""
        self._lazy[name] = target

    def decorator(self, make: Callable[[type], Any] = lambda cls: cls,
                  name_of: Callable[[type], str] = lambda cls: cls.name) -> Callable[[type], type]:
        """A class decorator registering ``make(cls)`` (the class itself by default) under ``name_of(cls)``."""

        def register(cls: type) -> type:
            self.add(name_of(cls), make(cls), origin=cls.__module__)
            return cls
        return register

    # ------------------------------------------------------------------ reading
    def get(self, name: str) -> T:
        self._load_builtins()
        if name not in self._entries and name in self._lazy:
            module, _, attribute = self._lazy[name].partition(":")
            self._entries[name] = getattr(importlib.import_module(module), attribute)
            self._origin[name] = module
            del self._lazy[name]
        if name not in self._entries:
            raise self._error(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        """Every name: built-ins in ``modules`` order, then the rest as registered (lazy ones included)."""
        self._load_builtins()
        order = list(self._entries)

        def rank(name: str) -> tuple[int, int]:
            origin = self._origin[name]
            return (self.modules.index(origin) if origin in self.modules else len(self.modules)), order.index(name)
        return sorted(order, key=rank) + [n for n in self._lazy if n not in self._entries]

    def items(self) -> list[tuple[str, T]]:
        return [(name, self.get(name)) for name in self.names()]

    def remove(self, name: str) -> None:
        """Unregister ``name`` (a plug-in a test added)."""
        self._entries.pop(name, None)
        self._origin.pop(name, None)
        self._lazy.pop(name, None)

    __delitem__ = remove

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._entries or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def _load_builtins(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self.modules:
                importlib.import_module(module)


def _class(entry: Any) -> type:
    return entry if isinstance(entry, type) else type(entry)


def _qualname(entry: Any) -> str:
    return f"{_class(entry).__module__}.{_class(entry).__qualname__}"


__all__ = ["Registry"]
