"""Instruction-following benchmark on image questions: suites, builder, and the `if` benchmark.

    focusvlm ifbench build --questions SOURCE --suite paper16 --seed 0 -o bench.jsonl
    focusvlm eval if --bench bench.jsonl --out runs/stock
    focusvlm score if runs/stock

Every question gets every task of the suite. A task's arguments are drawn
with ``random.Random(f"{seed}/{question_id}/{task}")`` so a row does not
depend on the order or number of the other questions, and the final prompt
text is stored in the file: every run answers identical prompts.

Bench file: JSONL, one row per (question, task)::

    {"id": "v1_0/T07", "question_id": "v1_0", "question": "...", "image": "images/v1_0.png",
     "task": "T7", "task_name": "Keyword", "instruction_id": "keywords:existence",
     "kwargs": {"keywords": ["river", "light"]}, "instruction": "...", "prompt": "...",
     "suite": "paper16", "seed": 0}

``image`` is relative to the bench file's folder (or absolute).
"""

from __future__ import annotations

import json
import os
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .benchmarks.common import read_jsonl
from .instructions import ALL_IDS, CHECKERS, InstructionError, validate_kwargs
from .registry import Benchmark
from .runs import atomic_write_text, file_fingerprint
from .samples import Sample

# --------------------------------------------------------------------------- argument drawing
# Ranges chosen for short answers about one image; every draw is stored in the bench file.

KEYWORDS = ("color", "light", "shape", "detail", "background", "center", "texture", "surface", "scene", "object",
            "corner", "pattern", "shadow", "bright", "simple", "visible", "edge", "frame", "view", "space",
            "person", "animal", "nature", "window", "table", "street", "water", "sky", "picture", "moment")
FIRST_WORDS = ("first", "overall", "looking", "here", "the", "this", "in", "from", "notably", "finally")
END_PHRASES = ("Is there anything else I can help with?", "Let me know if you have additional questions.",
               "That is all I can see.", "Hope this helps.", "Any other questions?")
STARTERS = ("In this image", "Looking closely", "My answer", "To answer your question", "Based on the picture",
            "Here is what I see")
LANGUAGES = {"fr": "French", "de": "German", "es": "Spanish", "it": "Italian", "pt": "Portuguese",
             "nl": "Dutch", "ru": "Russian", "ja": "Japanese", "ko": "Korean", "hi": "Hindi"}


def _relation(rng: random.Random) -> str:
    return rng.choice(["less than", "at least"])


def _draw(instruction_id: str, rng: random.Random, question: str) -> dict[str, Any]:
    """Arguments for one task; the ranges favour instructions a short answer can meet."""
    if instruction_id == "keywords:existence":
        return {"keywords": sorted(rng.sample(KEYWORDS, 2))}
    if instruction_id == "keywords:frequency":
        return {"keyword": rng.choice(KEYWORDS), "frequency": rng.randint(1, 3), "relation": _relation(rng)}
    if instruction_id == "keywords:forbidden_words":
        return {"forbidden_words": sorted(rng.sample(KEYWORDS, 2))}
    if instruction_id == "keywords:letter_frequency":
        return {"letter": rng.choice(string.ascii_lowercase), "let_frequency": rng.randint(1, 10),
                "let_relation": _relation(rng)}
    if instruction_id == "language:response_language":
        return {"language": rng.choice(sorted(LANGUAGES))}
    if instruction_id == "length_constraints:number_sentences":
        rel = _relation(rng)
        return {"num_sentences": rng.randint(3, 8) if rel == "less than" else rng.randint(1, 6), "relation": rel}
    if instruction_id == "length_constraints:number_paragraphs":
        return {"num_paragraphs": rng.randint(2, 5)}
    if instruction_id == "length_constraints:number_words":
        rel = _relation(rng)
        return {"num_words": rng.randrange(40, 201, 10) if rel == "less than" else rng.randrange(30, 151, 10),
                "relation": rel}
    if instruction_id == "length_constraints:nth_paragraph_first_word":
        n = rng.randint(2, 4)
        return {"num_paragraphs": n, "nth_paragraph": rng.randint(1, n), "first_word": rng.choice(FIRST_WORDS)}
    if instruction_id == "detectable_content:number_placeholders":
        return {"num_placeholders": rng.randint(1, 4)}
    if instruction_id == "detectable_content:postscript":
        return {"postscript_marker": rng.choice(["P.S.", "P.P.S"])}
    if instruction_id == "detectable_format:number_bullet_lists":
        return {"num_bullets": rng.randint(2, 5)}
    if instruction_id == "detectable_format:number_highlighted_sections":
        return {"num_highlights": rng.randint(1, 4)}
    if instruction_id == "detectable_format:multiple_sections":
        return {"section_spliter": rng.choice(["Section", "SECTION"]), "num_sections": rng.randint(2, 5)}
    if instruction_id == "combination:repeat_prompt":
        return {"prompt_to_repeat": question}
    if instruction_id == "startend:end_checker":
        return {"end_phrase": rng.choice(END_PHRASES)}
    if instruction_id == "change_case:capital_word_frequency":
        return {"capital_frequency": rng.randint(2, 20), "capital_relation": _relation(rng)}
    if instruction_id == "startend:constrained_start":
        return {"starter": rng.choice(STARTERS)}
    return {}


