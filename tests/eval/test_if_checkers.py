import sys
from pathlib import Path

import pytest

from focusvlm.eval import instructions as ins
from focusvlm.eval.instructions import ALL_IDS, IFEVAL_IDS, InstructionError, check

LOW = "at least"
LT = "less than"
EN_LOWER = "the astronaut wears a white suit and stands in front of a flag in a bright room"
EN_UPPER = "THE ASTRONAUT WEARS A WHITE SUIT AND STANDS IN FRONT OF A FLAG IN A BRIGHT ROOM"

# id -> (kwargs, [responses that pass strictly], [responses that fail strictly])
CASES = {
    "keywords:existence": ({"keywords": ["suit", "flag"]},
                           ["A white SUIT next to a flag.", "suitcase and flagpole"],  # substring regex, as IFEval
                           ["A white suit only.", "nothing"]),
    "keywords:frequency": ({"keyword": "red", "frequency": 2, "relation": LOW},
                           ["red, Red and red", "redder red"],
                           ["one red thing", "blue"]),
    "keywords:forbidden_words": ({"forbidden_words": ["cat", "dog"]},
                                 ["a catalog and dogma", "birds only"],  # whole words only
                                 ["the Cat sat", "a dog."]),
    "keywords:letter_frequency": ({"letter": "z", "let_frequency": 2, "let_relation": LT},
                                  ["one Z here", "none at all"],
                                  ["zz", "Zebra zone"]),
    "language:response_language": ({"language": "fr"},
                                   ["Le chat est assis sur le canapé et regarde la fenêtre ouverte.", "12345 !!!"],
                                   ["The cat is sitting on the sofa and looking out of the window."]),
    "length_constraints:number_sentences": ({"num_sentences": 3, "relation": LT},
                                            ["One sentence. Two sentences.", "Dr. Smith left. He came back."],
                                            ["One. Two. Three.", "A! B? C."]),
    "length_constraints:number_paragraphs": ({"num_paragraphs": 2},
                                             ["first part *** second part", "*** one ***\ntwo ***"],
                                             ["one *** *** two", "only one", "a *** b *** c"]),
    "length_constraints:number_words": ({"num_words": 5, "relation": LOW},
                                        ["one two three four five", "it's a well-known fact"],  # \w+ splits ' and -
                                        ["one two three four", "..."]),
    "length_constraints:nth_paragraph_first_word": (
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "Then"},
        ["Start here.\n\n\"Then, we go.", "Start.\n\nthen end"],
        ["Start.\n\nNext we go.", "Then only one paragraph", "A\n\nThen\n\nC"]),
    "detectable_content:number_placeholders": ({"num_placeholders": 2},
                                               ["Meet [name] at [place].", "[] and [x]"],
                                               ["Meet [name] at home.", "no brackets"]),
    "detectable_content:postscript": ({"postscript_marker": "P.S."},
                                      ["Answer.\nP.S. see you", "Answer. p. s. later"],
                                      ["Answer. PS later", "Answer only"]),
    "detectable_format:number_bullet_lists": ({"num_bullets": 2},
                                              ["* one\n* two", "- one\n  * two\ntext"],
                                              ["* one\n* two\n* three", "**bold** line\n* one", "one\ntwo"]),
    "detectable_format:constrained_response": ({}, ["Well. My answer is maybe.", "My answer is no."],
                                               ["My answer is Yes.", "yes"]),
    "detectable_format:number_highlighted_sections": ({"num_highlights": 2},
                                                      ["*one* and **two**", "*a* *b*"],
                                                      ["*one* only", "* * and ** **"]),
    "detectable_format:multiple_sections": ({"section_spliter": "Section", "num_sections": 2},
                                            ["Section 1\nfoo\nSection 2\nbar", "Section1 a Section 2 b"],
                                            ["Section 1 only", "SECTION 1 a SECTION 2 b"]),
    "detectable_format:json_format": ({}, ['{"a": 1}', '```json\n{"a": [1, 2]}\n```', "  42 "],
                                      ["{'a': 1}", "Here is JSON: {\"a\": 1}"]),
    "detectable_format:title": ({}, ["<<My Title>>\ntext", "x <<a>> y"], ["<< >> text", "<<split\nline>>", "no"]),
    "combination:two_responses": ({}, ["first answer ****** second answer", "******a******b"],
                                  ["same ****** same", "a ****** ****** b", "only one"]),
    "combination:repeat_prompt": ({"prompt_to_repeat": "What is shown?"},
                                  ["what is shown? A cat.", "  What is shown?"],
                                  ["A cat. What is shown?"]),
    "startend:end_checker": ({"end_phrase": "Any other questions?"},
                             ["Done. Any other questions?", "\"Done. any other questions?\"  "],
                             ["Any other questions? Yes.", "Done."]),
    "startend:quotation": ({}, ['"quoted"', '  "a"  '], ['"', 'not "quoted"', '"half']),
    "change_case:capital_word_frequency": ({"capital_frequency": 3, "capital_relation": LOW},
                                           ["THE BIG RED dog", "I AM HAPPY."],
                                           ["THE BIG dog", "The Big Red"]),
    "change_case:english_capital": ({}, [EN_UPPER, "OK 123"],
                                    [EN_UPPER.lower(), EN_UPPER + " x", "1234 !!"]),  # no cased letter: not upper
    "change_case:english_lowercase": ({}, [EN_LOWER, "hello there, how are you today?"],
                                      [EN_LOWER.capitalize(),
                                       "le chat est assis sur le canapé et regarde la fenêtre ouverte avec sa mère"]),
    "punctuation:no_comma": ({}, ["No commas here.", "semi; colon: fine"], ["a, b", "1,000"]),
    "startend:constrained_start": ({"starter": "My answer"},
                                   ["My answer is yes.", "\n  My answer: no"],
                                   ["my answer is yes.", "Well. My answer", "Intro\nMy answer is yes."]),
}


