"""Arguments and loading shared by every subcommand that runs a model.

The loading itself lives in ``focusvlm.runtime`` (below cli/, eval/ and
bench/); this module turns command-line arguments into calls to it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import FocusConfig
from ..runtime import DEMO, load_image, load_model, open_image, resolve_device_dtype  # noqa: F401 (re-exported)


def add_model_args(parser: argparse.ArgumentParser, default_model: str | None = DEMO) -> None:
    parser.add_argument("--model", default=default_model,
                        help="hub id or local folder of a supported checkpoint; 'demo' = the embedded default "
                             "(no download)")
    parser.add_argument("--config", type=Path, help="FocusConfig file (YAML or JSON)")
    parser.add_argument("--cmai", type=float, metavar="GAMMA_MAX",
                        help="switch CMAI on with this gamma_max (overrides the config file's cmai.gamma_max)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")


def focus_config_from_args(args: argparse.Namespace) -> FocusConfig:
    from ..inhibit.method import CMAIConfig
    import dataclasses

    config = FocusConfig.load(args.config) if getattr(args, "config", None) else FocusConfig()
    gamma = getattr(args, "cmai", None)
    if gamma is not None:
        config = config.replace(cmai=dataclasses.replace(config.cmai or CMAIConfig(), gamma_max=gamma))
    return config


def load_from_args(args: argparse.Namespace, patch_model: bool = True) -> tuple[Any, Any, FocusConfig]:
    """(model, processor, config) as the arguments ask, patched unless told otherwise."""
    from ..api import patch

    config = focus_config_from_args(args)
    device, dtype = resolve_device_dtype(getattr(args, "device", None), getattr(args, "dtype", None))
    model, processor = load_model(args.model, device, dtype)
    if patch_model and not config.is_stock:
        patch(model, config, processor)
    return model, processor, config
