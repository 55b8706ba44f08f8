"""The lmms-eval plugin on the newer families: Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT and LLaVA-OneVision
checkpoints saved as folders, stock / CMAI / VMTC + CMAI. Every request is answered, ``until`` cuts the
answer where the stop string starts, and the image tokens the LLM receives are the count the processor
and the method give.
Skipped where lmms-eval is not installed (an optional extra; `make test` puts it on the path)."""

import json

import pytest
from PIL import Image

from anyres_builders import random_images
from saved_checkpoints import save_checkpoint

pytest.importorskip("lmms_eval.api.model", reason="lmms_eval is not installed (pip install focusvlm[lmms])")

FAMILIES = ["qwen2_5_vl", "qwen3_vl", "llava_next", "llava_onevision"]
CONFIGS = {"stock": None, "cmai": {"cmai": {}}, "vmtc+cmai": {"vmtc": {"target": 0.5, "stages": 2}, "cmai": {}}}
SIZES = [(50, 90), (120, 60)]  # different aspect ratios: different grids / tile counts
NEW = 6


@pytest.fixture(scope="module", params=FAMILIES)
def folder(request, tmp_path_factory):
    return request.param, save_checkpoint(request.param, tmp_path_factory.mktemp(request.param), words=True)


class Req:
    def __init__(self, doc_id, gen_kwargs, context="w3 w4"):
        self.args = (context, gen_kwargs, lambda doc: doc["images"], doc_id, "t", "test")


def _plugin(folder, config, tmp_path, batch_size):
    from focusvlm.integrations.lmms import FocusVLMLmms

    path = None
    if CONFIGS[config] is not None:
        path = tmp_path / "focus.json"
        path.write_text(json.dumps(CONFIGS[config]))
    lm = FocusVLMLmms(pretrained=str(folder), focus_config=None if path is None else str(path), device="cpu",
                      batch_size=batch_size, max_new_tokens=NEW)
    images = [Image.fromarray(x) for x in random_images(SIZES, seed=5)]
    lm.task_dict = {"t": {"test": {0: {"images": [images[0]]}, 1: {"images": [images[1]]}, 2: {"images": []}}}}
    return lm, images


def _count_llm_image_tokens(lm):
    """Per forward call that carries images: the image positions of each row (what the LLM receives),
    as focusvlm's adapter types them. Returns (calls, undo)."""
    from focusvlm.models import adapter_for

    adapter = adapter_for(lm.model)
    calls = []

    def hook(module, args, kwargs):
        mask = adapter.call_inputs(module, args, kwargs).image_mask
        if mask.any():
            calls.append(mask.sum(1).tolist())

    handle = adapter.call_module(lm.model).register_forward_pre_hook(hook, with_kwargs=True)
    return calls, handle.remove


def _expected_image_tokens(lm, family, image):
    """(what the method's arithmetic says, what the plugin's processor emits) for one image in a prompt."""
    from focusvlm.models.llava_next import anyres_tiles, packed_length
    from focusvlm.runtime import to_messages

    model, processor = lm.model, lm.generator.processor
    handle = getattr(model, "_focusvlm", None)
    vision = handle.vision if handle is not None else None
    text = processor.apply_chat_template(to_messages("w3 w4", 1), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    emitted = int((inputs["input_ids"] == model.config.image_token_id).sum())
    if family.startswith("qwen"):
        _, h, w = inputs["image_grid_thw"][0].tolist()
        merged = (h // 2, w // 2)
        return (vision.image_tokens(merged) if vision else merged[0] * merged[1]), emitted
    if vision is None:  # stock AnyRes packing (unpadding, anyres_max_9): the processor is the reference
        return emitted, emitted
    crop = model.config.vision_config.image_size
    rows, cols = anyres_tiles((image.height, image.width), model.config.image_grid_pinpoints, (crop, crop))
    if hasattr(vision, "crop_budget"):  # VMTC: SPEC "Per-image budget", from the stock processor's own count
        from focusvlm.compress.vmtc import anyres_count

        stock = type(processor)._get_num_multimodal_tokens(processor, image_sizes=[(image.height, image.width)])
        return anyres_count(*vision.crop_budget(stock.num_image_tokens[0], rows * cols), rows * cols), emitted
    return packed_length(vision.image_tokens(), rows * cols), emitted


@pytest.mark.parametrize("config", list(CONFIGS))
def test_generate_until_on_family(folder, config, tmp_path):
    family, path = folder
    lm, images = _plugin(path, config, tmp_path, batch_size=2)
    calls, undo = _count_llm_image_tokens(lm)
    try:
        out = lm.generate_until([Req(0, {"max_new_tokens": NEW}), Req(1, {"max_new_tokens": NEW, "until": []}),
                                 Req(2, {"max_new_tokens": NEW})])
    finally:
        undo()

    # every request answered, in words (the saved model answers in w0..w39), the image ones in one left-padded batch
    assert len(out) == 3 and all(isinstance(o, str) for o in out)
    for answer in out:
        words = answer.split()
        assert len(words) == NEW and all(w.startswith("w") for w in words), answer

    # the image tokens the LLM received = the method's count = the processor's placeholders, per image
    assert calls == [[_expected_image_tokens(lm, family, im)[0] for im in images]]
    for image, received in zip(images, calls[0]):
        method_says, processor_says = _expected_image_tokens(lm, family, image)
        assert received == method_says == processor_says
    if config == "vmtc+cmai":  # the reduction reached the LLM
        stock_lm, _ = _plugin(path, "stock", tmp_path, batch_size=2)
        stock = [_expected_image_tokens(stock_lm, family, im)[1] for im in images]
        assert all(c < s for c, s in zip(calls[0], stock)), (calls, stock)

    # until: the answer stops where a stop string starts, and holds none of it. The stop is a word that
    # first appears mid-answer (not inside an earlier word), so the cut keeps a non-empty prefix
    def first_new_word(answer):
        words = answer.split()
        return next((i for i in range(1, len(words)) if words[i] not in " ".join(words[:i])), None)

    doc = next((i for i, answer in enumerate(out) if first_new_word(answer) is not None), None)
    assert doc is not None, f"every answer repeats one word, no stop string to test: {out}"
    stop = out[doc].split()[first_new_word(out[doc])]
    expected = out[doc].split(stop, 1)[0].strip()
    assert expected and expected != out[doc]
    cut = lm.generate_until([Req(doc, {"max_new_tokens": NEW, "until": [stop, "never-said"]})])
    assert cut == [expected] and stop not in cut[0]
