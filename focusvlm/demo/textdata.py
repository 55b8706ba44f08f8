"""Text-only conversations answered by the demo's own language model, for stage 2's mix.

LLaVA-1.5 keeps Vicuna's conversational behaviour partly because its stage-2 mix carries text-only
ShareGPT conversations. The demo's analogue: prompts built here from topic and request templates
(``text_prompts``), answered greedily by the base LM itself, SmolLM2-135M-Instruct, in the demo's ChatML
format (``answer_prompts``), and kept only when the answer is a finished, non-degenerate reply
(``is_good_answer``). Training on them pulls the LoRA back towards what the LM already says on text.

The prompts deliberately carry no verifiable formatting instruction (no "answer in JSON", no word
limits, ...): the instruction-following benchmark's instruction types must not be trained in, only the
LM's ordinary behaviour kept. Answers are appended to a JSONL file as they are made, so a stopped run
continues where it stopped; a row records the prompt's key, so a rerun with the same seed is the same data.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Callable

TOPICS = (
    "the colour red", "the colour blue", "the colour green", "the colour yellow", "circles", "triangles",
    "rectangles", "the ocean", "mountains", "rain", "the moon", "the sun", "trees", "a city park", "bicycles",
    "trains", "cooking pasta", "baking bread", "coffee", "tea", "cats", "dogs", "birds", "bees", "a garden",
    "a library", "reading books", "learning a new language", "music", "painting", "photography", "chess",
    "football", "running", "swimming", "sleep", "breakfast", "friendship", "a rainy day", "winter", "summer",
    "autumn leaves", "the night sky", "a small village", "a busy market", "recycling", "saving energy",
    "a school day", "a museum", "a birthday party", "maps", "clocks", "bridges", "lighthouses", "honey",
    "apples", "volcanoes", "rivers", "the desert", "snow",
)
# short requests: the LM's greedy replies to open requests run past any practical token budget (14 of 16
# cut at 160 tokens when tried), and stage 2's sequences must stay short on a CPU
REQUESTS = (
    "Tell me briefly about {topic}.",
    "Describe {topic} in two sentences.",
    "In one sentence, what is special about {topic}?",
    "Explain {topic} to a child in a few words.",
    "Give me one short tip about {topic}.",
    "Why do people like {topic}? Answer briefly.",
    "Write one sentence about {topic}.",
    "What is one interesting fact about {topic}?",
    "Write a very short poem about {topic}.",
    "Say something nice about {topic} in a sentence or two.",
    "What is the main idea of {topic}, in short?",
    "Give a short definition of {topic}.",
    "Briefly, how would you describe {topic} to a friend?",
    "What is a quick idea related to {topic}?",
    "Summarize what you know about {topic} in two sentences.",
    "What colour do you think of with {topic}, and why? Keep it short.",
    "Write a two-sentence story about {topic}.",
    "Name one good thing about {topic}.",
    "What would a child ask about {topic}? Answer it briefly.",
    "Write a short caption for a photo of {topic}.",
)


def text_prompts(count: int, seed: int = 0) -> list[dict[str, str]]:
    """``count`` distinct (topic, request) prompts drawn with ``random.Random(f"{seed}/text-prompts")``, each
    with a stable key."""
    pairs = [(t, r) for t in range(len(TOPICS)) for r in range(len(REQUESTS))]
    if not 0 < count <= len(pairs):
        raise ValueError(f"text prompt count must be in 1..{len(pairs)}, got {count}")
    picked = random.Random(f"{seed}/text-prompts").sample(pairs, count)
    return [{"key": f"t{t:02d}-r{r:02d}", "prompt": REQUESTS[r].format(topic=TOPICS[t])} for t, r in picked]


_WORD = re.compile(r"[A-Za-z']+")


def is_good_answer(text: str, finished: bool, min_words: int = 8, max_repeats: int = 2) -> bool:
    """A reply worth training on: it ended by itself (not cut at the token budget), has at least ``min_words``
    words, is mostly ASCII, and repeats no 4-word phrase more than ``max_repeats`` times (a 135M model's
    greedy loops)."""
    if not finished:
        return False
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) < min_words:
        return False
    if sum(ch.isascii() for ch in text) < 0.98 * len(text):
        return False
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - 3):
        gram = tuple(words[i:i + 4])
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] > max_repeats:
            return False
    return True


def answer_prompts(prompts: list[dict[str, str]], out_file: str | Path, lm: Any, tokenizer: Any, chat_template: str,
                   max_new_tokens: int = 160, batch_size: int = 16,
                   log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Greedy answers of ``lm`` to ``prompts`` in the chat format, appended to ``out_file`` (JSONL) batch by
    batch; prompts already answered there are skipped. Returns every row (``key``, ``prompt``, ``answer``,
    ``finished``, ``good``)."""
    import torch

    from ..eval.runs import append_records, drop_torn_tail

    out = Path(out_file)
    drop_torn_tail(out)  # a line torn by a stop mid-write: its prompt is answered again
    done = read_answers(out)
    todo = [p for p in prompts if p["key"] not in done]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        with out.open("a", encoding="utf-8") as f, torch.inference_mode():
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                texts = [tokenizer.apply_chat_template([{"role": "user", "content": p["prompt"]}],
                                                       chat_template=chat_template, tokenize=False,
                                                       add_generation_prompt=True) for p in batch]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
                gen = lm.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end,
                                  pad_token_id=pad)
                records = []
                for p, row in zip(batch, gen[:, enc["input_ids"].shape[1]:]):
                    finished = bool((row == end).any())
                    ids = row[: int((row == end).nonzero()[0, 0])] if finished else row
                    answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
                    records.append({"key": p["key"], "prompt": p["prompt"], "answer": answer, "finished": finished,
                                    "good": is_good_answer(answer, finished)})
                append_records(f, records)
                done.update((r["key"], r) for r in records)
                if log:
                    log(f"text answers: {len(done)}/{len(prompts)}")
    finally:
        tokenizer.padding_side = side
    return [done[p["key"]] for p in prompts]


def read_answers(path: str | Path) -> dict[str, dict[str, Any]]:
    """Rows of an answers file by prompt key (a torn last line is left out)."""
    from ..eval.runs import read_jsonl_records

    return {row["key"]: row for row in read_jsonl_records(Path(path))}


def text_records(rows: list[dict[str, Any]]) -> list[dict]:
    """LLaVA-format text-only conversations (no ``image``) of the rows judged good."""
    return [{"id": f"text-{r['key']}", "conversations": [{"from": "human", "value": r["prompt"]},
                                                         {"from": "gpt", "value": r["answer"]}]}
            for r in rows if r["good"]]
