"""torch.compile(fullgraph=True) of the pure-torch path: training forward and backward, and decoding.

The checks trace with backends that stop at the graph ("eager" for the forward, "aot_eager" when the
backward graph matters): a graph break fails `fullgraph=True` whatever the backend, and inductor's
C++ compilation would cost minutes per test on 2 cores. The benchmark (eval_harness/bench_speed.py
--compile) measures inductor itself.
"""

import pytest
import torch
from conftest import tiny_config
from transformers import CompileConfig

from hybrid_mamba.modeling import HybridMambaForCausalLM
from hybrid_mamba.modeling.modeling_hybrid_mamba import CausalConv1d, _crossing_mask, _crossing_taps


def _grads(model, params, **kwargs):
    for p in params:
        p.grad = None
    loss = model(**kwargs).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


def _inputs(vocab, b=2, t=21):
    ids = torch.randint(0, vocab, (b, t))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    positions = torch.cat([torch.arange(9), torch.arange(t - 9)]).expand(b, -1)  # two packed documents
    return [
        dict(input_ids=ids, labels=ids),
        dict(input_ids=ids, labels=ids, attention_mask=mask),
        dict(input_ids=ids, labels=ids, position_ids=positions),
        dict(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids)),  # all ones: no branch on it
    ]


def test_training_step_compiles_fullgraph_and_matches_eager():
    """The hybrid layout holds every mixer (Mamba-2, attention, Mamba-1); four inputs: plain, left padding,
    packed documents, and an all-ones mask (dropped eagerly, kept when compiled: same result)."""
    torch._dynamo.reset()
    model = HybridMambaForCausalLM(tiny_config("hybrid"))
    params = [p for p in model.parameters() if p.requires_grad]
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for kwargs in _inputs(model.config.vocab_size):
        loss, grads = _grads(model, params, **kwargs)
        c_loss, c_grads = _grads(compiled, params, **kwargs)
        torch.testing.assert_close(c_loss, loss, atol=1e-5, rtol=1e-5)
        for g, cg in zip(grads, c_grads, strict=True):
            torch.testing.assert_close(cg, g, atol=1e-5, rtol=1e-4)


def test_model_declares_fullgraph_compile():
    assert HybridMambaForCausalLM._can_compile_fullgraph


@pytest.mark.parametrize("layout", ["hybrid", "mamba2", "attention"])
def test_compiled_static_cache_generation_equals_eager(layout):
    """generate() compiles the decode step itself with a static cache (on CPU when asked to)."""
    torch._dynamo.reset()
    model = HybridMambaForCausalLM(tiny_config(layout)).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 11))
    ref = model.generate(ids, max_new_tokens=8, do_sample=False)
    static = model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static")
    torch.testing.assert_close(static, ref, atol=0, rtol=0)
    config = CompileConfig(fullgraph=True, backend="eager")
    config._compile_all_devices = True  # generate() compiles on accelerators only unless told
    compiled = model.generate(
        ids, max_new_tokens=8, do_sample=False, cache_implementation="static", compile_config=config
    )
    torch.testing.assert_close(compiled, ref, atol=0, rtol=0)


def test_dense_crossing_mask_matches_sparse_taps():
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3], [0, 1, 1, 1, 1, 1, 1, 2, 2, 2]])
    k, t = 4, seq_idx.shape[1]
    dense = _crossing_mask(seq_idx, k, t, torch.float32)
    rows, cols, taps, crossing = _crossing_taps(seq_idx, k, t)
    sparse = torch.zeros_like(dense)
    for r, c, tp, cr in zip(rows, cols, taps, crossing, strict=True):
        assert tp.tolist() == list(range(int(c), int(c) + k))  # padded positions of the K taps
        for j in range(k - 1):
            sparse[r, j, c] = float(cr[j])
    torch.testing.assert_close(dense, sparse)


def test_conv_compiled_path_matches_eager_with_segments():
    torch._dynamo.reset()
    x = torch.randn(2, 6, 17, requires_grad=True)
    w = torch.randn(6, 4, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    seq_idx = torch.tensor([[0] * 5 + [1] * 7 + [2] * 5, [0] * 2 + [1] * 15])

    def run(fn):
        out = fn(x, w, bias, None, seq_idx, True)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), (x, w, bias))
        return out.detach(), grads

    eager = run(CausalConv1d.apply)
    compiled = run(torch.compile(CausalConv1d.apply, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-6, rtol=1e-5)
    for a, b in zip(compiled[1], eager[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
