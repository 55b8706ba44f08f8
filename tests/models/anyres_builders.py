"""Tiny LLaVA-NeXT / LLaVA-OneVision processors built offline (no download) for the AnyRes tests.

The tokenizer is word-level (``tokenizers``): ids below 64 are words, <image> = 511 and <video> = 510,
matching the ``next-tiny`` / ``onevision-tiny`` presets. Each processor carries a chat template in its
family's format (Vicuna for NeXT, ChatML for OneVision) written with the tiny vocabulary.
"""

from __future__ import annotations

import numpy as np

IMAGE_ID, VIDEO_ID = 511, 510
WORDS = [f"w{i}" for i in range(40)]
TEMPLATE_WORDS = ["USER", "ASSISTANT", ":", "system", "user", "assistant", "\n"]

# Vicuna v1 as llava-v1.6-vicuna uses it: "USER: <image>\n... ASSISTANT:"
NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER : ' }}{% else %}{{ 'ASSISTANT : ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image> ' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ ' ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT :' }}{% endif %}"
)

# ChatML as llava-onevision-qwen2 uses it: "<|im_start|>user <image>\n...<|im_end|><|im_start|>assistant"
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|> ' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image> ' }}{% elif item['type'] == 'video' %}{{ '<video> ' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ ' <|im_end|> ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|> assistant' }}{% endif %}"
)


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"] + WORDS + TEMPLATE_WORDS)}
    vocab["<image>"] = IMAGE_ID
    vocab["<video>"] = VIDEO_ID
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
                                   additional_special_tokens=["<image>", "<video>", "<|im_start|>", "<|im_end|>"])
    fast.padding_side = "left"
    return fast


def next_processor(pinpoints=None):
    """LlavaNextProcessor for the ``next-tiny`` preset: 56 px crops, 14 px patches, the preset's pinpoints."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    from focusvlm.models.llava_next import PRESETS

    pinpoints = pinpoints or PRESETS["next-tiny"].pinpoints
    images = LlavaNextImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                        image_grid_pinpoints=[list(p) for p in pinpoints])
    return LlavaNextProcessor(image_processor=images, tokenizer=word_tokenizer(), patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=NEXT_CHAT_TEMPLATE)


def onevision_processor(pinpoints=None):
    """LlavaOnevisionProcessor for the ``onevision-tiny`` preset (no video processor: it needs torchvision)."""
    from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor

    from focusvlm.models.llava_onevision import PRESETS

    pinpoints = pinpoints or PRESETS["onevision-tiny"].pinpoints
    images = LlavaOnevisionImageProcessorPil(size={"height": 56, "width": 56},
                                             image_grid_pinpoints=[list(p) for p in pinpoints])

    class ImagesOnlyOnevisionProcessor(LlavaOnevisionProcessor):
        # transformers' video processors need torchvision, which the test environment lacks; videos are
        # fed to the model as tensors instead, so the processor is built without one
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImagesOnlyOnevisionProcessor(image_processor=images, tokenizer=word_tokenizer(), video_processor=None,
                                        num_image_tokens=16, vision_feature_select_strategy="full",
                                        chat_template=ONEVISION_CHAT_TEMPLATE)


def random_images(sizes, seed=0):
    """uint8 HWC images of the given (h, w) sizes."""
    rs = np.random.RandomState(seed)
    return [rs.randint(0, 255, (h, w, 3), dtype=np.uint8) for h, w in sizes]


# --------------------------------------------------------------------------- shared checks
# The CMAI / VMTC guarantees tests/test_cmai.py and tests/test_vmtc_model.py make for LLaVA-1.5,
# written once for any AnyRes family and called from each family's test file.

import torch  # noqa: E402

# left-padded batches of images of different sizes and aspect ratios (each picks another tile grid)
MIXED_SIZES = [(50, 90), (120, 60), (70, 70)]
MIXED_PROMPTS = ["<image> w1 w2", "w3 w9 <image> w4 w5 w6 w7", "w5 <image> w6"]
NO_PLACEHOLDERS = [[IMAGE_ID], [VIDEO_ID]]  # generated tokens must not look like placeholders to a full re-run


def batch(processor, sizes=MIXED_SIZES, prompts=MIXED_PROMPTS, seed=0, **kwargs):
    return processor(images=random_images(sizes, seed), text=list(prompts), return_tensors="pt", padding=True, **kwargs)


def alone(processor, index, sizes=MIXED_SIZES, prompts=MIXED_PROMPTS, seed=0):
    """Sample ``index`` of ``batch(...)`` processed on its own (same pixels, no padding)."""
    image = random_images(sizes, seed)[index]
    return processor(images=[image], text=[prompts[index]], return_tensors="pt")


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def reference_logits(model, inputs, cfg):
    """The literal CMAI oracle (tests/reference) on this model: video positions count as image positions."""
    from reference import cmai_reference

    gammas = cfg.gammas(model.config.text_config.num_hidden_layers)
    ref = cmai_reference.ReferenceCMAI(gammas, cfg.focus, cfg.discount, IMAGE_ID)
    ids = inputs["input_ids"]
    ref.set_inputs(torch.where(ids == VIDEO_ID, IMAGE_ID, ids), inputs["attention_mask"])
    undo = cmai_reference.install(model, ref)
    try:
        return logits(model, inputs)
    finally:
        undo()


def assert_matches_reference(model, inputs, cfg, tol=1e-5):
    from focusvlm import FocusConfig, patched

    expected = reference_logits(model, inputs, cfg)
    with patched(model, FocusConfig(cmai=cfg)):
        got = logits(model, inputs)
    mask = inputs["attention_mask"].bool()
    assert (got[mask] - expected[mask]).abs().max().item() <= tol
    # the method must change something, or the comparison proves nothing
    assert (logits(model, inputs)[mask] - got[mask]).abs().max().item() > 1e-4


def assert_gamma_zero_and_unpatch_bit_identical(model, inputs):
    from focusvlm import CMAIConfig, FocusConfig, patch, patched, unpatch

    stock = logits(model, inputs)
    with patched(model, FocusConfig(cmai=CMAIConfig(gamma_max=0.0))):
        zero = logits(model, inputs)
    patch(model, FocusConfig(cmai=CMAIConfig(gamma_max=0.6)))
    changed = logits(model, inputs)
    unpatch(model)
    after = logits(model, inputs)
    assert torch.equal(stock, zero)
    assert not torch.equal(stock, changed)
    assert torch.equal(stock, after)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert "generate" not in model.__dict__ and not hasattr(model, "_focusvlm")


def assert_batch_equals_single(model, processor, config, sizes=MIXED_SIZES, prompts=MIXED_PROMPTS, tol=1e-5):
    """Last-position logits of a left-padded batch == each sample alone (patched with ``config``)."""
    from focusvlm import patched

    with patched(model, config, processor=processor):
        inputs = batch(processor, sizes, prompts)
        assert (inputs["attention_mask"] == 0).any(), "the batch must be left padded"
        both = logits(model, inputs)
        for i in range(len(sizes)):
            one = logits(model, alone(processor, i, sizes, prompts))
            got = both[i][inputs["attention_mask"][i].bool()]
            assert got.shape == one[0].shape
            assert (got - one[0]).abs().max().item() <= tol, i


def assert_generate_matches_full_forward(model, inputs, config, new=5, tol=1e-5):
    """generate() with the KV cache (its prefill gets precomputed image features) == one full forward."""
    from focusvlm import patched

    prompt_len = inputs["input_ids"].shape[1]
    b = inputs["input_ids"].shape[0]
    with patched(model, config), torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, bad_words_ids=NO_PLACEHOLDERS)
        mask = torch.cat([inputs["attention_mask"], torch.ones(b, new, dtype=torch.long)], dim=1)
        full = model(**{**inputs, "input_ids": gen.sequences, "attention_mask": mask}, use_cache=False).logits
    for step, step_logits in enumerate(gen.logits):
        diff = (step_logits - full[:, prompt_len - 1 + step]).abs().max().item()
        assert diff <= tol, (step, diff)


def assert_low_precision_close(build, processor, dtype):
    from focusvlm import CMAIConfig, FocusConfig, patched

    model = build(dtype=dtype)
    inputs = batch(processor)
    cfg = CMAIConfig()
    expected = reference_logits(model.float(), inputs, cfg)
    model.to(dtype)
    low = {**inputs, "pixel_values": inputs["pixel_values"].to(dtype)}
    with patched(model, FocusConfig(cmai=cfg)):
        got = logits(model, low)
    assert got.dtype == dtype and torch.isfinite(got).all()
    mask = inputs["attention_mask"].bool()
    assert (got[mask].float() - expected[mask]).abs().max().item() < 0.1


def assert_fused_kernel_kept(model):
    """CMAI runs on top of the stock SDPA kernel (no eager fallback), and the LM has GQA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from focusvlm import CMAIConfig, FocusConfig, patched
    from focusvlm.models import adapter_for

    tc = model.config.text_config
    assert tc.num_key_value_heads < tc.num_attention_heads
    with patched(model, FocusConfig(cmai=CMAIConfig())):
        assert model.config.text_config._attn_implementation == "focusvlm_cmai_sdpa"
        modules = adapter_for(model).decoder_attention_modules(model)
        assert all(m._focusvlm_cmai.base is sdpa_attention_forward for m in modules)


