"""lmms-eval plugin: ``--model focusvlm`` runs lmms-eval's task catalogue with any focusvlm method.

Install with ``pip install focusvlm[lmms]``; focusvlm's package metadata
declares the entry point (group ``lmms_eval.models``)::

    focusvlm = "focusvlm.integrations.lmms:manifest"

which lmms-eval (>= 0.5, checked on 0.7.3) reads when it builds its model
registry. Then::

    lmms-eval --model focusvlm \
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,focus_config=focus.yaml \
        --tasks gqa,mme --batch_size 1

Only generation tasks are supported (``generate_until``): the five standard
benchmarks and the instruction-following ones are all generative.
"""

from __future__ import annotations

from typing import Any

MODEL_ID = "focusvlm"
CLASS_PATH = "focusvlm.integrations.lmms.FocusVLMLmms"


def manifest():
    """The entry-point payload: lmms-eval's ModelManifest for ``--model focusvlm``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


def _build_class():
    from lmms_eval.api.model import lmms

    class FocusVLMLmms(lmms):
        """lmms-eval "simple" model around a focusvlm-patched LLaVA (greedy, left-padded batches)."""

        is_simple = True

        def __init__(self, pretrained: str = "demo", focus_config: str | None = None, device: str | None = None,
                     dtype: str | None = None, batch_size: int | str = 1, max_new_tokens: int = 128,
                     **kwargs: Any) -> None:
            super().__init__()
            if kwargs:
                raise ValueError(f"focusvlm lmms model: unknown model_args {sorted(kwargs)}; "
                                 "known: pretrained, focus_config, device, dtype, batch_size, max_new_tokens")
            from ..api import patch
            from ..config import FocusConfig
            from ..runtime import HFGenerator, load_model, resolve_device_dtype

            self.focus_config = FocusConfig.load(focus_config) if focus_config else FocusConfig()
            model, processor = load_model(pretrained, *resolve_device_dtype(device, dtype))
            if not self.focus_config.is_stock:
                patch(model, self.focus_config, processor)
            self.generator = HFGenerator(model, processor)
            self.batch_size_per_gpu = int(batch_size)
            self.default_max_new_tokens = int(max_new_tokens)

        def generate_until(self, requests) -> list[str]:
            out: list[str] = []
            for start in range(0, len(requests), self.batch_size_per_gpu):
                chunk = requests[start:start + self.batch_size_per_gpu]
                prompts, images, limits = [], [], []
                for req in chunk:
                    context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
                    visuals = doc_to_visual(self.task_dict[task][split][doc_id])
                    images.append(visuals[0].convert("RGB") if visuals else None)
                    prompts.append(context)
                    limits.append(int((gen_kwargs or {}).get("max_new_tokens", self.default_max_new_tokens)))
                # one cap per batch: the largest asked for; greedy answers stop at EOS anyway
                gens = self.generator.generate(prompts, images, max(limits))
                out.extend(g.text for g in gens)
            return out

        def loglikelihood(self, requests):
            raise NotImplementedError("focusvlm's lmms-eval model supports generation tasks only")

        def generate_until_multi_round(self, requests):
            raise NotImplementedError("focusvlm's lmms-eval model supports single-round generation only")

    FocusVLMLmms.__module__ = __name__
    FocusVLMLmms.__qualname__ = "FocusVLMLmms"
    return FocusVLMLmms


def __getattr__(name: str):
    # built on first access so importing this module never needs lmms-eval
    if name == "FocusVLMLmms":
        cls = _build_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
