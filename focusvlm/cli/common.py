"""Arguments and loading shared by every subcommand that runs a model.

The loading itself lives in ``focusvlm.runtime`` (below cli/, eval/ and
bench/); this module turns command-line arguments into calls to it. Nothing
here imports torch or transformers at module level: the parser is built from
these modules and `focusvlm --help` must answer at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..config import ConfigError, FocusConfig
from ..runtime import DEMO, load_image, load_model, open_image, resolve_device_dtype  # noqa: F401 (re-exported)


def add_model_args(parser: argparse.ArgumentParser, default_model: str | None = DEMO) -> None:
    parser.add_argument("--model", default=default_model,
                        help="hub id or local folder of a supported checkpoint; 'demo' = the embedded default "
                             "(no download)" + (f" (default: {default_model})" if default_model else ""))
    parser.add_argument("--config", type=Path, help="FocusConfig file (YAML or JSON)")
    parser.add_argument("--cmai", type=float, metavar="GAMMA_MAX",
                        help="switch CMAI on with this gamma_max (overrides the config file's cmai.gamma_max)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the vision tower and the decode steps (static cache); the first call "
                             "compiles (minutes on a CPU), later ones reuse it")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (model loading and generation)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")


def warn(message: str) -> None:
    print(f"focusvlm: warning: {message}", file=sys.stderr)


def _null_sections(path: Path) -> list[str]:
    """Sections written with no value (``cmai:`` alone), which YAML reads as null = off."""
    from ..config import read_config_file

    try:
        data = read_config_file(path)
    except ConfigError:  # FocusConfig.load already reported it
        return []
    return sorted(k for k, v in data.items() if v is None) if isinstance(data, dict) else []


def config_warnings(path: Path | None, config: FocusConfig) -> list[str]:
    """Why a config file the user passed switches nothing on, when it does not."""
    if path is None or not config.is_stock:
        return []
    nulls = _null_sections(Path(path))
    if nulls:
        hint = "; ".join(f"write `{k}: {{}}` for its defaults" for k in nulls)
        return [f"{path}: {', '.join(f'`{k}:`' for k in nulls)} has no value, so it stays off ({hint}); "
                "no method is switched on, running the stock model"]
    return [f"{path} switches no method on (it is empty or every section is null); running the stock model"]


def focus_config_from_args(args: argparse.Namespace, *, quiet: bool = False) -> FocusConfig:
    import dataclasses

    path = getattr(args, "config", None)
    config = FocusConfig.load(path) if path else FocusConfig()
    gamma = getattr(args, "cmai", None)
    if gamma is not None:
        from ..inhibit.cmai_method import CMAIConfig

        config = config.replace(cmai=dataclasses.replace(config.cmai or CMAIConfig(), gamma_max=gamma))
    if not quiet:
        for message in config_warnings(path, config):
            warn(message)
    return config


def quiet_progress(args: argparse.Namespace) -> None:
    """--no-progress: silence transformers' and the hub's bars too ("Loading weights" ...)."""
    if getattr(args, "no_progress", False):
        from ..runtime import set_progress_bars

        set_progress_bars(False)


def check_context(model: Any, max_new_tokens: int | None) -> None:
    """--max-new-tokens must leave room for a prompt within the model's context length."""
    if max_new_tokens is None:
        return
    from ..runtime import check_max_new_tokens

    check_max_new_tokens(model, max_new_tokens)


def load_from_args(args: argparse.Namespace, patch_model: bool = True,
                   config: FocusConfig | None = None) -> tuple[Any, Any, FocusConfig]:
    """(model, processor, config) as the arguments ask, patched unless told otherwise."""
    from ..runtime import check_model_source

    check_model_source(args.model)  # a mistyped folder fails before torch is even imported
    config = focus_config_from_args(args) if config is None else config
    quiet_progress(args)
    from ..api import patch

    device, dtype = resolve_device_dtype(getattr(args, "device", None), getattr(args, "dtype", None))
    if args.model == "demo-random":
        from ..models.demo.cache import demo_cache_dir, is_complete

        if not is_complete(demo_cache_dir()):
            print("building the random-vision demo model once (cached after)...", file=sys.stderr)
    model, processor = load_model(args.model, device, dtype)
    check_context(model, getattr(args, "max_new_tokens", None))
    if patch_model and not config.is_stock:
        patch(model, config, processor)
    if getattr(args, "compile", False):
        from ..compiling import compile_model

        compile_model(model)
    return model, processor, config
