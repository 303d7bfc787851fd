"""The chunked pure-torch scans against token-by-token recurrences (the definitions), and the fast
operators the model runs (hand-written backwards) against those references, which `MAMBA_OPS` pairs
under the same contracts."""

import pytest
import torch
import torch.nn.functional as F

from hybrid_mamba.modeling.modeling_hybrid_mamba import (
    MAMBA_OPS,
    RMSNormFunction,
    SelectiveScan,
    SSDChunkScan,
    causal_conv1d,
    causal_conv1d_ref,
    rms_norm,
    rms_norm_ref,
    segment_ids,
    selective_scan,
    selective_scan_ref,
    ssd_scan,
    ssd_scan_ref,
)


def _resets(seq_idx, i):
    return (seq_idx[:, i] != seq_idx[:, i - 1]) if (seq_idx is not None and i > 0) else None


def ssd_recurrent(x, dt, A, B, C, D, h0, seq_idx):
    b, t, h, p = x.shape
    hg = h // B.shape[2]
    Bh, Ch = B.repeat_interleave(hg, 2), C.repeat_interleave(hg, 2)
    state = h0.clone()
    ys = []
    for i in range(t):
        if (r := _resets(seq_idx, i)) is not None:
            state = state * (~r).float()[:, None, None, None]
        state = (
            state * torch.exp(dt[:, i] * A)[..., None, None]
            + (dt[:, i, :, None] * x[:, i])[..., None] * Bh[:, i, :, None]
        )
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, i]) + D[:, None] * x[:, i])
    return torch.stack(ys, 1), state


def selective_recurrent(u, delta, A, B, C, D, h0, seq_idx):
    state = h0.clone()
    ys = []
    for i in range(u.shape[1]):
        if (r := _resets(seq_idx, i)) is not None:
            state = state * (~r).float()[:, None, None]
        state = state * torch.exp(delta[:, i, :, None] * A) + (delta[:, i] * u[:, i])[..., None] * B[:, i, None]
        ys.append(torch.einsum("ben,bn->be", state, C[:, i]) + D * u[:, i])
    return torch.stack(ys, 1), state


def _segments(b, t):
    seq = torch.zeros(b, t, dtype=torch.long)
    seq[0, 9:] = 1
    seq[0, 20:] = 2
    seq[1, 3:] = 1
    return seq


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("t, chunk", [(29, 8), (16, 16), (5, 8)])
def test_ssd_chunked_scan_matches_recurrence(packed, t, chunk):
    b, h, p, g, n = 2, 4, 3, 2, 5
    x = torch.randn(b, t, h, p, dtype=torch.float64)
    dt = F.softplus(torch.randn(b, t, h, dtype=torch.float64))
    A = -torch.rand(h, dtype=torch.float64) * 2
    B, C = torch.randn(b, t, g, n, dtype=torch.float64), torch.randn(b, t, g, n, dtype=torch.float64)
    D, h0 = torch.randn(h, dtype=torch.float64), torch.randn(b, h, p, n, dtype=torch.float64)
    seq = _segments(b, t) if packed else None
    y, final = ssd_scan_ref(x, dt, A, B, C, chunk, D=D, initial_state=h0, seq_idx=seq)
    y_ref, final_ref = ssd_recurrent(x, dt, A, B, C, D, h0, seq)
    torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final.double(), final_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scan", [selective_scan_ref, selective_scan])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("t, chunk", [(29, 8), (7, 64)])
def test_selective_scan_matches_recurrence(scan, packed, t, chunk):
    b, e, n = 2, 6, 4
    u, delta = torch.randn(b, t, e), F.softplus(torch.randn(b, t, e))
    A = -torch.rand(e, n) * 3
    B, C, D = torch.randn(b, t, n), torch.randn(b, t, n), torch.randn(e)
    h0 = torch.randn(b, e, n)
    seq = _segments(b, t) if packed else None
    y, final = scan(u, delta, A, B, C, D=D, initial_state=h0, seq_idx=seq, chunk_size=chunk)
    y_ref, final_ref = selective_recurrent(u, delta, A, B, C, D, h0, seq)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final, final_ref, atol=1e-4, rtol=1e-4)


