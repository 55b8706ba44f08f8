"""The language-model share of a Qwen prefill, stock vs VMTC, timed in isolation.

VMTC on Qwen runs after the 2x2 merger, so it cannot make the vision tower cheaper; what it
buys is a shorter LLM prefill. On a loaded CPU the tower's run-to-run noise (tens of seconds
for the real tower) swamps that difference in a whole-TTFT measurement, so this script runs
one full forward per variant to capture exactly what the language model receives
(embeddings, 3-D positions, deepstack inputs), then times only the language model + LM
head on those inputs, alternating the variants every round (paired ratios).

Run: PYTHONPATH=. python benchmarks/qwen_llm_prefill.py qwen2.5-vl-mid [rounds] [prompt_tokens]
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time

import torch

from focusvlm import FocusConfig, VMTCConfig, patched
from focusvlm.models import adapter_for_preset

PREFIX = 5  # text tokens before the image, as in focusvlm bench


def main() -> None:
    preset = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    prompt = int(sys.argv[3]) if len(sys.argv) > 3 else 64
    torch.manual_seed(0)
    adapter = adapter_for_preset(preset)
    model = adapter.random_model(preset)
    vision = adapter.random_pixel_inputs(model, 1, torch.Generator().manual_seed(0))
    text = torch.randint(1, min(model.config.image_token_id, 1000) - 5, (1, prompt),
                         generator=torch.Generator().manual_seed(1))
    captured = {}
    for name, cfg in (("stock", None), ("vmtc", FocusConfig(vmtc=VMTCConfig(target=0.5)))):
        context = patched(model, cfg) if cfg is not None else contextlib.nullcontext()
        with context as handle, torch.inference_mode():
            t, h, w = vision["image_grid_thw"][0].tolist()
            tokens = (h // 2) * (w // 2) if handle is None else handle.vision.output_patches((h // 2, w // 2))
            ids = torch.cat([text[:, :PREFIX], torch.full((1, tokens), model.config.image_token_id),
                             text[:, PREFIX:]], dim=1)
            box = {}
            hook = model.model.language_model.register_forward_pre_hook(
                lambda module, args, kwargs: box.update(kwargs), with_kwargs=True)
            try:
                model(input_ids=ids, attention_mask=torch.ones_like(ids), **vision,
                      **adapter.prompt_inputs(model, ids), use_cache=False)
            finally:
                hook.remove()
            box["use_cache"] = False
            box.pop("past_key_values", None)
            captured[name] = (box, ids.shape[1])

    def prefill(name: str) -> float:
        kwargs, _ = captured[name]
        start = time.perf_counter()
        with torch.inference_mode():
            hidden = model.model.language_model(**kwargs).last_hidden_state
            model.lm_head(hidden[:, -1:])
        return time.perf_counter() - start

    names = list(captured)
    times = {name: [] for name in names}
    prefill("stock"), prefill("vmtc")  # warm-up
    for r in range(rounds):
        for name in names[r % 2:] + names[:r % 2]:
            times[name].append(prefill(name))
    ratios = [v / s for v, s in zip(times["vmtc"], times["stock"])]
    for name in names:
        print(f"{preset} {name}: {captured[name][1]} tokens, LLM prefill median {statistics.median(times[name]):.3f} s "
              f"({', '.join(f'{x:.2f}' for x in times[name])})")
    print(f"{preset} vmtc/stock LLM prefill: median of paired ratios {statistics.median(ratios):.3f}x "
          f"({', '.join(f'{x:.2f}' for x in ratios)})")


if __name__ == "__main__":
    main()
