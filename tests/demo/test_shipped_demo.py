"""The shipped demo model that sees: within budget, documented, loads offline, answers its bundled picture."""

import json

import pytest

from focusvlm.models.demo import DEMO_WEIGHTS_DIR, demo_focus_config_path, demo_twin_dir
from focusvlm.models.demo import ship as S
from focusvlm.models.factory import demo_image_path
from focusvlm.runtime import check_model_source


def test_shipped_weights_are_within_budget_and_described():
    total = sum(f.stat().st_size for f in DEMO_WEIGHTS_DIR.rglob("*") if f.is_file())
    assert total <= S.BUDGET_BYTES, f"{total / 1e6:.1f} MB shipped"
    card = (DEMO_WEIGHTS_DIR / "MODEL_CARD.md").read_text()
    for must in ("easy-VQA", "focusvlm train --recipe demo", "SmolLM2-135M-Instruct", "accuracy"):
        assert must in card
    meta = S.read_meta(demo_twin_dir("stock"))
    assert meta["info"]["twin"] == "stock" and meta["bytes"] <= S.BUDGET_BYTES
    assert meta["lora"]["dtype"] == "torch.float16"
    if demo_focus_config_path().is_file():  # the VMTC+CMAI-trained twin, where it ships
        from focusvlm import FocusConfig

        trained = FocusConfig.load(demo_focus_config_path())
        assert trained.vmtc is not None and trained.cmai is not None


def test_an_unshipped_twin_is_named():
    from focusvlm.models.demo.load import load_named_demo

    if demo_focus_config_path().is_file():
        pytest.skip("the demo-focus twin ships in this version")
    with pytest.raises(ValueError, match="demo-focus twin is not shipped"):
        load_named_demo("demo-focus")


def test_demo_names_need_no_folder():
    from focusvlm.models.demo import DEMO_MODELS
    from focusvlm.runtime import DEMO_NAMES

    assert set(DEMO_NAMES) == set(DEMO_MODELS)  # runtime takes them from models.demo, which imports no torch
    for name in ("demo", "demo-focus", "demo-random"):
        assert check_model_source(name) is None


@pytest.mark.slow
@pytest.mark.parametrize("name", ["demo", "demo-focus"])
def test_load_demo_answers_the_bundled_picture(name):
    from focusvlm import FocusConfig, load
    from focusvlm.runtime import HFGenerator, load_image

    if name == "demo-focus" and not demo_focus_config_path().is_file():
        pytest.skip("the demo-focus twin is not shipped in this version")
    # the focus twin runs as trained: VMTC + CMAI on
    model, processor = load(name, FocusConfig.load(demo_focus_config_path()) if name == "demo-focus" else None)
    image = load_image(demo_image_path("easyvqa"))
    truth = json.loads((DEMO_WEIGHTS_DIR / "easyvqa_picture.json").read_text())
    other_color = "red" if truth["color"] != "red" else "green"
    other_shape = "circle" if truth["shape"] != "circle" else "rectangle"
    # yes/no in both directions and both question forms: the picture, not the question's wording, decides
    # (a twin that learned easy-VQA's form prior answers "no" to every positive question)
    asked = {"What color is the shape?": truth["color"], "What shape is in the image?": truth["shape"],
             f"Is there a {truth['color']} shape?": "yes", f"Is there a {other_color} shape?": "no",
             f"Is there not a {truth['shape']}?": "no", f"Is there not a {other_shape}?": "yes"}
    prompts = [f"{q}\nAnswer the question using a single word or phrase." for q in asked]
    answers = [o.text.strip().lower().rstrip(".") for o in HFGenerator(model, processor).generate(
        prompts, [image] * len(prompts), 3)]
    assert dict(zip(asked, answers)) == asked


@pytest.mark.slow
def test_demo_command_shows_three_rows(capsys):
    from focusvlm.cli import main

    assert main(["demo", "--json", "--max-new-tokens", "8", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["rows"]
    assert len(rows) == 3
    tokens = [r["question"]["image_tokens"] for r in rows]
    vision = S.read_meta(demo_twin_dir("stock"))["vision_config"]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    assert tokens[0] == tokens[1] == patches and tokens[2] < patches  # VMTC compresses the picture
    truth = json.loads((DEMO_WEIGHTS_DIR / "easyvqa_picture.json").read_text())
    assert rows[0]["question"]["answer"].strip().lower().rstrip(".") == truth["color"]
    # the yes/no question only the picture answers ("Is there a blue shape?" about the blue triangle)
    assert truth["color"] in out["yes_no"]
    assert [r["yes_no"]["answer"].strip().lower().rstrip(".") for r in rows] == ["yes"] * 3
    assert all(isinstance(r["instruction"]["follows"], bool) for r in rows)
    from focusvlm.demo.experiment import shipped_summary

    if shipped_summary() is None:  # no experiment measured on these twins: no figure is claimed
        assert all(r["measured_if"] is None for r in rows)
    else:
        assert rows[0]["measured_if"]["if_strict"] == shipped_summary()["arms"]["stock"]["if_strict"]


def test_gguf_conversion_bar_follows_the_progress_switch(capfd):
    """--no-progress silences transformers' own GGUF conversion bar too, and only for the load."""
    from transformers import modeling_gguf_pytorch_utils as gguf_reader
    from transformers.utils import logging as hf_logging

    from focusvlm.models.demo.lm import smollm2_lm_from_gguf
    from focusvlm.runtime import set_progress_bars

    original = gguf_reader.tqdm
    set_progress_bars(False)
    try:  # the conversion itself: smollm2_lm() reads the cached conversion, which draws no such bar
        lm, tokenizer = smollm2_lm_from_gguf()
    finally:
        set_progress_bars(True)
    assert "GGUF tensors" not in capfd.readouterr().err
    assert gguf_reader.tqdm is original and hf_logging.is_progress_bar_enabled()
    assert lm.config.model_type == "llama" and "<image>" in tokenizer.get_vocab()
