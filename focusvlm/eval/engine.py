"""Shared generation engine for every focusvlm benchmark.

Interface (stable; other benchmarks build on it)
-------------------------------------------------
A benchmark (see ``focusvlm.eval.registry.Benchmark``) turns its data into a
list of :class:`Sample`::

    Sample(id="q17", image="imgs/17.jpg" | PIL.Image | None,
           prompt="What is shown?"            # user text; the engine wraps it as
                                              # [{"type": "image"}, {"type": "text"}]
           | [{"role": "user", "content": [...]}, ...],   # or full chat messages
           meta={...})                         # anything JSON-serialisable, copied to the output

and the engine does the rest:

* ``run_from_args(benchmark, args)``: what ``focusvlm eval NAME`` calls.
  Loads the model with ``focusvlm.cli.common`` (``--model/--config/--cmai/
  --device/--dtype``), shards across processes, runs, merges.
* ``run(samples, generator, out_dir, manifest, settings)``: the same loop with
  an injected generator (tests pass a fake one; library users an
  :class:`HFGenerator`).

Output folder ``out_dir``:

* ``manifest.json``: model id, ``FocusConfig.to_dict()``, benchmark name and
  fingerprint (e.g. the bench file's hash), generation settings, the resolved
  dtype and the device type. A second run into the same folder resumes only if
  these match; otherwise it refuses. Informational, updated on resume:
  ``environment`` (device, library versions), ``samples`` (how many samples the
  last call asked for and a hash of their ids: what ``runinfo`` measures
  completeness against), ``resumed`` (the environments of later calls).
* ``config.yaml``: the resolved FocusConfig (loadable with ``FocusConfig.load``).
* ``predictions.jsonl``: one flushed line per sample, written as it goes:
  ``{"id", "index", "prompt", "response", "error", "time_s", "batch_time_s",
  "prompt_tokens", "new_tokens", "image_tokens", "mode", "meta"}`` (+ ``"description"`` in
  describe-then-answer mode). ``error`` is null on success; an unreadable image
  gives an error line and the run goes on. After the run the file holds one
  line per sample in sample order.
* with N processes (``accelerate launch -m focusvlm eval ...``), process i
  takes samples ``index % N == i`` and writes ``predictions.shard{i}.jsonl``;
  the main process merges them into ``predictions.jsonl`` at the end. A
  resumed run (any process count) reads every shard and the merged file.

Modes: ``direct`` (image + prompt) and ``describe-then-answer`` (the model
first describes the image, then answers from the description alone, text
only; ``Benchmark.answer_from_description`` shapes the second prompt).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from ..runtime import Generation, HFGenerator, load_image, to_messages
from .runinfo import atomic_write_text

MANIFEST = "manifest.json"
PREDICTIONS = "predictions.jsonl"
SHARD_PATTERN = "predictions.shard{}.jsonl"
MODES = ("direct", "describe-then-answer")

DEFAULT_DESCRIBE_PROMPT = "Describe this image in detail, including every object, any text, colors and positions."


def default_answer_from_description(prompt: str, description: str) -> str:
    """Text-only prompt of the second describe-then-answer step."""
    return (f"Here is a description of an image:\n{description.strip()}\n\n"
            f"Using only this description, respond to the following.\n{prompt}")


@dataclass
class Sample:
    id: str
    image: Any = None  # str | Path | PIL.Image.Image | None
    prompt: str | list[dict] = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def prompt_text(self) -> str:
        """The user-facing text of the prompt (recorded in predictions)."""
        if isinstance(self.prompt, str):
            return self.prompt
        parts = []
        for message in self.prompt:
            content = message.get("content")
            if isinstance(content, str):
                parts.append(content)
            else:
                parts.extend(c.get("text", "") for c in content or [] if c.get("type") == "text")
        return "\n".join(parts)


@dataclass
class GenerationSettings:
    max_new_tokens: int = 1024
    batch_size: int = 1
    mode: str = "direct"
    describe_prompt: str = DEFAULT_DESCRIBE_PROMPT
    describe_max_new_tokens: int = 256

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("--batch-size and --max-new-tokens must be >= 1")

    def identity(self) -> dict[str, Any]:
        """What changes the answers (batch size does not, so a resume may change it)."""
        out = {"decoding": "greedy", "max_new_tokens": self.max_new_tokens, "mode": self.mode}
        if self.mode == "describe-then-answer":
            out.update(describe_prompt=self.describe_prompt, describe_max_new_tokens=self.describe_max_new_tokens)
        return out


class Generator(Protocol):
    """Greedy-generates answers for a batch. ``images[i]`` is a PIL image or None (text only)."""

    def generate(self, prompts: Sequence[str | list[dict]], images: Sequence[Any],
                 max_new_tokens: int) -> list[Generation]: ...


class ManifestMismatch(RuntimeError):
    pass


# --------------------------------------------------------------------------- helpers

def file_fingerprint(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def read_jsonl_records(path: Path) -> list[dict]:
    """Records of a predictions file. A torn last line (a killed writer) is dropped;
    a broken line elsewhere is an error, because it means the file was edited."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if n == len(lines):
                break
            raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
    return out


