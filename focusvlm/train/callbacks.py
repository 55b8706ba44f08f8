"""Trainer callbacks: a progress bar (loss, lr, tokens/s, ETA), JSONL metrics, the loss-curve PNG."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

METRICS_FILE = "metrics.jsonl"
LOSS_PNG = "loss.png"


class ProgressCallback(TrainerCallback):
    """One tqdm bar over optimizer steps, on the main process, with loss, lr and tokens/s in its postfix."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = None
        self._last = None   # (time, tokens) at the previous log

    def on_train_begin(self, args, state, control, **kwargs):
        if not (self.enabled and state.is_world_process_zero):
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step",
                        dynamic_ncols=True)
        self._last = (time.perf_counter(), state.num_input_tokens_seen or 0)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs or "loss" not in logs:
            return
        post = {"loss": f"{logs['loss']:.4f}"}
        if "learning_rate" in logs:
            post["lr"] = f"{logs['learning_rate']:.2e}"
        rate = logs.get("tokens_per_second")
        if rate is not None:
            post["tok/s"] = f"{rate:.0f}"
        self.bar.set_postfix(post, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MetricsCallback(TrainerCallback):
    """Every log as one JSON line in ``metrics.jsonl`` (step, epoch, loss, lr, grad norm, tokens/s ...);
    a loss-curve PNG when training ends. Adds ``tokens_per_second`` (non-padding tokens, all processes)."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / METRICS_FILE
        self._last: tuple[float, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), state.num_input_tokens_seen or 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        now, seen = time.perf_counter(), state.num_input_tokens_seen or 0
        if self._last is not None and "loss" in logs and now > self._last[0]:
            logs["tokens_per_second"] = (seen - self._last[1]) / (now - self._last[0])
        self._last = (now, seen)
        if not state.is_world_process_zero:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_plain(record)) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.path.is_file():
            plot_loss(self.path, self.path.parent / LOSS_PNG)


class StopAtStep(TrainerCallback):
    """Stop after ``step`` optimizer steps, saving a checkpoint first (tests; ``--stop-at-step``)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = True
            control.should_training_stop = True


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Training-loss records of a metrics file, one per step (a resumed run's later record wins)."""
    by_step: dict[int, dict] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            if "loss" in rec:
                by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def plot_loss(metrics: str | Path, png: str | Path) -> Path | None:
    records = read_metrics(metrics)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, lw=1, label="loss")
    if len(losses) >= 20:
        k = max(2, len(losses) // 20)
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, lw=2, label=f"mean of {k}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return Path(png)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return value
