"""Benchmarks by name: what `focusvlm eval NAME` and `focusvlm score NAME DIR` dispatch on.

Adding a benchmark
------------------
1. Write a module with a subclass of :class:`Benchmark` (keep its import
   light: no torch/transformers at module level, the CLI imports it to build
   its arguments) and an instance of it.
2. Add one line to ``BUILTIN`` below: ``"name": "focusvlm.eval.mymod:BENCHMARK"``
   (a plug-in calls ``register("name", BENCHMARK)`` instead).

A Benchmark supplies samples (``load_samples``), scores a run folder
(``score``), and optionally its own CLI arguments, a fingerprint of its data
(recorded in the run manifest so a resume cannot mix data versions), a
default answer length and the second prompt of describe-then-answer.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Iterable

from ..registry import Registry
from .runs import benchmark_of_run  # noqa: F401 - re-exported: its first home
from .samples import Sample, default_answer_from_description

BUILTIN: dict[str, str] = {
    "if": "focusvlm.eval.ifbench:BENCHMARK",
    "vqav2": "focusvlm.eval.benchmarks.vqav2:BENCHMARK",
    "gqa": "focusvlm.eval.benchmarks.gqa:BENCHMARK",
    "textvqa": "focusvlm.eval.benchmarks.textvqa:BENCHMARK",
    "mme": "focusvlm.eval.benchmarks.mme:BENCHMARK",
    "mmbench": "focusvlm.eval.benchmarks.mmbench:BENCHMARK",
}

# name -> a Benchmark, or (until first asked for) its "module:attribute"; the attribute may be a
# Benchmark subclass, instantiated on first use
BENCHMARKS: Registry[Any] = Registry("benchmark", lazy=BUILTIN)


class Benchmark:
    """Base class; override what your benchmark needs."""

    name: str = ""
    description: str = ""
    default_max_new_tokens: int = 128

    # -- eval ------------------------------------------------------------------
    def add_eval_args(self, parser: argparse.ArgumentParser) -> None:
        """Benchmark-specific arguments of `focusvlm eval NAME` (data paths ...)."""

    def load_samples(self, args: argparse.Namespace) -> Iterable[Sample]:
        raise NotImplementedError(f"benchmark {self.name!r} does not load samples")

    def fingerprint(self, args: argparse.Namespace) -> Any:
        """JSON-able identity of the data (e.g. a file hash); a resume must match it."""
        return None

    def answer_from_description(self, prompt: str, description: str) -> str:
        return default_answer_from_description(prompt, description)

    # -- score -----------------------------------------------------------------
    def add_score_args(self, parser: argparse.ArgumentParser) -> None:
        """Extra arguments of `focusvlm score NAME DIR`."""

    def score(self, run_dir: Path, args: argparse.Namespace | None = None) -> dict:
        """Score a run folder; write scores.json (+ a readable report) into it and return the scores.

        Convention: scores.json holds ``{"benchmark": name, "summary": {metric: number}, ...}``;
        `focusvlm compare` reads ``summary`` for benchmarks without their own ``compare``.
        """
        raise NotImplementedError(f"benchmark {self.name!r} has no scorer")

    def compare(self, run_dirs: list[Path], out: Path | None, names: list[str] | None = None) -> str | None:
        """Optional: a benchmark-specific side-by-side report; None = use the generic one."""
        return None


def register(name: str, target: "Benchmark | str") -> None:
    """Add a benchmark at run time: an instance, or a lazy "module:attribute" path. A taken name is replaced."""
    BENCHMARKS.remove(name)
    if isinstance(target, str):
        BENCHMARKS.add_lazy(name, target)
    else:
        BENCHMARKS.add(name, target)


def names() -> list[str]:
    """Every benchmark name, sorted (the order of `focusvlm eval --help`)."""
    return sorted(BENCHMARKS.names())


def get(name: str) -> Benchmark:
    """The benchmark registered as ``name``, imported (and a registered class instantiated) on first use."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(names())}")
    obj = BENCHMARKS.get(name)
    if isinstance(obj, Benchmark):
        bench = obj
    elif isinstance(obj, type) and issubclass(obj, Benchmark):
        bench = obj()
        BENCHMARKS.remove(name)
        BENCHMARKS.add(name, bench)  # the instance from now on
    else:
        raise TypeError(f"benchmark {name!r} ({obj!r}) is not a focusvlm.eval.registry.Benchmark")
    if not bench.name:
        bench.name = name
    return bench
