"""Folders focusvlm builds once per machine (the converted demo LM, the random-vision demo), published safely.

A cache folder is only ever created by renaming a fully written temporary sibling onto its name, and that
temporary folder gets ``COMPLETE_MARKER`` last; so a folder that lacks the marker was not made here (an
interrupted older writer, a user's copy) and is replaced, never read. Concurrent first builds each write into
their own temporary folder; the first rename wins and the others discard theirs. No torch here.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

COMPLETE_MARKER = "focusvlm-cache-complete.json"
_STALE_TEMP_SECONDS = 3600  # a temporary folder untouched this long belongs to a writer that died


def cache_root() -> Path:
    """Where focusvlm keeps what it builds once per machine: $FOCUSVLM_CACHE, else ~/.cache/focusvlm."""
    return Path(os.environ.get("FOCUSVLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "focusvlm"))


def demo_cache_dir() -> Path:
    """Where the random-vision demo (``demo-random``) is cached after its first build."""
    return cache_root() / "demo-smollm2-clip-random-v1"


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` is a published cache folder (it has ``COMPLETE_MARKER``, written last)."""
    return (Path(folder) / COMPLETE_MARKER).is_file()


def build_once(folder: Path, write: Callable[[Path], None], record: dict[str, Any] | None = None,
               message: str | None = None) -> bool:
    """Publish ``folder`` as a cache folder unless it already is one: ``write(tmp)`` fills a temporary sibling,
    ``COMPLETE_MARKER`` (holding ``record``) is written last, then the sibling is renamed onto ``folder``.
    Safe with concurrent builders: the first rename wins, the others discard their copy. ``message`` is printed
    on stderr before building. Returns whether this call published the folder."""
    folder = Path(folder)
    if is_complete(folder):
        return False
    if message:
        print(message, file=sys.stderr, flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_temporaries(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        os.chmod(tmp, 0o755)  # as a plain mkdir under the usual umask would make it (mkdtemp's is 0700)
        write(tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps(record or {}, indent=1, sort_keys=True))
        return _publish(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a successful rename; a lost race leaves it here


def discard(folder: Path) -> None:
    """Remove a cache folder; renamed aside first, so that no reader or builder ever sees it half deleted."""
    aside = folder.with_name(f".{folder.name}.discarded-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(folder, aside)
    except FileNotFoundError:
        return  # another process moved it already
    shutil.rmtree(aside, ignore_errors=True)


def _publish(tmp: Path, folder: Path) -> bool:
    for _ in range(5):
        try:
            os.rename(tmp, folder)  # atomic; fails on an existing non-empty folder (an empty one is replaced)
            return True
        except OSError:
            if is_complete(folder):
                return False  # another process published first; the caller discards ours
            if not folder.exists():
                continue
            discard(folder)  # a folder without the marker is not ours to read
    raise OSError(f"could not publish the cache folder {folder}")


def _sweep_stale_temporaries(folder: Path) -> None:
    # temporary folders of writers killed mid-build (each ~0.5 GB); a live writer touches its folder far more
    # often than _STALE_TEMP_SECONDS, so only the dead ones are old
    now = time.time()
    for pattern in (f".{folder.name}.tmp-*", f".{folder.name}.discarded-*"):
        for old in folder.parent.glob(pattern):
            try:
                if now - old.stat().st_mtime > _STALE_TEMP_SECONDS:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError:
                pass
