"""easy-VQA (PyPI ``easy-vqa``) as LLaVA training and evaluation data, read offline from the wheel.

easy-VQA: 64x64 PNGs of one coloured shape on a plain background (4,000 train / 1,000 test
images, 38,575 / 9,673 questions). Every answer is one word: a colour (8), a shape (3), yes/no.

* ``read_split(split)``: every question as a ``VQAItem`` (id, image path relative to the data
  root, question, answer, question type).
* ``image_labels(items)``: each image's (colour, shape), read off its own questions; every
  question's claim is checked against the result, so a misparse fails loudly.
* ``stage1_records`` / ``stage2_records`` / ``test_records``: LLaVA's JSON conversation format
  (``{"id", "image", "conversations": [{"from": "human", ...}, {"from": "gpt", ...}]}``).
* ``test_items(sample, seed)``: the fixed evaluation sample.
* ``write_easyvqa(folder)``: writes the files and returns their paths; images stay in the wheel
  (``image_folder`` is easy-vqa's own ``data/`` folder, ``image`` fields are relative to it).

Everything is deterministic: the only randomness comes from ``random.Random(f"{seed}/...")``
keyed per image, so a record does not depend on the order or number of the others.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

from ..models import IMAGE_TOKEN

COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
YES_NO = ("no", "yes")
QUESTION_TYPES = ("color", "shape", "yes/no")
SPLITS = ("train", "test")

# LLaVA-1.5's instruction for short-answer VQA data (VQAv2, GQA); also used at evaluation
SHORT_ANSWER = "Answer the question using a single word or phrase."
CAPTION_PROMPT = "Describe the image briefly."

# stage-1 captions: one per image, the template drawn per image (several phrasings, so the projector
# learns to carry colour and shape rather than one fixed sentence)
CAPTION_TEMPLATES = (
    "A {color} {shape}.",
    "A {color} {shape} on a plain background.",
    "The image shows a {color} {shape}.",
    "A picture of a {color} {shape}.",
    "There is a {color} {shape} in the image.",
    "A simple drawing of a {color} {shape}.",
)

_COLOR_RE = re.compile(r"\b(" + "|".join(COLORS) + r")\b")
_SHAPE_RE = re.compile(r"\b(" + "|".join(SHAPES) + r")\b")
# easy-VQA's negated yes/no forms: "is there not a ...", "does the image not contain ...", "is no ... present"
_NEGATION_RE = re.compile(r"\bnot\b|^is no\b")


@dataclass(frozen=True)
class VQAItem:
    """One easy-VQA question. ``image`` is relative to ``data_root()``."""
    qid: str
    split: str
    image_id: int
    image: str
    question: str
    answer: str
    qtype: str


@dataclass(frozen=True)
class EasyVQAFiles:
    """What ``write_easyvqa`` wrote (``image_folder`` is where the ``image`` fields point)."""
    image_folder: Path
    captions: Path        # stage 1 (plain): <image> -> caption
    instruct: Path        # stage 2: multi-turn short-answer questions
    test: Path            # the test sample as single-turn conversations (answers included)
    test_questions: Path  # the same sample as JSONL (id, image, question, answer, type) for eval/ifbench
    manifest: Path        # counts, seed and settings


def data_root() -> Path:
    """easy-vqa's ``data/`` folder inside the installed wheel."""
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the demo data needs the PyPI package `easy-vqa`: pip install easy-vqa==1.0")
    root = Path(list(spec.submodule_search_locations)[0]) / "data"
    for split in SPLITS:
        if not (root / split / "questions.json").is_file():
            raise RuntimeError(f"{root / split} holds no questions.json; reinstall easy-vqa")
    return root


def question_type(answer: str) -> str:
    """'color' / 'shape' / 'yes/no', by the answer's vocabulary (easy-VQA's answer sets do not overlap)."""
    if answer in COLORS:
        return "color"
    if answer in SHAPES:
        return "shape"
    if answer in YES_NO:
        return "yes/no"
    raise ValueError(f"easy-VQA answer {answer!r} is not a known colour, shape or yes/no")


