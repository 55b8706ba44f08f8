"""`focusvlm demo`: stock vs CMAI vs VMTC+CMAI side by side on a bundled picture, no download.

On the embedded demo model (trained here on easy-VQA; focusvlm/assets/demo_model/MODEL_CARD.md) the rows
are the stock-trained model, the same with CMAI switched on at inference, and with VMTC + CMAI (the twin
trained with them, run as trained, where it is shipped; else the same model with them at inference), each
asked the colour question, a yes/no question only the picture answers, and one instruction-following
prompt. On any other model (``--model``) the three rows are that model stock, with CMAI, and with
VMTC + CMAI, asked a photo question and the instruction-following prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

DEMO_QUESTION = "What color is the shape?"
# a yes/no question whose answer only the picture gives (the bundled picture holds a blue triangle): a model
# that answers from the question's wording says "no" to every "Is there a ...?" (easy-VQA's form prior)
DEMO_YES_NO = "Is there a blue shape?"
# asked as the demo model was trained (LLaVA-1.5's short-answer instruction)
SHORT_ANSWER = "Answer the question using a single word or phrase."
# one instruction-following prompt: a verifiable format instruction on top of an image question. The title
# task, because the demo's LM follows it on text alone (72 % of the IF suite's title prompts, given the
# picture's description: benchmarks/results/if_experiment, arm lm-text), so the picture decides whether it
# still does; not all-capitals, which the LM never follows even on text.
IF_PROMPT = ("What shape is in the image? Give your answer a title wrapped in double angle brackets, such as "
             "<<a title>>.")
IF_INSTRUCTION = ("detectable_format:title", {})
IF_CHECK = "a title in double angle brackets"
PHOTO_PROMPT = "What do you see in this picture? Answer in exactly two sentences, all in lowercase letters."

DEMO_NOTE = (
    "The embedded demo model: SmolLM2-135M-Instruct with a small CLIP-style vision tower, projector and LoRA\n"
    "trained on this kind of machine on easy-VQA (64x64 pictures of one coloured shape; colour, shape and yes/no\n"
    "questions). It sees these pictures, not photos. Model card: focusvlm/assets/demo_model/MODEL_CARD.md")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="stock vs CMAI vs VMTC+CMAI on a bundled picture (embedded model, no download)")
    p.add_argument("--model", default="demo",
                   help="'demo' (default: the embedded easy-VQA model) or a LLaVA-family hub id / folder")
    p.add_argument("--image", default=None, help="image file or URL (default: the bundled easy-VQA picture, or the "
                                                 "astronaut photo for other models)")
    p.add_argument("--question", default=None, help="the short-answer question (default: 'What color is the shape?')")
    p.add_argument("--yes-no", default=DEMO_YES_NO, help="the demo model's yes/no question ('' to skip; demo model only)")
    p.add_argument("--if-prompt", default=IF_PROMPT, help="the instruction-following prompt (checked for a <<title>>)")
    p.add_argument("--cmai", type=float, default=0.6, metavar="GAMMA_MAX")
    p.add_argument("--vmtc", type=float, default=0.5, metavar="TARGET", help="VMTC's kept share for other models")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no progress bars while the model loads")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=run)


def _rows(args: argparse.Namespace):
    """[(title, model, processor, FocusConfig)] and what they are, loading each model once."""
    from ..compress.vmtc_method import VMTCConfig
    from ..config import FocusConfig
    from ..inhibit.cmai_method import CMAIConfig
    from .common import load_model, resolve_device_dtype

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    cmai = FocusConfig(cmai=CMAIConfig(gamma_max=args.cmai))
    both = FocusConfig(cmai=CMAIConfig(gamma_max=args.cmai), vmtc=VMTCConfig(target=args.vmtc))
    if args.model == "demo":
        from ..models.demo import demo_focus_config_path

        stock, sp = load_model("demo", device, dtype)
        rows = [("stock", stock, sp, FocusConfig(), "stock"),
                (f"CMAI at inference ({cmai.describe()})", stock, sp, cmai, "cmai")]
        if demo_focus_config_path().is_file():  # the twin trained with VMTC + CMAI, run as trained
            focus, fp = load_model("demo-focus", device, dtype)
            trained = FocusConfig.load(demo_focus_config_path())
            return rows + [(f"VMTC+CMAI, trained with them ({trained.describe()})", focus, fp, trained, "focus")]
        return rows + [(f"VMTC+CMAI at inference ({both.describe()})", stock, sp, both, None)]

    model, processor = load_model(args.model, device, dtype)
    return [("stock", model, processor, FocusConfig(), None), (cmai.describe(), model, processor, cmai, None),
            (both.describe(), model, processor, both, None)]


def measured_if(arm: str | None, config, summary: dict | None) -> dict | None:
    """The experiment's IF figure for a demo row (issue 31; shipped with the twins it was measured on), when the
    row runs exactly that arm's model and FocusConfig."""
    if arm is None or summary is None or arm not in summary["arms"]:
        return None
    found = summary["arms"][arm]
    if found["config"] != config.to_dict():
        return None
    return {"if_strict": found["if_strict"], "prompts": found["prompts"], "suite": summary["suite"]}


