"""`focusvlm` command line. Each subcommand lives in its own module with a
``register(subparsers)`` function; the module list below is the whole CLI."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = ("generate", "demo", "ifbench", "evaluate", "compare", "report", "bench", "show", "train")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="focusvlm", description="Reduce image redundancy in LLaVA-style models.")
    parser.add_argument("--version", action="version", version=f"focusvlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotImplementedError, RuntimeError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"focusvlm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
