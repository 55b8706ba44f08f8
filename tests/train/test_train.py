"""Training with the methods on (tiny preset, CPU): VMTC/CMAI active in training forwards, gradient
checkpointing, loss falls, stop/resume, LoRA, saved output."""

import json
import math

import pytest
import torch

from focusvlm import hfcompat

import tiny
from focusvlm import CMAIConfig, FocusConfig, VMTCConfig, patch, unpatch
from focusvlm.train import train
from focusvlm.train.data import Collator, SupervisedDataset

BOTH = FocusConfig(vmtc=VMTCConfig(target=0.5, stages=2), cmai=CMAIConfig(gamma_max=0.6))
FAST = dict(format="vicuna_v1", global_batch_size=4, per_device_batch_size=4, learning_rate=2e-3,
            gradient_checkpointing=False, save_steps=1000, warmup_ratio=0.0)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    tiny.save_tiny(root / "base")
    data = tiny.dataset(root, n=16)
    return root


def batch_for(model, proc, root, n=4, config=None):
    ds = SupervisedDataset(root / "data.json", root / "images", proc, tiny.IMAGE_ID, "vicuna_v1", 2048)
    return Collator(0)([ds[i] for i in range(n)])


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_placeholders_match_vmtc_and_both_methods_act_in_training(base):
    model, proc = tiny.model(), tiny.processor()
    model.train()
    stock_batch = batch_for(model, proc, base)
    stock_loss, _ = loss_and_grads(model, stock_batch)
    handle = patch(model, BOTH, processor=proc)
    batch = batch_for(model, proc, base)
    # the processor now emits VMTC's count, and that many features reach the language model
    want = handle.vision.image_tokens()
    assert want == 32
    assert ((batch["input_ids"] == tiny.IMAGE_ID).sum(1) == torch.tensor([32, 32, 32, 0])).all()
    seen, rows = {}, {}

    def grab(module, args, out):
        seen["shape"] = tuple(out.shape)

    hook = model.model.multi_modal_projector.register_forward_hook(grab)
    import focusvlm.inhibit.attention as cmai_attention

    prefill = cmai_attention._prefill_attention

    def count_rows(link, plan, module, *args, **kwargs):
        rows[module.layer_idx] = rows.get(module.layer_idx, 0) + 1
        return prefill(link, plan, module, *args, **kwargs)

    cmai_attention._prefill_attention = count_rows
    try:
        loss, grads = loss_and_grads(model, batch)
    finally:
        cmai_attention._prefill_attention = prefill
        hook.remove()
    assert seen["shape"][:2] == (3, 32)
    # CMAI redid the text rows in every inhibited layer (layer 0 has gamma 0 under the linear schedule)
    assert sorted(rows) == list(range(1, model.config.text_config.num_hidden_layers))
    # CMAI changes the loss: the same compressed batch with CMAI switched off
    unpatch(model, proc)
    patch(model, FocusConfig(vmtc=BOTH.vmtc), processor=proc)
    vmtc_only, _ = loss_and_grads(model, batch)
    assert not torch.allclose(loss, vmtc_only) and not torch.allclose(loss, stock_loss)
    assert grads["model.multi_modal_projector.linear_1.weight"].abs().sum() > 0
    unpatch(model, proc)


def gc_equivalence(base, config):
    model, proc = tiny.model(), tiny.processor()
    patch(model, config, processor=proc)
    model.train()
    batch = batch_for(model, proc, base)
    loss, grads = loss_and_grads(model, batch)
    hfcompat.enable_checkpointing(model, checkpoint_kwargs={"use_reentrant": False})
    loss_ckpt, grads_ckpt = loss_and_grads(model, batch)
    assert torch.allclose(loss, loss_ckpt, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        assert torch.allclose(grads[name], grads_ckpt[name], atol=1e-6, rtol=1e-5), name


def test_gradient_checkpointing_same_loss_and_gradients_with_vmtc(base):
    gc_equivalence(base, FocusConfig(vmtc=BOTH.vmtc))


def test_gradient_checkpointing_same_loss_and_gradients_with_cmai(base):
    gc_equivalence(base, BOTH)


def test_loss_falls_and_resume_continues_the_same_run(base, tmp_path):
    common = dict(stage="finetune", model=str(base / "base"), data=base / "data.json", image_folder=base / "images",
                  focus_config=BOTH, progress=False)
    full = train(output_dir=tmp_path / "full", overrides={**FAST, "max_steps": 24, "save_steps": 12}, **common)
    assert len(full.losses) == 24
    first, last = sum(full.losses[:4]) / 4, sum(full.losses[-4:]) / 4
    assert last < 0.7 * first, full.losses
    # the same run, stopped after the checkpoint at step 12 and resumed from it
    part = train(output_dir=tmp_path / "part", overrides={**FAST, "max_steps": 24, "save_steps": 12},
                 stop_at_step=12, **common)
    assert part.steps == 12 and not (tmp_path / "part" / "model.safetensors").exists()
    resumed = train(output_dir=tmp_path / "part", overrides={**FAST, "max_steps": 24, "save_steps": 12},
                    resume=True, **common)
    assert resumed.steps == 24
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-6)


