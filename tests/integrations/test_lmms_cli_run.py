"""Issue 10, item 9: the lmms-eval plugin under lmms-eval's own CLI, on 1 and 2 processes, with a
local task (a YAML task over a local JSONL, several images per document, ``until: [" "]``).

The in-process tests need only ``lmms_eval.api`` (in `make test`'s reference libs). The CLI tests
need what ``python -m lmms_eval`` imports at start-up (datasets, pyarrow, pandas, sacrebleu,
aiohttp, ...), which `make test` does not install; they run under `make test-lmms`, which adds
those packages to a side folder, and are skipped (with the missing module named) otherwise.
"""

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "focusvlm" / "assets"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_llava_folder import save_tiny_llava

    return str(save_tiny_llava(tmp_path_factory.mktemp("tiny") / "m"))


# --------------------------------------------------------------------------- generation settings

def test_greedy_settings_follow_until_and_max_new_tokens():
    from focusvlm.integrations.lmms import greedy_settings

    assert greedy_settings({"until": [" ", "\n\n"], "max_new_tokens": 7}, 128) == (7, (" ", "\n\n"))
    assert greedy_settings({"until": "ASSISTANT:", "temperature": 0, "do_sample": False, "num_beams": 1}, 5) == \
        (5, ("ASSISTANT:",))
    assert greedy_settings(None, 9) == (9, ())


@pytest.mark.parametrize("kwargs,message", [
    ({"do_sample": True}, "sampling \\(do_sample: true\\)"),
    ({"temperature": 0.7}, "temperature 0.7"),
    ({"num_beams": 4}, "beam search \\(num_beams: 4\\)"),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
])
def test_greedy_settings_refuse_what_greedy_cannot_do(kwargs, message):
    from focusvlm.integrations.lmms import UnsupportedGeneration, greedy_settings

    with pytest.raises(UnsupportedGeneration, match=message):
        greedy_settings(kwargs, 16)


def test_unknown_generation_kwargs_are_named_once(capsys):
    from focusvlm.integrations.lmms import greedy_settings

    warned = set()
    greedy_settings({"image_aspect_ratio": "pad", "top_p": 1.0}, 4, warned)
    greedy_settings({"image_aspect_ratio": "pad"}, 4, warned)
    err = capsys.readouterr().err
    assert err.count("ignoring generation kwargs ['image_aspect_ratio']") == 1 and "top_p" not in err


# --------------------------------------------------------------------------- the model class, in process

class Req:
    def __init__(self, doc_id, gen_kwargs, context="w3 w4"):
        self.args = (context, gen_kwargs, lambda doc: doc["images"], doc_id, "t", "test")


@pytest.fixture(scope="module")
def plugin(tiny):
    pytest.importorskip("lmms_eval.api.model")
    from PIL import Image

    from focusvlm.integrations.lmms import FocusVLMLmms

    model = FocusVLMLmms(pretrained=tiny, device="cpu", batch_size=2)
    a, b = Image.open(ASSETS / "chelsea.jpg"), Image.open(ASSETS / "coffee.jpg")
    model.task_dict = {"t": {"test": {0: {"images": [a]}, 1: {"images": [a, b]}, 2: {"images": []}}}}
    return model


def test_generate_until_cuts_at_until_and_uses_every_image(plugin):
    seen = []
    real = plugin.generator.generate

    def spy(prompts, images, max_new_tokens, stop=None):
        seen.append(([len(ims) if isinstance(ims, list) else int(ims is not None) for ims in images],
                     max_new_tokens, stop))
        return real(prompts, images, max_new_tokens, stop=stop)

    plugin.generator.generate = spy
    try:
        plain = plugin.generate_until([Req(1, {"max_new_tokens": 6, "until": []})])
        cut = plugin.generate_until([Req(0, {"max_new_tokens": 6, "until": [" "]}),
                                     Req(1, {"max_new_tokens": 6, "until": [" "]}),
                                     Req(2, {"max_new_tokens": 3, "until": [" "]})])
    finally:
        plugin.generator.generate = real
    assert " " in plain[0]  # the tiny model answers several words ...
    assert len(cut) == 3 and all(c and " " not in c for c in cut)  # ... cut at the first " "
    assert cut[1] == plain[0].split(" ")[0]
    # both images of document 1 reached the model; requests with other max_new_tokens are batched apart
    assert seen[0] == ([2], 6, [])
    assert sorted(seen[1:]) == [([0], 3, [" "]), ([1, 2], 6, [" "])]


