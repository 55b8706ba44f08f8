"""The shipped FSDP and DeepSpeed ZeRO-2 accelerate configs train `focusvlm train` with 2 CPU processes (gloo)
and reach the same per-step losses, gradient norms and final weights as 1 process at the same global batch.

Run as a script, this file is the launcher the test hands to ``accelerate launch``:

    accelerate launch --config_file focusvlm/train/configs/accelerate_fsdp.yaml --num_processes 2 \\
        --fsdp_sync_module_states false --mixed_precision no tests/train/test_distributed_cpu.py train ...

``accelerate launch ... -m focusvlm train`` on a machine without a GPU does *not* use FSDP: accelerate 1.16
only turns a process group into FSDP for GPU-like devices (``AcceleratorState``), so the same command
silently trains with plain DDP (MULTI_CPU), which tests/train/test_distributed.py already covers. The
launcher below switches FSDP on for the CPU group, so what runs here is FSDP1 as the config asks for it
(full sharding of the flat parameters, transformer-layer wrapping of LlamaDecoderLayer/CLIPEncoderLayer,
use_orig_params with the frozen tower, FSDP's activation checkpointing, FULL_STATE_DICT saving).

What the command line overrides in the shipped file, and why (both settings are right on GPUs):
* ``--fsdp_sync_module_states false``: accelerate refuses it without a GPU ("FSDP parameter initialization
  with `sync_module_states=True` is not supported on cpu."); every rank loads the same checkpoint anyway.
* ``--mixed_precision no``: fp32 on both sides, so the comparison is exact up to summation order (bf16
  moves the losses by up to 1.4e-4 relative on this model).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FSDP_YAML = ROOT / "focusvlm" / "train" / "configs" / "accelerate_fsdp.yaml"
# Same samples per optimizer step and the same loss normalisation (all supervised tokens of the global
# batch) in both runs, so only the floating-point summation order differs (reduce-scatter across 2 ranks
# vs accumulation in 1, batch 1 vs padded batch 2). Measured: <= 3e-7 relative on losses and gradient
# norms. 1e-5 leaves room for that noise, yet catches what went wrong on the way here: bf16 left on moved
# the losses by 2e-5 to 1.4e-4 relative, gradient norms taken over one rank's shard only were 27 % low.
REL_TOL = 1e-5
STEPS = 4
TIMEOUT_S = 240
DS_TIMEOUT_S = 480  # DeepSpeed's first CPU run compiles an op (see the ZeRO-2 test)


def force_fsdp_on_cpu() -> None:
    """Make accelerate + torch run FSDP on a CPU (gloo) process group; each patch is a CPU-only gap."""
    import dataclasses

    import accelerate.state as state
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    # accelerate's device for a MULTI_CPU rank is "cpu:0", which FSDP compares with its compute device "cpu"
    # ("Inconsistent compute device and `device_id` on rank 0: cpu vs cpu:0")
    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"

    init = state.AcceleratorState.__init__

    def accelerator_state_init(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        # accelerate builds the FSDP plugin from the launch config but only applies it to GPU-like groups;
        # do what it does for those (state.py): set the type on both shared states, pass on mixed precision
        if (self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None
                and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"):
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    state.AcceleratorState.__init__ = accelerator_state_init

    set_state_dict_type = FSDP.set_state_dict_type

    def no_cpu_offload(module, state_dict_type, state_dict_config=None, optim_state_dict_config=None):
        # accelerate saves full state dicts with offload_to_cpu=True, rank0_only=True; on CPU parameters
        # torch 2.13's FSDP1 then hands rank 0 views of freed storage and state_dict() segfaults. Without
        # the offload every rank gathers the full (tiny) model, and only rank 0 writes it
        def plain(config):
            if config is None:
                return None
            fields = {"offload_to_cpu": False}
            if hasattr(config, "rank0_only"):
                fields["rank0_only"] = False
            return dataclasses.replace(config, **fields)

        return set_state_dict_type(module, state_dict_type, plain(state_dict_config), plain(optim_state_dict_config))

    FSDP.set_state_dict_type = staticmethod(no_cpu_offload)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cmd: list[str], cwd: Path, timeout: int = TIMEOUT_S) -> subprocess.CompletedProcess:
    # one thread per rank (2 ranks share the cores); no GPU even where there is one, since the CPU / gloo
    # path is what this test is about (DS_ACCELERATOR: DeepSpeed's own device choice)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def _run(cmd: list[str], cwd: Path, timeout: int = TIMEOUT_S) -> float:
    """Seconds the command took; it must succeed."""
    started = time.perf_counter()
    proc = _launch(cmd, cwd, timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return time.perf_counter() - started


def _metrics(folder: Path) -> list[dict]:
    from focusvlm.train.callbacks import read_metrics

    return read_metrics(folder / "metrics.jsonl")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Tiny LLaVA, data, and the 1-process run (per-device batch 2, accumulation 2) both launches match."""
    import tiny

    root = tmp_path_factory.mktemp("dist")
    model = tiny.save_tiny(root / "base")
    # every 3rd sample is text-only: those steps run the vision keep-alive inside the wrapped forward
    data = tiny.dataset(root, n=24, text_every=3)
    # VMTC on: its class-swapped CLIP layers must still be wrapped and sharded like the stock ones
    (root / "focus.yaml").write_text("vmtc: {target: 0.5, stages: 2}\n")
    common = ["train", "--stage", "finetune", "--model", str(model), "--data", str(data), "--image-folder",
              str(root / "images"), "--config", str(root / "focus.yaml"), "--global-batch-size", "4",
              "--max-steps", str(STEPS), "--lr", "2e-3", "--warmup-ratio", "0", "--no-gradient-checkpointing",
              "--no-progress", "--save-steps", "1000"]
    seconds = _run([sys.executable, "-m", "focusvlm", *common, "--per-device-batch-size", "2",
                    "--output-dir", str(root / "one")], root)
    return root, common, seconds


