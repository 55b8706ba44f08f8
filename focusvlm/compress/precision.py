"""The float precision the peers' selection arithmetic runs in (shared by their pure functions)."""

from __future__ import annotations

import torch


def work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when an input already is: half-precision inputs are not rounded again inside, and
    float64 inputs stay exact (the parity tests rely on it)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype
