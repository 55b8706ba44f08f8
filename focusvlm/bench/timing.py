"""Wall-clock and peak-memory measurement that means the same thing on CPU and GPU.

GPU: CUDA events around the work and a synchronize before reading them, so
the figure is device time, not launch time; peak memory from the caching
allocator's counters. CPU: perf_counter; peak memory as the process RSS
sampled by a background thread (torch's CPU allocator is invisible to
tracemalloc, and ru_maxrss never goes down, so it cannot separate methods
measured in one process). The RSS figure is approximate: glibc keeps freed
pages, so a later method can reuse memory an earlier one left mapped.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Callable

import torch


class Clock:
    """Seconds a call takes: CUDA events on a GPU; on a CPU wall time, or with ``cpu_time`` the process's CPU
    time (user + system of all its threads), which other jobs on a shared machine cannot inflate by taking
    the cores (they still share caches and memory bandwidth)."""

    def __init__(self, device: torch.device, cpu_time: bool = False):
        self.device = device
        self.cuda = device.type == "cuda"
        self.cpu_time = cpu_time and not self.cuda

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object]) -> float:
        """Seconds ``fn`` takes (device time on GPU)."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.sync()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        now = time.process_time if self.cpu_time else time.perf_counter
        begin = now()
        fn()
        return now() - begin


class _RSSSampler(threading.Thread):
    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = self.proc.memory_info().rss
        self.stop_flag = threading.Event()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)


def peak_memory(fn: Callable[[], object], device: torch.device) -> dict[str, float | str]:
    """Peak memory (bytes) while ``fn`` runs: absolute and above what was held before it.

    Run outside the timed repeats: the CPU sampler thread competes for the GIL.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak": float(peak), "delta": float(peak - before), "source": "cuda.max_memory_allocated"}
    try:
        sampler = _RSSSampler()
    except ImportError:
        fn()
        return {"peak": float("nan"), "delta": float("nan"), "source": "n/a (psutil missing)"}
    before = sampler.peak
    sampler.start()
    try:
        fn()
    finally:
        sampler.stop_flag.set()
        sampler.join()
    sampler.peak = max(sampler.peak, sampler.proc.memory_info().rss)
    return {"peak": float(sampler.peak), "delta": float(sampler.peak - before), "source": "process RSS (sampled, approx.)"}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
