"""LLaVA-format training data: reading, checking, tokenizing, batching.

A data file is LLaVA's JSON (a list of records) or JSONL (one record per
line). A record has an ``id``, an optional ``image`` (a path relative to the
image folder, or a list of them) and ``conversations``: alternating
``human``/``gpt`` turns (``user``/``assistant`` accepted), with one
``<image>`` per image. Text-only records are normal.

Every problem names the file, the line and the record id. Nothing is dropped
silently: records that cannot be used are either an error (the default) or,
with ``skip_bad``, recorded in ``skipped.jsonl`` in the output folder with the
reason; records that are fine but leave no supervised token after truncation
are always skipped and recorded the same way (they would add nothing).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from ..runtime import load_image
from .formats import IGNORE_INDEX, IMAGE_TOKEN, ChatFormat, TokenizationMismatch, Turn, move_single_image_first  # noqa: F401

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class DataError(ValueError):
    """A record that cannot be trained on; the message names file, line and id."""

    def __init__(self, file: str, line: int | None, sample_id: Any, reason: str):
        self.file, self.line, self.sample_id, self.reason = str(file), line, sample_id, reason
        where = f"{file}:{line}" if line is not None else str(file)
        super().__init__(f"{where} id={sample_id}: {reason}")

    def record(self) -> dict:
        return {"file": self.file, "line": self.line, "id": self.sample_id, "reason": self.reason}


# --------------------------------------------------------------------------- reading

@dataclass
class RawRecord:
    line: int
    value: Any                 # the parsed record, or None when the line is not valid JSON
    error: str | None = None   # why the line could not be parsed


def read_records(path: str | Path) -> Iterator[RawRecord]:
    """Records of a JSON list or JSONL file, each with the line it starts on."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    start = len(text) - len(text.lstrip())
    if text[start:start + 1] == "[":
        yield from _read_json_list(path, text, start)
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield RawRecord(n, json.loads(line))
        except json.JSONDecodeError as exc:
            yield RawRecord(n, None, f"malformed JSON line: {exc.msg} (column {exc.colno})")


