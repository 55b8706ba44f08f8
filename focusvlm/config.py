"""Configuration of what focusvlm switches on.

Every method's config is a frozen dataclass validated on construction (it
lives in the method's own module), so a bad value fails where it is written,
with the field named, instead of deep inside a forward pass. ``FocusConfig``
bundles one optional section per registered method (``focusvlm.methods``) and
round-trips through plain dicts, JSON and YAML so a run records exactly what
it used.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


from .errors import ConfigError


def fail(cls: str, field_name: str, problem: str) -> None:
    """Raise the one-line ``ConfigError`` every config uses: ``Class.field: problem``."""
    raise ConfigError(f"{cls}.{field_name}: {problem}")


_fail = fail  # the name the first release used


def check_layer_list(cls: str, field_name: str, layers: Any, allow_empty: bool = False) -> tuple[int, ...] | None:
    """Validate an optional list of distinct non-negative layer indices; returns it sorted."""
    if layers is None:
        return None
    layers = tuple(layers)
    if not layers and not allow_empty:
        fail(cls, field_name, "an explicit layer list needs at least one layer")
    if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers):
        fail(cls, field_name, f"must be non-negative integer layer indices, got {list(layers)}")
    if len(set(layers)) != len(layers):
        fail(cls, field_name, f"repeats a layer index: {list(layers)}")
    return tuple(sorted(layers))


class FocusConfig:
    """Everything focusvlm switches on for one model: one optional section per method.

        FocusConfig(cmai=CMAIConfig(gamma_max=0.6), vmtc=VMTCConfig(target=0.5))
        FocusConfig(cmai={"gamma_max": 0.5})            # a mapping works too
        cfg.cmai, cfg.vmtc, cfg.spd ...                  # None when off

    The sections are the registered methods (``focusvlm.methods``). At most one
    vision-side and one LLM-side method at a time. Immutable; ``replace``
    returns a changed copy.
    """

    __slots__ = ("_sections",)

    def __init__(self, **sections: Any) -> None:
        from .methods import all_methods

        known = all_methods()
        unknown = sorted(set(sections) - set(known))
        if unknown:
            raise ConfigError(f"FocusConfig: unknown section(s) {unknown}; known: {sorted(known)}")
        chosen: dict[str, Any] = {}
        for key, value in sections.items():
            cls = known[key].config_class
            if isinstance(value, dict):  # FocusConfig(cmai={"gamma_max": 0.5})
                value = section_from_dict(key, value)
            if value is None:
                continue
            if not isinstance(value, cls):
                fail("FocusConfig", key, f"must be a {cls.__name__} or None, got {type(value).__name__}")
            chosen[key] = value
        for side, what in (("vision", "vision-side reduction"), ("llm", "language-model method")):
            on = [k for k in known if k in chosen and known[k].side == side]
            if len(on) > 1:
                fail("FocusConfig", on[1], f"only one {what} at a time, got {' and '.join(on)}")
        # keep the registry's order so to_dict / repr are stable however the sections were given
        object.__setattr__(self, "_sections", {k: chosen[k] for k in known if k in chosen})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        from .methods import all_methods

        if name in all_methods():
            return None  # a registered method that is off
        raise AttributeError(f"FocusConfig has no section {name!r}")

    def __getattribute__(self, name: str) -> Any:
        if not name.startswith("_"):
            sections = object.__getattribute__(self, "_sections")
            if name in sections:
                return sections[name]
        return object.__getattribute__(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"FocusConfig is immutable; use .replace({name}=...)")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FocusConfig) and self._sections == other._sections

    def __hash__(self) -> int:
        return hash(tuple(self._sections.items()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._sections.items())
        return f"FocusConfig({inner})"

    def __reduce__(self):
        return (_rebuild, (dict(self._sections),))

    def replace(self, **changes: Any) -> "FocusConfig":
        """A copy with some sections changed (``None`` switches one off)."""
        return FocusConfig(**{**self._sections, **changes})

    __replace__ = replace  # copy.replace(cfg, ...) on Python >= 3.13

    # -- what is on ----------------------------------------------------------
    @property
    def sections(self) -> dict[str, Any]:
        """The switched-on sections by name."""
        return dict(self._sections)

    @property
    def active(self) -> list[str]:
        """Names of the switched-on methods, e.g. ``["cmai", "vmtc"]``."""
        return list(self._sections)

    def _side(self, side: str) -> Any:
        from .methods import all_methods

        known = all_methods()
        return next((v for k, v in self._sections.items() if known[k].side == side), None)

    @property
    def vision(self) -> Any:
        """The vision-side reduction in use, if any."""
        return self._side("vision")

    @property
    def llm(self) -> Any:
        """The language-model-side method in use, if any."""
        return self._side("llm")

    @property
    def is_stock(self) -> bool:
        return not self._sections

    def describe(self) -> str:
        """One line naming what is on, for logs and outputs: ``"cmai(gamma_max=0.6) + vmtc(target=0.5)"``."""
        if not self._sections:
            return "stock (no method switched on)"
        parts = []
        for name, cfg in self._sections.items():
            defaults = type(cfg)()
            changed = [f"{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
                       if getattr(cfg, f.name) != getattr(defaults, f.name)]
            parts.append(f"{name}({', '.join(changed)})" if changed else name)
        return " + ".join(parts)

    # -- serialisation -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every registered section; ``None`` for the ones that are off."""
        from .methods import all_methods

        return {key: (None if key not in self._sections else _plain(dataclasses.asdict(self._sections[key])))
                for key in all_methods()}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "FocusConfig":
        from .methods import all_methods

        data = dict(data or {})
        unknown = sorted(set(data) - set(all_methods()))
        if unknown:
            raise ConfigError(f"FocusConfig: unknown section(s) {unknown}; known: {sorted(all_methods())}")
        return cls(**{k: (None if v is None else section_from_dict(k, v)) for k, v in data.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=True)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.write_text(self.to_yaml() if path.suffix in (".yaml", ".yml") else self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "FocusConfig":
        path = Path(path)
        data = read_config_file(path)
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
        return cls.from_dict(data)


def read_config_file(path: Path) -> Any:
    """The parsed content of a YAML (.yaml/.yml) or JSON config file; ConfigError naming the file otherwise."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    except Exception as exc:  # yaml and json raise different types
        raise ConfigError(f"{path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: {exc}") from exc


def _rebuild(sections: dict[str, Any]) -> FocusConfig:
    return FocusConfig(**sections)


def section_from_dict(key: str, data: dict[str, Any]) -> Any:
    """The config dataclass of method ``key`` from a mapping (YAML/JSON), unknown fields named."""
    from .methods import get_method

    cls = get_method(key).config_class
    if not isinstance(data, dict):
        raise ConfigError(f"FocusConfig.{key}: must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()})


def _plain(value: Any) -> Any:
    """Tuples become lists so JSON and YAML write them the same way."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


# the method configs live with their methods; these names stay importable from here
_MOVED = {"CMAIConfig": "focusvlm.inhibit.cmai_method", "CMAI_SCHEDULES": "focusvlm.inhibit.cmai_method",
          "FOCUS_VARIANTS": "focusvlm.inhibit.cmai_method", "VMTCConfig": "focusvlm.compress.vmtc_method",
          "VMTC_MERGES": "focusvlm.compress.vmtc_method", "SPDConfig": "focusvlm.compress.spd_method",
          "PruMergeConfig": "focusvlm.compress.prumerge_method",
          "VisionZipConfig": "focusvlm.compress.visionzip_method",
          "DivPruneConfig": "focusvlm.compress.divprune_method", "FastVConfig": "focusvlm.inhibit.fastv_method"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'focusvlm.config' has no attribute {name!r}")