def test_output_is_a_stock_checkpoint_with_its_focus_config(base, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out = tmp_path / "ft"
    train(stage="finetune", model=str(base / "base"), data=base / "data.json", image_folder=base / "images",
          focus_config=BOTH, output_dir=out, overrides={**FAST, "max_steps": 2}, progress=False)
    model = LlavaForConditionalGeneration.from_pretrained(out)
    proc = AutoProcessor.from_pretrained(out)
    assert FocusConfig.load(out / "focus_config.yaml") == BOTH
    assert model.config.text_config._attn_implementation in (None, "sdpa", "eager")
    assert model.config.text_config.use_cache is not False
    # saved unpatched: the stock processor count, stock encoder layers
    assert proc._get_num_multimodal_tokens(image_sizes=[[112, 112]]).num_image_tokens == [64]
    assert all(type(l).__name__ == "CLIPEncoderLayer" for l in model.model.vision_tower.encoder.layers)
    base_model = LlavaForConditionalGeneration.from_pretrained(base / "base")
    sd, sd0 = model.state_dict(), base_model.state_dict()
    changed = {k for k in sd if not torch.equal(sd[k], sd0[k])}
    assert not any("vision_tower" in k for k in changed)  # frozen
    assert any("multi_modal_projector" in k for k in changed) and any("language_model" in k for k in changed)
    recipe = (out / "recipe.yaml").read_text()
    assert "gradient_accumulation_steps: 1" in recipe and "image_tokens_per_image: 32" in recipe
    assert (out / "loss.png").stat().st_size > 1000
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "learning_rate", "tokens_per_second"} <= set(recs[0])
    # patch(load) again: the trained model runs with its saved config
    patch(model, FocusConfig.load(out / "focus_config.yaml"), processor=proc)
    assert proc._get_num_multimodal_tokens(image_sizes=[[112, 112]]).num_image_tokens == [32]


def test_pretrain_trains_only_the_projector(base, tmp_path):
    out = tmp_path / "pt"
    train(stage="pretrain", model=str(base / "base"), data=tiny.dataset(tmp_path, n=8, captions=True),
          image_folder=tmp_path / "images", focus_config=BOTH, output_dir=out,
          overrides={**FAST, "format": "plain", "max_steps": 2}, progress=False)
    from transformers import LlavaForConditionalGeneration

    sd = LlavaForConditionalGeneration.from_pretrained(out).state_dict()
    sd0 = LlavaForConditionalGeneration.from_pretrained(base / "base").state_dict()
    changed = {k.split(".")[1] for k in sd if not torch.equal(sd[k], sd0[k])}
    assert changed == {"multi_modal_projector"}


