"""Issue 10, items 2 and 3: model loading fails in one line naming the problem, offline fails fast;
`load("demo")` works and `load(path)` without a config returns an unpatched model."""

import time
from pathlib import Path

import pytest

from focusvlm.cli import main
from focusvlm.runtime import ModelLoadError, load_model

ROOT = Path(__file__).resolve().parents[2]
IMAGE = str(ROOT / "focusvlm" / "assets" / "chelsea.jpg")


def generate(model, capsys):
    capsys.readouterr()  # only what the command itself prints
    code = main(["generate", "--model", str(model), "--image", IMAGE, "--prompt", "hi"])
    err = capsys.readouterr().err.strip()
    return code, err


def test_missing_folder(tmp_path, capsys):
    code, err = generate(tmp_path / "no-such-model", capsys)
    assert code == 2
    assert err == f"focusvlm generate: error: model folder not found: {tmp_path / 'no-such-model'}"


def test_relative_missing_folder_is_not_called_a_hub_id(capsys):
    code, err = generate("./checkpoints/llava", capsys)
    assert code == 2 and err == "focusvlm generate: error: model folder not found: ./checkpoints/llava"


def test_empty_folder(tmp_path, capsys):
    code, err = generate(tmp_path, capsys)
    assert code == 2
    assert err == f"focusvlm generate: error: {tmp_path} holds no config.json, so it is not a saved model " \
                  "(the folder is empty)"


def test_folder_without_config_names_its_files(tmp_path, capsys):
    (tmp_path / "weights.bin").write_bytes(b"x")
    code, err = generate(tmp_path, capsys)
    assert code == 2 and err.endswith("holds no config.json, so it is not a saved model (it has: weights.bin)")


def test_file_instead_of_folder(tmp_path, capsys):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    code, err = generate(f, capsys)
    assert code == 2 and err == f"focusvlm generate: error: model folder is a file, not a model folder: {f}"


def test_folder_with_config_but_no_weights(tmp_path, capsys):
    from tiny_llava_folder import save_tiny_llava

    folder = save_tiny_llava(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    code, err = generate(folder, capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"focusvlm generate: error: {folder}: the config loaded but the model or its processor did not")


def test_offline_hub_id_fails_fast_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model("some-org/not-cached-model", "cpu")
    assert time.perf_counter() - start < 5
    msg = str(info.value)
    assert "\n" not in msg and "not in the local Hugging Face cache" in msg and "HF_HUB_OFFLINE is set" in msg


def test_unreachable_hub_fails_fast_without_retries(monkeypatch):
    """No HF_HUB_OFFLINE, but no route to the hub: one short probe, then the cache only.
    The hub client alone retries with backoff for ~23 s before giving up."""
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model("some-org/not-cached-model", "cpu")
    assert time.perf_counter() - start < 5
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("some-org/not-cached-model: no local folder of that name, and not in the local Hugging "
                          "Face cache while the hub is offline (http://127.0.0.1:9 unreachable")


def test_load_without_config_returns_the_stock_model(tmp_path):
    from tiny_llava_folder import save_tiny_llava

    from focusvlm import CMAIConfig, FocusConfig, load, patch, unpatch

    folder = save_tiny_llava(tmp_path / "m")
    model, processor = load(str(folder))
    assert getattr(model, "_focusvlm", None) is None
    handle = patch(model, FocusConfig(cmai=CMAIConfig(gamma_max=0.5)), processor)  # the README's next step
    assert handle.cmai is not None
    unpatch(model, processor)
    patched_model, _ = load(str(folder), FocusConfig(cmai=CMAIConfig(gamma_max=0.5)))
    assert patched_model._focusvlm.config.cmai.gamma_max == 0.5


@pytest.mark.slow
def test_load_demo_in_python(demo):
    from focusvlm import load

    model, processor = load("demo")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert getattr(model, "_focusvlm", None) is None and processor.tokenizer.padding_side == "left"


def test_unsupported_family_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    code, err = generate(tmp_path, capsys)
    assert code == 2
    assert err.startswith("focusvlm generate: error: focusvlm has no adapter for model_type 'bert'; supported: "
                          "LLaVA-1.5 (model_type llava)")
    assert len(err.splitlines()) == 1


def test_broken_config_json_names_the_file(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": ')
    code, err = generate(tmp_path, capsys)
    assert code == 2 and err.startswith(f"focusvlm generate: error: {tmp_path / 'config.json'}: ")
    assert len(err.splitlines()) == 1
