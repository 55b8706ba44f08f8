"""Chat formats for training: text rendering and assistant-only labels.

A conversation is rendered to one string, tokenized once, and the
supervised spans are found by rendering it turn by turn: at every turn
boundary the prefix rendered so far is tokenized on its own and must be a
token-for-token prefix of the whole tokenization. Tokens between "prompt up
to this assistant turn" and "prompt plus this assistant turn" are
supervised; everything else gets -100. A boundary where the tokenizer merges
across turns raises ``TokenizationMismatch`` instead of guessing.

Formats:
* ``plain`` (LLaVA-1.5 stage 1): the image, then the caption and a newline;
  loss on the caption and the newline.
* ``vicuna_v1`` (LLaVA-1.5 stage 2): LLaVA's system prompt, then
  ``USER: ... ASSISTANT: ...<eos>`` turns; loss on each answer and its
  end-of-sequence token (``</s>`` for Vicuna).
* ``chat_template``: the processor's (or tokenizer's) own chat template; loss
  on everything an assistant message adds after the generation prompt
  (its content and its end-of-turn token and separator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..models import IMAGE_TOKEN

IGNORE_INDEX = -100
FORMATS = ("plain", "vicuna_v1", "chat_template")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


class TokenizationMismatch(ValueError):
    """A turn boundary does not fall on a token boundary of the whole conversation."""


@dataclass(frozen=True)
class Turn:
    role: str    # "user" | "assistant"
    text: str


@dataclass
class Rendered:
    """A conversation as one string and the (start, end) character spans of its boundaries."""

    text: str
    spans: list[tuple[int, int]]     # supervised character spans, in order
    bos: bool                         # prepend the tokenizer's BOS token


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


def move_single_image_first(text: str) -> str:
    """LLaVA's convention for one image: the placeholder leads the turn, followed by a newline."""
    rest = text.replace(IMAGE_TOKEN, "").strip()
    return f"{IMAGE_TOKEN}\n{rest}"


# --------------------------------------------------------------------------- renderers

def render_plain(turns: list[Turn], eos: str | None = None) -> Rendered:
    """Image placeholder(s), caption, newline. The human turn's words are dropped (LLaVA-1.5 stage 1)."""
    if len(turns) != 2 or turns[0].role != "user" or turns[1].role != "assistant":
        raise ValueError("the plain format needs exactly one human turn and one gpt turn")
    prompt = IMAGE_TOKEN * turns[0].text.count(IMAGE_TOKEN)
    text = prompt + turns[1].text + "\n"
    return Rendered(text, [(len(prompt), len(text))], bos=True)


def render_vicuna_v1(turns: list[Turn], eos: str | None = None) -> Rendered:
    """``{system} USER: {q} ASSISTANT: {a}{eos}USER: ...`` with LLaVA's system prompt."""
    eos = eos or "</s>"
    text = VICUNA_SYSTEM + " "
    spans = []
    for turn in turns:
        if turn.role == "user":
            text += f"USER: {turn.text} "
        else:
            text += "ASSISTANT:"
            start = len(text)
            text += f" {turn.text}{eos}"
            spans.append((start, len(text)))
    return Rendered(text, spans, bos=True)


def vicuna_v1_prompt(question: str) -> str:
    """The generation prompt for one user turn, as ``render_vicuna_v1`` writes it."""
    return f"{VICUNA_SYSTEM} USER: {question} ASSISTANT:"


def _content(text: str, multimodal: bool) -> Any:
    if not multimodal:
        return text
    parts: list[dict] = []
    pieces = text.split(IMAGE_TOKEN)
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append({"type": "image"})
        if i == 0 and len(pieces) == 2 and piece.strip() == "":
            continue
        piece = piece.strip("\n") if len(pieces) == 2 else piece
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def render_with_template(turns: list[Turn], apply: Callable[[list[dict], bool], str], multimodal: bool) -> Rendered:
    """Render with a chat template, one assistant turn at a time.

    ``apply(messages, add_generation_prompt)`` returns the template's text.
    For each assistant message m, the prompt (messages before m plus the
    generation prompt) and the prompt plus m must both be string prefixes of
    the whole rendering; the text between them is supervised.
    """
    messages = [{"role": t.role, "content": _content(t.text, multimodal)} for t in turns]
    full = apply(messages, False)
    spans = []
    for m, turn in enumerate(turns):
        if turn.role != "assistant":
            continue
        before = apply(messages[:m], True)
        after = apply(messages[:m + 1], False)
        if not after.startswith(before) or not full.startswith(after):
            raise TokenizationMismatch(
                f"the chat template does not render turn {m} as a prefix of the whole conversation "
                "(it rewrites earlier turns); use --format vicuna_v1 or a prefix-stable template")
        spans.append((len(before), len(after)))
    return Rendered(full, spans, bos=False)


# --------------------------------------------------------------------------- tokenization

def boundary_texts(rendered: Rendered) -> list[str]:
    """What to tokenize for one conversation: the whole text, then the prefix at every span boundary."""
    cuts = [c for span in rendered.spans for c in span]
    return [rendered.text] + [rendered.text[:c] for c in cuts]