def test_generate_until_refuses_sampling_before_generating(plugin):
    from focusvlm.integrations.lmms import UnsupportedGeneration

    with pytest.raises(UnsupportedGeneration, match="temperature 0.2"):
        plugin.generate_until([Req(0, {"until": [" "]}), Req(2, {"temperature": 0.2})])


def test_device_rank_and_world_size_of_a_single_process(plugin):
    import torch

    assert plugin.device == torch.device("cpu") and plugin.rank == 0 and plugin.world_size == 1
    assert plugin.accelerator is not None and plugin.batch_size == 2


# --------------------------------------------------------------------------- lmms-eval's own CLI

@functools.lru_cache(maxsize=1)
def cli_missing() -> str | None:
    """None when `python -m lmms_eval` can start here, else the module it misses."""
    proc = subprocess.run([sys.executable, "-c", "import lmms_eval.__main__, lmms_eval.evaluator"],
                          capture_output=True, text=True, timeout=300, env=_env())
    if proc.returncode == 0:
        return None
    last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
    return last


def _env(**extra):
    paths = [str(ROOT), str(ROOT / "tests")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", **extra}


TASK = textwrap.dedent("""\
    task: focusvlm_tiny
    dataset_path: json
    dataset_kwargs:
      data_files:
        test: {data}
    test_split: test
    output_type: generate_until
    doc_to_visual: !function focusvlm_tiny_utils.doc_to_visual
    doc_to_text: !function focusvlm_tiny_utils.doc_to_text
    doc_to_target: answer
    generation_kwargs:
      until: [" "]
      max_new_tokens: 6
      temperature: 0
      do_sample: false
    process_results: !function focusvlm_tiny_utils.process_results
    metric_list:
      - metric: answered
        aggregation: mean
        higher_is_better: true
    """)

UTILS = textwrap.dedent("""\
    from PIL import Image


    def doc_to_visual(doc):
        return [Image.open(p).convert("RGB") for p in doc["images"]]


    def doc_to_text(doc):
        return doc["question"]


    def process_results(doc, results):
        return {"answered": float(bool(results[0]) and " " not in results[0])}
    """)


def local_task(tmp_path, n_docs=7):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    docs = [{"id": i, "question": f"w{i} w2", "answer": "w1",
             "images": [str(ASSETS / "chelsea.jpg")] + ([str(ASSETS / "coffee.jpg")] if i % 2 else [])}
            for i in range(n_docs)]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "focusvlm_tiny.yaml").write_text(TASK.format(data=data))
    (tasks / "focusvlm_tiny_utils.py").write_text(UTILS)
    return tasks


def run_cli(tmp_path, tiny, processes):
    missing = cli_missing()
    if missing and os.environ.get("FOCUSVLM_EXTRAS_INSTALLED") == "1":
        # `make test-latest` installed the [lmms] extra as a user does: a CLI that cannot start is a failure
        pytest.fail(f"lmms-eval's CLI cannot start with the [lmms] extra installed: {missing}")
    if missing:
        pytest.skip(f"lmms-eval's CLI cannot start here ({missing}); `make test-latest` installs what it needs")
    tasks, out = local_task(tmp_path), tmp_path / "out"
    lmms = ["-m", "lmms_eval", "--model", "focusvlm", "--model_args", f"pretrained={tiny}",
            "--tasks", "focusvlm_tiny", "--include_path", str(tasks), "--batch_size", "2",
            "--log_samples", "--output_path", str(out)]
    if processes == 1:
        cmd = [sys.executable, *lmms]
    else:
        # the command; `--cpu` would pick accelerate's single-process launcher, while
        # `--multi_gpu` starts torchrun, which on a machine without CUDA gives an N-process gloo group
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               "29541", *lmms]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env=_env(HF_DATASETS_CACHE=str(tmp_path / "hf-datasets")))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    files = list(out.rglob("*samples_focusvlm_tiny.jsonl"))
    assert len(files) == 1, log[-3000:]
    rows = [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]
    return rows, log


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_lmms_eval_cli_on_a_local_task(tmp_path, tiny, processes):
    rows, log = run_cli(tmp_path, tiny, processes)
    # every document answered exactly once, whatever the number of processes
    assert sorted(r["doc_id"] for r in rows) == list(range(7))
    for r in rows:
        answer = r["filtered_resps"] if isinstance(r["filtered_resps"], str) else r["filtered_resps"][0]
        assert answer and " " not in answer, r  # until [" "] cut every answer at its first space
        assert r["answered"] == 1.0
    assert f"on {processes} process(es)" in log
    assert "has no attribute 'device'" not in log
