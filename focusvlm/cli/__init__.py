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
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what was typed, for retry hints
    try:
        code = int(args.func(args) or 0)
        _leave_process_group()
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `focusvlm compare ... | head`: the reader left; not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # noqa: BLE001 - user errors get one line, bugs keep their traceback
        if getattr(args, "debug", False) or not _is_user_error(exc):
            raise
        print(f"focusvlm {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _leave_process_group() -> None:
    """A rank started by ``accelerate launch`` leaves its process group once its command has succeeded. Left to
    the interpreter's exit, gloo's worker threads can still hold tensors while Python is torn down, and the rank
    then aborts (SIGABRT, "terminate called without an active exception") after its work is saved, which fails
    the whole launch: seen now and then with DeepSpeed ZeRO-2 on 2 CPU processes (pytorch/pytorch#190489). Not
    after an error: a rank that failed must not wait in a teardown for ranks still inside a collective."""
    dist = sys.modules.get("torch.distributed")  # imported only by commands that can have started a group
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _is_user_error(exc: BaseException) -> bool:
    """Errors that describe a problem with the input (bad path, bad config, unsupported model)."""
    if isinstance(exc, (ValueError, FileNotFoundError, NotImplementedError, RuntimeError)):
        return True
    base = sys.modules.get("focusvlm.models.base")  # loaded whenever such an error can have been raised
    return base is not None and isinstance(exc, base.UnsupportedModelError)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