def test_every_id_has_cases():
    assert set(CASES) == set(ALL_IDS)
    assert len(IFEVAL_IDS) == 25 and "startend:constrained_start" not in IFEVAL_IDS


@pytest.mark.parametrize("iid", sorted(CASES))
def test_pass_and_fail(iid):
    kwargs, good, bad = CASES[iid]
    for r in good:
        assert check(iid, r, kwargs), f"{iid} should pass: {r!r}"
    for r in bad:
        assert not check(iid, r, kwargs), f"{iid} should fail: {r!r}"


@pytest.mark.parametrize("iid", sorted(ALL_IDS))
def test_empty_response_fails_strict_and_loose(iid):
    kwargs = CASES[iid][0]
    for r in ("", "   \n  ", None):
        assert not check(iid, r, kwargs)
        assert not check(iid, r, kwargs, loose=True)


def test_loose_strips_first_last_lines_and_asterisks():
    r = "Sure! Here it is:\nthe astronaut wears a white suit and stands in front of a flag\nHope this helps!"
    assert not check("change_case:english_lowercase", r)
    assert check("change_case:english_lowercase", r, loose=True)
    assert not check("detectable_format:json_format", "Here:\n{\"a\": 1}\nDone")
    assert check("detectable_format:json_format", "Here:\n{\"a\": 1}\nDone", loose=True)
    # asterisk removal: "**Intro**" makes the first line non-matching for constrained start
    assert not check("startend:constrained_start", "**My answer** is yes", {"starter": "My answer"})
    assert check("startend:constrained_start", "**My answer** is yes", {"starter": "My answer"}, loose=True)
    # loose never turns a plain failure into a pass when no variant passes
    assert not check("punctuation:no_comma", "a, b\nc, d\ne, f", loose=True)
    assert check("punctuation:no_comma", "a, b\nc d\ne, f", loose=True)  # middle line alone


def test_variants_are_ifevals_eight():
    v = ins.response_variants("*a*\nb\n*c*")
    assert v == ["*a*\nb\n*c*", "a\nb\nc", "b\n*c*", "*a*\nb", "b", "b\nc", "a\nb", "b"]


