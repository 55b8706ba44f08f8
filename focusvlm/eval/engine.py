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

* ``focusvlm.cli.evaluate.run_from_args(benchmark, args)``: what ``focusvlm eval NAME`` calls.
  Loads the model with ``focusvlm.cli.common`` (``--model/--config/--cmai/
  --device/--dtype``), shards across processes, runs, merges.
* ``run(samples, generator, out_dir, manifest, settings)``: the same loop with
  an injected generator (tests pass a fake one; library users an
  :class:`HFGenerator`).

Output: a run folder, in the format ``focusvlm.eval.runs`` defines and reads
(manifest.json, config.yaml, predictions.jsonl written one flushed line per
sample; with N processes (``accelerate launch -m focusvlm eval ...``) process
i takes samples ``index % N == i`` and writes its own shard, merged at the
end). A second run into the same folder resumes it if its manifest matches,
and refuses otherwise. An unreadable image gives an error line and the run
goes on.

Modes: ``direct`` (image + prompt) and ``describe-then-answer`` (the model
first describes the image, then answers from the description alone, text
only; ``Benchmark.answer_from_description`` shapes the second prompt).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from ..runtime import Generation, HFGenerator, load_image, to_messages
from .runs import (CONFIG, ManifestMismatch, append_records, atomic_write_text, build_manifest, check_manifest,
                   drop_torn_tail, existing_predictions, file_fingerprint, merge, predictions_file,
                   read_jsonl_records, write_manifest)
from .runs import INFO_KEYS, MANIFEST, PREDICTIONS, SHARD_PATTERN, environment  # noqa: F401 - re-exported: first home
from .samples import Sample, default_answer_from_description

# given-description: no image; the prompt is answered from the description the sample carries
# (``meta["description"]``, e.g. a ground-truth caption): the language model's own level on the task
MODES = ("direct", "describe-then-answer", "given-description")

DEFAULT_DESCRIBE_PROMPT = "Describe this image in detail, including every object, any text, colors and positions."


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
    resuming, done, kept_errors = _open_run(out_dir, manifest, ids, is_main=is_main, barrier=barrier,
                                            retry_errors=retry_errors, config_yaml=config_yaml)
    mine = [(i, s) for i, s in enumerate(samples) if i % num_processes == process_index]
    pending = [(i, s) for i, s in mine if s.id not in done]
    target = predictions_file(out_dir, process_index, num_processes)
    drop_torn_tail(target)
    bar = _progress(len(pending), progress, process_index, num_processes)
    # describe-then-answer describes each distinct picture once per run; a resumed run reuses its descriptions
    described = {str(s.image): done[s.id]["description"] for s in samples
                 if s.id in done and done[s.id].get("description") is not None}
    generated, errors = _append_answers(target, pending, process_index, bar, generator, settings,
                                        answer_from_description, described)
    barrier()
    if is_main:
        merge(out_dir, ids)
    barrier()
    final = existing_predictions(out_dir)
    failed = {sid: str(final[sid].get("error")) for sid in ids if sid in final and final[sid].get("error")}
    return RunResult(out_dir, len(samples), generated, len(mine) - len(pending), errors, failed=failed,
                     kept_errors=kept_errors, resumed=resuming)


def _open_run(out_dir: Path, manifest: dict, ids: list[str], *, is_main: bool, barrier: Callable[[], None],
              retry_errors: bool, config_yaml: str | None) -> tuple[bool, dict[str, dict], list[str]]:
    """Check the folder (every process) and write its manifest and config (the main one).

    Returns (resuming, id -> record of the samples already done, error rows kept as they were).
    """
    # every process checks, so a mismatch fails everywhere rather than hanging the others at the barrier
    out_dir.mkdir(parents=True, exist_ok=True)
    resuming = check_manifest(out_dir, manifest)
    barrier()
    if is_main:
        write_manifest(out_dir, manifest, ids, resuming)
        if config_yaml is not None and not resuming:
            atomic_write_text(out_dir / CONFIG, config_yaml)
    done = existing_predictions(out_dir)
    wanted = set(ids)
    kept_errors = [] if retry_errors else sorted((k for k, v in done.items() if v.get("error") and k in wanted),
                                                 key=str)
    if retry_errors:
        done = {k: v for k, v in done.items() if not v.get("error")}
    barrier()
    return resuming, done, kept_errors


