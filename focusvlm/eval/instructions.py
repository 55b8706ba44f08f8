"""Verifiable-instruction checkers (IFEval's 25 ids + ``startend:constrained_start``).

    from focusvlm.eval.instructions import check
    check("punctuation:no_comma", "No commas here")                      # True
    check("keywords:existence", text, {"keywords": ["cat", "sofa"]})
    check("change_case:english_lowercase", text, loose=True)

Written for focusvlm rather than imported from lm-eval (see docs/eval-if.md):
lm-eval pulls datasets/evaluate/peft/sacrebleu/scikit-learn and tries to
download NLTK data when its IFEval module is imported. The verdicts follow
lm-eval's IFEval implementation, quirks included, so numbers compare with
what the community reports; ``tests/test_if_checkers.py`` holds a parity test
that runs whenever lm-eval is importable.

Behaviour worth knowing:

* An empty (or white-space) response fails every instruction.
* ``loose=True`` passes when any of eight variants of the response passes:
  the response, without its first line, without its last line, without
  both, and each of those four with every ``*`` removed.
* Case checkers also require the text to be detected as English; language
  detection (langdetect) is seeded, and text it cannot classify counts as
  passing the language part, as in IFEval.
* Patterns taken from the arguments (keywords, section words, postscript
  markers) are used as regular expressions, as in IFEval.
* Sentences are counted with NLTK's punkt_tab model when it is installed
  (``python -m nltk.downloader punkt_tab``); otherwise with a rule-based
  splitter (:func:`fallback_sentences`) after a one-time warning. Reports
  record which one ran (:func:`sentence_splitter`). Set
  ``FOCUSVLM_SENTENCE_SPLITTER=fallback`` to force the fallback.
* ``startend:constrained_start`` (not registered in IFEval) passes when the
  response, after leading white space, begins with ``starter`` literally and
  case-sensitively.

Nothing here touches the network, at import or at check time.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import re
import warnings
from typing import Callable

LESS, AT_LEAST = "less than", "at least"
RELATIONS = (LESS, AT_LEAST)


class InstructionError(ValueError):
    """Unknown instruction id or bad arguments."""


# --------------------------------------------------------------------------- text utilities

@functools.lru_cache(maxsize=1)
def _punkt():
    """NLTK's punkt_tab sentence tokenizer, or None when its data is not installed."""
    if os.environ.get("FOCUSVLM_SENTENCE_SPLITTER", "").lower() == "fallback":
        return None
    try:
        import nltk

        nltk.data.find("tokenizers/punkt_tab/english/")
        from nltk.tokenize import PunktTokenizer

        return PunktTokenizer("english")
    except (LookupError, ImportError, OSError):
        return None


# once per process, even when the module is reloaded (a reload re-runs this file in the same namespace)
_warned = globals().get("_warned", False)


def sentence_splitter() -> str:
    """Name of the splitter in use: ``"nltk-punkt_tab"`` or ``"fallback-rules"`` (recorded in reports)."""
    return "nltk-punkt_tab" if _punkt() is not None else "fallback-rules"


# Abbreviations whose trailing period does not end a sentence in the fallback splitter.
_ABBREV = {"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "inc", "ltd", "co", "no", "fig",
           "e.g", "i.e", "approx", "capt", "lt", "mt", "ph.d", "u.s", "u.k", "a.m", "p.m"}
_BOUNDARY = re.compile(r"([.!?]+[\"')\]\u201d]*)(\s+)")


