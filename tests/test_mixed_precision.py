"""bf16 autocast (accelerate's `mixed_precision: bf16`): the projections run in bf16, the SSM arithmetic in fp32.

Under autocast, matmuls, einsums and vecdots run in bf16 even on fp32 inputs. The conv, the scans (both
`mamba_ops`) and the decode steps turn autocast off, so each computes under autocast exactly what it
computes without it from the same inputs; A_log, D and dt_bias stay fp32 and get fp32 gradients. Run on
the CPU and, where there is one, on a CUDA GPU.
"""

import copy
import dataclasses

import pytest
import torch
from conftest import tiny_config

from hybrid_mamba.modeling import HybridMambaForCausalLM

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SSM_OPS = ("causal_conv1d", "ssd_scan", "selective_scan")


def _mixers(model):
    return [m for m in model.modules() if hasattr(m, "ops") and hasattr(m, "A_log")]


def _copy(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)


def _checked(name, fn, device, calls):
    """`fn` that also reruns each call with autocast off (on copies of its arguments: a cache is updated
    in place) and records both results."""

    def call(*args, **kwargs):
        args_, kwargs_ = [_copy(a) for a in args], {k: _copy(v) for k, v in kwargs.items()}
        out = fn(*args, **kwargs)
        with torch.no_grad(), torch.autocast(device, enabled=False):
            plain = fn(*args_, **kwargs_)
        calls.append((name, torch.is_autocast_enabled(device), out, plain))
        return out

    return call


def _assert_same(calls, names):
    assert {c[0] for c in calls} == set(names), [c[0] for c in calls]
    assert all(autocast for _, autocast, _, _ in calls)  # each ran under autocast
    for name, _, out, plain in calls:
        out, plain = (out, plain) if isinstance(out, tuple) else ((out,), (plain,))
        for a, b in zip(out, plain, strict=True):
            assert a.dtype == torch.float32, name
            torch.testing.assert_close(a.detach(), b, atol=0, rtol=0, msg=f"{name} differs under autocast")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mamba_ops", ["fast", "reference"])
def test_scans_and_conv_compute_in_fp32_under_bf16_autocast(device, mamba_ops):
    model = HybridMambaForCausalLM(tiny_config("hybrid", use_mamba_kernels=False, mamba_ops=mamba_ops)).to(device)
    ids = torch.randint(3, model.config.vocab_size, (2, 40), device=device)
    calls = []
    for m in _mixers(model):
        m.ops = dataclasses.replace(m.ops, **{op: _checked(op, getattr(m.ops, op), device, calls) for op in SSM_OPS})
    with torch.autocast(device, dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 or device == "cpu"  # the projections did autocast
    _assert_same(calls, SSM_OPS)
    out.loss.backward()
    for name, p in model.named_parameters():
        if name.endswith(("A_log", ".D", "dt_bias")):
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        fp32_loss = model(input_ids=ids, labels=ids).loss
    assert abs(float(out.loss.detach()) - float(fp32_loss)) < 0.02


@pytest.mark.parametrize("device", DEVICES)
def test_decode_steps_compute_in_fp32_under_bf16_autocast(device):
    model = HybridMambaForCausalLM(tiny_config("hybrid", use_mamba_kernels=False)).to(device).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 12), device=device)
    calls = []
    for m in _mixers(model):
        m._step = _checked(type(m).__name__, m._step, device, calls)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        model.generate(ids, max_new_tokens=4, do_sample=False)
    _assert_same(calls, ["HybridMamba2Mixer", "HybridMamba1Mixer"])
    assert len(calls) == 3 * 3  # 3 Mamba layers x 3 decode steps
