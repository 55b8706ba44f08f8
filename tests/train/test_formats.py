"""Assistant-only labels, token by token, in each chat format (hand-checked expectations)."""

import pytest

import tiny
from focusvlm.train.formats import (IGNORE_INDEX, ChatFormat, TokenizationMismatch, Turn, VICUNA_SYSTEM,
                                    render_with_template, vicuna_v1_prompt)

TURNS = [Turn("user", "<image>\nWhat is in the picture?"), Turn("assistant", "A cat sits."),
         Turn("user", "Is it day?"), Turn("assistant", "Yes.")]


def pairs(processor, enc):
    tok = processor.tokenizer
    return [(tok.decode([i]), l != IGNORE_INDEX) for i, l in zip(enc.input_ids, enc.labels)]


def check_labels(enc):
    """Labels are either -100 or the token itself."""
    assert len(enc.labels) == len(enc.input_ids)
    assert all(l in (IGNORE_INDEX, i) for i, l in zip(enc.input_ids, enc.labels))


@pytest.fixture(scope="module")
def proc():
    return tiny.processor()


def test_plain(proc):
    enc = ChatFormat("plain", proc, tiny.IMAGE_ID).encode(TURNS[:2])
    check_labels(enc)
    assert pairs(proc, enc) == [("<s>", False), ("<image>", False), ("A", True), (" cat", True), (" sits", True),
                                (".", True), ("\n", True)]


def test_plain_needs_one_exchange(proc):
    with pytest.raises(ValueError, match="exactly one human turn and one gpt turn"):
        ChatFormat("plain", proc, tiny.IMAGE_ID).encode(TURNS)


def test_vicuna_v1(proc):
    fmt = ChatFormat("vicuna_v1", proc, tiny.IMAGE_ID)
    assert fmt.render(TURNS).text == (VICUNA_SYSTEM + " USER: <image>\nWhat is in the picture? ASSISTANT: "
                                      "A cat sits.</s>USER: Is it day? ASSISTANT: Yes.</s>")
    enc = fmt.encode(TURNS)
    check_labels(enc)
    got = pairs(proc, enc)
    system_tokens = len(proc.tokenizer(VICUNA_SYSTEM, add_special_tokens=False)["input_ids"])
    assert got[0] == ("<s>", False)
    assert not any(sup for _, sup in got[:1 + system_tokens])
    assert got[1 + system_tokens:] == [
        (" USER", False), (":", False), (" ", False), ("<image>", False), ("\n", False), ("What", False),
        (" is", False), (" in", False), (" the", False), (" pic", False), ("tu", False), ("re", False), ("?", False),
        (" ASS", False), ("ISTAN", False), ("T", False), (":", False),
        (" A", True), (" cat", True), (" sits", True), (".", True), ("</s>", True),
        ("USER", False), (":", False), (" ", False), ("Is", False), (" it", False), (" day", False), ("?", False),
        (" ASS", False), ("ISTAN", False), ("T", False), (":", False),
        (" Yes", True), (".", True), ("</s>", True)]


def test_chat_template(proc):
    enc = ChatFormat("chat_template", proc, tiny.IMAGE_ID).encode(TURNS)
    check_labels(enc)
    assert pairs(proc, enc) == [
        ("<|im_start|>", False), ("user", False), ("\n", False), ("<image>", False), ("\n", False), ("What", False),
        (" is", False), (" in", False), (" the", False), (" pic", False), ("tu", False), ("re", False), ("?", False),
        ("<|im_end|>", False), ("\n", False), ("<|im_start|>", False), ("a", False), ("ss", False),
        ("istant", False), ("\n", False),
        ("A", True), (" cat", True), (" sits", True), (".", True), ("<|im_end|>", True), ("\n", True),
        ("<|im_start|>", False), ("user", False), ("\n", False), ("Is", False), (" it", False), (" day", False),
        ("?", False), ("<|im_end|>", False), ("\n", False), ("<|im_start|>", False), ("a", False), ("ss", False),
        ("istant", False), ("\n", False),
        ("Y", True), ("es", True), (".", True), ("<|im_end|>", True), ("\n", True)]


def test_boundary_that_splits_a_token_is_refused(proc):
    """A boundary inside a token (" as" | "sistant" where " assistant" is one token) cannot be masked on
    token boundaries: refused, never guessed."""
    from focusvlm.train.formats import Rendered, tokenize_rendered

    assert proc.tokenizer.tokenize(" assistant") == ["Ġassistant"]
    text = "The assistant"
    rendered = Rendered(text, [(len("The as"), len(text))], bos=False)
    with pytest.raises(TokenizationMismatch, match="splits a token"):
        tokenize_rendered(rendered, proc.tokenizer, tiny.IMAGE_ID)
    from focusvlm.train.formats import _labels_from_offsets  # the fast index path refuses it too

    enc = proc.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    with pytest.raises(TokenizationMismatch, match="splits a token"):
        _labels_from_offsets(rendered, enc["input_ids"], enc["offset_mapping"], [], tiny.IMAGE_ID)


def test_compose_template_renders_vicuna_v1(proc):
    """The chat template compose_llava saves renders exactly what training's vicuna_v1 renders."""
    from focusvlm.models.compose import VICUNA_V1_CHAT_TEMPLATE

    p = tiny.processor(chat_template=VICUNA_V1_CHAT_TEMPLATE)
    train_text = ChatFormat("vicuna_v1", p, tiny.IMAGE_ID).render(TURNS).text
    via_template = ChatFormat("chat_template", p, tiny.IMAGE_ID).render(TURNS).text
    assert via_template == train_text
    prompt = p.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}],
                                   add_generation_prompt=True, tokenize=False)
    assert prompt == vicuna_v1_prompt("<image>\nQ?")


@pytest.mark.slow
def test_demo_chatml_labels(demo):
    """The demo model (SmolLM2, ChatML): each assistant turn's supervised tokens are exactly the tokens of
    its content + <|im_end|> + newline; everything else is -100."""
    _, processor = demo
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    enc = ChatFormat("chat_template", processor, image_id).encode(TURNS)
    check_labels(enc)
    runs, cur = [], []
    for i, l in zip(enc.input_ids, enc.labels):
        if l != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    tok = processor.tokenizer
    assert runs == [tok("A cat sits.<|im_end|>\n", add_special_tokens=False)["input_ids"],
                    tok("Yes.<|im_end|>\n", add_special_tokens=False)["input_ids"]]
    text = tok.decode(enc.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n<|im_start|>user\n<image>\n")


@pytest.mark.parametrize("name", ["plain", "vicuna_v1", "chat_template"])
def test_fast_index_labels_equal_exact_labels(proc, name):
    """The data index labels by token offsets (one batched tokenizer call); training uses the exact
    prefix-verified labels. Both must agree."""
    fmt = ChatFormat(name, proc, tiny.IMAGE_ID)
    convs = [TURNS[:2], TURNS[:2]] if name == "plain" else [TURNS, TURNS[:2], [Turn("user", "Hi?"), Turn("assistant", "Yes.")]]
    for turns, fast in zip(convs, fmt.encode_many(convs)):
        exact = fmt.encode(turns)
        assert (fast.input_ids, fast.labels) == (exact.input_ids, exact.labels)


@pytest.mark.slow
def test_fast_index_labels_equal_exact_labels_demo(demo):
    _, processor = demo
    fmt = ChatFormat("chat_template", processor, processor.tokenizer.convert_tokens_to_ids("<image>"))
    fast = fmt.encode_many([TURNS])[0]
    exact = fmt.encode(TURNS)
    assert (fast.input_ids, fast.labels) == (exact.input_ids, exact.labels)
