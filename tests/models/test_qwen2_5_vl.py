"""Qwen2.5-VL: CMAI and VMTC guarantees on a tiny random model (shared tests in qwen_guarantees.py)."""

import pytest

from qwen_guarantees import *  # noqa: F401,F403  (the shared guarantee tests run against this family)


@pytest.fixture(scope="module")
def preset():
    return "qwen2.5-vl-tiny"


def test_vmtc_video_positions_follow_seconds_per_grid(model, monkeypatch):
    """Qwen2.5 spaces a video's frames by tokens_per_second x second_per_grid_ts; compressed frames keep that."""
    import torch

    from focusvlm import VMTCConfig
    from qwen_builders import make_inputs
    from qwen_guarantees import VIDEO_LAYOUTS, check_positions_against_reference, vmtc_counts

    batch = make_inputs(model, VIDEO_LAYOUTS, seed=15, tokens_per_frame=vmtc_counts(model, VMTCConfig(target=0.5)))
    inputs = dict(batch.inputs, second_per_grid_ts=torch.tensor([0.5, 1.5]))
    check_positions_against_reference(model, inputs, monkeypatch, video_seconds=[0.5, 1.5])