def existing_predictions(out_dir: Path) -> dict[str, dict]:
    """id -> record over the merged file and every shard file (later files win)."""
    done: dict[str, dict] = {}
    files = [out_dir / PREDICTIONS] + sorted(out_dir.glob(SHARD_PATTERN.format("*")))
    for path in files:
        for rec in read_jsonl_records(path):
            done[str(rec["id"])] = rec
    return done


# manifest keys that describe a run without changing its answers: a resume may differ in them
INFO_KEYS = ("created", "environment", "samples", "resumed")


def check_manifest(out_dir: Path, manifest: dict) -> bool:
    """True when resuming. Raises ManifestMismatch when the folder belongs to another run."""
    path = out_dir / MANIFEST
    if not path.is_file():
        if (out_dir / PREDICTIONS).is_file():
            raise ManifestMismatch(f"{out_dir} holds predictions but no {MANIFEST}; use a fresh --out folder")
        return False
    old = json.loads(path.read_text())
    diffs = [k for k in sorted(set(old) | set(manifest)) if k not in INFO_KEYS and old.get(k) != manifest.get(k)]
    if not diffs:
        return True
    if set(diffs) <= {"dtype", "device_type"}:
        # the same run on other hardware or precision: its answers would differ from the ones on disk
        raise ManifestMismatch(
            f"{out_dir} was run in {old.get('dtype')} on {old.get('device_type')}; this run would use "
            f"{manifest.get('dtype')} on {manifest.get('device_type')}, and mixing them would mix results. Resume "
            f"with --dtype {old.get('dtype')} --device {old.get('device_type')}, or use another --out folder.")
    detail = "; ".join(f"{k}: folder has {json.dumps(old.get(k))}, this run {json.dumps(manifest.get(k))}"
                       for k in diffs)
    raise ManifestMismatch(f"{out_dir} holds a different run ({detail}). "
                           "Use another --out folder to keep both results.")


def environment(device: Any = None) -> dict[str, Any]:
    """Where a run happens: the device (with its name on GPU) and the library versions."""
    import platform

    from .. import __version__

    env: dict[str, Any] = {"focusvlm": __version__, "python": platform.python_version()}
    for lib in ("torch", "transformers", "accelerate"):
        try:
            env[lib] = __import__(lib).__version__
        except ImportError:
            env[lib] = None
    if device is not None:
        env["device"] = str(device)
        try:
            import torch

            dev = torch.device(device)
            if dev.type == "cuda" and torch.cuda.is_available():
                env["device_name"] = torch.cuda.get_device_name(dev)
        except (ImportError, RuntimeError):
            pass
    return env


def build_manifest(*, model: str, config: dict, benchmark: str, settings: GenerationSettings,
                   fingerprint: Any = None, dtype: Any = None, device: Any = None) -> dict:
    """The identity of a run (a resume must match it) plus its environment (informational).

    ``dtype`` is the resolved dtype (``torch.float32`` or its name), never "auto": a run
    resumed on other hardware in another precision must be refused, not mixed in.
    """
    dtype_name = None if dtype is None else str(dtype).replace("torch.", "")
    if dtype_name == "auto":
        raise ValueError("build_manifest needs the resolved dtype (e.g. float32), not 'auto'")
    device_type = None if device is None else str(device).split(":")[0]
    return {"model": model, "config": config, "benchmark": benchmark, "benchmark_fingerprint": fingerprint,
            "generation": settings.identity(), "dtype": dtype_name, "device_type": device_type,
            "environment": environment(device)}


# --------------------------------------------------------------------------- the loop

