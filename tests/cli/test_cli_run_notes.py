"""Issue 10, items 5 and 10: configs that switch nothing on are flagged, every output names the
active methods, --no-progress silences the loading bars, --max-new-tokens is checked against the
context length. On the tiny saved LLaVA (loads in a second)."""

import json
from pathlib import Path

import pytest

from focusvlm.cli import main

IMAGE = str(Path(__file__).resolve().parents[2] / "focusvlm" / "assets" / "chelsea.jpg")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_llava_folder import save_tiny_llava

    return str(save_tiny_llava(tmp_path_factory.mktemp("tiny") / "m"))


def gen(capsys, tiny, *extra):
    capsys.readouterr()
    code = main(["generate", "--model", tiny, "--image", IMAGE, "--prompt", "w3 w4", "--max-new-tokens", "3",
                 "--device", "cpu", "--no-progress", *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("text,expected", [
    ("", " switches no method on (it is empty or every section is null); running the stock model"),
    ("cmai:\n", ": `cmai:` has no value, so it stays off (write `cmai: {}` for its defaults); no method is switched "
              "on, running the stock model"),
])
def test_config_that_switches_nothing_on_is_flagged(tmp_path, capsys, tiny, text, expected):
    cfg = tmp_path / "focus.yaml"
    cfg.write_text(text)
    code, out, err = gen(capsys, tiny, "--config", str(cfg))
    assert code == 0
    warnings = [line for line in err.splitlines() if line.startswith("focusvlm: warning:")]
    assert warnings == [f"focusvlm: warning: {cfg}{expected}"], err
    assert "stock (no method switched on)" in err


def test_config_with_a_method_gives_no_warning_and_is_named(tmp_path, capsys, tiny):
    cfg = tmp_path / "focus.yaml"
    cfg.write_text("cmai: {gamma_max: 0.5}\n")
    code, out, err = gen(capsys, tiny, "--config", str(cfg))
    assert code == 0 and "warning" not in err
    assert f"[{tiny}, cmai(gamma_max=0.5):" in err  # text mode names the methods that were on


def test_json_output_names_the_methods(capsys, tiny):
    code, out, err = gen(capsys, tiny, "--cmai", "0.3", "--json")
    assert code == 0 and json.loads(out)["methods"] == "cmai(gamma_max=0.3)"


def test_no_progress_silences_the_loading_bars(capsys, tiny):
    from focusvlm.runtime import set_progress_bars

    try:
        _, _, err = gen(capsys, tiny)
        assert "Loading weights" not in err
        set_progress_bars(True)
        capsys.readouterr()
        assert main(["generate", "--model", tiny, "--image", IMAGE, "--prompt", "w3", "--max-new-tokens", "2",
                     "--device", "cpu"]) == 0
        assert "Loading weights" in capsys.readouterr().err  # the bar exists; the flag is what removed it
    finally:
        set_progress_bars(True)


def test_max_new_tokens_beyond_the_context_is_refused(capsys, tiny):
    code, out, err = gen(capsys, tiny, "--max-new-tokens", "5000")
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "focusvlm generate: error: --max-new-tokens 5000: 5000 new tokens exceed the model's context length of "
        "2048 tokens (max_position_embeddings); at most 2048 for the answer")


def test_prompt_plus_answer_beyond_the_context_is_refused(tiny):
    from focusvlm.runtime import HFGenerator, load_image, load_model

    model, processor = load_model(tiny, "cpu")
    with pytest.raises(ValueError, match=r"--max-new-tokens 2000: \d+ prompt tokens \+ 2000 new tokens exceed the "
                                         r"model's context length of 2048 tokens"):
        HFGenerator(model, processor).generate(["w1"], [load_image(IMAGE)], 2000)