def test_prompt_argument_feeds_repeat_prompt():
    assert check("combination:repeat_prompt", "What is it? A dog.", prompt="What is it?")
    assert not check("combination:repeat_prompt", "A dog.", prompt="What is it?")


def test_bad_arguments_name_the_problem():
    with pytest.raises(InstructionError, match="unknown instruction id"):
        check("punctuation:no_semicolon", "x")
    with pytest.raises(InstructionError, match="missing argument 'keywords'"):
        check("keywords:existence", "x", {})
    with pytest.raises(InstructionError, match="relation must be one of"):
        check("length_constraints:number_words", "x", {"num_words": 3, "relation": "at most"})
    with pytest.raises(InstructionError, match="must be an integer"):
        check("detectable_format:number_bullet_lists", "x", {"num_bullets": "2"})


def test_language_detection_is_repeatable():
    text = "ok fine sure"  # short text: unseeded langdetect flips between languages
    first = [ins.detect_language(text) for _ in range(5)]
    assert len(set(first)) == 1


def test_fallback_sentence_splitter():
    s = ins.fallback_sentences("Dr. Smith went home. He paid $3.50 on the 5. floor! Really? J. R. R. Tolkien wrote e.g. "
                               "books. It was 1999. Then it ended...")
    assert s == ["Dr. Smith went home.", "He paid $3.50 on the 5. floor!", "Really?",
                 "J. R. R. Tolkien wrote e.g. books.", "It was 1999.", "Then it ended..."]
    assert ins.sentence_splitter() in ("nltk-punkt_tab", "fallback-rules")


def test_import_and_checks_touch_no_network(monkeypatch):
    import importlib
    import socket

    def refuse(*a, **k):
        raise AssertionError("network touched")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    mod = importlib.reload(ins)
    for iid, (kw, good, bad) in CASES.items():
        for r in good + bad:
            mod.check(iid, r, kw)
            mod.check(iid, r, kw, loose=True)


# --------------------------------------------------------------------------- parity with lm-eval

def _lm_eval_registry():
    """lm-eval's IFEval registry, loaded without lm-eval's package __init__ (which needs `datasets`)
    and without its NLTK download. Skipped when lm-eval is not installed."""
    import importlib
    import importlib.util
    import types

    import nltk

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("lm-eval not installed")
    root = Path(list(spec.submodule_search_locations)[0])
    saved = {k: sys.modules.get(k) for k in ("lm_eval", "lm_eval.tasks", "lm_eval.tasks.ifeval")}
    for name, folder in (("lm_eval", root), ("lm_eval.tasks", root / "tasks"),
                         ("lm_eval.tasks.ifeval", root / "tasks" / "ifeval")):
        stub = types.ModuleType(name)
        stub.__path__ = [str(folder)]
        sys.modules[name] = stub
    real_download = nltk.download
    nltk.download = lambda *a, **k: False  # never fetch
    try:
        return importlib.import_module("lm_eval.tasks.ifeval.instructions_registry").INSTRUCTION_DICT
    except Exception as exc:  # noqa: BLE001 - any import failure means no parity check here
        pytest.skip(f"lm-eval IFEval not importable: {exc}")
    finally:
        nltk.download = real_download
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def test_parity_with_lm_eval():
    registry = _lm_eval_registry()
    needs_punkt = {"length_constraints:number_sentences", "change_case:capital_word_frequency"}
    if ins.sentence_splitter() != "nltk-punkt_tab":
        skip = needs_punkt
    else:
        skip = set()
    compared = 0
    for iid, (kwargs, good, bad) in CASES.items():
        if iid not in registry or iid in skip:
            continue
        for r in good + bad:
            for variant in ins.response_variants(r):
                if not variant.strip():
                    continue
                theirs = registry[iid](iid)
                theirs.build_description(**kwargs)
                assert ins.CHECKERS[iid][0](variant, ins.validate_kwargs(iid, kwargs)) == \
                    bool(theirs.check_following(variant)), (iid, variant)
                compared += 1
    assert compared > 100