@dataclass
class RunResult:
    out_dir: Path
    total: int
    generated: int  # by this process in this call
    skipped: int  # already done before this call (this process's share)
    errors: int  # error records written by this process in this call
    # after the merge, over the whole sample set (every process sees the same): id -> error message
    failed: dict[str, str] = field(default_factory=dict)
    kept_errors: list[str] = field(default_factory=list)  # error rows from earlier calls left as they were
    resumed: bool = False


def run(samples: Sequence[Sample], generator: Generator, out_dir: str | Path, manifest: dict,
        settings: GenerationSettings, *, process_index: int = 0, num_processes: int = 1,
        barrier: Callable[[], None] | None = None, progress: bool = True, retry_errors: bool = False,
        answer_from_description: Callable[[str, str], str] = default_answer_from_description,
        config_yaml: str | None = None) -> RunResult:
    """Generate every pending sample of this process's shard, appending flushed records."""
    out_dir = Path(out_dir)
    barrier = barrier or (lambda: None)
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"duplicate sample id {dup!r}: ids must be unique to resume")
    is_main = process_index == 0
    # every process checks, so a mismatch fails everywhere rather than hanging the others at the barrier
    out_dir.mkdir(parents=True, exist_ok=True)
    resuming = check_manifest(out_dir, manifest)
    barrier()
    if is_main:
        _write_manifest(out_dir, manifest, ids, resuming)
        if config_yaml is not None and not resuming:
            atomic_write_text(out_dir / "config.yaml", config_yaml)
    done = existing_predictions(out_dir)
    wanted = set(ids)
    kept_errors = [] if retry_errors else sorted((k for k, v in done.items() if v.get("error") and k in wanted),
                                                 key=str)
    if retry_errors:
        done = {k: v for k, v in done.items() if not v.get("error")}
    barrier()

    mine = [(i, s) for i, s in enumerate(samples) if i % num_processes == process_index]
    pending = [(i, s) for i, s in mine if s.id not in done]
    target = out_dir / (PREDICTIONS if num_processes == 1 else SHARD_PATTERN.format(process_index))
    _drop_torn_tail(target)
    errors = generated = 0
    bar = _progress(len(pending), progress, process_index, num_processes)
    with open(target, "a", encoding="utf-8") as sink:
        for start in range(0, len(pending), settings.batch_size):
            batch = pending[start:start + settings.batch_size]
            for rec in _run_batch(batch, generator, settings, answer_from_description):
                rec["shard"] = process_index
                sink.write(json.dumps(rec, ensure_ascii=False) + "\n")
                errors += bool(rec["error"])
                generated += 1
            sink.flush()
            os.fsync(sink.fileno())
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    barrier()
    if is_main:
        merge(out_dir, ids)
    barrier()
    final = existing_predictions(out_dir)
    failed = {sid: str(final[sid].get("error")) for sid in ids if sid in final and final[sid].get("error")}
    return RunResult(out_dir, len(samples), generated, len(mine) - len(pending), errors, failed=failed,
                     kept_errors=kept_errors, resumed=resuming)


def _write_manifest(out_dir: Path, manifest: dict, ids: Sequence[str], resuming: bool) -> None:
    """Create the manifest, or on resume record the (possibly new) sample set and this environment."""
    from .runinfo import sample_set

    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    if resuming:
        data = json.loads((out_dir / MANIFEST).read_text())
        if manifest.get("environment") and manifest["environment"] != data.get("environment"):
            data.setdefault("resumed", []).append({"at": now, "environment": manifest["environment"]})
    else:
        data = {**manifest, "created": now}
    data["samples"] = sample_set(ids)
    atomic_write_text(out_dir / MANIFEST, json.dumps(data, indent=2, sort_keys=True))