def instruction_text(instruction_id: str, kw: dict[str, Any]) -> str:
    """The sentence appended to the question (focusvlm's own wording)."""
    t = {
        "keywords:existence": lambda: f"Make sure your response includes the words {_and(kw['keywords'])}.",
        "keywords:frequency": lambda: f"The word \"{kw['keyword']}\" should appear {kw['relation']} "
                                      f"{kw['frequency']} times in your response.",
        "keywords:forbidden_words": lambda: f"Do not use the words {_and(kw['forbidden_words'])} anywhere in "
                                            "your response.",
        "keywords:letter_frequency": lambda: f"The letter \"{kw['letter']}\" should appear {kw['let_relation']} "
                                             f"{kw['let_frequency']} times in your response.",
        "language:response_language": lambda: f"Write your whole response in {LANGUAGES.get(kw['language'], kw['language'])}; "
                                              "no other language is allowed.",
        "length_constraints:number_sentences": lambda: f"Your response should contain {kw['relation']} "
                                                       f"{kw['num_sentences']} sentences.",
        "length_constraints:number_paragraphs": lambda: f"Write exactly {kw['num_paragraphs']} paragraphs, separated "
                                                        "from each other by the markdown divider ***",
        "length_constraints:number_words": lambda: f"Answer with {kw['relation']} {kw['num_words']} words.",
        "length_constraints:nth_paragraph_first_word": lambda: (
            f"Write exactly {kw['num_paragraphs']} paragraphs separated by blank lines; paragraph "
            f"{kw['nth_paragraph']} must begin with the word \"{kw['first_word']}\"."),
        "detectable_content:number_placeholders": lambda: (
            f"Include at least {kw['num_placeholders']} placeholders in square brackets, for example [name]."),
        "detectable_content:postscript": lambda: f"End your response with a postscript that starts with "
                                                 f"{kw['postscript_marker']}",
        "detectable_format:number_bullet_lists": lambda: (
            f"Format your answer as exactly {kw['num_bullets']} markdown bullet points, each line starting "
            "with \"* \"."),
        "detectable_format:constrained_response": lambda: (
            "Answer with one of these options: \"My answer is yes.\", \"My answer is no.\", \"My answer is maybe.\""),
        "detectable_format:number_highlighted_sections": lambda: (
            f"Highlight at least {kw['num_highlights']} parts of your answer with markdown, like *this part*."),
        "detectable_format:multiple_sections": lambda: (
            f"Split your response into {kw['num_sections']} sections, each starting with "
            f"\"{kw['section_spliter']} N\" where N is the section's number."),
        "detectable_format:json_format": lambda: "Give your entire output in JSON format (markdown code fences "
                                                 "are allowed).",
        "detectable_format:title": lambda: "Give your answer a title wrapped in double angle brackets, such as "
                                           "<<a title>>.",
        "combination:two_responses": lambda: "Give two different responses, separated by six asterisks: ******",
        "combination:repeat_prompt": lambda: "First repeat the request word for word without change, then give "
                                             "your answer. Do not say anything before repeating the request.",
        "startend:end_checker": lambda: f"Finish your response with this exact phrase: {kw['end_phrase']} "
                                        "Nothing else may follow it.",
        "startend:quotation": lambda: "Wrap your entire response in double quotation marks.",
        "change_case:capital_word_frequency": lambda: (
            f"Words written in all capital letters should appear {kw['capital_relation']} "
            f"{kw['capital_frequency']} times in your response."),
        "change_case:english_capital": lambda: "Your entire response must be in English and in capital letters "
                                               "only.",
        "change_case:english_lowercase": lambda: "Your entire response must be in English and in lowercase "
                                                 "letters only; no capital letters are allowed.",
        "punctuation:no_comma": lambda: "Do not use any commas in your response.",
        "startend:constrained_start": lambda: f"Begin your response with the phrase \"{kw['starter']}\".",
    }
    return t[instruction_id]()


def _and(words) -> str:
    quoted = [f"\"{w}\"" for w in words]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


# --------------------------------------------------------------------------- suites

@dataclass(frozen=True)
class Task:
    key: str  # "T1"...
    name: str
    instruction_id: str
    kwargs: dict | None = None  # fixed arguments (None: drawn per question)
    template: str | None = None  # own instruction wording, str.format(**kwargs)


