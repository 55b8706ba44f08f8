"""Issue 10, item 4: a vision-side method without `processor=` says to pass the processor
(a warning at patch time, a clear error instead of transformers' "tokens: 576, features: ..." )."""

import numpy as np
import pytest
import torch

from focusvlm import FocusConfig, ProcessorHint, PruMergeConfig, SPDConfig, VMTCConfig, patch, unpatch
from focusvlm.models.llava import random_llava
from tiny_llava_folder import tiny_processor

CONFIGS = [FocusConfig(vmtc=VMTCConfig(target=0.25, stages=2)), FocusConfig(spd=SPDConfig()),
           FocusConfig(prumerge=PruMergeConfig(budget=0.25))]


def batch(processor):
    image = np.random.RandomState(0).randint(0, 255, (120, 130, 3), dtype=np.uint8)
    return processor(images=[image], text=["<image> w1 w2"], return_tensors="pt")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.describe())
def test_without_processor_warns_then_names_the_fix(config):
    model, processor = random_llava("tiny"), tiny_processor()
    inputs = batch(processor)  # built by the stock processor: 64 placeholders
    with pytest.warns(ProcessorHint, match=r"gives \d+ image tokens per image instead of 64, and patch\(\) got no "
                                         r"processor: pass processor= to patch\(\)"):
        handle = patch(model, config)
    with pytest.raises(ValueError, match=r"the inputs hold 64 image placeholder tokens for 1 image\(s\), the stock "
                                         rf"64 per image, but with .* each image gives {handle.image_tokens()} "
                                         r"tokens: pass the processor to patch\(model, config, processor=processor\)"):
        with torch.no_grad():
            model(**inputs)
    unpatch(model)
    with torch.no_grad():
        model(**inputs)  # stock again: the guard went with the patch


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.describe())
def test_with_processor_no_warning_and_it_runs(config, recwarn):
    model, processor = random_llava("tiny"), tiny_processor()
    handle = patch(model, config, processor)
    assert not [w for w in recwarn if "processor" in str(w.message)]
    inputs = batch(processor)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == handle.image_tokens()
    with torch.no_grad():
        model(**inputs)
    unpatch(model, processor)