def _drop_torn_tail(path: Path) -> None:
    """Cut a half-written last line (a killed run) so appended records start on a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        data = f.seek(0) or f.read()
        f.truncate(data.rfind(b"\n") + 1)


def merge(out_dir: Path, order: Sequence[str] | None = None) -> Path:
    """Fold shard files into predictions.jsonl (sample order, one line per id) and remove them."""
    done = existing_predictions(out_dir)
    position = {sid: n for n, sid in enumerate(order or [])}
    records = sorted(done.values(), key=lambda r: (position.get(str(r["id"]), len(position)), r.get("index", 0)))
    atomic_write_text(out_dir / PREDICTIONS, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records))
    for shard in out_dir.glob(SHARD_PATTERN.format("*")):
        shard.unlink()
    return out_dir / PREDICTIONS


def _progress(total: int, enabled: bool, process_index: int, num_processes: int):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    desc = "generate" if num_processes == 1 else f"generate[{process_index}/{num_processes}]"
    return tqdm(total=total, desc=desc, unit="sample", position=process_index, dynamic_ncols=True)


def _record(index: int, sample: Sample, settings: GenerationSettings, **fields: Any) -> dict:
    rec = {"id": sample.id, "index": index, "prompt": sample.prompt_text(), "response": None, "error": None,
           "time_s": 0.0, "batch_time_s": 0.0, "prompt_tokens": 0, "new_tokens": 0, "image_tokens": 0, "mode": settings.mode,
           "meta": sample.meta}
    rec.update(fields)
    return rec


def _run_batch(batch: list[tuple[int, Sample]], generator: Generator, settings: GenerationSettings,
               answer_from_description: Callable[[str, str], str]) -> list[dict]:
    records: dict[int, dict] = {}
    ready: list[tuple[int, Sample, Any]] = []
    for index, sample in batch:
        try:
            ready.append((index, sample, load_image(sample.image)))
        except (OSError, ValueError) as exc:
            records[index] = _record(index, sample, settings, error=f"image: {exc}")
    if ready:
        for rec in _generate_group(ready, generator, settings, answer_from_description):
            records[rec["index"]] = rec
    return [records[i] for i, _ in batch]


def _generate_group(ready, generator, settings, answer_from_description) -> list[dict]:
    t0 = time.perf_counter()
    try:
        if settings.mode == "direct":
            outs = _generate(generator, [s.prompt for _, s, _ in ready], [im for _, _, im in ready],
                             settings.max_new_tokens)
            descriptions = [None] * len(ready)
        else:
            descs = _generate(generator, [settings.describe_prompt if im is not None else "" for _, _, im in ready],
                              [im for _, _, im in ready], settings.describe_max_new_tokens)
            descriptions = [d.text if im is not None else "" for d, (_, _, im) in zip(descs, ready)]
            prompts = [answer_from_description(s.prompt_text(), d) for (_, s, _), d in zip(ready, descriptions)]
            outs = _generate(generator, prompts, [None] * len(ready), settings.max_new_tokens)
    except Exception as exc:  # noqa: BLE001 - one bad sample must not stop the run
        if len(ready) == 1:
            index, sample, _ = ready[0]
            return [_record(index, sample, settings, error=f"generate: {type(exc).__name__}: {exc}")]
        # find the culprit: retry one by one so only the failing sample records an error
        return [rec for item in ready for rec in _generate_group([item], generator, settings, answer_from_description)]
    elapsed = time.perf_counter() - t0
    records = []
    for (index, sample, _), out, desc in zip(ready, outs, descriptions):
        extra = {} if desc is None else {"description": desc}
        records.append(_record(index, sample, settings, response=out.text, time_s=round(elapsed / len(ready), 4),
                               batch_time_s=round(elapsed, 4), prompt_tokens=out.prompt_tokens,
                               new_tokens=out.new_tokens, image_tokens=out.image_tokens, **extra))
    return records


def _generate(generator: Generator, prompts, images, max_new_tokens) -> list[Generation]:
    outs = generator.generate(prompts, images, max_new_tokens)
    if len(outs) != len(prompts):
        raise RuntimeError(f"generator returned {len(outs)} answers for {len(prompts)} prompts")
    return outs


# --------------------------------------------------------------------------- Hugging Face generator

def process_state():
    """accelerate's PartialState (rank, world size, device), or None without accelerate."""
    try:
        from accelerate import PartialState
    except ImportError:  # accelerate is a dependency, but a single process needs none of it
        return None
    import torch

    # without cpu=True, PartialState ignores a torchrun world on a machine with no GPU
    return PartialState(cpu=not torch.cuda.is_available())


__all__ = ["Sample", "GenerationSettings", "Generation", "Generator", "HFGenerator", "ManifestMismatch",
           "RunResult", "run", "merge", "build_manifest", "check_manifest",
           "existing_predictions", "read_jsonl_records", "load_image", "file_fingerprint", "MODES", "to_messages",
           "default_answer_from_description"]