PAPER16 = (
    ("Remove commas", "punctuation:no_comma"),
    ("Lowercase", "change_case:english_lowercase"),
    ("Uppercase", "change_case:english_capital"),
    ("Placeholder", "detectable_content:number_placeholders"),
    ("Postscript", "detectable_content:postscript"),
    ("Title", "detectable_format:title"),
    ("Keyword", "keywords:existence"),
    ("Highlights", "detectable_format:number_highlighted_sections"),
    ("JSON", "detectable_format:json_format"),
    ("Sections", "detectable_format:multiple_sections"),
    ("Bullet points", "detectable_format:number_bullet_lists"),
    ("Sentence count", "length_constraints:number_sentences"),
    ("Word count", "length_constraints:number_words"),
    ("Dual response", "combination:two_responses"),
    ("Ending", "startend:end_checker"),
    ("Starting", "startend:constrained_start"),
)


def suite(name_or_path: str) -> tuple[str, list[Task]]:
    """(suite name, tasks) for ``paper16``, ``ifeval-all`` or a YAML file."""
    if name_or_path == "paper16":
        return "paper16", [Task(f"T{i}", n, iid) for i, (n, iid) in enumerate(PAPER16, 1)]
    if name_or_path == "ifeval-all":
        return "ifeval-all", [Task(f"T{i}", iid.split(":")[1], iid) for i, iid in enumerate(ALL_IDS, 1)]
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
        return _suite_file(path)
    raise ValueError(f"unknown suite {name_or_path!r}: use paper16, ifeval-all or a YAML file")


def _suite_file(path: Path) -> tuple[str, list[Task]]:
    """YAML: ``{name: str, tasks: [{id: ..., name: ..., kwargs: {...}, instruction: "... {arg} ..."}]}``."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), list) or not data["tasks"]:
        raise ValueError(f"{path}: needs a non-empty `tasks:` list")
    tasks = []
    for n, item in enumerate(data["tasks"], 1):
        where = f"{path}: task {n}"
        if not isinstance(item, dict) or "id" not in item:
            raise ValueError(f"{where}: each task needs an `id`")
        unknown = set(item) - {"id", "name", "kwargs", "instruction"}
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
        if item["id"] not in CHECKERS:
            raise ValueError(f"{where}: unknown instruction id {item['id']!r}")
        kwargs = item.get("kwargs")
        if kwargs is not None:
            try:
                validate_kwargs(item["id"], kwargs, prompt="x")
            except InstructionError as exc:
                raise ValueError(f"{where}: {exc}") from exc
        tasks.append(Task(f"T{n}", str(item.get("name") or item["id"]), item["id"], kwargs, item.get("instruction")))
    return str(data.get("name") or path.stem), tasks


# --------------------------------------------------------------------------- question sources

@dataclass(frozen=True)
class Question:
    id: str
    image: Path
    question: str
    where: str  # "file:line" for error messages
    description: str | None = None  # a true description of the image (for --mode given-description)


def read_questions(source: str | Path) -> list[Question]:
    """MM-Vet folder (mm-vet.json + images/), LLaVA-Bench (questions.jsonl + images/) or generic JSONL."""
    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"question source not found: {src}")
    if src.is_dir():
        if (src / "mm-vet.json").is_file():
            return _mmvet(src / "mm-vet.json", src / "images")
        if (src / "questions.jsonl").is_file():
            return _jsonl(src / "questions.jsonl", src / "images")
        raise ValueError(f"{src}: expected mm-vet.json (MM-Vet) or questions.jsonl (LLaVA-Bench) inside")
    if src.suffix == ".json":
        return _mmvet(src, src.parent / "images")
    images = src.parent / "images"
    return _jsonl(src, images if images.is_dir() else src.parent)


def _mmvet(path: Path, images: Path) -> list[Question]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object of question id -> {{imagename, question}}")
    out = []
    for qid, row in data.items():
        where = f"{path}: entry {qid!r}"
        if not isinstance(row, dict) or not row.get("imagename") or not row.get("question"):
            raise ValueError(f"{where}: needs `imagename` and `question`")
        out.append(Question(str(qid), images / row["imagename"], str(row["question"]), where))
    return out


def _jsonl(path: Path, images: Path) -> list[Question]:
    out = []
    for n, row in read_jsonl(path, {}):
        where = f"{path}:{n}"
        qid = row.get("id", row.get("question_id"))
        question = row.get("question", row.get("text"))
        image = row.get("image")
        missing = [k for k, v in (("id", qid), ("image", image), ("question", question)) if v in (None, "")]
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(missing)} (need id, image, question; "
                             "LLaVA-Bench's question_id/text also work)")
        img = Path(image)
        if not img.is_absolute():
            img = (images / img) if (images / img).exists() else (path.parent / img)
        description = row.get("description")
        out.append(Question(str(qid), img, str(question), where, None if description is None else str(description)))
    return out


# --------------------------------------------------------------------------- builder

def build_rows(questions: list[Question], suite_name: str, tasks: list[Task], seed: int,
               base_dir: Path, check_images: bool = True) -> list[dict]:
    seen: dict[str, str] = {}
    rows = []
    for q in questions:
        if q.id in seen:
            raise ValueError(f"{q.where}: duplicate question id {q.id!r} (first at {seen[q.id]})")
        seen[q.id] = q.where
        if check_images and not q.image.is_file():
            raise FileNotFoundError(f"{q.where}: image not found: {q.image}")
        for task in tasks:
            rng = random.Random(f"{seed}/{q.id}/{task.key}/{task.instruction_id}")
            kwargs = dict(task.kwargs) if task.kwargs is not None else _draw(task.instruction_id, rng, q.question)
            if task.instruction_id == "combination:repeat_prompt":
                kwargs.setdefault("prompt_to_repeat", q.question)
            try:
                text = task.template.format(**kwargs) if task.template else instruction_text(task.instruction_id, kwargs)
            except KeyError as exc:
                raise ValueError(f"suite {suite_name}, {task.key}: instruction template names unknown argument {exc}")
            rows.append({
                "id": f"{q.id}/{task.key}", "question_id": q.id, "question": q.question,
                "image": _rel(q.image, base_dir), "task": task.key, "task_name": task.name,
                "instruction_id": task.instruction_id, "kwargs": kwargs, "instruction": text,
                "prompt": f"{q.question.strip()}\n{text}", "suite": suite_name, "seed": seed,
                **({} if q.description is None else {"description": q.description}),
            })
    return rows


def _rel(path: Path, base: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), base.resolve())
    except ValueError:  # another drive on Windows
        return str(path.resolve())


def build(source: str | Path, suite_name: str, seed: int, out: str | Path, limit: int | None = None) -> list[dict]:
    out = Path(out)
    name, tasks = suite(suite_name)
    questions = read_questions(source)
    if not questions:
        raise ValueError(f"{source}: no questions in it (the file is empty); nothing to build, {out} not written")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit {limit}: must be >= 1")
        questions = questions[:limit]
    rows = build_rows(questions, name, tasks, seed, out.parent)
    if not rows:
        raise ValueError(f"suite {name} has no tasks; nothing to build, {out} not written")
    # temp file + rename: a crash or an error never leaves a half-written (or empty) bench file behind
    atomic_write_text(out, "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows))
    return rows


REQUIRED = ("id", "image", "prompt", "instruction_id", "kwargs", "task")


def read_bench(path: str | Path) -> list[dict]:
    """Rows of a bench file, validated; errors name the line. ``image`` becomes absolute."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"bench file not found: {path}")
    rows, seen = [], set()
    for n, row in read_jsonl(path, {}):
        where = f"{path}:{n}"
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
        if row["instruction_id"] not in CHECKERS:
            raise ValueError(f"{where}: unknown instruction id {row['instruction_id']!r}")
        try:
            validate_kwargs(row["instruction_id"], row["kwargs"], row.get("question"))
        except InstructionError as exc:
            raise ValueError(f"{where}: {exc}") from exc
        if row["id"] in seen:
            raise ValueError(f"{where}: duplicate id {row['id']!r}")
        seen.add(row["id"])
        img = Path(row["image"])
        row["image"] = str(img if img.is_absolute() else (path.parent / img))
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


# --------------------------------------------------------------------------- the `if` benchmark

class IFBenchmark(Benchmark):
    name = "if"
    description = "instruction following on image questions (Table 1): built with `focusvlm ifbench build`"
    default_max_new_tokens = 1024

    def add_eval_args(self, parser) -> None:
        parser.add_argument("--bench", type=Path, required=True, help="bench.jsonl from `focusvlm ifbench build`")

    def load_samples(self, args):
        meta_keys = ("question_id", "task", "task_name", "instruction_id", "kwargs", "question", "description")
        return [Sample(id=r["id"], image=r["image"], prompt=r["prompt"], meta={k: r.get(k) for k in meta_keys})
                for r in read_bench(args.bench)]

    def fingerprint(self, args) -> Any:
        return {"bench": file_fingerprint(args.bench)}

    def score(self, run_dir, args=None) -> dict:
        from .ifreport import score_run

        return score_run(Path(run_dir))

    def compare(self, run_dirs, out, names=None):
        from .ifreport import compare_runs

        return compare_runs([Path(d) for d in run_dirs], out, names=names)


BENCHMARK = IFBenchmark()
