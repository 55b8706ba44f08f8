"""focusvlm: reduce image redundancy in vision-language models (VMTC + CMAI).

    from focusvlm import FocusConfig, CMAIConfig, VMTCConfig, patch, unpatch, patched, load
    patch(model, FocusConfig(cmai=CMAIConfig(gamma_max=0.6)), processor=processor)

Names are imported on first use, so ``import focusvlm`` (and ``focusvlm --help``)
does not pay for torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "FocusHandle": "focusvlm.api", "ProcessorHint": "focusvlm.api", "load": "focusvlm.api", "patch": "focusvlm.api", "patched": "focusvlm.api",
    "unpatch": "focusvlm.api", "compile_model": "focusvlm.compiling",
    "ConfigError": "focusvlm.config", "FocusConfig": "focusvlm.config",
    "CMAIConfig": "focusvlm.inhibit.cmai_method", "VMTCConfig": "focusvlm.compress.vmtc_method",
    "SPDConfig": "focusvlm.compress.spd_method", "PruMergeConfig": "focusvlm.compress.prumerge_method",
    "VisionZipConfig": "focusvlm.compress.visionzip_method", "DivPruneConfig": "focusvlm.compress.divprune_method",
    "FastVConfig": "focusvlm.inhibit.fastv_method", "GlobalCom2Config": "focusvlm.compress.globalcom2_method",
    "HiREDConfig": "focusvlm.compress.hired_method",
    "UnsupportedModelError": "focusvlm.errors",
    "list_methods": "focusvlm.methods", "list_families": "focusvlm.models",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'focusvlm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
