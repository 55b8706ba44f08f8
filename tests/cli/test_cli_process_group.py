"""A rank started by `accelerate launch` leaves its process group when its command succeeds (and only then).

Left to interpreter exit, gloo's worker threads made a rank of the 2-process DeepSpeed ZeRO-2 CPU run abort
with SIGABRT after its model was saved (CI, test_deepspeed_zero2_two_cpu_processes_match_one), failing the
launch. One process with a one-rank gloo group stands in for a launched rank."""

import pytest
import torch.distributed as dist

from focusvlm.cli import main


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_command_that_succeeds_leaves_the_process_group(one_rank_group, tmp_path, capsys):
    assert main(["train", "--copy-configs", str(tmp_path / "configs")]) == 0
    assert not dist.is_initialized()


def test_a_command_that_fails_keeps_the_process_group_for_its_launcher(one_rank_group, capsys):
    # a failed rank must not wait in a teardown for ranks that may still be inside a collective
    assert main(["train", "--stage", "finetune"]) == 2
    assert "training needs" in capsys.readouterr().err
    assert dist.is_initialized()
