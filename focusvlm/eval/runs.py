"""Run folders: what `focusvlm eval` writes, how it is read back, and what it covers.

Layout of a run folder ``out_dir``:

* ``manifest.json``: model id, ``FocusConfig.to_dict()``, benchmark name and
  fingerprint (e.g. the bench file's hash), generation settings, the resolved
  dtype and the device type (:func:`build_manifest`). A second run into the
  same folder resumes only if these match; otherwise it refuses
  (:func:`check_manifest`). Informational, updated on resume (``INFO_KEYS``):
  ``environment`` (device, library versions), ``samples`` (how many samples the
  last call asked for and a hash of their ids: what completeness is measured
  against), ``resumed`` (the environments of later calls).
* ``config.yaml``: the resolved FocusConfig (loadable with ``FocusConfig.load``).
* ``predictions.jsonl``: one flushed line per sample, written as it goes:
  ``{"id", "index", "prompt", "response", "error", "time_s", "batch_time_s",
  "prompt_tokens", "new_tokens", "image_tokens", "mode", "meta", "shard"}`` (+
  ``"description"`` in describe-then-answer mode). ``error`` is null on
  success. After the run the file holds one line per sample in sample order.
* with N processes, process i writes ``predictions.shard{i}.jsonl``; the main
  process folds them into ``predictions.jsonl`` at the end (:func:`merge`).
  Reading (:func:`existing_predictions`) takes every shard and the merged file,
  so a run resumes under any process count.
* ``scores.json`` and ``report.md``: written by scoring (``focusvlm.eval.scoring``).

Completeness: the manifest records the sample set a run was asked for
(``"samples": {"expected": N, "ids_sha256": ...}``); :func:`run_status` compares
it with the predictions on disk, :func:`status_line` says it in one line, and
:func:`comparability_problems` says when two runs cannot be compared like for
like (another benchmark or data version, other generation settings, or
another set of answered samples).

Every file is written whole (:func:`atomic_write_text`) except the
predictions being appended. No torch at import: `score`, `report` and
`compare` read JSON files only.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import IO, Any, Iterable, Protocol, Sequence

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
PREDICTIONS = "predictions.jsonl"
SHARD_PATTERN = "predictions.shard{}.jsonl"
SCORES = "scores.json"
REPORT = "report.md"

# manifest keys that describe a run without changing its answers: a resume may differ in them
INFO_KEYS = ("created", "environment", "samples", "resumed")


class ManifestMismatch(RuntimeError):
    pass


# --------------------------------------------------------------------------- writing files

def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# --------------------------------------------------------------------------- fingerprints

def file_fingerprint(path: str | Path) -> str:
    """sha256 of a data file (a benchmark's fingerprint is made of these)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def ids_digest(ids: Iterable[Any]) -> str:
    """Order-free fingerprint of a set of sample ids."""
    h = hashlib.sha256()
    for sid in sorted({str(i) for i in ids}):
        h.update(sid.encode("utf-8") + b"\n")
    return "sha256:" + h.hexdigest()


def sample_set(ids: Sequence[Any]) -> dict[str, Any]:
    """The manifest's record of the samples a run was asked for."""
    return {"expected": len(ids), "ids_sha256": ids_digest(ids)}


# --------------------------------------------------------------------------- the manifest

class _Settings(Protocol):
    def identity(self) -> dict[str, Any]: ...


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


def build_manifest(*, model: str, config: dict, benchmark: str, settings: _Settings,
                   fingerprint: Any = None, dtype: Any = None, device: Any = None) -> dict:
    """The identity of a run (a resume must match it) plus its environment (informational).

    ``settings`` is the engine's ``GenerationSettings`` (its ``identity()`` is recorded).
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


def write_manifest(out_dir: Path, manifest: dict, ids: Sequence[str], resuming: bool) -> None:
    """Create the manifest, or on resume record the (possibly new) sample set and this environment."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    if resuming:
        data = json.loads((out_dir / MANIFEST).read_text())
        if manifest.get("environment") and manifest["environment"] != data.get("environment"):
            data.setdefault("resumed", []).append({"at": now, "environment": manifest["environment"]})
    else:
        data = {**manifest, "created": now}
    data["samples"] = sample_set(ids)
    atomic_write_text(out_dir / MANIFEST, json.dumps(data, indent=2, sort_keys=True))


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {MANIFEST}; not a `focusvlm eval` output folder")
    return json.loads(path.read_text())


def is_run_dir(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def benchmark_of_run(run_dir: Path) -> str:
    """The benchmark name recorded in a run folder's manifest."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {MANIFEST}; is this a `focusvlm eval` output folder?")
    return json.loads(path.read_text())["benchmark"]


# --------------------------------------------------------------------------- predictions

def predictions_file(out_dir: Path, process_index: int = 0, num_processes: int = 1) -> Path:
    """The file a process appends to: the merged file alone, else its shard."""
    return out_dir / (PREDICTIONS if num_processes == 1 else SHARD_PATTERN.format(process_index))


def append_records(sink: IO[str], records: Iterable[dict]) -> None:
    """Append prediction records to an open predictions file, flushed to disk (a killed run keeps them)."""
    for rec in records:
        sink.write(_line(rec))
    sink.flush()
    os.fsync(sink.fileno())


def _line(rec: dict) -> str:
    return json.dumps(rec, ensure_ascii=False) + "\n"


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


def drop_torn_tail(path: Path) -> None:
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
    atomic_write_text(out_dir / PREDICTIONS, "".join(_line(rec) for rec in records))
    for shard in out_dir.glob(SHARD_PATTERN.format("*")):
        shard.unlink()
    return out_dir / PREDICTIONS


# --------------------------------------------------------------------------- completeness

def run_status(run_dir: Path, manifest: dict | None = None) -> dict[str, Any]:
    """Completeness and identity of a run folder, from its manifest and predictions on disk."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir) if manifest is None else manifest
    records = existing_predictions(run_dir)
    errors = sorted((sid for sid, r in records.items() if r.get("error")), key=str)
    samples = manifest.get("samples") or {}
    expected = samples.get("expected")
    digest = ids_digest(records)
    complete = None if expected is None else (len(records) == expected and digest == samples.get("ids_sha256"))
    return {
        "expected": expected, "answered": len(records) - len(errors), "predicted": len(records),
        "errors": len(errors), "error_ids": errors[:20], "complete": complete, "ids_sha256": digest,
        "benchmark": manifest.get("benchmark"), "benchmark_fingerprint": manifest.get("benchmark_fingerprint"),
        "generation": manifest.get("generation"), "dtype": manifest.get("dtype"),
        "device_type": manifest.get("device_type"), "model": manifest.get("model"),
    }


def status_line(status: dict[str, Any]) -> str:
    """One line a reader cannot miss: how much of the run the scores cover."""
    n, expected, errors = status["predicted"], status["expected"], status["errors"]
    err = f", {errors} failed (scored as wrong; redo with --retry-errors)" if errors else ", 0 errors"
    if expected is None:
        return (f"samples: {n}{err}; completeness unknown (the run was made by a focusvlm that did not record "
                "its sample count)")
    if status["complete"]:
        return f"complete: {n} of {expected} samples{err}"
    share = f" ({100 * n / expected:.1f}%)" if expected else ""
    return (f"INCOMPLETE: {n} of {expected} samples{share}{err} - these scores cover only the answered "
            "samples; rerun the same `focusvlm eval` command to finish (it resumes)")


def completeness_marker(status: dict[str, Any]) -> str:
    """Short tag for table cells: "" when complete, else e.g. "6/48"."""
    if status.get("complete"):
        return ""
    if status.get("expected") is None:
        return f"{status['predicted']}/?"
    return f"{status['predicted']}/{status['expected']}"


def _generation_text(gen: dict | None) -> str:
    if not gen:
        return "unknown"
    return ", ".join(f"{k}={v}" for k, v in sorted(gen.items()) if k != "decoding") or "default"


def comparability_problems(statuses: Sequence[dict[str, Any]], names: Sequence[str]) -> list[str]:
    """Why these runs are not like for like (empty when they are): benchmark, data, settings, samples."""
    problems = []
    first, base = statuses[0], names[0]

    def differs(key: str, label: str, show=lambda v: json.dumps(v, sort_keys=True)) -> None:
        for name, st in zip(names[1:], statuses[1:]):
            if st.get(key) != first.get(key):
                problems.append(f"{label} differ: {base} has {show(first.get(key))}, {name} has {show(st.get(key))}")

    differs("benchmark", "benchmarks")
    differs("benchmark_fingerprint", "benchmark data (fingerprints)", lambda v: _short(v))
    differs("generation", "generation settings", _generation_text)
    for name, st in zip(names[1:], statuses[1:]):
        if st["ids_sha256"] != first["ids_sha256"]:
            problems.append(f"sample sets differ: {base} answered {first['predicted']} samples, {name} "
                            f"{st['predicted']} (or other ids); deltas would mix different questions")
    for name, st in zip(names, statuses):
        if st.get("complete") is False:
            problems.append(f"{name} is incomplete ({st['predicted']} of {st['expected']} samples)")
    return problems


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


__all__ = ["MANIFEST", "CONFIG", "PREDICTIONS", "SHARD_PATTERN", "SCORES", "REPORT", "INFO_KEYS", "ManifestMismatch",
           "atomic_write_text", "file_fingerprint", "ids_digest", "sample_set", "environment", "build_manifest",
           "check_manifest", "write_manifest", "read_manifest", "is_run_dir", "benchmark_of_run", "predictions_file",
           "append_records", "read_jsonl_records", "existing_predictions", "drop_torn_tail", "merge", "run_status",
           "status_line", "completeness_marker", "comparability_problems"]
