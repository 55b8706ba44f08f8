"""CMAI and VMTC make the host wait for the device no more often than stock does, per step or per layer.

On a GPU every device-to-host read (``.item()``, ``if tensor:``, ``nonzero``, boolean-mask indexing ...)
stalls the host until the queued kernels finish, so the next kernels cannot be queued behind them.
The H100 run (benchmarks/RESULTS.md) found both methods' overheads to be fixed per-launch costs with no
such stalls; these tests keep it that way. They count the operations that read device data back to the
host while ``generate`` runs on CPU, where the same operators are dispatched.
"""


import pytest
import torch

from focusvlm.bench.arms import parse_arm
from focusvlm.bench.opcount import HostReadCounter
from focusvlm.bench.setup import arm_applied, bench_inputs, fit_arm, make_input_ids, probe_vision
from focusvlm.models import adapter_for, adapter_for_preset



@pytest.fixture(scope="module")
def tiny():
    model = adapter_for_preset("tiny").random_model("tiny", seed=0, attn_implementation="sdpa").eval()
    model.generation_config.pad_token_id = 0
    vision, text_ids = bench_inputs(model, 2, 12, torch.Generator().manual_seed(0), "cpu", torch.float32)
    return model, vision, text_ids


def host_reads(tiny, method: str, new_tokens: int) -> int:
    model, vision, text_ids = tiny
    m = fit_arm(model, parse_arm(method))
    ids = make_input_ids(text_ids, probe_vision(model, m, vision)["visual_tokens"], model.config.image_token_id)
    extra = adapter_for(model).prompt_inputs(model, ids)
    counter = HostReadCounter()
    with arm_applied(model, m), torch.inference_mode(), counter:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **vision, **extra,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return sum(counter.counts.values())


@pytest.mark.parametrize("inference", [False, True])
def test_counter_counts_each_read_once(inference):
    counter = HostReadCounter()
    with torch.inference_mode(inference), counter:
        x = torch.arange(4)
        bool(x.sum() > 0)
        x[x > 1]
        float(x.sum())
        x.max().item()
        x.nonzero()
        x + 1  # no read
    assert dict(counter.counts) == {"__bool__": 1, "index": 1, "__float__": 1, "item": 1, "nonzero": 1}
    assert float(torch.ones(())) == 1.0 and counter.counts["__float__"] == 1  # wrappers removed on exit


@pytest.mark.parametrize("method", ["vmtc", "cmai", "vmtc+cmai"])
def test_method_adds_no_per_step_host_reads(tiny, method):
    added = {n: host_reads(tiny, method, n) - host_reads(tiny, "stock", n) for n in (2, 6)}
    assert added[2] == added[6], f"{method} reads device data back in every decode step: {added}"


def test_vmtc_adds_no_host_reads(tiny):
    assert host_reads(tiny, "vmtc", 2) == host_reads(tiny, "stock", 2)
