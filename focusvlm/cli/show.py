"""`focusvlm show`: draw which image patches survive VMTC (per stage), PruMerge(+), VisionZip, DivPrune or SPD."""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from pathlib import Path

from .common import add_model_args, load_from_args


def register(subparsers) -> None:
    p = subparsers.add_parser("show", help="picture of the image tokens a vision-side reduction keeps",
                              description="Draw the image with the tokens a vision-side reduction keeps (per VMTC "
                                          "stage: primary patches outlined, merged patches tinted by cluster; the "
                                          "PruMerge / VisionZip / DivPrune / SPD views likewise; Qwen-VL: one "
                                          "panel after the 2x2 merger, a cell per merged token), plus the final "
                                          "token count. The reduction comes from --config; without one, --method "
                                          "picks it with its defaults.")
    p.add_argument("--image", required=True, type=Path, help="image file (jpg, png, ...)")
    p.add_argument("--method", default="vmtc", metavar="NAME[:VALUE]",
                   help="vision-side method used when --config sets none, e.g. vmtc, vmtc:0.25, spd, prumerge:0.125, "
                        "visionzip:64, divprune "
                        "(default: vmtc)")
    p.add_argument("--target", type=float, help="VMTC target (share of patches, or a count if > 1)")
    p.add_argument("--stages", type=int, help="VMTC stages (overrides the config)")
    p.add_argument("-o", "--output", required=True, type=Path, help="PNG to write")
    add_model_args(p)
    p.set_defaults(func=run)


def _vision_config(config, args):
    from ..methods import get_method

    if config.vision is None:
        name, _, value = args.method.partition(":")
        method = get_method(name)
        if method.side != "vision":
            raise ValueError(f"--method {name}: not a vision-side method, nothing to draw")
        config = config.replace(**{name: method.parse(value or None)})
    changes = {}
    if args.target is not None:
        changes["target"] = args.target if args.target <= 1 else int(args.target)
    if args.stages is not None:
        changes["stages"] = args.stages
    if changes:
        if config.vmtc is None:
            raise ValueError(f"--{' and --'.join(changes)} applies to VMTC only")
        config = config.replace(vmtc=dataclasses.replace(config.vmtc, **changes))
    return config


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .. import viz
    from ..api import patch, unpatch
    from .common import focus_config_from_args, open_image

    if not args.image.is_file():
        raise FileNotFoundError(f"--image {args.image}: no such file")
    image = open_image(str(args.image))  # a corrupt file fails here, before the model loads
    config = _vision_config(focus_config_from_args(args), args)
    model, processor, _ = load_from_args(args, patch_model=False)
    # the processor is only used for its pixels here, so it stays stock (an adaptive count needs no placeholders);
    # patch() warns about a stock processor, which does not apply: no prompt is built
    from ..api import ProcessorHint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProcessorHint)
        handle = patch(model, config)
    try:
        method, adapter = handle.vision, handle.adapter
        method.record = True
        ip = processor.image_processor
        # the family says what its processor's output means: fixed crops, AnyRes tiles, or (Qwen) flattened
        # patches of a variable grid drawn as merged tokens
        inputs, crops = adapter.shown_crops(model, ip(images=[image], return_tensors="pt"))
        param = next(model.parameters())
        inputs = {k: v.to(device=param.device, dtype=param.dtype if v.is_floating_point() else v.dtype)
                  if torch.is_tensor(v) else v for k, v in inputs.items()}
        with torch.no_grad():
            tokens = int(adapter.image_features(model, **inputs)[0].shape[0])
        pictures = []
        for index, crop in enumerate(crops):
            panels = method.panels(sample=index)
            if not panels:  # e.g. VMTC target 1.0: nothing compresses, show the plain grid
                n = crop.grid[0] * crop.grid[1]
                panels = [viz.Panel("stock", np.full(n, viz.PRIMARY), np.full(n, -1))]
            if crop.label:
                count = f"{crop.label}, {crop.patches} patches; the image -> {tokens} tokens to the LLM"
            elif crop.merged is not None:
                count = f"{crop.patches} patches -> {crop.merged} merged tokens -> {tokens} image tokens to the LLM"
            else:
                count = f"{crop.patches} patches -> {tokens} image tokens to the LLM"
            cell = "" if crop.merged is None else \
                f"; one cell = one merged token ({crop.patches // crop.merged} patches)"
            footer = (f"{count} ({type(config.vision).__name__}; white outline = kept as is, tint = merged group, "
                      f"dark = dropped{cell})")
            seen = viz.denormalize(crop.pixels, ip.image_mean, ip.image_std)
            pictures.append(viz.render(seen, crop.grid, panels, footer))
        picture = _stack(pictures)
    finally:
        unpatch(model)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    picture.save(args.output)
    print(f"wrote {args.output} ({tokens} image tokens{'' if len(pictures) == 1 else f', {len(pictures)} crops'}) "
          f"with {config.describe()}")
    return 0


def _stack(pictures):
    """PIL pictures one below the other (left aligned, white background)."""
    if len(pictures) == 1:
        return pictures[0]
    from PIL import Image

    canvas = Image.new("RGB", (max(p.width for p in pictures), sum(p.height for p in pictures)), "white")
    y = 0
    for p in pictures:
        canvas.paste(p, (0, y))
        y += p.height
    return canvas