def test_lora_trains_adapters_and_projector_only(base, tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration, TrainerCallback

    trainable = {}

    class Grab(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            trainable.update({n: p.numel() for n, p in model.named_parameters() if p.requires_grad})

    out = tmp_path / "lora"
    train(stage="finetune", model=str(base / "base"), data=base / "data.json", image_folder=base / "images",
          focus_config=BOTH, output_dir=out, lora=True,
          overrides={**FAST, "max_steps": 3, "lora_r": 4, "lora_alpha": 8, "learning_rate": 1e-2, "projector_lr": 1e-3},
          callbacks=[Grab()], progress=False)
    assert trainable and all(("lora_" in n) or ("multi_modal_projector" in n and "modules_to_save" in n)
                             for n in trainable)
    assert any("lora_A" in n for n in trainable) and any("multi_modal_projector" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    # adapter saved and mergeable: base + adapter merged == the merged model written to the output folder
    assert (out / "adapter" / "adapter_config.json").is_file()
    merged = LlavaForConditionalGeneration.from_pretrained(out).state_dict()
    again = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(base / "base"),
                                      out / "adapter").merge_and_unload().state_dict()
    assert merged.keys() == again.keys()
    for k in merged:
        assert torch.allclose(merged[k], again[k], atol=1e-6), k
    sd0 = LlavaForConditionalGeneration.from_pretrained(base / "base").state_dict()
    changed = {k for k in merged if not torch.equal(merged[k], sd0[k])}
    assert any("multi_modal_projector" in k for k in changed) and any("q_proj" in k for k in changed)
    assert not any(("vision_tower" in k) or ("norm" in k) or ("embed_tokens" in k) for k in changed)


def test_lora_adapters_start_from_the_recipes_seed(base, tmp_path):
    """peft draws LoRA A from torch's global generator: two runs of one recipe must start (and so end) at the
    same adapter, and another seed at another one. Before the recipe seeded it, two runs of one command
    differed in their first gradient norm (2.73 against 2.79 on this model), though their data were the same."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    def adapter(name, seed, generator_state):
        torch.manual_seed(generator_state)  # whatever the generator held before must not matter
        train(stage="finetune", model=str(base / "base"), data=base / "data.json", image_folder=base / "images",
              output_dir=tmp_path / name, lora=True, progress=False,
              overrides={**FAST, "max_steps": 1, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "seed": seed,
                         "merge_lora": False})
        return load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")

    first, again, other = adapter("first", 42, 1), adapter("again", 42, 2), adapter("other", 7, 1)
    lora_a = [k for k in first if "lora_A" in k]
    assert lora_a and first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not any(torch.equal(first[k], other[k]) for k in lora_a)


def test_unshuffled_batches_follow_the_data_files_order(base, tmp_path):
    """shuffle: false -> step 1 trains on the file's first records: its logged loss is the untrained
    model's loss on exactly those records (and a shuffled run's first batch is a different one)."""
    from transformers import LlavaForConditionalGeneration

    from focusvlm.train.recipe import Recipe, RecipeError

    common = dict(stage="finetune", model=str(base / "base"), data=base / "data.json", image_folder=base / "images",
                  focus_config=FocusConfig(), progress=False)
    in_order = {**FAST, "max_steps": 1, "group_by_modality_length": False, "shuffle": False}
    first = train(output_dir=tmp_path / "ordered", overrides=in_order, **common).losses[0]
    shuffled = train(output_dir=tmp_path / "shuffled", overrides={**in_order, "shuffle": True}, **common).losses[0]
    model = LlavaForConditionalGeneration.from_pretrained(base / "base").eval()
    with torch.no_grad():
        expected = model(**batch_for(model, tiny.processor(), base, n=4)).loss.item()
    # an untrained model's loss is near log(vocab) on any batch: the tolerance must be far below the
    # spread between batches (~1e-4 relative) and above float noise (~1e-7)
    assert first == pytest.approx(expected, rel=1e-6)
    assert shuffled != pytest.approx(expected, rel=1e-6)
    with pytest.raises(RecipeError, match="shuffle"):
        Recipe.build("finetune", overrides={"shuffle": False})  # group_by_modality_length reorders: refused


@pytest.mark.parametrize("methods", [None, BOTH], ids=["stock", "vmtc+cmai"])
def test_training_loss_from_supervised_positions_only_equals_the_full_logits_loss(base, methods):
    """The trainer projects only the positions that predict a supervised token onto the vocabulary:
    the loss and every gradient are those of the stock all-positions loss (also with num_items_in_batch)."""
    from focusvlm.train.runner import supervised_logits_only

    model, proc = tiny.model(), tiny.processor()
    model.train()
    if methods is not None:
        patch(model, methods, processor=proc)
    batch = batch_for(model, proc, base)
    fast_batch = supervised_logits_only(batch)
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    assert int(fast_batch["logits_to_keep"].sum()) == supervised < batch["labels"].numel() // 4
    assert model(**fast_batch).logits.shape[0] == supervised
    for extra in ({}, {"num_items_in_batch": torch.tensor(supervised + 5)}):
        full, full_grads = loss_and_grads(model, {**batch, **extra})
        fast, fast_grads = loss_and_grads(model, {**fast_batch, **extra})
        assert torch.allclose(fast, full, rtol=1e-6, atol=0)
        assert full_grads.keys() == fast_grads.keys() and len(full_grads) > 10
        for name, grad in full_grads.items():
            assert torch.allclose(fast_grads[name], grad, rtol=1e-5, atol=1e-7), name


def slow_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """sum over rows of sum_v p(v) (log p(v) - log q(v)), one probability at a time, in float64."""
    total = 0.0
    for p_row, q_row in zip(p_logits.double(), q_logits.double()):
        p, q = p_row.exp() / p_row.exp().sum(), q_row.exp() / q_row.exp().sum()
        total += sum(float(p[v]) * (math.log(float(p[v])) - math.log(float(q[v]))) for v in range(len(p)))
    return total


def test_distillation_kl_is_the_kl_from_the_reference_to_the_student():
    from focusvlm.train.runner import distillation_kl

    gen = torch.Generator().manual_seed(0)
    student, reference = torch.randn(5, 11, generator=gen) * 3, torch.randn(5, 11, generator=gen) * 3
    assert float(distillation_kl(student, reference)) == pytest.approx(slow_kl(reference, student), rel=1e-5)
    assert float(distillation_kl(reference, reference)) == pytest.approx(0.0, abs=1e-6)
    student.requires_grad_(True)
    reference.requires_grad_(True)
    distillation_kl(student, reference).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and reference.grad is None


@pytest.mark.parametrize("rows", [4, 3], ids=["with-a-text-row", "images-only"])
def test_text_distillation_adds_the_kl_to_the_base_lm_on_text_rows_only(base, tmp_path, rows):
    """The trainer's loss with text_distill = w is the task loss (all rows) plus w x KL(LM without adapters ||
    LM with them) summed over the text-only rows' supervised tokens, over the batch's supervised tokens,
    computed here from full logits at every position, one row and one token at a time."""
    pytest.importorskip("peft")
    from focusvlm.train.recipe import Recipe
    from focusvlm.train.runner import _trainer_class, supervised_logits_only, training_arguments, wrap_lora

    weight = 0.7
    recipe = Recipe.build("finetune", lora=True, overrides={**FAST, "lora_r": 4, "lora_alpha": 8, "text_distill": weight,
                                                             "lora_dropout": 0.0})
    proc = tiny.processor()
    model = wrap_lora(tiny.model(), recipe)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA's B starts at 0 (no change, no KL): move it
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.train()
    ds = SupervisedDataset(base / "data.json", base / "images", proc, tiny.IMAGE_ID, "vicuna_v1", 2048)
    batch = Collator(0)([ds[i] for i in range(rows)])
    text_rows = [r for r in range(rows) if not (batch["input_ids"][r] == tiny.IMAGE_ID).any()]
    assert text_rows == ([3] if rows == 4 else [])
    trainer = _trainer_class()(model=model, args=training_arguments(recipe, tmp_path, cuda=False, world_size=1),
                               train_dataset=ds, data_collator=Collator(0), recipe=recipe)
    got = trainer.compute_loss(model, batch)

    with torch.no_grad():
        task = model(**batch).loss.item()
        supervised = int((batch["labels"][:, 1:] != -100).sum())
        kl = 0.0
        for r in text_rows:
            one = {"input_ids": batch["input_ids"][r:r + 1], "attention_mask": batch["attention_mask"][r:r + 1]}
            student = model(**one).logits[0]
            with model.disable_adapter():
                reference = model(**one).logits[0]
            for t in range(batch["input_ids"].shape[1] - 1):
                if batch["labels"][r, t + 1] != -100:
                    kl += slow_kl(reference[t:t + 1], student[t:t + 1])
    assert (kl > 1e-3) == bool(text_rows)
    assert got.item() == pytest.approx(task + weight * kl / supervised, rel=1e-4)
    # the same batch without the term: the task loss alone
    plain = _trainer_class()(model=model, args=training_arguments(recipe, tmp_path, cuda=False, world_size=1),
                             train_dataset=ds, data_collator=Collator(0),
                             recipe=Recipe.build("finetune", lora=True, overrides={**FAST, "lora_dropout": 0.0}))
    assert plain.compute_loss(model, batch).item() == pytest.approx(task, rel=1e-5)
    assert "logits_to_keep" in supervised_logits_only(batch)


def test_text_distillation_needs_lora_and_a_weight_of_zero_or_more():
    from focusvlm.train.recipe import Recipe, RecipeError

    with pytest.raises(RecipeError, match="text_distill.*lora"):
        Recipe.build("finetune", overrides={"text_distill": 1.0})
    with pytest.raises(RecipeError, match="text_distill: must be a number >= 0"):
        Recipe.build("finetune", lora=True, overrides={"text_distill": -1.0})
    assert Recipe.build("finetune", lora=True, overrides={"text_distill": 0.5}).text_distill == 0.5


def test_text_distill_flag_reaches_the_recipe(base, tmp_path, capsys):
    pytest.importorskip("peft")
    from focusvlm.cli import main as cli

    common = ["train", "--stage", "finetune", "--model", str(base / "base"), "--data", str(base / "data.json"),
              "--image-folder", str(base / "images"), "--global-batch-size", "4", "--per-device-batch-size", "4",
              "--max-steps", "1", "--no-gradient-checkpointing", "--no-progress", "--text-distill", "0.5"]
    assert cli([*common, "--lora", "--lora-r", "4", "--output-dir", str(tmp_path / "ft")]) == 0
    assert "text_distill: 0.5" in (tmp_path / "ft" / "recipe.yaml").read_text()
    capsys.readouterr()
    assert cli([*common, "--output-dir", str(tmp_path / "no-lora")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "text_distill" in err[0] and "lora" in err[0]