def fallback_sentences(text: str) -> list[str]:
    """Rule-based sentence split used when punkt_tab is missing.

    A sentence ends at ``.``, ``!`` or ``?`` (plus closing quotes/brackets)
    followed by white space, unless the period closes a known abbreviation, a
    single-letter initial, or a number. Close to punkt on ordinary prose; may
    differ on unusual abbreviations.
    """
    sentences: list[str] = []
    start = 0
    for m in _BOUNDARY.finditer(text):
        end = m.end(1)
        if m.group(1).startswith(".") and len(m.group(1).rstrip("\"')]\u201d")) == 1:
            word = re.search(r"(\S+)\.$", text[start:m.start(1) + 1])
            token = word.group(1).lower().lstrip("(\"'") if word else ""
            if token in _ABBREV or (len(token) == 1 and token.isalpha()) or re.fullmatch(r"\d+", token or "x"):
                # a number then period then a capitalised word ends a sentence ("in 1999. Then")
                nxt = text[m.end():m.end() + 1]
                if not (token.isdigit() and nxt[:1].isupper()):
                    continue
        piece = text[start:end].strip()
        if piece:
            sentences.append(piece)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def split_sentences(text: str) -> list[str]:
    global _warned
    tok = _punkt()
    if tok is not None:
        return tok.tokenize(text)
    if not _warned:
        _warned = True
        warnings.warn("NLTK punkt_tab data is not installed; counting sentences with focusvlm's rule-based "
                      "fallback splitter (install it with `python -m nltk.downloader punkt_tab` for IFEval "
                      "parity). Reports record the splitter used.", RuntimeWarning, stacklevel=3)
    return fallback_sentences(text)


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


def count_words(text: str) -> int:
    # IFEval counts runs of word characters
    return len(re.findall(r"\w+", text))


def word_tokens(text: str) -> list[str]:
    """NLTK's word tokenization (Treebank rules per sentence), with our sentence splitter."""
    from nltk.tokenize import NLTKWordTokenizer

    tok = NLTKWordTokenizer()
    return [w for s in split_sentences(text) for w in tok.tokenize(s)]


@functools.lru_cache(maxsize=1)
def _seed_langdetect() -> None:
    from langdetect import DetectorFactory

    DetectorFactory.seed = 0  # langdetect samples n-grams at random; a fixed seed makes verdicts repeat


def detect_language(text: str) -> str | None:
    """ISO code, or None when langdetect finds no features (IFEval then lets the check pass)."""
    from langdetect import LangDetectException, detect

    _seed_langdetect()
    try:
        return detect(text)
    except LangDetectException:
        return None


def _is_english(text: str) -> bool:
    lang = detect_language(text)
    return lang is None or lang == "en"


def _compare(count: int, relation: str, n: int) -> bool:
    return count < n if relation == LESS else count >= n


# --------------------------------------------------------------------------- the checkers
# Each takes (response, kwargs) and answers the strict question for one response variant.

def _response_language(r, kw):
    lang = detect_language(r)
    return lang is None or lang == kw["language"]


def _number_sentences(r, kw):
    return _compare(count_sentences(r), kw["relation"], kw["num_sentences"])


def _number_paragraphs(r, kw):
    parts = re.split(r"\s?\*\*\*\s?", r)
    count = len(parts)
    for i, part in enumerate(parts):
        if not part.strip():
            if i in (0, len(parts) - 1):
                count -= 1  # a divider at the very start or end adds no paragraph
            else:
                return False  # two dividers in a row
    return count == kw["num_paragraphs"]


def _number_words(r, kw):
    return _compare(count_words(r), kw["relation"], kw["num_words"])


