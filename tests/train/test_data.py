"""Reading and checking LLaVA data: every problem named with file:line and id; --validate; truncation;
the modality-grouped order."""

import json

import pytest
import torch

import tiny
from focusvlm.cli import main as cli
from focusvlm.train.data import (Collator, DataError, SupervisedDataset, check_record, expand_and_truncate,
                                 modality_grouped_order, read_records)
from focusvlm.train.formats import IGNORE_INDEX


def good(i, image=None):
    rec = {"id": f"g{i}", "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + "Hi?"},
                                            {"from": "gpt", "value": "A cat sits."}]}
    if image:
        rec["image"] = image
    return rec


def bad_jsonl(tmp_path):
    """Line 1 good, 2 malformed, 3 unknown role, 4 missing image, 5 placeholder count, 6 unreadable image,
    7 good text-only."""
    pics = tiny.images(tmp_path / "images")
    (tmp_path / "images" / "broken.jpg").write_bytes(b"not a jpeg at all")
    lines = [json.dumps(good(1, pics[0])),
             '{"id": "m2", "conversations": [',
             json.dumps({"id": "r3", "conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]}),
             json.dumps(good(4, "nowhere.jpg")),
             json.dumps({"id": "p5", "image": pics[1], "conversations": [{"from": "human", "value": "no placeholder"},
                                                                          {"from": "gpt", "value": "y"}]}),
             json.dumps(good(6, "broken.jpg")),
             json.dumps(good(7))]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_json_list_line_numbers(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([good(1), good(2), good(3)], indent=2))
    lines = [r.line for r in read_records(path)]
    text = path.read_text().splitlines()
    assert [json.loads(path.read_text())[k]["id"] for k in range(3)] == ["g1", "g2", "g3"]
    assert all(text[n - 1].strip() == "{" for n in lines) and lines[0] == 2


def test_broken_json_list_names_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n{"id": "a", "conversations": []},\n{"id": "b", oops}\n]')
    with pytest.raises(DataError, match=r"d.json:3 id=\?: malformed JSON"):
        list(read_records(path))


@pytest.mark.parametrize("rec,msg", [
    ({"id": "x", "conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
     "unknown role 'bot' in turn 1"),
    ({"id": "x", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
     "turn 0 is from gpt"),
    ({"id": "x", "conversations": [{"from": "human", "value": "q"}]}, "the last turn is from human"),
    ({"id": "x", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image> <image>"},
                                                     {"from": "gpt", "value": "a"}]}, "2 <image> placeholder"),
    ({"id": "x", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image>"}]},
     "1 <image> placeholder\\(s\\) for 0 image"),
    ({"id": "x"}, "no 'conversations' list"),
])
def test_record_checks(rec, msg):
    from focusvlm.train.data import RawRecord

    with pytest.raises(DataError, match=rf"data.json:7 id=x: {msg}"):
        check_record(RawRecord(7, rec), 0, "data.json")


def test_single_image_moves_to_the_front():
    from focusvlm.train.data import RawRecord

    rec = {"id": "a", "image": "x.jpg", "conversations": [{"from": "human", "value": "What is this?\n<image>"},
                                                          {"from": "gpt", "value": "A cat."}]}
    assert check_record(RawRecord(1, rec), 0, "f").turns[0].text == "<image>\nWhat is this?"


def test_truncation_never_cuts_an_image():
    ids, labels = [1, 511, 5, 6, 7, 8], [-100, -100, -100, 6, 7, 8]
    assert expand_and_truncate(ids, labels, 511, 4, 100) == (
        [1, 511, 511, 511, 511, 5, 6, 7, 8], [-100] * 6 + [6, 7, 8])
    assert expand_and_truncate(ids, labels, 511, 4, 8) == ([1, 511, 511, 511, 511, 5, 6, 7], [-100] * 6 + [6, 7])
    assert "no supervised token left" in expand_and_truncate(ids, labels, 511, 4, 6)
    assert "do not fit in max_length 4" in expand_and_truncate(ids, labels, 511, 4, 4)


def test_training_stops_on_bad_data_with_file_line_and_id(tmp_path):
    path = bad_jsonl(tmp_path)
    with pytest.raises(DataError, match=r"bad.jsonl:2 id=\?: malformed JSON line"):
        SupervisedDataset(path, tmp_path / "images", tiny.processor(), tiny.IMAGE_ID, "vicuna_v1", 2048)


def test_skip_bad_records_every_skip(tmp_path):
    path = bad_jsonl(tmp_path)
    ds = SupervisedDataset(path, tmp_path / "images", tiny.processor(), tiny.IMAGE_ID, "vicuna_v1", 2048,
                           skip_bad=True, skipped_log=tmp_path / "skipped.jsonl")
    assert [s.id for s in ds.samples] == ["g1", "g6", "g7"]  # g6's image is only decoded when drawn
    assert [(r["line"], r["id"]) for r in ds.skipped.records] == [(2, "?"), (3, "r3"), (4, "g4"), (5, "p5")]
    ds.skipped.write(tmp_path)
    # drawing the sample with the unreadable image: recorded, and the next sample takes its place
    item = ds[1]
    assert torch.equal(item["input_ids"], ds[2]["input_ids"])
    logged = [json.loads(l) for l in (tmp_path / "skipped.jsonl").read_text().splitlines()]
    assert logged[-1]["id"] == "g6" and logged[-1]["line"] == 6 and "unreadable image" in logged[-1]["reason"]
    assert len(logged) == 5


def test_unreadable_image_stops_without_skip_bad(tmp_path):
    path = tmp_path / "d.jsonl"
    tiny.images(tmp_path / "images")
    (tmp_path / "images" / "broken.jpg").write_bytes(b"garbage")
    path.write_text(json.dumps(good(1, "broken.jpg")) + "\n")
    ds = SupervisedDataset(path, tmp_path / "images", tiny.processor(), tiny.IMAGE_ID, "vicuna_v1", 2048)
    with pytest.raises(DataError, match=r"d.jsonl:1 id=g1: unreadable image"):
        ds[0]


def test_unsupervised_samples_are_skipped_and_counted(tmp_path):
    tiny.images(tmp_path / "images")
    long_q = " ".join(["word"] * 300)
    recs = [good(1, "chelsea.jpg"), {"id": "long", "conversations": [{"from": "human", "value": long_q},
                                                                    {"from": "gpt", "value": "ok"}]}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(recs))
    ds = SupervisedDataset(path, tmp_path / "images", tiny.processor(), tiny.IMAGE_ID, "vicuna_v1", 200)
    assert len(ds) == 1 and ds.unsupervised == 1 and ds.bad == 0
    assert ds.skipped.records[0]["id"] == "long" and "no supervised token left" in ds.skipped.records[0]["reason"]


def test_batch_placeholders_and_padding(tmp_path):
    path = tiny.dataset(tmp_path, n=4, text_every=4)
    proc = tiny.processor()
    ds = SupervisedDataset(path, tmp_path / "images", proc, tiny.IMAGE_ID, "vicuna_v1", 2048)
    batch = Collator(0)([ds[i] for i in range(4)])
    assert batch["pixel_values"].shape == (3, 3, 112, 112)
    assert ((batch["input_ids"] == tiny.IMAGE_ID).sum(1) == torch.tensor([64, 64, 64, 0])).all()
    pad = batch["attention_mask"] == 0
    assert (batch["labels"][pad] == IGNORE_INDEX).all() and (batch["input_ids"][pad] == 0).all()
    assert (batch["labels"][batch["input_ids"] == tiny.IMAGE_ID] == IGNORE_INDEX).all()


def test_modality_grouped_order():
    has_image = [True] * 10 + [False] * 7
    lengths = list(range(17))
    order = modality_grouped_order(lengths, has_image, 4, seed=3)
    assert sorted(order) == list(range(17))
    assert order == modality_grouped_order(lengths, has_image, 4, seed=3)
    full = order[:12]  # 2 full image groups + 1 full text group, then the mixed leftovers
    for k in range(0, 12, 4):
        group = full[k:k + 4]
        assert len({has_image[i] for i in group}) == 1
        assert [lengths[i] for i in group] == sorted((lengths[i] for i in group), reverse=True)


def test_validate_cli(tmp_path, capsys):
    path = bad_jsonl(tmp_path)
    report = tmp_path / "report.json"
    rc = cli(["train", "--validate", "--data", str(path), "--image-folder", str(tmp_path / "images"),
              "--report", str(report), "--no-progress"])
    assert rc == 1
    out = capsys.readouterr().out
    rep = json.loads(report.read_text())
    assert rep["records"] == 7 and rep["usable"] == 2
    assert rep["problems_by_kind"] == {"malformed": 1, "unknown role": 1, "missing image": 1, "image count": 1,
                                       "unreadable image": 1}
    for needle in ["bad.jsonl:2 id=?: malformed JSON line", "bad.jsonl:3 id=r3: unknown role 'robot'",
                   "bad.jsonl:4 id=g4: image not found", "bad.jsonl:5 id=p5: 0 <image> placeholder(s) for 1 image",
                   "bad.jsonl:6 id=g6: unreadable image"]:
        assert needle in out


def test_validate_with_tokens(tmp_path):
    path = tiny.dataset(tmp_path, n=6)
    folder = tiny.save_tiny(tmp_path / "m")
    report = tmp_path / "r.json"
    rc = cli(["train", "--validate", "--data", str(path), "--image-folder", str(tmp_path / "images"),
              "--model", str(folder), "--format", "chat_template", "--report", str(report), "--no-progress"])
    assert rc == 0
    rep = json.loads(report.read_text())
    assert rep["usable"] == 6 and rep["tokens"]["image_tokens_per_image"] == 64 and rep["tokens"]["max"] > 64


def test_train_cli_stops_on_bad_data_then_skips_with_skip_bad(tmp_path, capsys):
    path = bad_jsonl(tmp_path)
    model = tiny.save_tiny(tmp_path / "m")
    args = ["train", "--stage", "finetune", "--model", str(model), "--data", str(path), "--image-folder",
            str(tmp_path / "images"), "--global-batch-size", "1", "--per-device-batch-size", "1", "--max-steps", "3",
            "--no-gradient-checkpointing", "--no-progress"]
    assert cli(args + ["--output-dir", str(tmp_path / "stop")]) == 2
    assert "bad.jsonl:2 id=?: malformed JSON line" in capsys.readouterr().err
    assert cli(args + ["--output-dir", str(tmp_path / "skip"), "--skip-bad"]) == 0
    skipped = [json.loads(l) for l in (tmp_path / "skip" / "skipped.jsonl").read_text().splitlines()]
    assert [(r["line"], r["id"]) for r in skipped][:4] == [(2, "?"), (3, "r3"), (4, "g4"), (5, "p5")]
    # g6's unreadable image is found when it is drawn (3 steps over 3 samples draw it): recorded as well
    assert any(r["id"] == "g6" and r.get("during") == "training" for r in skipped)
