"""easy-VQA as LLaVA data: question types, labels per image (questions and pixels), records, the test sample."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("easy_vqa")

from PIL import Image, ImageDraw  # noqa: E402

from focusvlm.demo import data as D  # noqa: E402


@pytest.fixture(scope="module")
def train_items():
    return D.read_split("train")


def test_splits_have_the_published_sizes(train_items):
    test = D.read_split("test")
    assert len(train_items) == 38575 and len(test) == 9673
    assert len({it.image_id for it in train_items}) == 4000 and len({it.image_id for it in test}) == 1000
    assert sum(it.qtype == "yes/no" for it in train_items) == 28407  # easy-VQA's README figure
    assert all((D.data_root() / it.image).is_file() for it in train_items[:50])
    assert train_items[0].question[0].isupper()


def test_question_type_by_answer_set():
    assert [D.question_type(a) for a in ("teal", "triangle", "no")] == ["color", "shape", "yes/no"]
    with pytest.raises(ValueError, match="purple"):
        D.question_type("purple")


@pytest.mark.parametrize("question,answer,holds,denied", [
    ("What is the blue shape?", "rectangle", {("color", "blue"), ("shape", "rectangle")}, set()),
    ("What color is the triangle?", "red", {("shape", "triangle"), ("color", "red")}, set()),
    ("What shape is present?", "circle", {("shape", "circle")}, set()),
    ("Is there a red shape in the image?", "no", set(), {("color", "red")}),
    ("Is there not a blue shape?", "no", {("color", "blue")}, set()),
    ("Does the image not contain a gray shape?", "yes", set(), {("color", "gray")}),
    ("Is no circle present?", "no", {("shape", "circle")}, set()),
    ("Is no yellow shape present?", "yes", set(), {("color", "yellow")}),
    ("Is a rectangle present?", "yes", {("shape", "rectangle")}, set()),
])
def test_claims_read_every_question_form(question, answer, holds, denied):
    yes, no = D._claims(question, answer)
    assert set(yes) == holds and set(no) == denied


def _item(image_id, question, answer, n=0):
    return D.VQAItem(f"t-{image_id}-{n}", "train", image_id, f"train/images/{image_id}.png", question, answer,
                     D.question_type(answer))


def test_labels_from_questions_and_contradictions_fail():
    items = [_item(7, "What color is the shape?", "green"), _item(7, "Is there a circle?", "yes", 1)]
    assert D.image_labels(items) == {7: ("green", "circle")}
    with pytest.raises(ValueError, match="contradicts"):
        D.image_labels(items + [_item(7, "Is there a green shape?", "no", 2)])


def test_labels_fall_back_to_pixels_when_questions_leave_them_open(train_items):
    # image 49: its questions only deny colours (gray, green, yellow) and deny rectangle/affirm circle
    items = [it for it in train_items if it.image_id == 49]
    facts = D.question_facts(items)[49]
    assert D.decided(*facts["color"], D.COLORS) is None
    assert D.image_labels(items)[49] == ("blue", "circle")  # the picture is a small blue circle


def _draw(shape, color, size=40, at=(10, 12)):
    """A 128-px drawing downsampled to 64 like easy-VQA's generator (background 240, 235, 250)."""
    im = Image.new("RGB", (128, 128), (240, 235, 250))
    d = ImageDraw.Draw(im)
    x, y = at[0] * 2, at[1] * 2
    s = size
    if shape == "rectangle":
        d.rectangle([(x, y), (x + s, y + s // 2)], fill=D.PALETTE[color])
    elif shape == "circle":
        d.ellipse([(x, y), (x + s, y + s)], fill=D.PALETTE[color])
    else:
        y += s
        d.polygon([(x, y), (x + s, y), (x + s * math.cos(-math.pi / 3), y + s * math.sin(-math.pi / 3))],
                  fill=D.PALETTE[color])
    return im.resize((64, 64), resample=Image.BILINEAR)


@pytest.mark.parametrize("shape,color,size", [("circle", "teal", 60), ("circle", "brown", 16),
                                              ("rectangle", "yellow", 50), ("rectangle", "black", 18),
                                              ("triangle", "gray", 60), ("triangle", "red", 20)])
def test_pixel_labels_on_drawn_pictures(tmp_path, shape, color, size):
    path = tmp_path / "x.png"
    _draw(shape, color, size).save(path)
    assert D.pixel_labels(path) == (color, shape)


def test_pixel_labels_agree_with_question_labels_on_real_images(train_items):
    checked = 0
    facts = D.question_facts([it for it in train_items if it.image_id < 60])
    for image_id, per in facts.items():
        color, shape = D.decided(*per["color"], D.COLORS), D.decided(*per["shape"], D.SHAPES)
        seen = D.pixel_labels(D.data_root() / f"train/images/{image_id}.png")
        if color:
            assert seen[0] == color, image_id
            checked += 1
        if shape:
            assert seen[1] == shape, image_id
            checked += 1
    assert checked > 100


def test_pixel_labels_reject_a_blank_picture(tmp_path):
    Image.new("RGB", (64, 64), (240, 240, 240)).save(tmp_path / "blank.png")
    with pytest.raises(ValueError, match="no shape"):
        D.pixel_labels(tmp_path / "blank.png")


def test_stage1_captions_name_each_images_colour_and_shape(train_items):
    items = D.train_subset(train_items, 15, seed=0)
    labels = D.image_labels(items)
    recs = D.stage1_records(items, seed=0)
    assert len(recs) == 15
    for r in recs:
        human, gpt = r["conversations"]
        assert human == {"from": "human", "value": f"{D.IMAGE_TOKEN}\n{D.CAPTION_PROMPT}"}
        image_id = int(Path(r["image"]).stem)
        color, shape = labels[image_id]
        assert f"{color} {shape}" in gpt["value"] and gpt["from"] == "gpt"
    assert recs == D.stage1_records(items, seed=0)


@pytest.mark.parametrize("turns", [0, 1, 3])
def test_stage2_conversations_hold_every_question_once(train_items, turns):
    items = D.train_subset(train_items, 12, seed=1)
    recs = D.stage2_records(items, seed=0, turns=turns)
    by_id = {it.qid: it for it in items}
    seen = []
    for r in recs:
        conv = r["conversations"]
        assert [c["from"] for c in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith(D.IMAGE_TOKEN + "\n")
        assert all(D.IMAGE_TOKEN not in c["value"] for c in conv[1:])
        assert all(c["value"].endswith(D.SHORT_ANSWER) for c in conv[0::2])
        if turns:
            assert len(conv) // 2 <= turns
        for qid, human, gpt in zip(r["question_ids"], conv[0::2], conv[1::2]):
            it = by_id[qid]
            assert it.question in human["value"] and gpt["value"] == it.answer and r["image"] == it.image
            seen.append(qid)
    assert sorted(seen) == sorted(by_id)
    if turns == 0:
        assert len(recs) == 12
    assert D.stage2_records(items, seed=0, turns=turns) == recs
    if turns != 1:  # another seed shuffles the questions differently
        assert D.stage2_records(items, seed=5, turns=turns) != recs


def test_test_sample_is_fixed_and_reaches_every_type():
    a, b = D.test_items(2000, seed=0), D.test_items(2000, seed=0)
    assert a == b and len(a) == 2000 and len({it.qid for it in a}) == 2000
    assert {it.qtype for it in a} == set(D.QUESTION_TYPES)
    assert D.test_items(2000, seed=1) != a
    assert len(D.test_items(None)) == 9673


def test_write_easyvqa_files(tmp_path):
    files = D.write_easyvqa(tmp_path / "out", seed=0, turns=2, train_images=10, test_sample=40)
    assert files.image_folder == D.data_root()
    captions = json.loads(files.captions.read_text())
    instruct = json.loads(files.instruct.read_text())
    test = json.loads(files.test.read_text())
    rows = [json.loads(line) for line in files.test_questions.read_text().splitlines()]
    manifest = json.loads(files.manifest.read_text())
    assert len(captions) == 10 and len(test) == len(rows) == 40
    assert all((files.image_folder / r["image"]).is_file() for r in captions + instruct + test)
    assert all(Path(r["image"]).is_absolute() and Path(r["image"]).is_file() for r in rows)
    assert {r["type"] for r in rows} <= set(D.QUESTION_TYPES)
    assert manifest["stage2_records"] == len(instruct) and manifest["train_images"] == 10
    assert sum(manifest["test_by_type"].values()) == 40
    with pytest.raises(ValueError, match="images must be"):
        D.write_easyvqa(tmp_path / "bad", train_images=0)


def test_balance_yes_no_evens_each_question_form_and_attribute_and_keeps_the_rest():
    items = D.read_split("train")
    kept = D.balance_yes_no(items, seed=0)

    def counts(among):
        found = {}
        for it in among:
            if it.qtype == "yes/no":
                key = (D.question_attribute(it.question), D.is_negated(it.question), it.answer)
                found[key] = found.get(key, 0) + 1
        return found

    after = counts(kept)
    for attribute in ("color", "shape"):
        for negated in (False, True):
            assert after[(attribute, negated, "yes")] == after[(attribute, negated, "no")] > 0, (attribute, negated)
    # the unbalanced source: the form alone predicts the answer most of the time, and balancing the form alone
    # would leave the shape questions' answer predictable from form + attribute (colour questions dominate)
    source = [it for it in items if it.qtype == "yes/no" and not D.is_negated(it.question)]
    assert sum(it.answer == "no" for it in source) / len(source) > 0.75
    before = counts(items)
    assert before[("color", False, "no")] > 3 * before[("shape", False, "no")]
    # colour and shape questions all kept, order preserved, deterministic
    assert [it for it in kept if it.qtype != "yes/no"] == [it for it in items if it.qtype != "yes/no"]
    positions = {it.qid: n for n, it in enumerate(items)}
    assert [positions[it.qid] for it in kept] == sorted(positions[it.qid] for it in kept)
    assert D.balance_yes_no(items, seed=0) == kept and D.balance_yes_no(items, seed=1) != kept


def test_curriculum_puts_colour_and_shape_first_then_yes_no_at_its_share():
    items = D.balance_yes_no(D.read_split("train"), seed=0)
    order = D.curriculum(items, size=1000, lead=200, yes_no_share=0.9, seed=0)
    assert len(order) == 1000 and len({it.qid for it in order}) == 1000      # no question twice
    assert {it.qid for it in order} <= {it.qid for it in items}
    assert all(it.qtype != "yes/no" for it in order[:200])                  # the lead: what the picture shows
    assert {it.qtype for it in order[:200]} == {"color", "shape"}
    tail = order[200:]
    assert sum(it.qtype == "yes/no" for it in tail) == 720                  # 90 % of the 800 after the lead
    assert {it.qtype for it in tail} == set(D.QUESTION_TYPES)
    # the yes/no part is mixed through the tail, not appended as a block
    first_half = sum(it.qtype == "yes/no" for it in tail[:400])
    assert 300 < first_half < 420
    assert D.curriculum(items, 1000, 200, 0.9, seed=0) == order and D.curriculum(items, 1000, 200, 0.9, seed=1) != order
    with pytest.raises(ValueError, match="yes/no share"):
        D.curriculum(items, 1000, 200, 1.5)
    with pytest.raises(ValueError, match="lead"):
        D.curriculum(items, 100, 200, 0.9)
    with pytest.raises(ValueError, match="needs more than"):
        D.curriculum(items[:50], 100, 0, 0.5)


def test_write_easyvqa_writes_the_curriculum_in_training_order(tmp_path):
    files = D.write_easyvqa(tmp_path, turns=1, train_images=200, test_sample=20, balance=True,
                            curriculum_size=120, curriculum_lead=40, yes_no_share=0.75)
    records = json.loads(files.instruct.read_text())
    expected = D.curriculum(D.balance_yes_no(D.train_subset(D.read_split("train"), 200, 0), 0), 120, 40, 0.75, 0)
    assert [r["question_ids"] for r in records] == [[it.qid] for it in expected]
    manifest = json.loads(files.manifest.read_text())
    assert manifest["curriculum"] == {"size": 120, "lead": 40, "yes_no_share": 0.75}
    with pytest.raises(ValueError, match="turns must be 1"):
        D.write_easyvqa(tmp_path / "bad", turns=4, train_images=20, curriculum_size=10)


def test_negation_forms():
    for q in ("Is there not a red shape?", "Does the image not contain a circle?", "Is no triangle present?"):
        assert D.is_negated(q)
    for q in ("Is there a red shape?", "Does the image contain a circle?", "Is a triangle present?"):
        assert not D.is_negated(q)


def test_question_attribute_of_every_yes_no_test_question():
    assert D.question_attribute("Is there not a red shape?") == "color"
    assert D.question_attribute("Does the image contain a circle?") == "shape"
    with pytest.raises(ValueError, match="one colour or one shape"):
        D.question_attribute("Is there a red circle?")
    # every yes/no question of the fixed sample names exactly one of them (else the call raises), and both occur
    kinds = {D.question_attribute(it.question) for it in D.test_items(2000) if it.qtype == "yes/no"}
    assert kinds == {"color", "shape"}


def test_description_records_name_the_pictures_colour_and_shape(train_items):
    labels = D.image_labels(train_items)
    recs = D.description_records(train_items, 30, seed=0)
    assert len(recs) == 30 and recs == D.description_records(train_items, 30, seed=0)
    assert recs != D.description_records(train_items, 30, seed=1)
    by_image = {it.image: it.image_id for it in train_items}
    assert len({r["image"] for r in recs}) > 10 and len({r["id"] for r in recs}) == 30
    for r in recs:
        human, gpt = r["conversations"][0]["value"], r["conversations"][1]["value"]
        color, shape = labels[by_image[r["image"]]]
        assert human.startswith(f"{D.IMAGE_TOKEN}\n") and human.split("\n", 1)[1] in D.DESCRIBE_PROMPTS
        assert gpt in {d.format(color=color, shape=shape) for d in D.DESCRIPTIONS}


def test_sentence_records_alternate_descriptions_and_sentence_answers(train_items):
    labels = D.image_labels(train_items)
    recs = D.sentence_records(train_items, 40, seed=0)
    assert len(recs) == 40 and recs == D.sentence_records(train_items, 40, seed=0)
    by_image = {it.image: it.image_id for it in train_items}
    for n, r in enumerate(recs):
        human, gpt = r["conversations"][0]["value"], r["conversations"][1]["value"]
        color, shape = labels[by_image[r["image"]]]
        assert human.startswith(f"{D.IMAGE_TOKEN}\n") and D.SHORT_ANSWER not in human
        assert gpt.endswith(".") and len(gpt.split()) >= 3  # a sentence, not a word
        if n % 2 == 0:
            assert human.split("\n", 1)[1] in D.DESCRIBE_PROMPTS
            assert color in gpt and shape in gpt
        else:
            question = human.split("\n", 1)[1]
            item = next(it for it in train_items if it.image == r["image"] and it.question == question)
            if item.qtype == "yes/no":
                assert gpt.startswith("Yes." if item.answer == "yes" else "No.")
            else:
                assert item.answer in gpt


def test_interleave_puts_the_extras_after_each_batch_of_short_answers():
    short = [{"id": f"s{i}"} for i in range(7)]
    a, b = [{"id": "a0"}, {"id": "a1"}, {"id": "a2"}], [{"id": "b0"}, {"id": "b1"}]
    out = D.interleave(short, 2, [a, b], steps=3)
    assert [r["id"] for r in out] == ["s0", "s1", "a0", "b0", "s2", "s3", "a1", "b1", "s4", "s5", "a2", "b0"]
    with pytest.raises(ValueError, match="need 8 short-answer records, got 7"):
        D.interleave(short, 2, [a], steps=4)
    with pytest.raises(ValueError, match="empty"):
        D.interleave(short, 2, [[]], steps=1)


def test_question_rows_carry_the_pictures_true_description():
    items = D.test_items(30, seed=0)
    labels = D.image_labels(D.read_split("test"))
    for row, it in zip(D.question_rows(items), items):
        assert row["description"] == D.true_description(*labels[it.image_id])
