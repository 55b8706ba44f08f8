"""`focusvlm generate` / `focusvlm demo` and `load()` on the embedded default model."""

import json

import pytest
import torch

from focusvlm import CMAIConfig, FocusConfig, load, unpatch
from focusvlm.cli import main
from focusvlm.models.demo.cache import demo_cache_dir
from focusvlm.models.factory import demo_image_path


def test_generate_reports_bad_input_clearly(capsys, tmp_path):
    assert main(["generate", "--model", "demo-random", "--image", str(tmp_path / "nope.jpg"), "--prompt", "hi"]) == 2
    assert "image not found" in capsys.readouterr().err
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    assert main(["generate", "--model", "demo-random", "--image", str(broken), "--prompt", "hi"]) == 2
    assert "unreadable image" in capsys.readouterr().err
    bad_cfg = tmp_path / "focus.yaml"
    bad_cfg.write_text("cmai: {gamma_max: 1.5}\n")
    assert main(["generate", "--model", "demo-random", "--image", str(demo_image_path()), "--prompt", "hi",
                 "--config", str(bad_cfg)]) == 2
    assert "CMAIConfig.gamma_max" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_json_with_cmai(capsys, demo):
    code = main(["generate", "--model", "demo-random", "--image", str(demo_image_path("chelsea")), "--prompt",
                 "Name one colour.", "--cmai", "0.5", "--max-new-tokens", "4", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["image_tokens"] == 576
    assert 1 <= result["new_tokens"] <= 4
    assert result["config"]["cmai"]["gamma_max"] == 0.5
    assert isinstance(result["answer"], str)


@pytest.mark.slow
def test_demo_runs_stock_and_cmai(capsys, demo):
    assert main(["demo", "--model", "demo-random", "--max-new-tokens", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["question"]["image_tokens"] for r in rows] == [576, 576, 288]  # stock, CMAI, VMTC(0.5)+CMAI
    assert rows[1]["config"]["cmai"]["gamma_max"] == 0.6 and rows[2]["config"]["vmtc"]["target"] == 0.5


@pytest.mark.slow
def test_load_patches_a_local_checkpoint(demo):
    model, processor = load(str(demo_cache_dir()), FocusConfig(cmai=CMAIConfig(gamma_max=0.3)),
                            torch_dtype="float32")
    assert model._focusvlm.config.cmai.gamma_max == 0.3
    assert model.config.text_config._attn_implementation.startswith("focusvlm_cmai_")
    ids = processor.tokenizer("hello there", return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()
    unpatch(model, processor)
    assert model.config.text_config._attn_implementation == "sdpa"


def test_demo_row_shows_the_measured_figure_only_for_the_arm_and_settings_it_ran():
    """`focusvlm demo` prints the experiment's IF figure on a row only when the row runs that arm's FocusConfig."""
    from focusvlm.cli.demo import measured_if

    cmai = FocusConfig(cmai=CMAIConfig(gamma_max=0.6))
    summary = {"suite": "paper16", "arms": {"cmai": {"config": cmai.to_dict(), "if_strict": "20.0 [17.0, 23.0]",
                                                     "prompts": 400}}}
    assert measured_if("cmai", cmai, summary) == {"if_strict": "20.0 [17.0, 23.0]", "prompts": 400, "suite": "paper16"}
    assert measured_if("cmai", FocusConfig(cmai=CMAIConfig(gamma_max=0.3)), summary) is None  # --cmai 0.3
    assert measured_if("stock", FocusConfig(), summary) is None      # arm not measured
    assert measured_if(None, cmai, summary) is None                  # another model than the demo twins
    assert measured_if("cmai", cmai, None) is None                   # no experiment shipped


@pytest.mark.slow
def test_demo_prints_the_measured_if_rates_of_the_shipped_experiment(capsys, demo, monkeypatch):
    """With an experiment summary shipped for the twins, the demo's instruction section ends with each row's
    measured IF strict rate; the rows' models here are demo-random stand-ins (the twins' weights do not matter)."""
    from focusvlm.cli import demo as cli_demo

    model, processor = demo
    cmai = FocusConfig(cmai=CMAIConfig(gamma_max=0.6))
    monkeypatch.setattr(cli_demo, "_rows", lambda args: [("stock", model, processor, FocusConfig(), "stock"),
                                                         ("CMAI", model, processor, cmai, "cmai")])
    summary = {"suite": "paper16", "arms": {
        "stock": {"config": FocusConfig().to_dict(), "if_strict": "16.0 [13.0, 19.0]", "prompts": 400},
        "cmai": {"config": cmai.to_dict(), "if_strict": "20.0 [17.0, 23.0]", "prompts": 400}}}
    monkeypatch.setattr("focusvlm.demo.experiment.shipped_summary", lambda: summary)
    assert main(["demo", "--max-new-tokens", "2", "--yes-no", "", "--no-progress"]) == 0
    out = capsys.readouterr().out
    measured = out.split("measured on 400 prompts (paper16 suite")[1]
    assert "16.0 [13.0, 19.0]" in measured and "20.0 [17.0, 23.0]" in measured