def _read_json_list(path: Path, text: str, start: int) -> Iterator[RawRecord]:
    decoder = json.JSONDecoder()
    pos, line, counted = start + 1, 1, 0
    n = len(text)

    def skip_ws(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    pos = skip_ws(pos)
    if pos < n and text[pos] == "]":
        return
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            # a broken element leaves no way to find where the next one starts
            raise DataError(path, exc.lineno, "?", f"malformed JSON: {exc.msg} (column {exc.colno}); "
                            "the rest of the file cannot be read") from None
        yield RawRecord(line, value)
        pos = skip_ws(end)
        if pos < n and text[pos] == ",":
            pos = skip_ws(pos + 1)
            continue
        if pos < n and text[pos] == "]":
            return
        bad_line = text.count("\n", 0, pos) + 1
        raise DataError(path, bad_line, "?", "malformed JSON: expected ',' or ']' between records")


# --------------------------------------------------------------------------- checking one record

@dataclass
class Sample:
    """One checked record (text not yet tokenized)."""

    index: int                 # position among the file's records
    line: int
    id: Any
    turns: list[Turn]
    images: list[str]          # paths as written in the record
    length: int = 0            # tokens after image expansion and truncation (set by the index)
    supervised: int = 0


def check_record(raw: RawRecord, index: int, path: str | Path) -> Sample:
    """A ``Sample`` from a parsed record, or ``DataError`` naming what is wrong."""
    if raw.error is not None:
        raise DataError(path, raw.line, "?", raw.error)
    rec = raw.value
    if not isinstance(rec, dict):
        raise DataError(path, raw.line, "?", f"a record must be a JSON object, got {type(rec).__name__}")
    sid = rec.get("id", f"#{index}")
    fail = lambda reason: DataError(path, raw.line, sid, reason)  # noqa: E731
    convs = rec.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise fail("no 'conversations' list")
    turns = []
    for k, turn in enumerate(convs):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise fail(f"turn {k} needs a 'from' and a string 'value'")
        who = turn.get("from")
        role = ROLES.get(who)
        if role is None:
            raise fail(f"unknown role {who!r} in turn {k} (use human/gpt)")
        turns.append(Turn(role, turn["value"]))
    for k, turn in enumerate(turns):
        want = "user" if k % 2 == 0 else "assistant"
        if turn.role != want:
            raise fail(f"turn {k} is from {'human' if turn.role == 'user' else 'gpt'}; turns must alternate, "
                       "starting with human")
    if turns[-1].role != "assistant":
        raise fail("the last turn is from human: nothing to learn from it")
    image = rec.get("image")
    if image is None:
        images = []
    elif isinstance(image, str):
        images = [image]
    elif isinstance(image, list) and all(isinstance(x, str) for x in image):
        images = list(image)
    else:
        raise fail("'image' must be a path or a list of paths")
    placeholders = sum(t.text.count(IMAGE_TOKEN) for t in turns)
    if placeholders != len(images):
        raise fail(f"{placeholders} {IMAGE_TOKEN} placeholder(s) for {len(images)} image(s)")
    if any(IMAGE_TOKEN in t.text for t in turns if t.role == "assistant"):
        raise fail(f"{IMAGE_TOKEN} in a gpt turn")
    if len(images) == 1:
        turns = [Turn(t.role, move_single_image_first(t.text)) if IMAGE_TOKEN in t.text else t for t in turns]
    return Sample(index, raw.line, sid, turns, images)


def image_path(folder: str | Path | None, name: str) -> Path:
    return Path(folder) / name if folder is not None else Path(name)


def open_image(path: Path):
    """Decode an image fully (so truncated files fail here, not in the middle of a batch)."""
    return load_image(path)


def pad_to_square(image, mean: tuple[float, ...]):
    """The image centred on a square canvas filled with the processor's mean colour (LLaVA-1.5 'pad')."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), tuple(int(round(m * 255)) for m in mean))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


# --------------------------------------------------------------------------- tokenization of one sample

def image_token_count(processor: Any) -> int:
    """Placeholders the processor emits for one image (VMTC's patched count when patched)."""
    from PIL import Image

    ip = processor.image_processor
    crop = getattr(ip, "crop_size", None) or {}
    side = int(crop.get("height", 0) or crop.get("shortest_edge", 0) or 336) if isinstance(crop, dict) else 336
    token = getattr(processor, "image_token", IMAGE_TOKEN)
    out = processor(images=[Image.new("RGB", (side, side))], text=[token], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids(token)
    return int((out["input_ids"] == image_id).sum())


def expand_and_truncate(ids: list[int], labels: list[int], image_id: int, per_image: int,
                        max_length: int) -> tuple[list[int], list[int]] | str:
    """Each image placeholder repeated ``per_image`` times, then cut to ``max_length`` in text only.

    Returns the pair, or a string saying why the sample cannot be used.
    """
    out_ids, out_labels, blocks = [], [], []
    for t, l in zip(ids, labels):
        if t == image_id:
            blocks.append((len(out_ids), len(out_ids) + per_image))
            out_ids += [image_id] * per_image
            out_labels += [IGNORE_INDEX] * per_image
        else:
            out_ids.append(t)
            out_labels.append(l)
    if len(out_ids) > max_length:
        if any(a < max_length < b for a, b in blocks) or any(a >= max_length for a, b in blocks):
            return (f"its image placeholders do not fit in max_length {max_length} "
                    f"({len(out_ids)} tokens); truncation never cuts through an image")
        out_ids, out_labels = out_ids[:max_length], out_labels[:max_length]
    if all(l == IGNORE_INDEX for l in out_labels[1:]):
        return f"no supervised token left (after truncation to {max_length})" if len(out_ids) == max_length \
            else "no supervised token"
    return out_ids, out_labels


# --------------------------------------------------------------------------- the index and the dataset

@dataclass
class Skipped:
    records: list[dict] = field(default_factory=list)

    def add(self, err: DataError) -> None:
        self.records.append(err.record())

    def write(self, folder: str | Path) -> Path:
        """Write the index's skips; skips recorded while training (a resumed run's earlier ones) are kept."""
        path = Path(folder) / "skipped.jsonl"
        earlier = []
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("during") == "training":
                    earlier.append(line)
        with open(path, "w", encoding="utf-8") as f:
            for line in earlier:
                f.write(line + "\n")
            for r in self.records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        return path


class SupervisedDataset(torch.utils.data.Dataset):
    """Checked, tokenized samples; images are decoded when a sample is drawn.

    Building it reads the whole file, checks every record (structure, roles,
    placeholders, that image files exist), tokenizes every conversation and
    applies truncation, so lengths are exact and every skip is known before
    the first step.
    """

    def __init__(self, path: str | Path, image_folder: str | Path | None, processor: Any, image_token_id: int,
                 fmt: str, max_length: int, pad_square: bool = True, skip_bad: bool = False,
                 progress: bool = False, skipped_log: str | Path | None = None):
        self.path = str(path)
        self.image_folder = image_folder
        self.processor = processor
        self.image_token_id = image_token_id
        self.format = ChatFormat(fmt, processor, image_token_id)
        self.max_length = max_length
        self.pad_square = pad_square
        self.skip_bad = skip_bad
        self.skipped = Skipped()
        self.skipped_log = str(skipped_log) if skipped_log else None
        self.per_image = image_token_count(processor)
        self.bad = 0
        self.unsupervised = 0
        self.samples: list[Sample] = []
        records = read_records(path)
        if progress:
            from tqdm.auto import tqdm

            records = tqdm(records, desc="checking data", unit=" records", mininterval=1.0)
        checked: list[Sample] = []
        for index, raw in enumerate(records):
            try:
                sample = check_record(raw, index, self.path)
                for name in sample.images:
                    if not image_path(image_folder, name).is_file():
                        raise DataError(self.path, raw.line, sample.id,
                                        f"image not found: {image_path(image_folder, name)}")
            except DataError as err:
                self._skip(err)
                continue
            checked.append(sample)
        # tokenize everything now, in chunks with one parallel tokenizer call each: exact lengths for the
        # sampler, and every skip known before the first step
        chunks = range(0, len(checked), self.CHUNK)
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="tokenizing", unit=" chunks", mininterval=1.0)
        for start in chunks:
            part = checked[start:start + self.CHUNK]
            for sample, enc in zip(part, self.format.encode_many([s.turns for s in part])):
                try:
                    ids, labels = self._finish(sample, enc)
                except DataError as err:
                    self._skip(err)
                    continue
                sample.length = len(ids)
                sample.supervised = sum(1 for l in labels if l != IGNORE_INDEX)
                self.samples.append(sample)
        self.skipped.records.sort(key=lambda r: r["line"] or 0)
        if not self.samples:
            raise ValueError(f"{path}: no usable sample ({self.bad} bad, {self.unsupervised} without a supervised "
                             "token)")

    CHUNK = 1024

    def _skip(self, err: DataError) -> None:
        """Unsupervised samples are always skipped; bad ones only with skip_bad. Each is recorded."""
        if "no supervised token" in err.reason or "do not fit in max_length" in err.reason:
            self.unsupervised += 1
        elif not self.skip_bad:
            raise err
        else:
            self.bad += 1
        self.skipped.add(err)

    def _finish(self, sample: Sample, enc: Any) -> tuple[list[int], list[int]]:
        if isinstance(enc, Exception):
            raise DataError(self.path, sample.line, sample.id, str(enc))
        if sum(1 for t in enc.input_ids if t == self.image_token_id) != len(sample.images):
            raise DataError(self.path, sample.line, sample.id,
                            f"the tokenizer did not keep {IMAGE_TOKEN} as one token per image")
        out = expand_and_truncate(enc.input_ids, enc.labels, self.image_token_id, self.per_image, self.max_length)
        if isinstance(out, str):
            raise DataError(self.path, sample.line, sample.id, out)
        return out

    def _tokens(self, sample: Sample) -> tuple[list[int], list[int]]:
        try:
            enc: Any = self.format.encode(sample.turns)
        except ValueError as exc:  # TokenizationMismatch included
            enc = exc
        return self._finish(sample, enc)

    # -- for samplers and reports
    @property
    def lengths(self) -> list[int]:
        return [s.length for s in self.samples]

    @property
    def has_image(self) -> list[bool]:
        return [bool(s.images) for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def _pixels(self, sample: Sample) -> torch.Tensor | None:
        if not sample.images:
            return None
        ip = self.processor.image_processor
        images = []
        for name in sample.images:
            try:
                im = open_image(image_path(self.image_folder, name))
            except (FileNotFoundError, ValueError) as exc:
                raise DataError(self.path, sample.line, sample.id, str(exc)) from None
            images.append(pad_to_square(im, tuple(ip.image_mean)) if self.pad_square else im)
        return ip(images=images, return_tensors="pt")["pixel_values"]

    def __getitem__(self, i: int) -> dict[str, Any]:
        for attempt in range(len(self.samples)):
            sample = self.samples[(i + attempt) % len(self.samples)]
            try:
                pixels = self._pixels(sample)
                ids, labels = self._tokens(sample)  # exact labels, every turn boundary verified by prefix
            except DataError as err:
                if not self.skip_bad:
                    raise
                self._log_skip(err, replaced_by=(i + attempt + 1) % len(self.samples))
                continue
            item = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
            if pixels is not None:
                item["pixel_values"] = pixels
            return item
        raise RuntimeError(f"{self.path}: no sample could be loaded")

    def _log_skip(self, err: DataError, replaced_by: int) -> None:
        """A sample that fails when drawn (an undecodable image, a turn boundary the exact check refuses):
        record it; the next sample takes its place."""
        import sys

        print(f"skipping: {err} (replaced by the next sample)", file=sys.stderr)
        if self.skipped_log:
            rec = {**err.record(), "during": "training", "replaced_by_index": replaced_by}
            with open(self.skipped_log, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")


@dataclass
class Collator:
    """Right-padded batch: ids, labels (-100 on padding), mask, and the images of the samples that have them."""

    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for r, it in enumerate(items):
            n = len(it["input_ids"])
            ids[r, :n] = it["input_ids"]
            labels[r, :n] = it["labels"]
            mask[r, :n] = 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        pixels = [it["pixel_values"] for it in items if "pixel_values" in it]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        return batch


# --------------------------------------------------------------------------- grouping by modality

def modality_grouped_order(lengths: list[int], has_image: list[bool], group: int, seed: int) -> list[int]:
    """A permutation where each run of ``group`` indices (one optimizer step's samples) is all-image or
    all-text, sorted longest first inside the run; the leftovers of both modalities form the last runs.

    The order depends only on the data, ``group`` (the global batch) and ``seed``, so 1 process and
    N processes with the same global batch see the same samples in the same steps.
    """
    rng = random.Random(seed)
    full, rest = [], []
    for modality in (True, False):
        idx = [i for i, m in enumerate(has_image) if m == modality]
        rng.shuffle(idx)
        for k in range(0, len(idx), group):
            chunk = sorted(idx[k:k + group], key=lambda i: -lengths[i])
            (full if len(chunk) == group else rest).append(chunk)
    rng.shuffle(full)
    tail = sorted((i for chunk in rest for i in chunk), key=lambda i: -lengths[i])
    return [i for chunk in full for i in chunk] + tail


class ModalityGroupedSampler(torch.utils.data.Sampler):
    """LLaVA-1.5's ``group_by_modality_length``, deterministic per (seed, epoch)."""

    def __init__(self, lengths: list[int], has_image: list[bool], group: int, seed: int):
        self.lengths, self.has_image, self.group, self.seed = lengths, has_image, group, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        return iter(modality_grouped_order(self.lengths, self.has_image, self.group, self.seed + self.epoch))

