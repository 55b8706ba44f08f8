"""`focusvlm generate`: answer one prompt about one image."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from .common import add_model_args, load_from_args, open_image


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="answer a prompt about an image with the (patched) model")
    add_model_args(p)
    p.add_argument("--image", required=True, help="image file or http(s) URL")
    p.add_argument("--prompt", required=True, help="the question or instruction")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def answer(model: Any, processor: Any, image: Any, prompt: str, max_new_tokens: int) -> dict:
    """One greedy answer plus the counts a user wants to see."""
    from ..eval.engine import HFGenerator

    start = time.perf_counter()
    out = HFGenerator(model, processor).generate([prompt], [image], max_new_tokens)[0]
    seconds = time.perf_counter() - start
    return {"answer": out.text, "prompt_tokens": out.prompt_tokens, "image_tokens": out.image_tokens,
            "new_tokens": out.new_tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(out.new_tokens / seconds, 2) if seconds > 0 else None}


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    image = open_image(args.image)
    model, processor, config = load_from_args(args)
    result = answer(model, processor, image, args.prompt, args.max_new_tokens)
    result.update(model=args.model, methods=config.describe(), config=config.to_dict())
    if args.json:
        print(json.dumps(result))
    else:
        print(result["answer"])
        print(f"[{args.model}, {config.describe()}: {result['prompt_tokens']} prompt tokens "
              f"({result['image_tokens']} image), "
              f"{result['new_tokens']} new tokens in {result['seconds']:.2f} s, "
              f"{result['tokens_per_s']} tokens/s]", file=sys.stderr)
    return 0
