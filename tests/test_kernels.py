"""CUDA kernels (mamba-ssm, causal-conv1d) against the pure-torch reference. Skipped without a GPU."""

import pytest
import torch
from conftest import tiny_config

from hybrid_mamba.modeling import HybridMambaForCausalLM
from hybrid_mamba.modeling import modeling_hybrid_mamba as mhm

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or mhm.mamba_chunk_scan_combined is None or mhm.causal_conv1d_fn is None,
    reason="needs CUDA with mamba-ssm and causal-conv1d installed",
)


def _pair(layout, **kw):
    ref = HybridMambaForCausalLM(tiny_config(layout, use_mamba_kernels=False, mamba_chunk_size=16, **kw)).cuda().eval()
    fast = HybridMambaForCausalLM(tiny_config(layout, use_mamba_kernels=True, mamba_chunk_size=16, **kw)).cuda().eval()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


@pytest.mark.parametrize("layout", ["hybrid", "mamba2", "mamba1"])
def test_kernels_match_reference(layout):
    ref, fast = _pair(layout)
    ids = torch.randint(3, 512, (2, 77), device="cuda")
    pos = torch.cat([torch.arange(30), torch.arange(47)]).cuda()[None].expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, ref(ids).logits, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(
            fast(ids, position_ids=pos).logits, ref(ids, position_ids=pos).logits, atol=1e-3, rtol=1e-3
        )
        a = fast.generate(ids[:, :20], max_new_tokens=10, do_sample=False)
        b = ref.generate(ids[:, :20], max_new_tokens=10, do_sample=False)
        assert a.tolist() == b.tolist()


def test_kernel_gradients_match_reference():
    ref, fast = _pair("hybrid")
    ids = torch.randint(3, 512, (2, 64), device="cuda")
    for m in (ref, fast):
        m.train()
        m(ids, labels=ids).loss.backward()
    for (name, p), q in zip(ref.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-3, rtol=1e-2, msg=name)