def run(args: argparse.Namespace) -> int:
    from ..api import patched
    from ..demo.experiment import shipped_summary
    from ..eval.instructions import check
    from ..models.factory import demo_image_path
    from ..runtime import check_max_new_tokens
    from .common import open_image, quiet_progress
    from .generate import answer

    start = time.perf_counter()
    is_demo = args.model == "demo"
    image_source = args.image or str(demo_image_path("easyvqa" if is_demo else "astronaut"))
    image = open_image(image_source)
    question = args.question or (DEMO_QUESTION if is_demo else PHOTO_PROMPT)
    prompt = f"{question}\n{SHORT_ANSWER}" if is_demo else question
    yes_no_prompt = f"{args.yes_no}\n{SHORT_ANSWER}" if is_demo and args.yes_no else None
    quiet_progress(args)
    rows = _rows(args)
    check_max_new_tokens(rows[0][1], args.max_new_tokens)
    summary = shipped_summary() if is_demo else None
    results = []
    for title, model, processor, config, arm in rows:
        with patched(model, config, processor=processor):
            qa = answer(model, processor, image, prompt, args.max_new_tokens)
            yes_no = answer(model, processor, image, yes_no_prompt, args.max_new_tokens) if yes_no_prompt else None
            follow = answer(model, processor, image, args.if_prompt, args.max_new_tokens)
        follow["follows"] = check(IF_INSTRUCTION[0], follow["answer"], IF_INSTRUCTION[1])
        results.append({"title": title, "config": config.to_dict(), "question": qa, "instruction": follow,
                        "measured_if": measured_if(arm, config, summary)} | ({"yes_no": yes_no} if yes_no else {}))
    total = time.perf_counter() - start
    if args.json:
        print(json.dumps({"model": args.model, "image": image_source, "question": prompt, "yes_no": yes_no_prompt,
                          "if_prompt": args.if_prompt,
                          "if_instruction": IF_INSTRUCTION[0], "rows": results, "seconds": round(total, 2)}))
        return 0
    if is_demo:
        print(DEMO_NOTE + "\n")
    print(f"image:    {image_source}")
    width = max(len(r["title"]) for r in results)
    for key, asked in (("question", prompt), ("yes_no", yes_no_prompt)):
        if asked is None:
            continue
        print(f"question: {asked!r}")
        for r in results:
            q = r[key]
            print(f"  {r['title']:<{width}}  {q['image_tokens']:>4} image tokens  {q['seconds']:.2f} s  -> {q['answer']}")
    print(f"\ninstruction following: {args.if_prompt!r} (checked: {IF_CHECK})")
    for r in results:
        f = r["instruction"]
        verdict = "follows" if f["follows"] else "does not follow"
        print(f"  {r['title']:<{width}}  {verdict:<15} -> {f['answer']}")
    measured = [r for r in results if r["measured_if"]]
    if measured:
        m = measured[0]["measured_if"]
        print(f"\nmeasured on {m['prompts']} prompts ({m['suite']} suite on held-out pictures; MODEL_CARD.md), "
              "IF strict % [95 % CI]:")
        for r in measured:
            print(f"  {r['title']:<{width}}  {r['measured_if']['if_strict']}")
    print(f"[total {total:.1f} s including model load]", file=sys.stderr)
    return 0