def _nth_paragraph_first_word(r, kw):
    parts = re.split(r"\n\n", r)
    count = sum(1 for p in parts if p.strip())
    n = kw["nth_paragraph"]
    if n > count:
        return False
    # IFEval indexes the raw split, blank pieces included
    paragraph = parts[n - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    first = ""
    for ch in word:
        if ch in ".,?!'\"":
            break
        first += ch.lower()
    return count == kw["num_paragraphs"] and first == kw["first_word"].lower()


def _number_placeholders(r, kw):
    return len(re.findall(r"\[.*?\]", r)) >= kw["num_placeholders"]


def _postscript(r, kw):
    marker = kw["postscript_marker"]
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + marker.lower() + r".*$"
    return bool(re.findall(pattern, r.lower(), flags=re.MULTILINE))


def _number_bullet_lists(r, kw):
    stars = re.findall(r"^\s*\*[^\*].*$", r, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", r, flags=re.MULTILINE)
    return len(stars) + len(dashes) == kw["num_bullets"]


_CONSTRAINED = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def _constrained_response(r, kw):
    r = r.strip()
    return any(option in r for option in _CONSTRAINED)


def _number_highlighted_sections(r, kw):
    n = sum(1 for h in re.findall(r"\*[^\n\*]*\*", r) if h.strip("*").strip())
    n += sum(1 for h in re.findall(r"\*\*[^\n\*]*\*\*", r) if h[2:-2].strip())
    return n >= kw["num_highlights"]


def _multiple_sections(r, kw):
    pieces = re.split(r"\s?" + kw["section_spliter"] + r"\s?\d+\s?", r)
    return len(pieces) - 1 >= kw["num_sections"]


def _json_format(r, kw):
    text = r.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        if text.startswith(fence):
            text = text[len(fence):]
            break
    if text.endswith("```"):
        text = text[:-3]
    try:
        json.loads(text.strip())
    except ValueError:
        return False
    return True


def _title(r, kw):
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", r))


def _two_responses(r, kw):
    parts = r.split("******")
    kept = []
    for i, part in enumerate(parts):
        if not part.strip():
            if i not in (0, len(parts) - 1):
                return False
        else:
            kept.append(part)
    return len(kept) == 2 and kept[0].strip() != kept[1].strip()


def _repeat_prompt(r, kw):
    return r.strip().lower().startswith(kw["prompt_to_repeat"].strip().lower())


def _end_checker(r, kw):
    return r.strip().strip('"').lower().endswith(kw["end_phrase"].strip().lower())


def _capital_word_frequency(r, kw):
    n = sum(1 for w in word_tokens(r) if w.isupper())
    return _compare(n, kw["capital_relation"], kw["capital_frequency"])


def _english_capital(r, kw):
    return r.isupper() and _is_english(r)


def _english_lowercase(r, kw):
    return r.islower() and _is_english(r)


def _no_comma(r, kw):
    return "," not in r


def _quotation(r, kw):
    r = r.strip()
    return len(r) > 1 and r[0] == '"' and r[-1] == '"'


def _keywords_existence(r, kw):
    return all(re.search(k, r, flags=re.IGNORECASE) for k in kw["keywords"])


def _keyword_frequency(r, kw):
    n = len(re.findall(kw["keyword"].strip(), r, flags=re.IGNORECASE))
    return _compare(n, kw["relation"], kw["frequency"])


def _forbidden_words(r, kw):
    return not any(re.search(r"\b" + w + r"\b", r, flags=re.IGNORECASE) for w in kw["forbidden_words"])


def _letter_frequency(r, kw):
    n = collections.Counter(r.lower())[kw["letter"].strip().lower()]
    return _compare(n, kw["let_relation"], kw["let_frequency"])


def _constrained_start(r, kw):
    return r.lstrip().startswith(kw["starter"])


# id -> (checker, {argument: type})
CHECKERS: dict[str, tuple[Callable[[str, dict], bool], dict[str, type]]] = {
    "keywords:existence": (_keywords_existence, {"keywords": list}),
    "keywords:frequency": (_keyword_frequency, {"keyword": str, "frequency": int, "relation": str}),
    "keywords:forbidden_words": (_forbidden_words, {"forbidden_words": list}),
    "keywords:letter_frequency": (_letter_frequency, {"letter": str, "let_frequency": int, "let_relation": str}),
    "language:response_language": (_response_language, {"language": str}),
    "length_constraints:number_sentences": (_number_sentences, {"num_sentences": int, "relation": str}),
    "length_constraints:number_paragraphs": (_number_paragraphs, {"num_paragraphs": int}),
    "length_constraints:number_words": (_number_words, {"num_words": int, "relation": str}),
    "length_constraints:nth_paragraph_first_word": (
        _nth_paragraph_first_word, {"num_paragraphs": int, "nth_paragraph": int, "first_word": str}),
    "detectable_content:number_placeholders": (_number_placeholders, {"num_placeholders": int}),
    "detectable_content:postscript": (_postscript, {"postscript_marker": str}),
    "detectable_format:number_bullet_lists": (_number_bullet_lists, {"num_bullets": int}),
    "detectable_format:constrained_response": (_constrained_response, {}),
    "detectable_format:number_highlighted_sections": (_number_highlighted_sections, {"num_highlights": int}),
    "detectable_format:multiple_sections": (_multiple_sections, {"section_spliter": str, "num_sections": int}),
    "detectable_format:json_format": (_json_format, {}),
    "detectable_format:title": (_title, {}),
    "combination:two_responses": (_two_responses, {}),
    "combination:repeat_prompt": (_repeat_prompt, {"prompt_to_repeat": str}),
    "startend:end_checker": (_end_checker, {"end_phrase": str}),
    "startend:quotation": (_quotation, {}),
    "change_case:capital_word_frequency": (
        _capital_word_frequency, {"capital_frequency": int, "capital_relation": str}),
    "change_case:english_capital": (_english_capital, {}),
    "change_case:english_lowercase": (_english_lowercase, {}),
    "punctuation:no_comma": (_no_comma, {}),
    "startend:constrained_start": (_constrained_start, {"starter": str}),
}

IFEVAL_IDS = tuple(k for k in CHECKERS if k != "startend:constrained_start")
ALL_IDS = tuple(CHECKERS)


def validate_kwargs(instruction_id: str, kwargs: dict | None, prompt: str | None = None) -> dict:
    """The arguments ``instruction_id`` needs, checked; raises InstructionError naming what is wrong."""
    if instruction_id not in CHECKERS:
        raise InstructionError(f"unknown instruction id {instruction_id!r}; known: {', '.join(ALL_IDS)}")
    _, spec = CHECKERS[instruction_id]
    kw = dict(kwargs or {})
    if instruction_id == "combination:repeat_prompt" and not kw.get("prompt_to_repeat") and prompt:
        kw["prompt_to_repeat"] = prompt
    out = {}
    for name, typ in spec.items():
        if kw.get(name) is None:
            raise InstructionError(f"{instruction_id}: missing argument {name!r}")
        value = kw[name]
        if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise InstructionError(f"{instruction_id}: {name} must be an integer, got {value!r}")
        if typ is str and not isinstance(value, str):
            raise InstructionError(f"{instruction_id}: {name} must be a string, got {value!r}")
        if typ is list and (not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value)):
            raise InstructionError(f"{instruction_id}: {name} must be a list of strings, got {value!r}")
        if name.endswith("relation") and value not in RELATIONS:
            raise InstructionError(f"{instruction_id}: {name} must be one of {RELATIONS}, got {value!r}")
        out[name] = value
    return out


def response_variants(response: str) -> list[str]:
    """The eight variants the loose score tries (IFEval's order)."""
    lines = response.split("\n")
    first = "\n".join(lines[1:]).strip()
    last = "\n".join(lines[:-1]).strip()
    both = "\n".join(lines[1:-1]).strip()
    return [response, response.replace("*", ""), first, last, both,
            first.replace("*", ""), last.replace("*", ""), both.replace("*", "")]


def check(instruction_id: str, response: str, kwargs: dict | None = None, prompt: str | None = None,
          loose: bool = False) -> bool:
    """Whether ``response`` follows the instruction (IFEval's strict or loose verdict)."""
    fn, _ = CHECKERS.get(instruction_id, (None, None))
    kw = validate_kwargs(instruction_id, kwargs, prompt)
    if response is None:
        return False
    candidates = response_variants(response) if loose else [response]
    return any(c.strip() and fn(c, kw) for c in candidates)


def check_all(instruction_id: str, response: str, kwargs: dict | None = None,
              prompt: str | None = None) -> dict[str, bool]:
    """Deprecated: call ``check(..., loose=False)`` and ``check(..., loose=True)``; nothing in focusvlm uses it."""
    import warnings

    warnings.warn("focusvlm.eval.instructions.check_all is deprecated and will be removed; call check(...) "
                  "with loose=False / loose=True", DeprecationWarning, stacklevel=2)
    return {"strict": check(instruction_id, response, kwargs, prompt),
            "loose": check(instruction_id, response, kwargs, prompt, loose=True)}


__all__ = ["check", "check_all", "validate_kwargs", "response_variants", "sentence_splitter", "count_sentences",
           "count_words", "fallback_sentences", "detect_language", "CHECKERS", "IFEVAL_IDS", "ALL_IDS",
           "InstructionError", "RELATIONS"]
