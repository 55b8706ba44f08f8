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
    twin_steps = ["stage 1", "stage 2", "stage 2 pack", "stage 2b base", "stage 2b", "stage 2b pack",
                  "stage 2c base", "stage 2c", "pack"]
    steps = (["tower", "data", "text answers", "stage 2 mix", "stage 2b mix", "stage 2c mix", "base"]
             + [f"stock {s}" for s in twin_steps] + ["stock check"] + [f"focus {s}" for s in twin_steps])
    assert list(times) == steps + ["total"]
    assert times["total"] == pytest.approx(sum(times[s] for s in steps), abs=0.2)
    for twin in R.TWINS:
        meta = json.loads((out / "ship" / twin / S.META_FILE).read_text())
        assert meta["bytes"] <= S.BUDGET_BYTES and meta["lora"]["dtype"] == "torch.float16"
        assert meta["info"]["twin"] == twin and meta["info"]["training"]["finetune"]["steps"] == 2
        assert meta["info"]["training"]["refresh"]["steps"] == 2
        assert meta["info"]["training"]["refresh_2c"]["steps"] == 2
        assert meta["lora"]["ranks"] == [24]   # stage 2's rank-8 factors, stage 2b's and 2c's, side by side
    _shipped_lm_is_previous_plus_restart(out / "stock", "stage2", "refresh", "stage2b")
    _shipped_lm_is_previous_plus_restart(out / "stock", "stage2b", "refresh_2c", "../ship/stock")
    # the focus twin trained with the methods on (fewer image tokens per sample) and ships its config
    assert (out / "ship" / "focus" / "focus_config.yaml").is_file()
    assert not (out / "ship" / "stock" / "focus_config.yaml").exists()
    import yaml

    tokens = {t: yaml.safe_load((out / t / "finetune" / "recipe.yaml").read_text())["resolved"]["image_tokens_per_image"]
              for t in R.TWINS}
    assert tokens["stock"] == 256 and tokens["focus"] < 256  # 4-pixel patches: a LLaVA-like share of the prompt
    # stage 2's mix: short-answer questions alone (2 batches of 4)
    mix = json.loads((out / "data" / "stage2_mix.json").read_text())
    assert len(mix) == 2 * 4
    assert all("image" in r and R.D.SHORT_ANSWER in r["conversations"][0]["value"] for r in mix)
    # stage 2b's: three short answers and one of the base LM's text answers per batch; 2c's: two short answers, a
    # text answer and a description request; no sentence answers; each round takes the next text answers of the
    # cycle and its own questions
    texts: list[str] = []
    for name, layout in (("2b", ["short", "short", "short", "text"]), ("2c", ["short", "short", "text", "describe"])):
        refresh = json.loads((out / "data" / f"stage{name}_mix.json").read_text())
        kinds = ["text" if "image" not in r else "short" if R.D.SHORT_ANSWER in r["conversations"][0]["value"]
                 else "describe" for r in refresh]
        assert kinds == layout * 2, name
        for r in refresh:
            if "-description-" in r["id"]:
                assert r["conversations"][0]["value"].split("\n", 1)[1] in R.D.DESCRIBE_PROMPTS
        assert not set(texts) & {r["id"] for r in refresh}
        texts += [r["id"] for r in refresh if r["id"].startswith("text-")]
    assert (out / "data" / "text_answers.jsonl").is_file()  # answered for the restarts although stage 2 has none
    # rerun: every step is found done, nothing retrains
    capsys.readouterr()
    assert main(["train", "--recipe", "demo", "--demo-quick", "--output-dir", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.count("done before") == len(steps)
    # a stock twin under the floor stops the run and names the last trained stage's loss curve
    from dataclasses import replace

    (out / "stock_check.json").unlink()
    with pytest.raises(R.DemoRecipeError, match=r"under the recipe's floor .*refresh_2c/metrics\.jsonl"):
        R.run(out, replace(R.DemoRecipe.quick(), check_floor=1.01), log=lambda msg: None)
    assert not (out / "stock_check.json").exists()
    R.run(out, R.DemoRecipe.quick(), log=lambda msg: None)  # the quick recipe's floor (0) passes: check written
    assert (out / "stock_check.json").is_file()
    # a packed twin carried over without its training folders (another machine) is not trained again
    import shutil

    for folder in ("pretrain", "finetune", "refresh", "refresh_base", "refresh_2c", "refresh_2c_base"):
        shutil.rmtree(out / "stock" / folder)
    assert main(["train", "--recipe", "demo", "--demo-quick", "--output-dir", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "stock twin: packed before" in err and "stock stage 1 ..." not in err
    assert not (out / "stock" / "refresh").exists()
    # a stage-2b twin carried over packed (stage2/ and stage2b/ alone): stages 1, 2 and 2b are skipped, 2c runs
    shutil.rmtree(out / "ship" / "stock")
    (out / "stock_check.json").unlink()
    assert main(["train", "--recipe", "demo", "--demo-quick", "--output-dir", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "stock twin: stage 2 packed before" in err and "stock stage 1 ..." not in err
    assert "stock twin: stage 2b packed before" in err and "stock stage 2b ..." not in err
    assert "stock stage 2c ..." in err and (out / "ship" / "stock" / S.META_FILE).is_file()
    _shipped_lm_is_previous_plus_restart(out / "stock", "stage2b", "refresh_2c", "../ship/stock")
    # a stage-2 twin alone: stage 2b runs from it, then 2c from 2b's new pack
    for folder in ("ship/stock", "stock/stage2b", "stock/refresh_2c", "stock/refresh_2c_base"):
        shutil.rmtree(out / folder)
    (out / "stock_check.json").unlink()
    assert main(["train", "--recipe", "demo", "--demo-quick", "--output-dir", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "stock stage 2b ..." in err and "stock stage 2c ..." in err
    _shipped_lm_is_previous_plus_restart(out / "stock", "stage2", "refresh", "stage2b")
    _shipped_lm_is_previous_plus_restart(out / "stock", "stage2b", "refresh_2c", "../ship/stock")
    # installing copies both twins where load("demo") looks (here: a scratch package folder)
    R.install(out / "ship", tmp_path / "pkg")
    model, processor = L.load_demo(tmp_path / "pkg" / "stock")
    assert type(model).__name__ == "LlavaForConditionalGeneration"


def _shipped_lm_is_previous_plus_restart(twin_dir, previous, restart, packed):
    """A warm restart's pack: its LM = the previous pack's LM + the restart's LoRA product (factors stored in fp16)."""
    import torch

    shipped, _ = L.load_demo(twin_dir / packed)
    stage2, _ = L.load_demo(twin_dir / previous)
    pairs, scale, _ = S.read_peft_adapter(twin_dir / restart / "adapter")
    modules2, modules = dict(stage2.named_modules()), dict(shipped.named_modules())
    assert pairs
    for name, (a, b) in pairs.items():
        expected = modules2[name].weight.double() + L.lora_delta(a.half(), b.half(), scale)
        assert torch.allclose(modules[name].weight.double(), expected, atol=1e-6, rtol=0), name


def test_recipe_demo_refuses_stage_and_data(tmp_path, capsys):
    code = main(["train", "--recipe", "demo", "--stage", "pretrain", "--output-dir", str(tmp_path)])
    assert code == 2
    assert "--recipe demo runs every stage on easy-VQA itself" in capsys.readouterr().err


def test_a_batch_that_cannot_hold_its_extras_and_a_short_answer_is_refused():
    recipe = R.DemoRecipe(finetune_batch=4, consolidate_text_per_batch=2, consolidate_describe_per_batch=2)
    with pytest.raises(ValueError, match="cannot hold 0 sentence, 2 text-only and 2 description records"):
        recipe.refresh_rounds()
    with pytest.raises(ValueError, match="description"):
        R.DemoRecipe(describe_per_batch=8).short_per_batch
    assert R.DemoRecipe().short_per_batch == 8     # stage 2: short answers alone
    assert [(r.name, r.text_per_batch, r.describe_per_batch) for r in R.DemoRecipe().refresh_rounds()] == [
        ("2b", 3, 0), ("2c", 2, 1)]


def test_frozen_lm_recipe_trains_the_projector_alone(tmp_path, capsys):
    """`--recipe demo-frozen-lm`: stage 2 without LoRA, the shipped LM is the base LM bit for bit, the projector
    is stage 2's, and no warm restart runs."""
    import torch
    import yaml

    out = tmp_path / "frozen"
    assert main(["train", "--recipe", "demo-frozen-lm", "--demo-quick", "--output-dir", str(out), "--no-progress"]) == 0
    times = json.loads((out / "times.json").read_text())
    assert not any("2b" in k or "2c" in k for k in times)
    assert [k for k in times if k.startswith("stock")] == ["stock stage 1", "stock stage 2", "stock stage 2 pack",
                                                           "stock pack", "stock check"]
    resolved = yaml.safe_load((out / "stock" / "finetune" / "recipe.yaml").read_text())
    assert resolved["train_lm"] is False and resolved["lora"] is False
    assert not (out / "stock" / "finetune" / "adapter").exists()
    from focusvlm.runtime import load_model

    base, _ = load_model(str(out / "base"), "cpu", torch.float32)
    stage1, _ = load_model(str(out / "stock" / "pretrain"), "cpu", torch.float32)
    stage2, _ = load_model(str(out / "stock" / "finetune"), "cpu", torch.float32)
    for twin in R.TWINS:
        meta = json.loads((out / "ship" / twin / S.META_FILE).read_text())
        assert meta["lora"]["layers"] == 0 and meta["info"]["recipe"]["finetune_train_lm"] is False
        shipped, _ = L.load_demo(out / "ship" / twin)
        lm, base_lm = shipped.model.language_model.state_dict(), base.model.language_model.state_dict()
        assert lm.keys() == base_lm.keys() and all(torch.equal(lm[k], base_lm[k]) for k in lm)
        if twin == "stock":
            proj = shipped.model.multi_modal_projector.state_dict()
            trained = stage2.model.multi_modal_projector.state_dict()
            assert all(torch.equal(proj[k], trained[k]) for k in proj)
            before = stage1.model.multi_modal_projector.state_dict()
            assert any(not torch.equal(proj[k], before[k]) for k in proj)   # stage 2 moved it


def test_frozen_lm_settings():
    recipe = R.DemoRecipe().with_frozen_lm()
    overrides = R._stage_overrides(recipe, "finetune")
    assert overrides["train_lm"] is False and not any(k.startswith("lora_") for k in overrides)
    assert overrides["learning_rate"] == overrides["projector_lr"] == 1e-3
    assert recipe.refresh_rounds() == [] and recipe.check_floor == 0.55
    assert R.DemoRecipe.quick().with_frozen_lm().check_floor == 0.0   # a quick run's floor stays off
    assert "lora_r" in R._stage_overrides(R.DemoRecipe(), "finetune")
    from dataclasses import replace

    with pytest.raises(ValueError, match="warm restart of stage 2's LoRA"):
        replace(recipe, refresh_steps=10).refresh_rounds()
    # the distillation term rides on the LoRA stages only (its reference is the LM without adapters)
    assert R._stage_overrides(replace(R.DemoRecipe(), text_distill=0.5), "finetune")["text_distill"] == 0.5
    assert "text_distill" not in overrides