def _append_answers(target: Path, pending: list[tuple[int, Sample]], process_index: int, bar: Any,
                    generator: Generator, settings: GenerationSettings,
                    answer_from_description: Callable[[str, str], str],
                    described: dict[str, str]) -> tuple[int, int]:
    """Answer ``pending`` batch by batch, each batch's records appended to ``target``; (generated, errors)."""
    errors = generated = 0
    with open(target, "a", encoding="utf-8") as sink:
        for start in range(0, len(pending), settings.batch_size):
            batch = pending[start:start + settings.batch_size]
            records = _run_batch(batch, generator, settings, answer_from_description, described)
            for rec in records:
                rec["shard"] = process_index
                errors += bool(rec["error"])
                generated += 1
            append_records(sink, records)
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    return generated, errors


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
               answer_from_description: Callable[[str, str], str], described: dict[str, str]) -> list[dict]:
    records: dict[int, dict] = {}
    ready: list[tuple[int, Sample, Any]] = []
    for index, sample in batch:
        if settings.mode == "given-description":  # the picture is never shown
            ready.append((index, sample, None))
            continue
        try:
            ready.append((index, sample, load_image(sample.image)))
        except (OSError, ValueError) as exc:
            records[index] = _record(index, sample, settings, error=f"image: {exc}")
    if ready:
        for rec in _generate_group(ready, generator, settings, answer_from_description, described):
            records[rec["index"]] = rec
    return [records[i] for i, _ in batch]


def describe_pictures(generator: Generator, settings: GenerationSettings, pictures: Sequence[str],
                      load: Callable[[str], Any], described: dict[str, str]) -> list[str]:
    """describe-then-answer's first step: the description of each picture named in ``pictures``. Pictures not in
    ``described`` (picture -> description, updated) are loaded with ``load`` and described in one batch, each
    once however many prompts ask about it."""
    new = list(dict.fromkeys(p for p in pictures if p not in described))
    if new:
        outs = _generate(generator, [settings.describe_prompt] * len(new), [load(p) for p in new],
                         settings.describe_max_new_tokens)
        described.update(zip(new, (o.text for o in outs)))
    return [described[p] for p in pictures]


def _describe(ready, generator, settings, described: dict[str, str]) -> list[str]:
    """Each ready sample's description of its picture ("" for a text-only sample)."""
    images = {str(sample.image): image for _, sample, image in ready if image is not None}
    describe_pictures(generator, settings, list(images), images.__getitem__, described)
    return ["" if image is None else described[str(sample.image)] for _, sample, image in ready]


def _generate_group(ready, generator, settings, answer_from_description, described) -> list[dict]:
    t0 = time.perf_counter()
    try:
        if settings.mode == "direct":
            outs = _generate(generator, [s.prompt for _, s, _ in ready], [im for _, _, im in ready],
                             settings.max_new_tokens)
            descriptions = [None] * len(ready)
        elif settings.mode == "given-description":
            descriptions = [s.meta.get("description") for _, s, _ in ready]
            missing = [s.id for (_, s, _), d in zip(ready, descriptions) if not d]
            if missing:
                raise ValueError(f"--mode given-description: sample {missing[0]} carries no description "
                                 "(its benchmark rows need a `description` field)")
            prompts = [answer_from_description(s.prompt_text(), d) for (_, s, _), d in zip(ready, descriptions)]
            outs = _generate(generator, prompts, [None] * len(ready), settings.max_new_tokens)
        else:
            descriptions = _describe(ready, generator, settings, described)
            prompts = [answer_from_description(s.prompt_text(), d) for (_, s, _), d in zip(ready, descriptions)]
            outs = _generate(generator, prompts, [None] * len(ready), settings.max_new_tokens)
    except Exception as exc:  # noqa: BLE001 - one bad sample must not stop the run
        if len(ready) == 1:
            index, sample, _ = ready[0]
            return [_record(index, sample, settings, error=f"generate: {type(exc).__name__}: {exc}")]
        # find the culprit: retry one by one so only the failing sample records an error
        return [rec for item in ready
                for rec in _generate_group([item], generator, settings, answer_from_description, described)]
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