def assemble(rendered: Rendered, tokens: list[list[int]], bos: list[int], image_token_id: int) -> Encoded:
    """Ids and labels from the tokenizations of ``boundary_texts(rendered)``: every prefix must be the
    first tokens of the whole, token for token; tokens between a span's two boundaries are supervised."""
    ids = bos + list(tokens[0])
    labels = [IGNORE_INDEX] * len(ids)

    def boundary(k: int, pos: int) -> int:
        prefix = bos + list(tokens[k])
        if ids[:len(prefix)] != prefix:
            raise TokenizationMismatch(
                f"turn boundary at character {pos} splits a token: {rendered.text[max(0, pos - 20):pos + 20]!r}")
        return len(prefix)

    for n, (start, end) in enumerate(rendered.spans):
        a, b = boundary(1 + 2 * n, start), boundary(2 + 2 * n, end)
        labels[a:b] = ids[a:b]
    for i, t in enumerate(ids):
        if t == image_token_id:
            labels[i] = IGNORE_INDEX
    return Encoded(ids, labels)


def tokenize_rendered(rendered: Rendered, tokenizer: Any, image_token_id: int) -> Encoded:
    """Token ids and labels (assistant spans only), each boundary verified token by token."""
    bos = [tokenizer.bos_token_id] if rendered.bos and _adds_bos(tokenizer) else []
    tokens = tokenizer(boundary_texts(rendered), add_special_tokens=False)["input_ids"]
    return assemble(rendered, tokens, bos, image_token_id)


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a BOS token in front by itself (Llama/Vicuna yes, SmolLM2/GPT-2 no)."""
    cached = getattr(tokenizer, "_focusvlm_adds_bos", None)
    if cached is None:
        bos = tokenizer.bos_token_id
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
        cached = bos is not None and len(ids) > 0 and ids[0] == bos
        try:
            tokenizer._focusvlm_adds_bos = cached
        except AttributeError:
            pass
    return cached


class ChatFormat:
    """One of ``FORMATS`` bound to a processor: ``encode(turns, n_images)`` -> ids and labels."""

    def __init__(self, name: str, processor: Any, image_token_id: int):
        if name not in FORMATS:
            raise ValueError(f"unknown chat format {name!r}; use one of {', '.join(FORMATS)}")
        self.name = name
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_token_id = image_token_id
        if name == "chat_template":
            owner = processor if getattr(processor, "chat_template", None) else None
            if owner is None and getattr(self.tokenizer, "chat_template", None):
                owner = self.tokenizer
            if owner is None:
                raise ValueError("--format chat_template: neither the processor nor the tokenizer has a chat template; "
                                 "use --format vicuna_v1")
            self._owner = owner
            self._multimodal = owner is processor

    def render(self, turns: list[Turn]) -> Rendered:
        if self.name == "plain":
            return render_plain(turns)
        if self.name == "vicuna_v1":
            return render_vicuna_v1(turns, self.tokenizer.eos_token)

        def apply(messages: list[dict], add_generation_prompt: bool) -> str:
            if not messages:
                return ""
            return self._owner.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                   tokenize=False)

        return render_with_template(turns, apply, self._multimodal)

    def encode(self, turns: list[Turn]) -> Encoded:
        return tokenize_rendered(self.render(turns), self.tokenizer, self.image_token_id)

    def encode_many(self, conversations: list[list[Turn]]) -> list[Encoded | Exception]:
        """Fast ``encode`` for many conversations (the data index): one parallel tokenizer call over the
        whole texts, labels from the tokens' character offsets (a token that straddles a turn boundary is a
        ``TokenizationMismatch``). ``encode`` (the exact, prefix-verified labels) runs again when a sample is
        drawn for training; tests check that both agree. A conversation that cannot be rendered or masked
        gets its exception in its place."""
        rendered: list[Rendered | Exception] = []
        for turns in conversations:
            try:
                rendered.append(self.render(turns))
            except ValueError as exc:
                rendered.append(exc)
        texts = [r.text for r in rendered if not isinstance(r, Exception)]
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True) if texts else None
        out: list[Encoded | Exception] = []
        k = 0
        for r in rendered:
            if isinstance(r, Exception):
                out.append(r)
                continue
            ids, offsets = enc["input_ids"][k], enc["offset_mapping"][k]
            k += 1
            bos = [self.tokenizer.bos_token_id] if r.bos and _adds_bos(self.tokenizer) else []
            try:
                out.append(_labels_from_offsets(r, ids, offsets, bos, self.image_token_id))
            except TokenizationMismatch as exc:
                out.append(exc)
        return out


def _labels_from_offsets(rendered: Rendered, ids: list[int], offsets: list[tuple[int, int]], bos: list[int],
                         image_token_id: int) -> Encoded:
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in rendered.spans:
        for i, (a, b) in enumerate(offsets):
            if a < start < b or a < end < b:
                raise TokenizationMismatch(f"turn boundary at character {start if a < start < b else end} splits a "
                                           f"token: {rendered.text[max(0, a - 20):b + 20]!r}")
            if a >= start and b <= end and b > a and ids[i] != image_token_id:
                labels[i] = ids[i]
    return Encoded(bos + list(ids), [IGNORE_INDEX] * len(bos) + labels)