def stage_tokens(model):
    """(n_in, n_out) of every encoder layer in the last vision forward, recorded by hooks; returns (hooks, log)."""
    from focusvlm.models import adapter_for

    log = []

    def record(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        out = output[0] if isinstance(output, (tuple, list)) else output
        log.append((hidden.shape[0], hidden.shape[1], out.shape[1]))

    layers = adapter_for(model).encoder_layers(model)
    return [layer.register_forward_hook(record, with_kwargs=True) for layer in layers], log


def count_case(model, processor, config, sizes, text=None, **kwargs):
    """Per image: (placeholders the patched processor emitted, features the patched model packed,
    crops the processor cut, stock placeholders). Also runs the full forward, whose own check
    (get_placeholder_mask) fails on any mismatch."""
    from focusvlm import patch, unpatch
    from focusvlm.models import adapter_for

    adapter = adapter_for(model)
    images = random_images(sizes, seed=len(sizes))
    text = text or ["<image> w1"] * len(sizes)
    stock = processor(images=images, text=text, return_tensors="pt", padding=True, **kwargs)
    patch(model, config, processor=processor)
    try:
        inputs = processor(images=images, text=text, return_tensors="pt", padding=True, **kwargs)
        extra = {k: inputs[k] for k in ("image_sizes", "batch_num_images") if k in inputs}
        with torch.no_grad():
            feats = adapter.image_features(model, inputs["pixel_values"], **extra)
            assert torch.isfinite(logits(model, inputs)).all()
        placeholders = (inputs["input_ids"] == IMAGE_ID).sum(1).tolist()
        stock_counts = (stock["input_ids"] == IMAGE_ID).sum(1).tolist()
    finally:
        unpatch(model, processor)
    return placeholders, [int(f.shape[0]) for f in feats], stock_counts, inputs