def _check_matches(root: Path, name: str, seconds: float, one_seconds: float, engine_files: list[str]) -> None:
    # the same numbers would come from plain DDP; the last checkpoint (the Trainer saves one at the final
    # step) shows the engine that really ran
    checkpoint = root / name / f"checkpoint-{STEPS}"
    missing = [f for f in engine_files if not (checkpoint / f).is_file()]
    assert not missing, (missing, sorted(p.name for p in checkpoint.iterdir()))
    one, two = _metrics(root / "one"), _metrics(root / name)
    print(f"\n1 process ({one_seconds:.0f} s) vs {name}, 2 processes ({seconds:.0f} s)")
    for a, b in zip(one, two):
        print(f"step {a['step']}: loss {a['loss']:.7f} vs {b['loss']:.7f}, "
              f"grad norm {a['grad_norm']:.7f} vs {b['grad_norm']:.7f}")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=REL_TOL)
    # a norm over one rank's shard instead of the whole model would still pass the loss check on step 1
    assert [r["grad_norm"] for r in two] == pytest.approx([r["grad_norm"] for r in one], rel=REL_TOL)

    recipe = (root / name / "recipe.yaml").read_text()
    assert "world_size: 2" in recipe and "gradient_accumulation_steps: 2" in recipe

    # the shards were gathered into one stock checkpoint holding every weight of the 1-process one
    # (measured: <= 4e-6 apart; one optimizer step moves a weight by ~lr = 2e-3)
    from safetensors.torch import load_file

    ref, got = load_file(root / "one" / "model.safetensors"), load_file(root / name / "model.safetensors")
    assert sorted(got) == sorted(ref)
    for key, tensor in ref.items():
        assert (got[key] - tensor).abs().max().item() <= 1e-4, key


@pytest.mark.slow
def test_fsdp_two_cpu_processes_match_one(reference):
    root, common, one_seconds = reference
    seconds = _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_YAML),
                    "--num_processes", "2", "--main_process_port", str(_free_port()),
                    "--fsdp_sync_module_states", "false", "--mixed_precision", "no",
                    str(Path(__file__).resolve()), *common, "--per-device-batch-size", "1",
                    "--output-dir", str(root / "fsdp")], root)
    # written only by accelerate's FSDP saving (DDP writes optimizer.pt, no model file)
    _check_matches(root, "fsdp", seconds, one_seconds, ["pytorch_model_fsdp.bin", "optimizer.bin"])


def _launch_fsdp(root: Path, common: list[str], name: str, *flags: str) -> subprocess.CompletedProcess:
    return _launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_YAML),
                 "--num_processes", "2", "--main_process_port", str(_free_port()),
                 "--fsdp_sync_module_states", "false", "--mixed_precision", "no", *flags,
                 str(Path(__file__).resolve()), *common, "--per-device-batch-size", "1",
                 "--output-dir", str(root / name)], root)


