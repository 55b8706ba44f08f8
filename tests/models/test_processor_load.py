"""Loading LLaVA-OneVision / Qwen2.5-VL / Qwen3-VL checkpoints from a folder through ``runtime.load_model``.

transformers builds every sub-processor a processor declares, and these families' video processors
need torchvision. Without it focusvlm loads the same processor class minus its video processor
(``focusvlm.models.processors``): it must process images exactly as the checkpoint's full processor
would, refuse videos by naming torchvision, warn once at load, and save as the stock class.
"""

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

import anyres_builders as ab
from saved_checkpoints import builder_processor, save_checkpoint, stock_processor_class

FAMILIES = ["llava_onevision", "qwen2_5_vl", "qwen3_vl"]
SIZES = [(50, 90), (120, 60), (70, 70), (300, 60)]
PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w1 w2"}]}]

needs_no_torchvision = pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None,
                                          reason="torchvision is installed: AutoProcessor builds the full processor")


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    family = request.param
    return family, save_checkpoint(family, tmp_path_factory.mktemp(family))


def _load(folder):
    from focusvlm.runtime import load_model

    with pytest.warns(UserWarning, match="torchvision is not installed.*without its video processor"):
        return load_model(str(folder), "cpu")


@needs_no_torchvision
def test_folder_loads_with_an_images_only_processor(saved):
    family, folder = saved
    stored = json.loads((folder / "processor_config.json").read_text())
    assert stored["processor_class"] == stock_processor_class(family).__name__ and "video_processor" in stored
    model, processor = _load(folder)
    assert model.config.model_type == family and not model.training
    assert isinstance(processor, stock_processor_class(family))
    assert type(processor).__name__ == stock_processor_class(family).__name__
    assert not hasattr(processor, "video_processor")
    assert processor.tokenizer.padding_side == "left"

    # images: byte for byte what the checkpoint's processor (the offline builder) makes, several sizes at once
    reference = builder_processor(family)
    reference.tokenizer.padding_side = "left"
    assert processor.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False) == \
        reference.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    text = [processor.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)] * len(SIZES)
    images = [Image.fromarray(x) for x in ab.random_images(SIZES)]
    got = processor(text=text, images=images, return_tensors="pt", padding=True)
    want = reference(text=text, images=images, return_tensors="pt", padding=True)
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    with torch.no_grad():
        assert torch.isfinite(model(**got).logits).all()


@needs_no_torchvision
def test_videos_are_refused_by_name(saved):
    from focusvlm.models import UnsupportedModelError

    _, folder = saved
    _, processor = _load(folder)
    frames = np.zeros((2, 56, 56, 3), dtype=np.uint8)
    with pytest.raises(UnsupportedModelError, match="without its video processor.*pip install torchvision"):
        processor(text=["w1"], videos=[frames])


@needs_no_torchvision
def test_saves_as_the_stock_class_and_loads_again(saved, tmp_path):
    from focusvlm.models.processors import load_processor

    family, folder = saved
    _, processor = _load(folder)
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == \
        stock_processor_class(family).__name__
    with pytest.warns(UserWarning, match="torchvision"):
        again = load_processor(str(tmp_path), stock_processor_class(family), family)
    image = Image.fromarray(ab.random_images([(80, 40)])[0])
    text = [processor.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)]
    a = again(text=text, images=[image], return_tensors="pt")
    b = processor(text=text, images=[image], return_tensors="pt")
    assert all(torch.equal(a[k], b[k]) for k in b)


@needs_no_torchvision
def test_a_folder_without_processor_files_names_torchvision(tmp_path):
    from focusvlm.models import UnsupportedModelError
    from focusvlm.runtime import load_model
    from saved_checkpoints import tiny_family_model

    tiny_family_model("llava_onevision").save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="needs torchvision.*images-only LlavaOnevisionProcessor"):
        load_model(str(tmp_path), "cpu")


def test_onevision_folder_generates_with_vmtc_and_cmai(tmp_path):
    """The whole path a user takes: focusvlm.load(folder) -> patched model and processor -> batched generation,
    with the placeholder count per image the SPEC gives ("Per-image budget")."""
    import warnings

    from focusvlm import CMAIConfig, FocusConfig, VMTCConfig, load
    from focusvlm.compress.vmtc import anyres_budget, anyres_count
    from focusvlm.models.llava_next import anyres_tiles
    from focusvlm.runtime import HFGenerator

    folder = save_checkpoint("llava_onevision", tmp_path / "ov", words=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the torchvision notice, tested above
        model, processor = load(str(folder), FocusConfig(vmtc=VMTCConfig(target=0.5, stages=2), cmai=CMAIConfig()),
                                torch_dtype="float32")
    images = [Image.fromarray(x) for x in ab.random_images([(50, 90), (300, 60)])]
    out = HFGenerator(model, processor).generate(["w1 w2", "w3"], images, 3)
    sizes = [(im.height, im.width) for im in images]
    tiles = [anyres_tiles(size, model.config.image_grid_pinpoints, (56, 56)) for size in sizes]
    stock = type(processor)._get_num_multimodal_tokens(processor, image_sizes=sizes).num_image_tokens
    assert [o.image_tokens for o in out] == [anyres_count(*anyres_budget(n, 16, r * c, 0.5), r * c)
                                             for n, (r, c) in zip(stock, tiles)]
    assert all(len(o.text.split()) == 3 for o in out)
