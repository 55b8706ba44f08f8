"""Text-only stage-2 conversations answered by the base LM: prompts, the quality filter, resumable answering."""

import json

import pytest

from focusvlm.demo import textdata as T
from focusvlm.eval.ifbench import instruction_text
from focusvlm.eval.instructions import ALL_IDS


def test_prompts_are_seeded_distinct_and_carry_no_benchmark_instruction():
    a, b = T.text_prompts(300, seed=0), T.text_prompts(300, seed=0)
    assert a == b and a != T.text_prompts(300, seed=1)
    assert len({p["key"] for p in a}) == len({p["prompt"] for p in a}) == 300
    total = len(T.TOPICS) * len(T.REQUESTS)
    assert len(T.text_prompts(total)) == total
    with pytest.raises(ValueError, match=f"1..{total}"):
        T.text_prompts(total + 1)
    # none of the IF benchmark's verifiable instructions (its wording) appears in a training prompt
    sentences = {instruction_text(i, {}) for i in ALL_IDS if _no_args(i)}
    assert not any(s in p["prompt"] for s in sentences for p in a)
    for banned in ("JSON", "capital", "bullet", "postscript", "P.S.", "quotation", "<<", "***", "paragraph"):
        assert not any(banned.lower() in p["prompt"].lower() for p in a), banned


def _no_args(instruction_id):
    try:
        instruction_text(instruction_id, {})
    except KeyError:
        return False
    return True


@pytest.mark.parametrize("text, finished, good", [
    ("Tea is a drink made from the leaves of the tea plant, enjoyed around the world.", True, True),
    ("Tea is a drink made from the leaves of the tea plant, enjoyed around the world.", False, False),  # cut off
    ("Tea is nice.", True, False),  # too short
    ("a big place called a big place called a big place called a big place called", True, False),  # a loop
    ("Le thé est une boisson — très appréciée — dans le monde entier, ça va?", True, False),  # not ASCII
])
def test_quality_filter(text, finished, good):
    assert T.is_good_answer(text, finished) is good


class _CountingLM:
    def __init__(self, lm):
        self.lm, self.calls = lm, 0

    def generate(self, **kw):
        self.calls += 1
        return self.lm.generate(**kw)


@pytest.mark.slow
def test_answers_are_appended_and_resumed_torn_lines_redone(tmp_path):
    from focusvlm.models.demo.assemble import DEMO_CHAT_TEMPLATE
    from focusvlm.models.demo.lm import smollm2_lm

    lm, tok = smollm2_lm()
    prompts = T.text_prompts(3, seed=0)
    out = tmp_path / "answers.jsonl"
    counting = _CountingLM(lm)
    rows = T.answer_prompts(prompts[:2], out, counting, tok, DEMO_CHAT_TEMPLATE, max_new_tokens=12, batch_size=2)
    assert counting.calls == 1 and [r["key"] for r in rows] == [p["key"] for p in prompts[:2]]
    assert all(r["answer"] and isinstance(r["finished"], bool) for r in rows)
    assert all(r["good"] == T.is_good_answer(r["answer"], r["finished"]) for r in rows)
    # a stop mid-write leaves a torn line: it is dropped and only the missing prompts are answered
    out.write_text(out.read_text() + '{"key": "t99-r', encoding="utf-8")
    again = T.answer_prompts(prompts, out, counting, tok, DEMO_CHAT_TEMPLATE, max_new_tokens=12, batch_size=2)
    assert counting.calls == 2 and again[:2] == rows
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["key"] for r in lines] == [p["key"] for p in prompts]
    records = T.text_records(again)
    assert len(records) == sum(r["good"] for r in again)
    assert all("image" not in r and r["conversations"][0]["from"] == "human" for r in records)