def read_split(split: str) -> list[VQAItem]:
    """All questions of ``split`` in the file's order; ids are ``{split}-{index in questions.json}``."""
    if split not in SPLITS:
        raise ValueError(f"unknown easy-VQA split {split!r}; use one of {', '.join(SPLITS)}")
    root = data_root()
    rows = json.loads((root / split / "questions.json").read_text())
    items = []
    for n, (question, answer, image_id) in enumerate(rows):
        image = f"{split}/images/{int(image_id)}.png"
        items.append(VQAItem(f"{split}-{n}", split, int(image_id), image, _sentence(question), answer,
                             question_type(answer)))
    return items


def _sentence(question: str) -> str:
    """easy-VQA questions are all lowercase; capitalise the first letter as a person would type it."""
    question = question.strip()
    return question[:1].upper() + question[1:]


# --------------------------------------------------------------------------- labels per image

def _claims(question: str, answer: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(facts that hold, facts that do not) about the image, as ("color"|"shape", word) pairs."""
    q = question.lower()
    colors, shapes = _COLOR_RE.findall(q), _SHAPE_RE.findall(q)
    named = [("color", c) for c in colors] + [("shape", s) for s in shapes]
    if answer in COLORS:
        return named + [("color", answer)], []
    if answer in SHAPES:
        return named + [("shape", answer)], []
    # yes/no: "is there a red shape?" yes -> red; "is there not a circle?" yes -> not a circle
    holds = (answer == "yes") != bool(_NEGATION_RE.search(q))
    return (named, []) if holds else ([], named)


def question_facts(items: Iterable[VQAItem]) -> dict[int, dict[str, tuple[set[str], set[str]]]]:
    """Per image and kind ("color"/"shape"): (words its questions state, words they deny)."""
    out: dict[int, dict[str, tuple[set[str], set[str]]]] = {}
    for it in items:
        yes, no = _claims(it.question, it.answer)
        per = out.setdefault(it.image_id, {"color": (set(), set()), "shape": (set(), set())})
        for kind, word in yes:
            per[kind][0].add(word)
        for kind, word in no:
            per[kind][1].add(word)
    return out


def decided(stated: set[str], denied: set[str], vocab: tuple[str, ...]) -> str | None:
    """The one word the questions leave possible, or None (about 7 % of images: easy-VQA samples 32 % of
    the open questions and 8 % of the yes/no ones per image, so some images are never asked enough)."""
    left = stated if stated else set(vocab) - denied
    return next(iter(left)) if len(left) == 1 else None


# easy-VQA's generator fills the shape with one of these exact RGB values (its color.py) on a
# near-white background (each channel 230-255), drawn at 2x and downsampled bilinearly
PALETTE = {"black": (0, 0, 0), "gray": (128, 128, 128), "red": (255, 0, 0), "green": (0, 255, 0),
           "blue": (0, 0, 255), "yellow": (255, 255, 0), "teal": (0, 128, 128), "brown": (165, 42, 42)}


def pixel_labels(path: str | Path) -> tuple[str, str]:
    """(colour, shape) read from the picture itself, for images whose questions leave one undecided.

    Colour: the palette entry closest to the shape's pixels (the most common nearest entry).
    Shape: a triangle (the generator's have a flat bottom and the apex up) has a quarter of its pixels
    in the upper half of its bounding box (upper : lower = 1 : 3), a circle and a rectangle half; a rectangle fills its
    bounding box, a circle about pi/4 of it (up to 0.91 for the smallest, 8-pixel circles).
    Checked on every image whose questions decide the label (4,791 shapes, 4,634 colours; benchmarks/demo/check_labels.log): all agree.
    """
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.int32)  # (H, W, 3)
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    values, counts = np.unique(packed, return_counts=True)
    mode = int(values[counts.argmax()])  # the shape covers at most a quarter of the picture
    background = np.array([mode >> 16, (mode >> 8) & 255, mode & 255])
    # halfway between the background and the shape: edge pixels count if they are mostly shape
    far = np.abs(rgb - background).max(-1)
    mask = far > far.max() / 2
    if mask.sum() < 4:
        raise ValueError(f"{path}: no shape found (the picture is all background)")
    palette = np.array(list(PALETTE.values()))
    dist = ((rgb[mask][:, None, :] - palette[None]) ** 2).sum(-1)  # (pixels, 8)
    color = list(PALETTE)[int(np.bincount(dist.argmin(1), minlength=len(palette)).argmax())]
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    half = box.shape[0] // 2
    upper_to_lower = box[:half].sum() / max(int(box[box.shape[0] - half:].sum()), 1)
    if upper_to_lower < 0.6:    # measured: triangles 0.29-0.39, circles and rectangles 0.87-1.14
        shape = "triangle"
    elif box.mean() > 0.95:  # measured: rectangles 0.99-1.0, circles 0.78-0.91
        shape = "rectangle"
    else:
        shape = "circle"
    return color, shape


def image_labels(items: Iterable[VQAItem], root: Path | None = None) -> dict[int, tuple[str, str]]:
    """Each image's (colour, shape): from its questions where they decide it, else from its pixels
    (``pixel_labels``). Raises if any question contradicts the result."""
    items = list(items)
    facts = question_facts(items)
    paths = {it.image_id: it.image for it in items}
    labels: dict[int, tuple[str, str]] = {}
    for image_id, per in facts.items():
        color = decided(*per["color"], COLORS)
        shape = decided(*per["shape"], SHAPES)
        if color is None or shape is None:
            seen = pixel_labels((root or data_root()) / paths[image_id])
            color, shape = color or seen[0], shape or seen[1]
        labels[image_id] = (color, shape)
    for it in items:  # every claim must agree with the labels (catches a misread form or a wrong pixel read)
        yes, no = _claims(it.question, it.answer)
        have = {("color", labels[it.image_id][0]), ("shape", labels[it.image_id][1])}
        if any(c not in have for c in yes) or any(c in have for c in no):
            raise ValueError(f"{it.qid}: {it.question!r} -> {it.answer!r} contradicts the image's labels "
                             f"{labels[it.image_id]}")
    return labels


# --------------------------------------------------------------------------- LLaVA records

def caption(color: str, shape: str, rng: random.Random) -> str:
    return rng.choice(CAPTION_TEMPLATES).format(color=color, shape=shape)


def _by_image(items: Iterable[VQAItem]) -> dict[int, list[VQAItem]]:
    out: dict[int, list[VQAItem]] = {}
    for it in items:
        out.setdefault(it.image_id, []).append(it)
    return dict(sorted(out.items()))


def stage1_records(items: list[VQAItem], seed: int = 0) -> list[dict]:
    """One caption conversation per image (LLaVA stage 1, ``plain`` format keeps only image + caption)."""
    labels = image_labels(items)
    records = []
    for image_id, group in _by_image(items).items():
        rng = random.Random(f"{seed}/caption/{group[0].split}/{image_id}")
        color, shape = labels[image_id]
        records.append({"id": f"easyvqa-{group[0].split}-{image_id}-caption", "image": group[0].image,
                        "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{CAPTION_PROMPT}"},
                                          {"from": "gpt", "value": caption(color, shape, rng)}]})
    return records


def _turn(question: str, first: bool) -> str:
    text = f"{question}\n{SHORT_ANSWER}"
    return f"{IMAGE_TOKEN}\n{text}" if first else text


def stage2_records(items: list[VQAItem], seed: int = 0, turns: int = 4) -> list[dict]:
    """Short-answer conversations: each image's questions in a seeded order, ``turns`` per conversation
    (0 = all of an image's questions in one). The image comes once, in the first human turn; every
    question carries LLaVA-1.5's short-answer instruction, as its VQA data does."""
    if turns < 0:
        raise ValueError(f"turns must be >= 0 (0 = all questions of an image in one conversation), got {turns}")
    records = []
    for image_id, group in _by_image(items).items():
        rng = random.Random(f"{seed}/order/{group[0].split}/{image_id}")
        order = list(group)
        rng.shuffle(order)
        size = turns or len(order)
        for k in range(0, len(order), size):
            chunk = order[k:k + size]
            conv = []
            for j, it in enumerate(chunk):
                conv.append({"from": "human", "value": _turn(it.question, j == 0)})
                conv.append({"from": "gpt", "value": it.answer})
            records.append({"id": f"easyvqa-{group[0].split}-{image_id}-{k // size}", "image": group[0].image,
                            "conversations": conv, "question_ids": [it.qid for it in chunk],
                            "question_types": [it.qtype for it in chunk]})
    return records


# Sentence answers (LLaVA's conversation data answers in sentences when no short-answer instruction is given):
# descriptions of the picture, and easy-VQA questions asked without SHORT_ANSWER, answered in a sentence that
# states the fact. They teach the format a question alone gets, never a verifiable formatting instruction.
DESCRIBE_PROMPTS = ("Describe the image.", "What do you see in this picture?", "What is shown in the image?",
                    "Tell me about this picture.")
DESCRIPTIONS = ("The image shows a {color} {shape} on a plain background.",
                "It is a picture of a single {color} {shape} on a plain background.",
                "I see one {color} {shape} in the middle of a plain background.")
SENTENCE_ANSWERS = {
    "color": ("The {shape} is {color}.", "The shape in the image is {color}."),
    "shape": ("It is a {shape}.", "The image shows a {color} {shape}."),
    "yes": ("Yes. The image shows a {color} {shape}.",),
    "no": ("No. The image shows a {color} {shape}.",),
}


def _picture_conversations(items: list[VQAItem], count: int, rng: random.Random, kind: str,
                           pick: Callable[[int, VQAItem, random.Random], tuple[str, str]]) -> list[dict]:
    """``count`` single-turn conversations about pictures of ``items`` drawn with ``rng``; ``pick(n, item, rng)``
    gives the n-th one's prompt and answer template (``{color}``, ``{shape}`` filled from the picture's labels)."""
    labels = image_labels(items)
    records = []
    for n in range(count):
        it = items[rng.randrange(len(items))]
        color, shape = labels[it.image_id]
        prompt, answer = pick(n, it, rng)
        records.append({"id": f"easyvqa-{it.split}-{it.image_id}-{kind}-{n}", "image": it.image,
                        "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}"},
                                          {"from": "gpt", "value": answer.format(color=color, shape=shape)}]})
    return records


def _description(rng: random.Random) -> tuple[str, str]:
    return rng.choice(DESCRIBE_PROMPTS), rng.choice(DESCRIPTIONS)


def description_records(items: list[VQAItem], count: int, seed: int = 0) -> list[dict]:
    """``count`` single-turn conversations asking for a description of one of ``items``' pictures (drawn with
    ``random.Random(f"{seed}/descriptions")``), answered by a sentence naming its colour and shape: what
    describe-then-answer asks the model for, without the question answers' fixed sentences."""
    return _picture_conversations(items, count, random.Random(f"{seed}/descriptions"), "description",
                                  lambda n, it, rng: _description(rng))


def sentence_records(items: list[VQAItem], count: int, seed: int = 0) -> list[dict]:
    """``count`` single-turn conversations answered in sentences, alternately a description of an image and
    one of ``items``' questions (without the short-answer instruction) answered in a sentence; the question
    (and its image) drawn with ``random.Random(f"{seed}/sentences")``."""
    def pick(n: int, it: VQAItem, rng: random.Random) -> tuple[str, str]:
        if n % 2 == 0:
            return _description(rng)
        return it.question, rng.choice(SENTENCE_ANSWERS[it.answer if it.qtype == "yes/no" else it.qtype])

    return _picture_conversations(items, count, random.Random(f"{seed}/sentences"), "sentence", pick)


def interleave(short: list[dict], per_batch: int, extras: list[list[dict]], steps: int) -> list[dict]:
    """Records in training order for ``steps`` batches: each batch is ``per_batch`` consecutive ``short``
    records followed by the next record of every list in ``extras`` (a list shorter than ``steps`` is
    cycled). Train with ``shuffle: false`` and a batch of ``per_batch + len(extras)``."""
    if len(short) < steps * per_batch:
        raise ValueError(f"{steps} batches of {per_batch} need {steps * per_batch} short-answer records, "
                         f"got {len(short)}")
    if any(not extra for extra in extras):
        raise ValueError("an extra record list of the stage-2 mix is empty")
    out: list[dict] = []
    for step in range(steps):
        out += short[step * per_batch:(step + 1) * per_batch]
        out += [extra[step % len(extra)] for extra in extras]
    return out


def is_negated(question: str) -> bool:
    """Whether an easy-VQA yes/no question is asked in the negative ("Is there not a ...", "Is no ... present?")."""
    return bool(_NEGATION_RE.search(question.lower()))


def question_attribute(question: str) -> str:
    """What an easy-VQA yes/no question asks about, "color" or "shape": it names one colour ("Is there a red
    shape?") or one shape ("Does the image contain a circle?"), never both."""
    words = set(re.findall(r"[a-z]+", question.lower()))
    colors, shapes = words & set(COLORS), words & set(SHAPES)
    if len(colors) + len(shapes) != 1:
        raise ValueError(f"not an easy-VQA yes/no question about one colour or one shape: {question!r}")
    return "color" if colors else "shape"


def balance_yes_no(items: list[VQAItem], seed: int = 0) -> list[VQAItem]:
    """The items with as many "yes" as "no" within each kind of yes/no question: positive or negated, asking
    about a colour or about a shape (``question_attribute``).

    easy-VQA asks mostly about absent attributes: 82 % of its positive yes/no questions are answered "no"
    and 82 % of its negated ones "yes", so the question's form alone scores 82 %; a model trained on that
    mix learned the form and not the picture (yes/no 86 %, colour and shape 100 %). Balancing per form alone
    is not enough: colour questions outnumber shape questions 4 to 1 and are mostly "no", so the form's
    balance left 69 % of positive shape questions answered "yes" (and 70 % of negated ones "no"), and a
    256-token twin learned the comparison for colour (100 %) while answering every shape question from that
    prior (27 % on the test sample, whose shapes are mostly absent; RESULTS.md, issue 31). Here, per form
    and attribute, the majority answer is sampled down (seeded) to the minority's count; colour and shape
    questions and the order of what is kept are unchanged.
    """
    groups: dict[tuple[str, bool, str], list[int]] = {}
    for n, it in enumerate(items):
        if it.qtype == "yes/no":
            groups.setdefault((question_attribute(it.question), is_negated(it.question), it.answer), []).append(n)
    drop: set[int] = set()
    for attribute in ("color", "shape"):
        for negated in (False, True):
            yes, no = groups.get((attribute, negated, "yes"), []), groups.get((attribute, negated, "no"), [])
            major, minor = (yes, no) if len(yes) > len(no) else (no, yes)
            keep = set(random.Random(f"{seed}/balance/{attribute}/{negated}").sample(major, len(minor)))
            drop.update(n for n in major if n not in keep)
    return [it for n, it in enumerate(items) if n not in drop]


def curriculum(items: list[VQAItem], size: int, lead: int, yes_no_share: float, seed: int = 0) -> list[VQAItem]:
    """``size`` of the items in training order: ``lead`` colour and shape questions first, then the rest
    with yes/no questions at ``yes_no_share`` of it and colour and shape making up the remainder (seeded).

    Colour and shape are read straight off the picture and learned in a few dozen steps; comparing the
    picture with the question's word is learned much later, and (measured on the demo model) only once the
    model already names the picture's colour and shape: a twin trained on the three types mixed from the
    start answered yes/no at chance after 300 steps, one continued on yes/no after learning colour and
    shape learned it.
    """
    if not 0 <= yes_no_share <= 1:
        raise ValueError(f"yes/no share must be between 0 and 1, got {yes_no_share}")
    if not 0 <= lead <= size:
        raise ValueError(f"curriculum lead must be between 0 and its size {size}, got {lead}")
    rng = random.Random(f"{seed}/curriculum")
    yes_no = [it for it in items if it.qtype == "yes/no"]
    seen = [it for it in items if it.qtype != "yes/no"]  # colour and shape: what the picture shows
    rng.shuffle(yes_no)
    rng.shuffle(seen)
    n_yes_no = round((size - lead) * yes_no_share)
    if n_yes_no > len(yes_no) or size - n_yes_no > len(seen):
        raise ValueError(f"a curriculum of {size} questions ({n_yes_no} yes/no) needs more than the "
                         f"{len(yes_no)} yes/no and {len(seen)} colour/shape questions given")
    tail = yes_no[:n_yes_no] + seen[lead:size - n_yes_no]
    rng.shuffle(tail)
    return seen[:lead] + tail


def test_items(sample: int | None = 2000, seed: int = 0) -> list[VQAItem]:
    """The fixed test sample: ``sample`` questions drawn with ``random.Random(seed)`` (None or 0 =
    all 9,673), in the file's order."""
    items = read_split("test")
    if not sample or sample >= len(items):
        return items
    picked = sorted(random.Random(f"{seed}/test-sample").sample(range(len(items)), sample))
    return [items[i] for i in picked]


def test_records(items: list[VQAItem]) -> list[dict]:
    return [{"id": it.qid, "image": it.image, "question_type": it.qtype,
             "conversations": [{"from": "human", "value": _turn(it.question, True)},
                               {"from": "gpt", "value": it.answer}]} for it in items]


def true_description(color: str, shape: str) -> str:
    """The picture's ground-truth description (what a text-only model is given in place of the image)."""
    return DESCRIPTIONS[0].format(color=color, shape=shape)


def question_rows(items: list[VQAItem], root: Path | None = None) -> list[dict]:
    """JSONL rows (id, absolute image path, question, answer, type, the image's true description): the input
    of `focusvlm ifbench build`."""
    root = root or data_root()
    labels = image_labels(items, root)
    return [{"id": it.qid, "image": str(root / it.image), "question": it.question, "answer": it.answer,
             "type": it.qtype, "image_id": it.image_id, "description": true_description(*labels[it.image_id])}
            for it in items]


def train_subset(items: list[VQAItem], images: int | None, seed: int = 0) -> list[VQAItem]:
    """The questions of ``images`` train images drawn with a seed (None = all), in the file's order."""
    if images is None:
        return items
    ids = sorted({it.image_id for it in items})
    if not 0 < images <= len(ids):
        raise ValueError(f"images must be in 1..{len(ids)}, got {images}")
    keep = set(random.Random(f"{seed}/train-images").sample(ids, images))
    return [it for it in items if it.image_id in keep]


def ordered_records(questions: list[VQAItem], seed: int = 0) -> list[dict]:
    """One single-question record per item, in the items' order (a curriculum is a training order;
    ``stage2_records`` groups by image)."""
    records = stage2_records(questions, seed, turns=1)
    position = {it.qid: n for n, it in enumerate(questions)}
    return sorted(records, key=lambda r: position[r["question_ids"][0]])


def write_easyvqa(folder: str | Path, seed: int = 0, turns: int = 4, train_images: int | None = None,
                  test_sample: int | None = 2000, balance: bool = False,
                  curriculum_size: int | None = None, curriculum_lead: int = 0,
                  yes_no_share: float = 0.5) -> EasyVQAFiles:
    """Write the stage-1 captions, stage-2 conversations and the test sample into ``folder``.

    ``balance``: stage 2 keeps as many "yes" as "no" answers per question form (``balance_yes_no``).
    ``curriculum_size``: then stage 2 is that many one-question records in training order (``curriculum``
    with ``curriculum_lead`` and ``yes_no_share``; train them with ``shuffle: false``). None = every
    question, in image order.
    ``train_images``: use only that many train images (seeded; None = all 4,000).
    ``test_sample``: size of the fixed test sample (None = all 9,673 questions).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    root = data_root()
    train = train_subset(read_split("train"), train_images, seed)
    test = test_items(test_sample, seed)
    questions = balance_yes_no(train, seed) if balance else train
    if curriculum_size is not None:
        if turns != 1:
            raise ValueError(f"a curriculum orders single questions: turns must be 1, got {turns}")
        questions = curriculum(questions, curriculum_size, curriculum_lead, yes_no_share, seed)
    captions = stage1_records(train, seed)
    instruct = ordered_records(questions, seed) if curriculum_size is not None else stage2_records(questions, seed, turns)
    files = EasyVQAFiles(image_folder=root, captions=folder / "easyvqa_captions.json",
                         instruct=folder / "easyvqa_instruct.json", test=folder / "easyvqa_test.json",
                         test_questions=folder / "easyvqa_test_questions.jsonl", manifest=folder / "easyvqa_manifest.json")
    files.captions.write_text(json.dumps(captions, indent=1))
    files.instruct.write_text(json.dumps(instruct, indent=1))
    files.test.write_text(json.dumps(test_records(test), indent=1))
    files.test_questions.write_text("".join(json.dumps(r) + "\n" for r in question_rows(test, root)))
    counts = {t: sum(it.qtype == t for it in test) for t in QUESTION_TYPES}
    manifest = {"source": "easy-vqa (PyPI) 1.0", "image_folder": str(root), "seed": seed, "turns": turns,
                "train_images": len({it.image_id for it in train}), "train_questions": len(questions),
                "yes_no_balanced": balance,
                "curriculum": None if curriculum_size is None else {
                    "size": curriculum_size, "lead": curriculum_lead, "yes_no_share": yes_no_share},
                "stage1_records": len(captions), "stage2_records": len(instruct),
                "test_questions": len(test), "test_by_type": counts, "short_answer_instruction": SHORT_ANSWER,
                "files": {k: str(v) for k, v in asdict(files).items()}}
    files.manifest.write_text(json.dumps(manifest, indent=1))
    return files
