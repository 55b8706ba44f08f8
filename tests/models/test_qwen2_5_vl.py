"""Qwen2.5-VL: CMAI and VMTC guarantees on a tiny random model (shared tests in qwen_guarantees.py)."""

import pytest

from qwen_guarantees import *  # noqa: F401,F403  (the shared guarantee tests run against this family)


@pytest.fixture(scope="module")
def preset():
    return "qwen2.5-vl-tiny"