@pytest.mark.slow
def test_lora_with_text_distillation_under_fsdp2_matches_one(reference):
    """LoRA + the distillation term under FSDP2 (activation checkpointing off, as LoRA under FSDP needs): the
    same losses and gradient norms as 1 process, and a saved adapter holding every LoRA weight of the
    1-process one (the merge is left to `--merge-lora`, the weights being sharded)."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    root, common, _ = reference
    recipe = root / "lora.yaml"
    recipe.write_text("lora_dropout: 0.0\n")  # dropout draws differ between 1 and 2 processes
    lora = [*common, "--lora", "--text-distill", "1", "--recipe", str(recipe)]
    _run([sys.executable, "-m", "focusvlm", *lora, "--per-device-batch-size", "2", "--output-dir",
          str(root / "one-lora")], root)
    proc = _launch_fsdp(root, lora, "fsdp2-lora", "--fsdp_version", "2", "--fsdp_activation_checkpointing", "false")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "LoRA under FSDP: merge the adapter with `focusvlm train --merge-lora`" in proc.stderr
    one, two = _metrics(root / "one-lora"), _metrics(root / "fsdp2-lora")
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=REL_TOL)
    assert [r["grad_norm"] for r in two] == pytest.approx([r["grad_norm"] for r in one], rel=REL_TOL)
    ref = load_file(root / "one-lora" / "adapter" / "adapter_model.safetensors")
    got = load_file(root / "fsdp2-lora" / "adapter" / "adapter_model.safetensors")
    assert sum("lora_A" in k for k in ref) > 0 and sorted(got) == sorted(ref)
    for key, tensor in ref.items():
        assert (got[key] - tensor).abs().max().item() <= 1e-4, key


@pytest.mark.slow
@pytest.mark.parametrize("flags", [(), ("--fsdp_version", "2", "--fsdp_activation_checkpointing", "true")],
                         ids=["fsdp1", "fsdp2-activation-checkpointing"])
def test_lora_under_a_renaming_fsdp_is_refused_before_training(reference, flags):
    """peft 0.21 picks an adapter's tensors by module name; FSDP1's units and FSDP's activation checkpointing
    rename the modules they wrap, and the adapters these launches saved held the projector and no LoRA weight:
    the run stops before its first step, with one line saying what works."""
    pytest.importorskip("peft")
    root, common, _ = reference
    name = "refused-" + ("-".join(flags) or "fsdp1").replace("--", "")
    proc = _launch_fsdp(root, [*common, "--lora"], name, *flags)
    assert proc.returncode != 0
    assert "focusvlm train: error: LoRA under FSDP needs fsdp_version 2 with fsdp_activation_checkpointing false" \
        in proc.stderr, proc.stderr[-3000:]
    metrics = root / name / "metrics.jsonl"
    assert not metrics.is_file() or not metrics.read_text().strip()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_deepspeed_zero2_two_cpu_processes_match_one(reference):
    """The shipped ZeRO-2 files as documented (copied with --copy-configs, launched from their parent), with
    nothing overridden: DeepSpeed picks its CPU accelerator and gloo by itself. DeepSpeed is not a test
    dependency (pip install 'focusvlm[deepspeed]'); its first CPU run JIT-compiles the shared-memory
    communication op (~2 min, then cached in ~/.cache/torch_extensions)."""
    root, common, one_seconds = reference
    from focusvlm.train.runner import CONFIG_DIR

    shutil.copytree(CONFIG_DIR, root / "configs", dirs_exist_ok=True)  # what `focusvlm train --copy-configs` does
    seconds = _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(root / "configs" / "accelerate_zero2.yaml"), "--num_processes", "2",
                    "--main_process_port", str(_free_port()), "-m", "focusvlm", *common,
                    "--per-device-batch-size", "1", "--output-dir", str(root / "zero2")], root,
                   timeout=DS_TIMEOUT_S)
    # one optimizer partition per rank: ZeRO sharded the optimizer state over the 2 processes
    _check_matches(root, "zero2", seconds, one_seconds,
                   [f"global_step{STEPS}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)])


if __name__ == "__main__":
    force_fsdp_on_cpu()
    from focusvlm.cli import main

    sys.exit(main())
