"""The compiled path, behind one switch: ``compile_model(model)``, ``load(..., compile=True)``, ``--compile``.

What it compiles (SPEC, "Compiled and fused paths": the same function, discrete decisions reported):
* the vision tower as one module (``torch.compile``, static shapes): every in-tower method's stage runs inside
  it (VMTC's stages compile with it: no host read, no data-dependent branch); a method whose shapes depend on
  the data (adaptive PruMerge) breaks the graph there and runs that part eagerly;
* the decode steps: a static cache and transformers' own compiled decode forward (``generate`` compiles it
  once per shape; CMAI's decode path has no host read and static shapes).
* CMAI's per-layer prefill math (C1-C7 of each chunk of text rows: head-mean attention, focus score, quantile
  threshold), regionally and dynamic over the prompt's length: the plan (index maps, quantile positions) is made
  once per call eagerly, since it has data-dependent shapes (how many text rows, which images each row sees)
  that a whole-forward compile cannot take; the rest of the prefill stays eager.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from . import hfcompat
from .methods import COMPILED_ATTR



def compile_model(model: torch.nn.Module, *, backend: str = "inductor", mode: str | None = None, tower: bool = True,
                  decode: bool = True, prefill: bool = True) -> torch.nn.Module:
    """Compile ``model`` in place (patched or not; a later ``patch`` recompiles what it changes) and return it.

    ``backend``: torch.compile's ("inductor"; "eager" / "aot_eager" check the capture without code generation).
    ``mode``: torch.compile's (None: its default; "reduce-overhead" adds CUDA graphs on a GPU: CMAI's decode
    buffers are reused by the next ``generate`` call of the same layout (batch, cache length, image count), so
    its decode steps read the same addresses; not yet run on a GPU here).
    ``tower``: compile the vision tower; ``decode``: compile ``generate``'s decode steps (static cache);
    ``prefill``: CMAI's per-layer prefill math (C1-C7 of a chunk of text rows) runs regionally compiled.
    """
    from .models import adapter_for

    adapter = adapter_for(model)
    if decode:
        hfcompat.compile_decode_steps(model.generation_config, backend, mode)
    if tower:
        adapter.vision_tower(model).compile(backend=backend, mode=mode, dynamic=False)
    setattr(model, COMPILED_ATTR, {"backend": backend, "mode": mode, "tower": tower, "decode": decode,
                                   "prefill": prefill})
    return model


@contextlib.contextmanager
def tower_compiled(model: torch.nn.Module, backend: str = "inductor", mode: str | None = None) -> Iterator[None]:
    """The vision tower compiled for the duration (``focusvlm bench``: each arm's tower, then stock again)."""
    from .models import adapter_for

    tower = adapter_for(model).vision_tower(model)
    tower.compile(backend=backend, mode=mode, dynamic=False)
    try:
        yield
    finally:
        tower._compiled_call_impl = None   # what nn.Module.compile set: its forward runs eagerly again


@contextlib.contextmanager
def prefill_compiled(model: torch.nn.Module, backend: str = "inductor") -> Iterator[None]:
    """CMAI's per-layer prefill math regionally compiled for the duration (``focusvlm bench --count-ops``)."""
    saved = getattr(model, COMPILED_ATTR, None)
    setattr(model, COMPILED_ATTR, {**(saved or {}), "backend": backend, "prefill": True})
    try:
        yield
    finally:
        if saved is None:
            delattr(model, COMPILED_ATTR)
        else:
            setattr(model, COMPILED_ATTR, saved)


def compiled_parts(model: torch.nn.Module) -> dict[str, Any] | None:
    """What ``compile_model`` compiled on ``model`` (None: nothing)."""
    return getattr(model, COMPILED_ATTR, None)


__all__ = ["compile_model", "compiled_parts", "prefill_compiled", "tower_compiled"]
