"""`focusvlm demo`: stock vs CMAI side by side on the embedded default, no download."""

from __future__ import annotations

import argparse
import json
import sys
import time

DEFAULT_PROMPT = "What do you see in this picture? Answer in exactly two sentences, all in lowercase letters."

RANDOM_VISION_NOTE = (
    "NOTE: the embedded demo model pairs the real SmolLM2-135M-Instruct language model with RANDOM vision\n"
    "weights (no CLIP/LLaVA weights can be downloaded here), so its answers do not describe the picture.\n"
    "It shows the mechanics: the same prompt answered by the stock model and with CMAI switched on.\n"
    "Run a real checkpoint with: focusvlm demo --model llava-hf/llava-1.5-7b-hf")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="stock vs CMAI on a bundled photo (embedded model, no download)")
    p.add_argument("--model", default="demo", help="'demo' (default, embedded) or a LLaVA hub id / folder")
    p.add_argument("--image", default=None, help="image file or URL (default: the bundled astronaut photo)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--cmai", type=float, default=0.6, metavar="GAMMA_MAX")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no progress bars while the model loads")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..api import patched
    from ..config import FocusConfig
    from ..inhibit.method import CMAIConfig
    from ..models.factory import demo_image_path
    from ..runtime import check_max_new_tokens
    from .common import load_model, open_image, quiet_progress, resolve_device_dtype
    from .generate import answer

    start = time.perf_counter()
    image_source = args.image or str(demo_image_path("astronaut"))
    image = open_image(image_source)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    from ..models.factory import demo_cache_dir

    if args.model == "demo" and not (demo_cache_dir() / "config.json").is_file():
        print("building the embedded demo model (first run converts the GGUF weights, ~30 s; cached after)...",
              file=sys.stderr)
    quiet_progress(args)
    model, processor = load_model(args.model, device, dtype)
    check_max_new_tokens(model, args.max_new_tokens)
    stock = answer(model, processor, image, args.prompt, args.max_new_tokens)
    config = FocusConfig(cmai=CMAIConfig(gamma_max=args.cmai))
    with patched(model, config, processor=processor):
        focused = answer(model, processor, image, args.prompt, args.max_new_tokens)
    total = time.perf_counter() - start
    if args.json:
        print(json.dumps({"model": args.model, "image": image_source, "prompt": args.prompt,
                          "stock": stock, "cmai": focused, "config": config.to_dict(), "seconds": round(total, 2)}))
        return 0
    if args.model == "demo":
        print(RANDOM_VISION_NOTE + "\n")
    print(f"image:  {image_source}\nprompt: {args.prompt}\n")
    for title, result in (("stock", stock), (f"CMAI (gamma_max={args.cmai})", focused)):
        print(f"--- {title}: {result['image_tokens']} image tokens, {result['new_tokens']} new tokens, "
              f"{result['seconds']:.2f} s")
        print(result["answer"] + "\n")
    if args.model == "demo" and stock["answer"] == focused["answer"]:
        print("(the answers coincide: with random vision weights the image tokens carry no signal, so removing\n"
              " the least relevant ones rarely changes a greedy answer of this small LM)")
    print(f"[total {total:.1f} s including model load]", file=sys.stderr)
    return 0
