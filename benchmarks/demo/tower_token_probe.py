"""How much of a picture's colour and shape each image token of a demo tower carries (issue 31's diagnosis).

    python benchmarks/demo/tower_token_probe.py --tower runs/demo-model/tower [--tower demo] [--images 2000]

The LM reads a tower's patch tokens (encoder layer -2, LLaVA's choice) one by one through attention. The tower's
own report probes the mean and max over all tokens (``tower.llava_features``), which says what the picture as a
whole holds; this probes three views on the same train/test pictures with the same linear classifier
(``tower.linear_probe``): the mean over tokens (what evenly spread attention sees), one token drawn at random
per picture (how far the tower spreads the picture's attributes to every token), and the mean and max. ``demo``:
the tower inside the packed shipped stock twin.
"""

from __future__ import annotations

import argparse
import sys

import torch

from focusvlm.demo import tower as T


def load_vision(name: str):
    if name == "demo":
        from focusvlm.models.demo import DEMO_WEIGHTS_DIR
        from focusvlm.models.demo.load import load_demo

        model, processor = load_demo(DEMO_WEIGHTS_DIR / "stock")
        return model.model.vision_tower, processor.image_processor
    from focusvlm.models.demo.vision import load_tower

    return load_tower(name)


@torch.no_grad()
def token_views(vision, pixels: torch.Tensor, gen: torch.Generator, batch: int = 250) -> dict[str, torch.Tensor]:
    views: dict[str, list[torch.Tensor]] = {"mean": [], "one random token": [], "mean and max": []}
    for k in range(0, len(pixels), batch):
        hidden = vision(pixel_values=pixels[k:k + batch], output_hidden_states=True).hidden_states[-2][:, 1:]
        pick = torch.randint(hidden.shape[1], (hidden.shape[0],), generator=gen)
        mean = hidden.mean(1)
        views["mean"].append(mean)
        views["one random token"].append(hidden[torch.arange(hidden.shape[0]), pick])
        views["mean and max"].append(torch.cat([mean, hidden.amax(1)], dim=-1))  # as tower.llava_features
    return {k: torch.cat(v) for k, v in views.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tower", action="append", required=True, help="a saved demo tower folder, or 'demo'")
    p.add_argument("--images", type=int, default=2000, help="train pictures for the probe (the test split is whole)")
    args = p.parse_args()
    torch.manual_seed(0)
    for name in args.tower:
        vision, processor = load_vision(name)
        vision.eval()
        train_px, train_y, _ = T.load_split_pixels("train", processor, list(range(args.images)))
        test_px, test_y, _ = T.load_split_pixels("test", processor)
        train = token_views(vision, train_px, torch.Generator().manual_seed(0))
        test = token_views(vision, test_px, torch.Generator().manual_seed(1))
        for view in train:
            acc = T.linear_probe(train[view], train_y, test[view], test_y)
            print(f"{name}, {view:>16}: colour {acc['color']:.1%}, shape {acc['shape']:.1%}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