def test_masked_conv_equals_segments_run_alone():
    e, k = 3, 4
    w, bias = torch.randn(e, k), torch.randn(e)
    x = torch.randn(1, e, 12)
    seq = torch.tensor([[0] * 5 + [1] * 7])
    out = causal_conv1d_ref(x, w, bias, seq_idx=seq)
    torch.testing.assert_close(out[..., :5], causal_conv1d_ref(x[..., :5], w, bias))
    torch.testing.assert_close(out[..., 5:], causal_conv1d_ref(x[..., 5:], w, bias))
    # with earlier inputs (the conv cache) as prefix
    prefix = torch.randn(1, e, k)
    whole = causal_conv1d_ref(torch.cat([prefix, x], -1), w, bias)[..., k:]
    torch.testing.assert_close(causal_conv1d_ref(x, w, bias, prefix=prefix), whole)


def test_segment_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [5, 6, 7, 8, 9, 10]])
    assert segment_ids(pos, None).tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0]]
    assert segment_ids(torch.arange(6)[None].expand(2, -1), None) is None
    pad = torch.tensor([[False, False, True, True, True, True]])
    assert segment_ids(torch.arange(6)[None], pad).tolist() == [[0, 0, 1, 1, 1, 1]]


def _ssd_inputs(b, t, h, p, g, n, dtype, packed, initial):
    x = torch.randn(b, t, h, p, dtype=dtype)
    dt = torch.rand(b, t, h, dtype=dtype) * 0.5 + 0.01
    A = -torch.rand(h, dtype=dtype) * 2 - 0.1
    B, C = torch.randn(b, t, g, n, dtype=dtype), torch.randn(b, t, g, n, dtype=dtype)
    D = torch.randn(h, dtype=dtype)
    h0 = torch.randn(b, h, p, n, dtype=dtype) if initial else None
    return [v.requires_grad_() if v is not None else None for v in (x, dt, A, B, C, D, h0)], _segments(
        b, t
    ) if packed else None


@pytest.mark.parametrize("packed, initial", [(False, False), (True, True), (True, False)])
@pytest.mark.parametrize("t, chunk, g", [(29, 8, 1), (29, 8, 2), (16, 16, 1), (5, 8, 2)])
def test_fast_ssd_scan_matches_reference_with_gradients(packed, initial, t, chunk, g):
    (x, dt, A, B, C, D, h0), seq = _ssd_inputs(2, t, 4, 3, g, 5, torch.float32, packed, initial)
    y_ref, f_ref = ssd_scan_ref(x, dt, A, B, C, chunk, D=D, initial_state=h0, seq_idx=seq)
    y, f = ssd_scan(x, dt, A, B, C, chunk, D=D, initial_state=h0, seq_idx=seq)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f, f_ref, atol=1e-5, rtol=1e-5)
    inputs = [v for v in (x, dt, A, B, C, D, h0) if v is not None]
    gy, gf = torch.randn_like(y), torch.randn_like(f)
    want = torch.autograd.grad((y_ref * gy).sum() + (f_ref * gf).sum(), inputs)
    got = torch.autograd.grad((y * gy).sum() + (f * gf).sum(), inputs)
    for w, o in zip(want, got):
        torch.testing.assert_close(o, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("packed", [False, True])
def test_fast_ssd_scan_backward_is_the_derivative(packed):
    (x, dt, A, B, C, D, h0), seq = _ssd_inputs(2, 13, 4, 3, 2, 5, torch.float64, packed, True)
    assert torch.autograd.gradcheck(lambda *v: SSDChunkScan.apply(*v, seq, 4), (x, dt, A, B, C, D, h0))


@pytest.mark.parametrize(
    "prefix, packed, silu",
    [(False, False, False), (True, False, False), (False, True, False), (True, True, False), (True, True, True)],
)
def test_fast_conv_matches_reference_with_gradients(prefix, packed, silu):
    b, e, k, t = 2, 5, 4, 29
    x = torch.randn(b, e, t, dtype=torch.float64, requires_grad=True)
    w = torch.randn(e, k, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(e, dtype=torch.float64, requires_grad=True)
    pre = torch.randn(b, e, k, dtype=torch.float64) if prefix else None
    seq = _segments(b, t) if packed else None
    out = causal_conv1d(x, w, bias, prefix=pre, seq_idx=seq, silu=silu)
    ref = causal_conv1d_ref(x, w, bias, prefix=pre, seq_idx=seq, silu=silu)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for o, r in zip(
        torch.autograd.grad((out * g).sum(), (x, w, bias)), torch.autograd.grad((ref * g).sum(), (x, w, bias))
    ):
        torch.testing.assert_close(o, r)
    assert torch.autograd.gradcheck(lambda *v: causal_conv1d(*v, prefix=pre, seq_idx=seq, silu=silu), (x, w, bias))


@pytest.mark.parametrize("gated, group_size", [(False, None), (True, 4), (True, None)])
def test_fast_rms_norm_matches_reference_with_gradients(gated, group_size):
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, dtype=torch.float64, requires_grad=True)
    gate = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True) if gated else None
    inputs = [v for v in (x, w, gate) if v is not None]
    out, ref = rms_norm(x, w, gate, 1e-5, group_size), rms_norm_ref(x, w, gate, 1e-5, group_size)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for o, r in zip(torch.autograd.grad((out * g).sum(), inputs), torch.autograd.grad((ref * g).sum(), inputs)):
        torch.testing.assert_close(o, r)
    with torch.no_grad():  # without a gradient the fast operator is the reference itself
        assert torch.equal(rms_norm(x, w, gate, 1e-5, group_size), ref)
    gs = group_size or 12
    assert torch.autograd.gradcheck(
        lambda x, w, *gate: RMSNormFunction.apply(x, w, *(gate or [None]), 1e-5, gs), inputs
    )


