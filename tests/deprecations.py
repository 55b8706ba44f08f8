"""Early warning: a deprecation that transformers (or accelerate, peft) raises because of a call focusvlm makes
fails the test that made it, so the next rename is caught while the old name still works.

transformers announces a rename two ways: ``warnings.warn(..., FutureWarning)`` (its ``deprecate_kwarg``
decorator and most renamed methods) and ``logger.warning_once(...)`` (renamed output fields, cache names).
Both are caught. A warning is attributed by walking the stack outward from the warning: frames of the
library itself, of torch's module machinery and of the standard library are skipped; the first frame
left is the caller. When that is focusvlm, its tests or its benchmarks, the call is ours; when it is
another library (peft calling a deprecated transformers API), it is not ours to fix and is let through.
"""

from __future__ import annotations

import logging
import re
import sysconfig
import traceback
import warnings
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
OURS = tuple(str(_ROOT / part) for part in ("focusvlm", "tests", "benchmarks"))
# the libraries whose deprecations are watched (transformers and the kernels/hub packages it calls through);
# their own frames are skipped when looking for the caller. accelerate and peft are callers like us: when they
# call a deprecated transformers API, the fix is theirs
WATCHED = ("transformers", "kernels", "huggingface_hub")
_SKIPPED = WATCHED + ("torch",)
_STDLIB = sysconfig.get_paths()["stdlib"]
_DEPRECATION_TEXT = re.compile(r"deprecat|will be removed|no longer be (called|supported)|renamed", re.I)
_THIS = str(Path(__file__).resolve())


def _package_of(filename: str) -> str | None:
    parts = Path(filename).parts
    if "site-packages" in parts:
        index = parts.index("site-packages")
        return parts[index + 1] if index + 1 < len(parts) else None
    return None


def caller_of_warning(stack: list[traceback.FrameSummary]) -> str | None:
    """The file of the first frame, walking outward, that belongs to neither a watched library, torch nor the
    standard library; None when the warning did not come from a watched library at all."""
    frames = [f for f in reversed(stack) if f.filename != _THIS]
    came_from_watched = False
    for frame in frames:
        package = _package_of(frame.filename)
        if package in _SKIPPED:
            came_from_watched = came_from_watched or package in WATCHED
            continue
        if frame.filename.startswith(_STDLIB) or frame.filename.startswith("<"):
            continue
        return frame.filename if came_from_watched else None
    return None


def is_ours(filename: str | None) -> bool:
    return filename is not None and filename.startswith(OURS)


class DeprecationRecorder(logging.Handler):
    """Collects the deprecations focusvlm's own calls caused, from both of transformers' channels."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.found: list[str] = []
        self._original_warn = None

    def _note(self, message: str, stack: list[traceback.FrameSummary]) -> None:
        caller = caller_of_warning(stack)
        if is_ours(caller):
            self.found.append(f"{message.strip().splitlines()[0]} (called from {caller})")

    # logger.warning_once / logger.warning of transformers
    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if _DEPRECATION_TEXT.search(message):
            self._note(message, traceback.extract_stack())

    # warnings.warn(..., FutureWarning | DeprecationWarning)
    def _warn(self, message, category=None, stacklevel=1, source=None, **kwargs):
        category = category or (type(message) if isinstance(message, Warning) else UserWarning)
        if issubclass(category, (FutureWarning, DeprecationWarning)) and _DEPRECATION_TEXT.search(str(message)):
            self._note(str(message), traceback.extract_stack())
        return self._original_warn(message, category, stacklevel + 1, source, **kwargs)

    def install(self) -> None:
        for name in WATCHED:
            logging.getLogger(name).addHandler(self)
        self._original_warn = warnings.warn
        warnings.warn = self._warn

    def take(self) -> list[str]:
        found, self.found = self.found, []
        return found


RECORDER = DeprecationRecorder()

__all__ = ["RECORDER", "DeprecationRecorder", "caller_of_warning", "is_ours"]
