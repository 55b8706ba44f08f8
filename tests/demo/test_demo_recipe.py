"""`focusvlm train --recipe demo`: every step runs through focusvlm train, packs within budget, resumes."""

import json

import pytest

pytest.importorskip("easy_vqa")
pytest.importorskip("peft")

from focusvlm.cli import main  # noqa: E402
from focusvlm.models.demo import load as L  # noqa: E402
from focusvlm.models.demo import ship as S  # noqa: E402
from focusvlm.demo import recipe as R  # noqa: E402


@pytest.mark.slow
def test_quick_recipe_runs_every_step_then_resumes(tmp_path, capsys):
    out = tmp_path / "demo-model"
    assert main(["train", "--recipe", "demo", "--demo-quick", "--output-dir", str(out), "--no-progress"]) == 0
    times = json.loads((out / "times.json").read_text())
    steps = ["tower", "data", "text answers", "stage 2 mix", "base", "stock stage 1", "stock stage 2", "stock pack", "stock check",
             "focus stage 1", "focus stage 2", "focus pack"]
    assert list(times) == steps + ["total"]
    assert times["total"] == pytest.approx(sum(times[s] for s in steps), abs=0.2)
    for twin in R.TWINS:
        meta = json.loads((out / "ship" / twin / S.META_FILE).read_text())
        assert meta["bytes"] <= S.BUDGET_BYTES and meta["lora"]["dtype"] == "torch.float16"
        assert meta["info"]["twin"] == twin and meta["info"]["training"]["finetune"]["steps"] == 2
    # the focus twin trained with the methods on (fewer image tokens per sample) and ships its config
    assert (out / "ship" / "focus" / "focus_config.yaml").is_file()
    assert not (out / "ship" / "stock" / "focus_config.yaml").exists()
    import yaml

    tokens = {t: yaml.safe_load((out / t / "finetune" / "recipe.yaml").read_text())["resolved"]["image_tokens_per_image"]
              for t in R.TWINS}
    assert tokens["stock"] == 256 and tokens["focus"] < 256  # 4-pixel patches: a LLaVA-like share of the prompt
    # stage 2's mix: per batch of 4, two short-answer questions, one sentence answer, one text-only conversation
    mix = json.loads((out / "data" / "stage2_mix.json").read_text())
    assert len(mix) == 2 * 4
    assert ["image" in r for r in mix] == [True, True, True, False] * 2
    assert all(R.D.SHORT_ANSWER in r["conversations"][0]["value"] for r in mix[:2])
    assert R.D.SHORT_ANSWER not in mix[2]["conversations"][0]["value"] and mix[3]["id"].startswith("text-")
    # rerun: every step is found done, nothing retrains
    capsys.readouterr()
    assert main(["train", "--recipe", "demo", "--demo-quick", "--output-dir", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.count("done before") == len(steps)
    # a packed twin carried over without its training folders (another machine) is not trained again
    import shutil

    shutil.rmtree(out / "stock")
    assert main(["train", "--recipe", "demo", "--demo-quick", "--output-dir", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "stock twin: packed before" in err and "stock stage 1 ..." not in err and not (out / "stock").exists()
    # installing copies both twins where load("demo") looks (here: a scratch package folder)
    R.install(out / "ship", tmp_path / "pkg")
    model, processor = L.load_demo(tmp_path / "pkg" / "stock")
    assert type(model).__name__ == "LlavaForConditionalGeneration"


def test_recipe_demo_refuses_stage_and_data(tmp_path, capsys):
    code = main(["train", "--recipe", "demo", "--stage", "pretrain", "--output-dir", str(tmp_path)])
    assert code == 2
    assert "--recipe demo runs every stage on easy-VQA itself" in capsys.readouterr().err