def test_operator_sets_keep_one_contract():
    fast, ref = MAMBA_OPS["fast"], MAMBA_OPS["reference"]
    assert (fast.causal_conv1d, fast.ssd_scan, fast.rms_norm) == (causal_conv1d, ssd_scan, rms_norm)
    assert (ref.causal_conv1d, ref.ssd_scan, ref.rms_norm) == (causal_conv1d_ref, ssd_scan_ref, rms_norm_ref)
    assert (fast.selective_scan, ref.selective_scan) == (selective_scan, selective_scan_ref)


@pytest.mark.parametrize(
    "initial, packed, with_d, t, chunk",
    [(False, False, True, 29, 8), (True, True, True, 29, 8), (True, False, False, 7, 64), (False, True, True, 16, 8)],
)
def test_fast_selective_scan_matches_reference_with_gradients(initial, packed, with_d, t, chunk):
    b, e, n = 2, 5, 3

    def leaf(*shape, fn=lambda v: v):
        return fn(torch.randn(*shape, dtype=torch.float64)).requires_grad_()

    u, delta = leaf(b, t, e), leaf(b, t, e, fn=F.softplus)
    A = leaf(e, n, fn=lambda v: -v.abs() * 3)
    B, C = leaf(b, t, n), leaf(b, t, n)
    D = leaf(e) if with_d else None
    h0 = leaf(b, e, n) if initial else None
    seq = _segments(b, t) if packed else None
    inputs = [v for v in (u, delta, A, B, C, D, h0) if v is not None]
    kw = dict(seq_idx=seq, chunk_size=chunk)
    (y, final), (y_ref, final_ref) = (
        fn(u, delta, A, B, C, D=D, initial_state=h0, **kw) for fn in (selective_scan, selective_scan_ref)
    )
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(final, final_ref)
    gy, gf = torch.randn_like(y), torch.randn_like(final)
    for o, r in zip(
        torch.autograd.grad((y * gy).sum() + (final * gf).sum(), inputs),
        torch.autograd.grad((y_ref * gy).sum() + (final_ref * gf).sum(), inputs),
    ):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)  # both compute in float32
    # the Function itself computes in the inputs' dtype: float64 for gradcheck
    start = None if seq is None else F.pad(seq[:, 1:] != seq[:, :-1], (1, 0), value=False)

    def fn(u, delta, A, B, C, *rest):
        rest = list(rest)
        d = rest.pop(0) if with_d else None
        init = rest.pop(0) if initial else None
        return SelectiveScan.apply(u, delta, A, B, C, d, init, start, chunk)

    assert torch.autograd.gradcheck(fn, inputs)
