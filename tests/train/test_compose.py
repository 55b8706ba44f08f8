"""compose_llava: a fresh LLaVA from a CLIP tower folder and an LM folder; stage 1 from scratch via the CLI."""

import pytest
import torch

import tiny
from focusvlm.cli import main as cli


def lm_tokenizer():
    """The tiny tokenizer without <image> (a plain LM tokenizer)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = tiny.tokenizer()
    raw = tok.backend_tokenizer.to_str()
    import json

    data = json.loads(raw)
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<image>"]
    data["model"]["vocab"].pop("<image>", None)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, LlamaConfig, LlamaForCausalLM)

    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        vision_config=dict(image_size=112, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, projection_dim=32),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=99, max_position_embeddings=16), projection_dim=32))
    clip.save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112}).save_pretrained(root / "clip")
    tok = lm_tokenizer()
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0))
    lm.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    return root, clip, lm


def test_compose(parts, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from focusvlm.models.compose import compose_llava

    root, clip, lm = parts
    model, proc = compose_llava(str(root / "clip"), str(root / "lm"))
    assert proc.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id == len(lm_tokenizer())
    assert model.model.language_model.embed_tokens.weight.shape[0] % 64 == 0
    assert torch.equal(model.model.vision_tower.encoder.layers[0].mlp.fc1.weight,
                       clip.vision_model.encoder.layers[0].mlp.fc1.weight)
    assert torch.equal(model.model.language_model.layers[1].mlp.up_proj.weight, lm.model.layers[1].mlp.up_proj.weight)
    assert model.config.vision_feature_layer == -2 and model.config.projector_hidden_act == "gelu"
    proj = model.model.multi_modal_projector
    assert proj.linear_1.weight.shape == (64, 32) and proj.linear_2.weight.shape == (64, 64)
    model.save_pretrained(tmp_path / "m")
    proc.save_pretrained(tmp_path / "m")
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path / "m")
    p2 = AutoProcessor.from_pretrained(tmp_path / "m")
    from PIL import Image

    batch = p2(images=[Image.new("RGB", (60, 80))], text=["<image>\nWhat?"], return_tensors="pt")
    assert (batch["input_ids"] == again.config.image_token_id).sum() == 64
    with torch.no_grad():
        assert torch.allclose(again(**batch).logits, model(**batch).logits, atol=1e-5)


def test_pretrain_from_scratch_cli(parts, tmp_path):
    root, _, _ = parts
    data = tiny.dataset(tmp_path, n=8, captions=True)
    out = tmp_path / "pt"
    cfg = tmp_path / "focus.yaml"
    cfg.write_text("vmtc: {target: 0.5, stages: 2}\ncmai: {gamma_max: 0.6}\n")
    rc = cli(["train", "--stage", "pretrain", "--vision", str(root / "clip"), "--lm", str(root / "lm"),
              "--data", str(data), "--image-folder", str(tmp_path / "images"), "--config", str(cfg),
              "--output-dir", str(out), "--global-batch-size", "4", "--per-device-batch-size", "4",
              "--max-steps", "2", "--no-progress"])
    assert rc == 0
    assert (out / "model.safetensors").is_file() and (out / "focus_config.yaml").is_file()
    assert "format: plain" in (out / "recipe.yaml").read_text()
    assert "learning_rate: 0.001" in (out / "recipe.yaml").read_text()
