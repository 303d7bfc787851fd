"""Hybrid Mamba/attention causal language model.

One self-contained file (torch and transformers; CUDA kernels optional) that is copied as remote code
into every saved model folder. The layer layout comes from ``config.layer_types``.

Notation in shape comments: B batch, T tokens, D hidden size, H heads, P head size, G groups,
N state size, K conv width, C chunks, L chunk length.

Pure-torch mixers always work. The operators come in two sets with the same contracts: the readable
references ``causal_conv1d_ref``, ``ssd_scan_ref``, ``selective_scan_ref`` and ``rms_norm_ref`` (read
them first), and the fast ``causal_conv1d``, ``ssd_scan``, ``selective_scan`` and ``rms_norm``, the same
arithmetic with hand-written backwards that keep only their inputs, tested against the references (values,
gradients, gradcheck). ``config.mamba_ops`` ("fast", the default, or "reference") picks the set
in ``MAMBA_OPS``. On CUDA, mamba-ssm and causal-conv1d kernels replace the fast operators when importable
(``config.use_mamba_kernels``); flash-attn through transformers' ``attn_implementation``. Kernels never read the weight of a projection: ``in_proj``, ``out_proj``,
``x_proj`` and ``dt_proj`` are always called as modules, so PEFT adapters on them take effect.

Padding and packed sequences share one mechanism: tokens get segment ids (a new segment wherever
``position_ids`` do not continue by one, or the attention mask switches), and neither the
convolution nor the scan crosses a segment boundary.
"""

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
from torch import nn
from transformers.utils import logging

# transformers compatibility: the one place that knows how the supported releases differ

# The oldest and the newest transformers releases the test suite ran on (`make test-compat`,
# docs/compat.md). Older releases lack internals used below; newer ones are allowed with a warning.
TRANSFORMERS_FLOOR = "5.21.0"
TRANSFORMERS_TESTED = "5.24.0"
SUPPORTED_TRANSFORMERS = f">={TRANSFORMERS_FLOOR},<6 (tested up to {TRANSFORMERS_TESTED})"

# A fixed name, so that the repository's copy and a model folder's copy of this file warn once together.
_version_logger = logging.get_logger("hybrid_mamba")


def _check_transformers_version(version: str) -> None:
    v = Version(version)
    if v.release < Version(TRANSFORMERS_FLOOR).release:
        raise ImportError(
            f"hybrid_mamba models need transformers {SUPPORTED_TRANSFORMERS}; found {version}. "
            f"Install a supported release: pip install 'transformers>={TRANSFORMERS_FLOOR},<6'"
        )
    if v.release > Version(TRANSFORMERS_TESTED).release:
        _version_logger.warning_once(
            f"transformers {version} is newer than the newest release hybrid_mamba was tested with "
            f"({TRANSFORMERS_TESTED}). If generation or loading misbehaves, install transformers=={TRANSFORMERS_TESTED}."
        )


_check_transformers_version(transformers.__version__)


def _failing_package(err: ImportError) -> str | None:
    """The installed package whose code raised `err` (the deepest frame under site-packages), if any."""
    tb, path = err.__traceback__, None
    while tb is not None:
        path, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
    parts = Path(path).parts if path else ()
    for marker in ("site-packages", "dist-packages"):
        if marker in parts and parts.index(marker) + 1 < len(parts):
            return parts[parts.index(marker) + 1].removesuffix(".py")
    return None


def _import_failure(err: ImportError) -> str:
    """What to say when importing transformers' internals failed: a moved internal, or a broken package."""
    package = _failing_package(err)
    if (err.name or "").startswith("transformers") or (err.name is None and package in (None, "transformers")):
        # a newer release moved something this file relies on
        return (
            f"hybrid_mamba's model code relies on a transformers internal that transformers "
            f"{transformers.__version__} does not have ({err}). Supported: transformers {SUPPORTED_TRANSFORMERS}; "
            f"pip install 'transformers>={TRANSFORMERS_FLOOR},<={TRANSFORMERS_TESTED}'"
        )
    # transformers imports optional packages (torchao, ...) when they are installed; one built for another
    # torch fails inside transformers' own import
    return (
        f"importing transformers {transformers.__version__} failed inside the installed package {package or err.name!r} "
        f"({err}); it does not work with torch {torch.__version__}. Upgrade torch to a release that package "
        f"supports, or install a release of it built for this torch, or uninstall it (pip uninstall {package or err.name})"
    )


try:  # transformers internals: present in every release of the supported range
    from transformers import initialization as init
    from transformers.activations import ACT2FN
    from transformers.cache_utils import (
        DYNAMIC_LAYER_TYPE_MAPPING,
        STATIC_LAYER_TYPE_MAPPING,
        Cache,
        DynamicCache,
        DynamicLayer,
        LinearAttentionLayer,
        StaticLayer,
    )
    from transformers.generation import GenerationMixin
    from transformers.masking_utils import create_causal_mask
    from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
    from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
    from transformers.utils import can_return_tuple
    from transformers.utils.generic import merge_with_config_defaults
    from transformers.utils.output_capturing import capture_outputs
except ImportError as err:
    raise ImportError(_import_failure(err)) from err

# 5.24 renamed the cache argument and output field `past_key_values` -> `cache`: generate() passes the
# cache to forward and prepare_inputs_for_generation under CACHE_NAME and reads it back from the output
# field of that name, and GradientCheckpointingLayer drops the keyword of that name under checkpointing.
# Our entry points accept both names and return the cache under the installed library's name.
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
_MASK_CACHE_KWARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def _one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The cache given under either name (`cache`, transformers >= 5.24, or `past_key_values`)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the cache once, as `cache=` or as `past_key_values=`, not two different caches.")
    return cache if cache is not None else past_key_values


def _cache_of(outputs) -> Cache | None:
    return getattr(outputs, CACHE_NAME, None)


try:  # in a saved model folder, the configuration module sits beside this file
    from .configuration_hybrid_mamba import HybridMambaConfig
except ImportError:  # in the hybrid-mamba repository
    from hybrid_mamba.configuration.configuration_hybrid_mamba import HybridMambaConfig

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except ImportError:
    selective_scan_fn = selective_state_update = mamba_chunk_scan_combined = None
try:
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
except ImportError:
    causal_conv1d_fn = causal_conv1d_update = None

logger = logging.get_logger(__name__)

# Chunk length of the pure-torch SSD scan on CPU. The result does not depend on it (up to rounding);
# `config.mamba_chunk_size` is the kernels' choice. The scan alone, forward + backward, 2 threads,
# 16 heads of 64, state 128 (python -m hybrid_mamba.eval_harness.bench_scan, docs/results/bench_scan.md): 64 is
# the fastest of 32/64/128/256 at 4x512 and 1x2048 tokens (and forward at 8192); 256 is 1.7-2.1x slower.
CPU_CHUNK_SIZE = 64
# Longest block of tokens a Mamba-2 mixer processes at once on CPU (longer inputs without segments are
# split, the state carried across). One mixer's forward, batch 1, 2 threads, microseconds per token at
# 512 / 2048 / 8192 tokens: whole inputs 34 / 38 / 65 (page faults and cache misses on tensors of tens
# of MB), blocks of 1024 tokens 34 / 36 / 37.
CPU_BLOCK_TOKENS = 1024

# Per-layer cache types for `DynamicCache(config=...)` / `StaticCache`: Mamba layers keep a conv and a
# recurrent state (constant size), attention layers a growing key/value cache.
for _name in ("mamba", "mamba1", "mamba2"):
    DYNAMIC_LAYER_TYPE_MAPPING[_name] = LinearAttentionLayer
    STATIC_LAYER_TYPE_MAPPING[_name] = LinearAttentionLayer


class HybridMambaKVLayer(DynamicLayer):
    """`DynamicLayer` whose keys and values live in buffers with spare room (256 tokens after a
    prefill, then grown by half again whenever full).

    DynamicLayer concatenates every new token onto the whole cache, a copy that grows with the context;
    here a token is written into spare room, so a decode step's cost does not grow with the cache
    (beyond attention reading it). `keys` / `values` are always exactly the cached tokens, views of
    the buffers; whatever replaces them (crop, beam reordering, offloading) is honoured at the next
    update, which then starts new buffers.
    """

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, m = self.get_seq_length(), key_states.shape[-2]
        kb, vb = getattr(self, "_key_buffer", None), getattr(self, "_value_buffer", None)
        reusable = (
            kb is not None
            and n > 0
            and self.keys.data_ptr() == kb.data_ptr()
            and self.values.data_ptr() == vb.data_ptr()
            and self.keys.shape[:-2] == key_states.shape[:-2]
            and kb.shape[-2] >= n + m
            and kb.dtype == key_states.dtype
            and kb.device == key_states.device
        )
        if not reusable:
            # a prefill gets room for 256 more tokens; a cache that outgrows its buffer half again
            capacity = n + m + (256 if n == 0 else max(256, (n + m) // 2))
            kb = key_states.new_empty(*key_states.shape[:-2], capacity, key_states.shape[-1])
            vb = value_states.new_empty(*value_states.shape[:-2], capacity, value_states.shape[-1])
            if n:
                kb[..., :n, :] = self.keys
                vb[..., :n, :] = self.values
            self._key_buffer, self._value_buffer = kb, vb
        kb[..., n : n + m, :] = key_states
        vb[..., n : n + m, :] = value_states
        self.keys, self.values = kb[..., : n + m, :], vb[..., : n + m, :]
        return self.keys, self.values

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


DYNAMIC_LAYER_TYPE_MAPPING["attention"] = HybridMambaKVLayer
STATIC_LAYER_TYPE_MAPPING["attention"] = StaticLayer


# Reference operators (pure torch)
# The definitions, written to be read: each fast operator below keeps one of these contracts and is
# tested against it (tests/test_reference_ops.py); `config.mamba_ops="reference"` runs the model on them.
# Sequences may be packed: `seq_idx` (B, T) gives each token's segment, and no operator lets a
# segment see another.


def segment_ids(position_ids: torch.Tensor | None, pad_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Segment id per token (B, T), non-decreasing along T, or None when every row is one segment.

    A segment starts where `position_ids` do not continue the previous token by one (packed
    documents), or where the padding mask switches. Token 0 always lies in segment 0, the segment
    a cached state belongs to.
    """
    starts = None
    if position_ids is not None and position_ids.shape[-1] > 1:
        starts = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if pad_mask is not None and pad_mask.shape[-1] > 1:
        switch = pad_mask[:, 1:] != pad_mask[:, :-1]
        starts = switch if starts is None else starts | switch
    if starts is None:
        return None
    # Eager: one segment in every row is the common case and keeps the unsegmented paths. Compiled: no
    # data-dependent branch (fullgraph), the all-zero ids give the same result.
    if not torch.compiler.is_compiling() and not bool(starts.any()):
        return None
    starts = torch.cat([torch.zeros_like(starts[:, :1]), starts], dim=1)
    return starts.long().cumsum(-1)


def _padded(x, prefix, k):
    """x (B, E, T) with the K - 1 inputs before it: the prefix's last K - 1 columns, or zeros."""
    if prefix is None:
        return F.pad(x, (k - 1, 0))
    return torch.cat([prefix[..., prefix.shape[-1] - (k - 1) :].to(x.dtype), x], dim=-1)


def _autocast_off(fn):
    """`fn` with autocast off. Under bf16 autocast (mixed-precision training, or inference) the matmuls,
    einsums and vecdots of a scan or of a decode step's state readout would run in bf16; the SSM
    arithmetic stays fp32, in the dtype of the inputs it upcasts (the projections around it still autocast)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for a in args:
            if isinstance(a, torch.Tensor):
                with torch.autocast(a.device.type, enabled=False):
                    return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


def causal_conv1d_ref(x, weight, bias=None, prefix=None, seq_idx=None, silu=False):
    """Depthwise causal convolution. x (B, E, T), weight (E, K), prefix (B, E, >=K-1) earlier inputs.

    Written as K shifted multiply-adds: on CPU the backward of a depthwise `F.conv1d` is slower than
    the whole rest of a Mamba layer, while this one's backward is elementwise.
    With `seq_idx` (B, T), a tap reads an input only from the same segment; prefix tokens belong to
    segment 0. Returns (B, E, T), after SiLU when `silu`.
    """
    k = weight.shape[-1]
    t = x.shape[-1]
    xp = _padded(x, prefix, k)
    seg = F.pad(seq_idx, (k - 1, 0), value=0) if seq_idx is not None else None  # prefix, zero pad: segment 0
    out = x * weight[:, k - 1, None]  # the last tap reads the token itself
    for j in range(k - 1):  # tap j reads token t - (k - 1 - j)
        tap = xp[..., j : j + t] * weight[:, j, None]
        if seg is not None:
            tap = tap * (seg[:, j : j + t] == seq_idx).unsqueeze(1).to(x.dtype)
        out = out + tap
    out = out if bias is None else out + bias[:, None]
    return F.silu(out) if silu else out


@_autocast_off
def ssd_scan_ref(x, dt, A, B, C, chunk_size, D=None, initial_state=None, seq_idx=None):
    """Chunked SSD scan of Mamba-2 (the quadratic-within-chunk, linear-across-chunks form).

    x (B, T, H, P), dt (B, T, H) after softplus and clamp, A (H,) negative, B and C (B, T, G, N),
    D (H,), initial_state (B, H, P, N), seq_idx (B, T) or None.
    Returns y (B, T, H, P) and the final state (B, H, P, N), both float32.
    """
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    hg = h // g
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    chunk_size = min(chunk_size, t)  # a short sequence is one chunk, not one padded to chunk_size
    pad = (-t) % chunk_size
    if pad:  # padded steps have dt = 0 and x = 0: they change neither outputs nor the final state
        x, dt, B, C = (F.pad(v, (0, 0) * (v.dim() - 2) + (0, pad)) for v in (x, dt, B, C))
        if seq_idx is not None:
            seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1)
    c, L = (t + pad) // chunk_size, chunk_size
    x = x.view(b, c, L, h, p)
    B = B.view(b, c, L, g, n)
    C = C.view(b, c, L, g, n)
    dA = (dt * A.float()).view(b, c, L, h).permute(0, 1, 3, 2)  # (B, C, H, L)
    dt = dt.view(b, c, L, h).permute(0, 1, 3, 2)  # (B, C, H, L)
    cs = torch.cumsum(dA, dim=-1)  # (B, C, H, L)

    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    if seq_idx is not None:
        seg = seq_idx.view(b, c, L)
        same = seg[:, :, :, None] == seg[:, :, None, :]  # (B, C, L, L)
        keep = (causal & same).unsqueeze(2)  # (B, C, 1, L, L)
        seg_end = seg[:, :, -1]  # (B, C) segment whose state leaves each chunk
    else:
        keep = causal

    # 1. Within chunks: y_l = sum_{s<=l} C_l.B_s exp(cs_l - cs_s) dt_s x_s
    decay = torch.exp((cs[..., :, None] - cs[..., None, :]).masked_fill(~keep, -torch.inf))  # (B, C, H, L, L)
    CB = torch.matmul(C.permute(0, 1, 3, 2, 4), B.permute(0, 1, 3, 4, 2))  # (B, C, G, L, L)
    M = decay.view(b, c, g, hg, L, L) * CB.unsqueeze(3) * dt.view(b, c, g, hg, 1, L)
    xh = x.permute(0, 1, 3, 2, 4)  # (B, C, H, L, P)
    y = torch.matmul(M.view(b, c, h, L, L), xh)  # (B, C, H, L, P)

    # 2. State each chunk leaves behind: sum_s exp(cs_end - cs_s) dt_s x_s B_s^T
    w = torch.exp(cs[..., -1:] - cs) * dt  # (B, C, H, L)
    if seq_idx is not None:
        w = w * (seg == seg_end[..., None]).unsqueeze(2)
    xw = (xh * w.unsqueeze(-1)).view(b, c, g, hg, L, p).permute(0, 1, 2, 3, 5, 4).reshape(b, c, g, hg * p, L)
    states = torch.matmul(xw, B.permute(0, 1, 3, 2, 4)).view(b, c, h, p, n)  # (B, C, H, P, N)

    # 3. Across chunks: state entering chunk k = sum_{j<k} exp(E_{k-1} - E_j) states_j (+ initial)
    if initial_state is None:
        initial_state = torch.zeros(b, h, p, n, dtype=x.dtype, device=x.device)
    states = torch.cat([initial_state.float().unsqueeze(1), states], dim=1)  # (B, C+1, H, P, N)
    E = F.pad(torch.cumsum(cs[..., -1], dim=1), (0, 0, 1, 0))  # (B, C+1, H): log decay up to each chunk end
    chunk_causal = torch.ones(c + 1, c + 1, dtype=torch.bool, device=x.device).tril()
    gap = E[:, :, None, :] - E[:, None, :, :]  # (B, C+1, C+1, H): from end j to end k
    if seq_idx is not None:
        ends = F.pad(seg_end, (1, 0), value=0)  # the initial state is segment 0
        chunk_keep = chunk_causal & (ends[:, :, None] == ends[:, None, :])
        chunk_keep = chunk_keep.unsqueeze(-1)
    else:
        chunk_keep = chunk_causal[..., None]
    chunk_decay = torch.exp(gap.masked_fill(~chunk_keep, -torch.inf))  # (B, C+1, C+1, H)
    carried = torch.einsum("bkjh,bjhpn->bkhpn", chunk_decay, states)  # (B, C+1, H, P, N)
    entering, final_state = carried[:, :-1], carried[:, -1]

    # 4. Output of the entering state: y_l += exp(cs_l) C_l . state
    Cg = C.permute(0, 1, 3, 2, 4)  # (B, C, G, L, N)
    st = entering.reshape(b, c, g, hg * p, n).transpose(-1, -2)  # (B, C, G, N, HG*P)
    y_off = torch.matmul(Cg, st).view(b, c, g, L, hg, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, L, p)
    out_decay = torch.exp(cs)  # (B, C, H, L)
    if seq_idx is not None:
        out_decay = out_decay * (seg == F.pad(seg_end, (1, 0), value=0)[:, :-1, None]).unsqueeze(2)
    y = y + y_off * out_decay.unsqueeze(-1)

    y = y.permute(0, 1, 3, 2, 4).reshape(b, c * L, h, p)[:, :t]
    if D is not None:
        y = y + x.view(b, c * L, h, p)[:, :t] * D.float()[:, None]
    return y, final_state


def _at_least_fp32(t):
    """fp32 for half types, unchanged for fp32 and fp64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def rms_norm_ref(x, weight, gate=None, eps=1e-6, group_size=None):
    """weight * rmsnorm(x [* silu(gate)]) per group of `group_size` channels (all of them when None),
    statistics in fp32. x and gate (..., E), weight (E,); returns (..., E) in x's dtype.

    The arithmetic of transformers' LlamaRMSNorm, and of mamba-ssm's gated norm with norm_before_gate=False.
    """
    h = _at_least_fp32(x)
    if gate is not None:
        h = h * F.silu(_at_least_fp32(gate))
    grouped = h.view(*h.shape[:-1], -1, group_size or x.shape[-1])
    rstd = torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (grouped * rstd).view(x.shape).to(x.dtype)


# Fast operators: the same contracts, hand-written backwards
# What the model runs by default: the references' arithmetic with hand-written backwards that keep
# only their inputs (recomputing the rest), in layouts that spare copies on CPU.


def _crossing_taps(seq_idx, k, t):
    """Positions whose taps read across a segment boundary: rows, cols (n,), xp positions of all K taps
    (n, K) and which of them cross (n, K). Only the first K - 1 tokens of a segment have any."""
    seg = F.pad(seq_idx, (k - 1, 0), value=0)  # prefix, zero pad: segment 0
    rows, cols = torch.nonzero(seg[:, :t] != seq_idx, as_tuple=True)  # the farthest tap crosses
    taps = cols[:, None] + torch.arange(k, device=seq_idx.device)
    crossing = seg[rows[:, None], taps] != seq_idx[rows, cols][:, None]
    return rows, cols, taps, crossing


def _crossing_mask(seq_idx, k, t, dtype):
    """Dense form of `_crossing_taps` for compiled graphs (no data-dependent shapes): (B, K - 1, T), 1
    where tap j (reading padded position t + j) reads across a segment boundary. Costs K - 1 passes
    over (B, T) where the sparse form touches only the crossing positions."""
    seg = F.pad(seq_idx, (k - 1, 0), value=0)
    return torch.stack([seg[:, j : j + t] != seq_idx for j in range(k - 1)], dim=1).to(dtype)


class CausalConv1d(torch.autograd.Function):
    """`causal_conv1d_ref` (then SiLU when `silu`), as one depthwise `F.conv1d` with a hand-written backward.

    On CPU, `F.conv1d`'s own depthwise backward is slower than the rest of a Mamba layer; here the
    input gradient is another depthwise conv (flipped taps) and the weight gradient a long-kernel
    depthwise conv. Taps that would read across a segment boundary exist only in the first K - 1
    tokens of a segment: their contributions are subtracted at those positions alone. Only the inputs
    are kept for backward; the padded input and the pre-activation are recomputed.
    """

    @staticmethod
    def _pre(x, weight, bias, prefix, seq_idx):
        k, t = weight.shape[-1], x.shape[-1]
        if prefix is None:  # the conv's own zero padding (both sides; the last K - 1 outputs dropped)
            xp = None
            out = F.conv1d(x, weight.unsqueeze(1), bias, padding=k - 1, groups=weight.shape[0])[..., :t]
        else:
            xp = _padded(x, prefix, k)
            out = F.conv1d(xp, weight.unsqueeze(1), bias, groups=weight.shape[0])
        cross = None
        if seq_idx is not None and torch.compiler.is_compiling():
            xp = _padded(x, prefix, k) if xp is None else xp
            cross = _crossing_mask(seq_idx, k, t, x.dtype)
            for j in range(k - 1):
                out = out - xp[..., j : j + t] * weight[:, j, None] * cross[:, j, None]
        elif seq_idx is not None:
            cross = _crossing_taps(seq_idx, k, t)
            rows, cols, taps, crossing = cross
            if rows.numel():
                xp = _padded(x, prefix, k) if xp is None else xp
                window = xp[rows[:, None], :, taps]  # (n, K, E)
                correction = torch.einsum("nke,ek,nk->ne", window, weight, crossing.to(x.dtype))
                out.transpose(1, 2).index_put_((rows, cols), -correction, accumulate=True)
        return xp, out, cross

    @staticmethod
    def forward(ctx, x, weight, bias, prefix, seq_idx, silu):
        with torch.autocast(x.device.type, enabled=False):  # in the parameters' dtype, autocast or not
            return CausalConv1d._forward(ctx, x, weight, bias, prefix, seq_idx, silu)

    @staticmethod
    def backward(ctx, dout):
        with torch.autocast(dout.device.type, enabled=False):
            return CausalConv1d._backward(ctx, dout)

    @staticmethod
    def _forward(ctx, x, weight, bias, prefix, seq_idx, silu):
        _, out, _ = CausalConv1d._pre(x, weight, bias, prefix, seq_idx)
        ctx.save_for_backward(x, weight, bias, prefix, seq_idx)
        ctx.silu = silu
        # (B, E, T) returned with (B, T, E) memory, the layout of the caller's tokens-major view: the
        # scan's matmuls then read B and C (and x) without copying them first.
        out = out.transpose(1, 2).contiguous()
        if silu:
            F.silu(out, inplace=True)
        return out.transpose(1, 2)

    @staticmethod
    def _backward(ctx, dout):
        x, weight, bias, prefix, seq_idx = ctx.saved_tensors
        k, t = weight.shape[-1], x.shape[-1]
        x = x.contiguous()  # once, for both convs below (x is usually a tokens-major view)
        xp, pre, cross = CausalConv1d._pre(x, weight, bias, prefix, seq_idx)
        # contiguous first: silu_backward on the transposed view the caller's gradient arrives as is
        # several times slower on CPU than the copy plus a contiguous silu_backward
        dout = dout.contiguous()
        if ctx.silu:
            dout = torch.ops.aten.silu_backward(dout, pre)
        b, e = dout.shape[:2]
        dxp = F.conv1d(F.pad(dout, (k - 1, k - 1)), weight.flip(-1).unsqueeze(1), groups=e)
        # weight gradient: one long-kernel depthwise conv of xp with dout per (row, channel)
        if xp is None:  # zero padding: let the conv pad x itself, keep the first K outputs
            dw = F.conv1d(x.reshape(1, b * e, t), dout.view(b * e, 1, t), padding=k - 1, groups=b * e)[..., :k]
        else:
            dw = F.conv1d(xp.reshape(1, b * e, t + k - 1), dout.view(b * e, 1, t), groups=b * e)
        dw = dw.view(b, e, k).sum(0)
        if torch.is_tensor(cross):  # the dense form (compiled)
            xp = _padded(x, prefix, k) if xp is None else xp
            dw_cross, dxp_cross = [], []
            for j in range(k - 1):
                d_masked = dout * cross[:, j, None]
                dw_cross.append((d_masked * xp[..., j : j + t]).sum((0, 2)))
                dxp_cross.append(F.pad(d_masked * weight[:, j, None], (j, k - 1 - j)))
            dw = dw - F.pad(torch.stack(dw_cross, dim=-1), (0, 1))
            dxp = dxp - sum(dxp_cross)
        elif cross is not None and cross[0].numel():
            rows, cols, taps, crossing = cross
            xp = _padded(x, prefix, k) if xp is None else xp
            d_at = dout.transpose(1, 2)[rows, cols]  # (n, E)
            mask = crossing.to(dout.dtype)
            dw -= torch.einsum("ne,nke,nk->ek", d_at, xp[rows[:, None], :, taps], mask)
            d_window = torch.einsum("ne,ek,nk->nke", d_at, weight, mask)
            dxp.transpose(1, 2).index_put_((rows[:, None].expand_as(taps), taps), -d_window, accumulate=True)
        db = dout.sum((0, 2)) if bias is not None else None
        d_prefix = None
        if prefix is not None and ctx.needs_input_grad[3]:
            d_prefix = torch.zeros_like(prefix)
            d_prefix[..., prefix.shape[-1] - (k - 1) :] = dxp[..., : k - 1]
        return dxp[..., k - 1 :], dw, db, d_prefix, None, None


def causal_conv1d(x, weight, bias=None, prefix=None, seq_idx=None, silu=False):
    """`causal_conv1d_ref`'s contract (and SiLU after it when `silu`), computed by `CausalConv1d`.

    It runs in the weight's dtype: under autocast the projections' bf16 outputs are convolved in fp32
    (4 multiply-adds per element, and the scan reads x, B and C in fp32 anyway)."""
    x = x.to(weight.dtype)
    prefix = prefix.to(weight.dtype) if prefix is not None else None
    return CausalConv1d.apply(x, weight, bias, prefix, seq_idx, silu)


class _SSDChunks:
    """The scan's inputs padded to whole chunks, with the decays and segment masks both passes of
    `SSDChunkScan` read.

    "Token" layout keeps the input order (B, C, L, H, ...): the state matmuls run on it as one
    (L, H/G*P) matrix per chunk and group. "Head" layout (B, C, H, L, ...) is for the within-chunk
    (L, L) products only.
    """

    def __init__(self, x, dt, A, B, C, chunk_size, seq_idx):
        b, t, h, p = x.shape
        g, n = B.shape[2], B.shape[3]
        L = min(chunk_size, t)
        pad = (-t) % L
        if pad:  # padded steps have dt = 0 and x = 0: they change neither outputs nor the final state
            x, dt, B, C = (F.pad(v, (0, 0) * (v.dim() - 2) + (0, pad)) for v in (x, dt, B, C))
            if seq_idx is not None:
                seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1)
        c = (t + pad) // L
        self.b, self.t, self.h, self.p, self.g, self.n, self.c, self.L, self.pad = b, t, h, p, g, n, c, L, pad
        self.x = x.view(b, c, L, h, p)
        self.dt = dt.view(b, c, L, h)
        self.cs = torch.cumsum(self.dt * A, dim=2)  # (B, C, L, H) log decay from the chunk start
        self.B = self.groups(B.view(b, c, L, g, n))  # (B, C, G, L, N)
        self.C = self.groups(C.view(b, c, L, g, n))
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        if seq_idx is None:
            self.keep, self.in_leaving_segment, self.in_entering_segment, self.entering_passes = (
                causal,
                None,
                None,
                None,
            )
        else:
            seg = seq_idx.view(b, c, L)
            self.keep = (causal & (seg[..., :, None] == seg[..., None, :])).unsqueeze(2)  # (B, C, 1, L, L)
            seg_end = seg[..., -1]  # (B, C): segment whose state leaves each chunk
            seg_in = F.pad(seg_end, (1, 0), value=0)[:, :-1]  # segment of the state entering each chunk
            # 1 for tokens of the segment whose state leaves the chunk (the only ones it carries)
            self.in_leaving_segment = (seg == seg_end[..., None]).unsqueeze(-1).to(x.dtype)  # (B, C, L, 1)
            # 1 for tokens of the segment the entering state belongs to (the only ones it reaches)
            self.in_entering_segment = (seg == seg_in[..., None]).unsqueeze(-1).to(x.dtype)
            # 1 where the entering state's segment runs through the whole chunk (it leaves it too)
            self.entering_passes = (seg_end == seg_in).unsqueeze(-1).to(x.dtype)  # (B, C, 1)

    def groups(self, v):
        """(B, C, L, H, P) or (B, C, L, G, N) -> (B, C, G, L, H/G*P or N); for one group a plain view
        (matmul copies a transposed size-1 dimension)."""
        b, c, L, g = self.b, self.c, self.L, self.g
        if g == 1:
            return v.reshape(b, c, 1, L, -1)
        return v.reshape(b, c, L, g, -1).transpose(2, 3)

    def ungroup(self, v):
        """(B, C, G, L, H/G*P) -> (B, C, L, H, P), the inverse of `groups`."""
        b, c, L, h, p = self.b, self.c, self.L, self.h, self.p
        return v.view(b, c, L, h, p) if self.g == 1 else v.transpose(2, 3).reshape(b, c, L, h, p)

    def heads(self, v):
        """(B, C, L, H, P) -> contiguous (B, C, H, L, P)."""
        return v.transpose(2, 3).contiguous()

    def decay_within(self):
        """exp(cs_l - cs_s) for causal same-segment pairs of a chunk, else 0: (B, C, H, L, L)."""
        cs = self.cs.transpose(2, 3).contiguous()  # (B, C, H, L); contiguous, so the (L, L) result is too
        return (cs[..., :, None] - cs[..., None, :]).masked_fill_(~self.keep, -torch.inf).exp_()

    def decay_out(self):
        """exp(cs_end - cs_s): decay from each token to its chunk's end, 0 outside the leaving segment."""
        w = torch.exp(self.cs[:, :, -1:] - self.cs)  # (B, C, L, H)
        return w if self.in_leaving_segment is None else w * self.in_leaving_segment

    def decay_in(self):
        """exp(cs_l): decay from the chunk start to each token, 0 outside the entering segment."""
        od = torch.exp(self.cs)
        return od if self.in_entering_segment is None else od * self.in_entering_segment

    def decay_pass(self):
        """Decay across each whole chunk, 0 where the entering state's segment ends inside it: (B, C, H)."""
        a = torch.exp(self.cs[:, :, -1])
        return a if self.entering_passes is None else a * self.entering_passes

    def within(self, dec, CB):
        """Within-chunk matrix M = decay * (C . B): (B, C, H, L, L), computed in place in `dec`."""
        b, c, g, L = self.b, self.c, self.g, self.L
        return dec.view(b, c, g, -1, L, L).mul_(CB.unsqueeze(3)).view(b, c, -1, L, L)

    def state_heads(self, s):
        """A per-chunk state (B, G, N, H/G*P) viewed as (B, G, N, H/G, P)."""
        return s.view(self.b, self.g, self.n, self.h // self.g, self.p)

    def per_head(self, a):
        """(B, H) -> (B, G, 1, H/G, 1) to scale a state."""
        return a.view(self.b, self.g, 1, self.h // self.g, 1)

    def unpad(self, v):
        """(B, C, L, ...) -> (B, T, ...)."""
        return v.reshape(self.b, self.c * self.L, *v.shape[3:])[:, : self.t]


def _states_to_bhpn(s, chunks):
    """A state (B, G, N, H/G*P) as (B, H, P, N), the layout callers pass and get back."""
    return chunks.state_heads(s).permute(0, 1, 3, 4, 2).reshape(chunks.b, chunks.h, chunks.p, chunks.n)


def _states_from_bhpn(s, chunks):
    """A state (B, H, P, N) as (B, G, N, H/G*P), the layout of the scan's state matmuls."""
    g, hg = chunks.g, chunks.h // chunks.g
    return s.view(chunks.b, g, hg, chunks.p, chunks.n).permute(0, 1, 4, 2, 3).reshape(chunks.b, g, chunks.n, -1)


class SSDChunkScan(torch.autograd.Function):
    """`ssd_scan_ref` with a hand-written backward.

    Same mathematics; the state matmuls run on token-layout (L, H/G*P) matrices, no (L, L) tensor is
    kept for the backward (they are recomputed), and the chunk-to-chunk pass is a recurrence, so
    memory and time are linear in the number of chunks.
    """

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, initial_state, seq_idx, chunk_size):
        with torch.autocast(x.device.type, enabled=False):  # fp32 throughout, autocast or not
            return SSDChunkScan._forward(ctx, x, dt, A, B, C, D, initial_state, seq_idx, chunk_size)

    @staticmethod
    def backward(ctx, dy, dfinal):
        with torch.autocast(dy.device.type, enabled=False):
            return SSDChunkScan._backward(ctx, dy, dfinal)

    @staticmethod
    def _forward(ctx, x, dt, A, B, C, D, initial_state, seq_idx, chunk_size):
        chunks = _SSDChunks(x, dt, A, B, C, chunk_size, seq_idx)
        b, c, h, p, L = chunks.b, chunks.c, chunks.h, chunks.p, chunks.L
        # 1. within chunks: y_l = sum_{s<=l} C_l.B_s exp(cs_l - cs_s) dt_s x_s
        xdt = chunks.heads(chunks.x).mul_(chunks.dt.transpose(2, 3)[..., None])  # (B, C, H, L, P)
        M = chunks.within(chunks.decay_within(), torch.matmul(chunks.C, chunks.B.transpose(-1, -2)))
        y = torch.matmul(M, xdt)  # (B, C, H, L, P)
        del M, xdt
        # 2. state each chunk leaves behind, (B, C, G, N, H/G*P): sum_s B_s exp(cs_end - cs_s) dt_s x_s
        xw = chunks.x * (chunks.dt * chunks.decay_out())[..., None]  # (B, C, L, H, P)
        states = torch.matmul(chunks.B.transpose(-1, -2), chunks.groups(xw))
        del xw
        # 3. across chunks: turn `states` into the state entering each chunk, in place
        a = chunks.decay_pass()  # (B, C, H)
        s = (
            x.new_zeros(b, chunks.g, chunks.n, h // chunks.g * p)
            if initial_state is None
            else _states_from_bhpn(initial_state, chunks)
        )
        for k in range(c):
            s_next = torch.addcmul(
                chunks.state_heads(states[:, k]), chunks.state_heads(s), chunks.per_head(a[:, k])
            ).view_as(s)
            states[:, k].copy_(s)
            s = s_next
        # 4. output of the entering state: y_l += exp(cs_l) C_l . entering
        y_in = chunks.ungroup(torch.matmul(chunks.C, states)).mul_(chunks.decay_in()[..., None])  # (B, C, L, H, P)
        if torch.compiler.is_compiling():  # inductor picks the layout itself (and fails on out=)
            out = chunks.unpad((y.transpose(2, 3) + y_in).contiguous())
        else:
            out = torch.empty(b, c, L, h, p, dtype=x.dtype, device=x.device)
            out = chunks.unpad(torch.add(y.transpose(2, 3), y_in, out=out))
        if D is not None:
            # out of place when compiling: torch 2.11's AOTAutograd drops every gradient of a Function whose
            # output was modified in place in forward (tests/test_compile.py; fixed by 2.13)
            out = out + x * D[:, None] if torch.compiler.is_compiling() else out.addcmul_(x, D[:, None])
        # y_in is kept for its log-decay gradient: recomputing it would cost a state-sized matmul
        ctx.save_for_backward(x, dt, A, B, C, D, states, y_in if any(ctx.needs_input_grad) else None, seq_idx)
        ctx.chunk_size, ctx.has_initial_state = chunk_size, initial_state is not None
        return out, _states_to_bhpn(s, chunks)

    @staticmethod
    def _backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, entering, y_in, seq_idx = ctx.saved_tensors
        chunks = _SSDChunks(x, dt, A, B, C, ctx.chunk_size, seq_idx)
        b, c, h, p, L = chunks.b, chunks.c, chunks.h, chunks.p, chunks.L
        dy = dy.contiguous()
        dyc = (F.pad(dy, (0, 0, 0, 0, 0, chunks.pad)) if chunks.pad else dy).view(b, c, L, h, p)

        # 4. y_in = od * (C . entering)
        dy_od = dyc * chunks.decay_in()[..., None]  # (B, C, L, H, P)
        dy_od_g = chunks.groups(dy_od)  # (B, C, G, L, H/G*P)
        dC = torch.matmul(dy_od_g, entering.transpose(-1, -2))  # (B, C, G, L, N)
        dcs = torch.linalg.vecdot(dyc, y_in)  # (B, C, L, H): y_in already carries exp(cs)
        del y_in
        d_entering = torch.matmul(chunks.C.transpose(-1, -2), dy_od_g)  # (B, C, G, N, H/G*P)
        del dy_od, dy_od_g
        # 3. across chunks, backwards; d_entering becomes the gradient of each chunk's state in place
        a = chunks.decay_pass()
        gs = (
            x.new_zeros(b, chunks.g, chunks.n, h // chunks.g * p)
            if dfinal is None
            else _states_from_bhpn(dfinal, chunks)
        )
        da = x.new_empty(b, c, h)
        for k in range(c - 1, -1, -1):
            da[:, k] = (chunks.state_heads(gs) * chunks.state_heads(entering[:, k])).sum((2, 4)).view(b, h)
            g_prev = torch.addcmul(
                chunks.state_heads(d_entering[:, k]), chunks.state_heads(gs), chunks.per_head(a[:, k])
            ).view_as(gs)
            d_entering[:, k].copy_(gs)
            gs = g_prev
        d_initial = _states_to_bhpn(gs, chunks) if ctx.has_initial_state else None
        d_states = d_entering
        dcs[:, :, -1] += da * a
        # 2. states = B^T (x * dt * w)
        w = chunks.decay_out()  # (B, C, L, H)
        coef = chunks.dt * w
        u = chunks.ungroup(torch.matmul(chunks.B, d_states))  # d(x * coef), (B, C, L, H, P)
        dx = u * coef[..., None]
        dcoef = torch.linalg.vecdot(u, chunks.x)  # (B, C, L, H)
        del u
        ddt = dcoef * w
        dwe = dcoef * coef  # d(log w)
        dcs -= dwe
        dcs[:, :, -1] += dwe.sum(2)
        xw = chunks.x * coef[..., None]
        dB = torch.matmul(chunks.groups(xw), d_states.transpose(-1, -2))  # (B, C, G, L, N)
        del xw
        # 1. within chunks
        dec = chunks.decay_within()
        CB = torch.matmul(chunks.C, chunks.B.transpose(-1, -2))  # (B, C, G, L, L)
        dy_h = chunks.heads(dyc)
        xdt = chunks.heads(chunks.x).mul_(chunks.dt.transpose(2, 3)[..., None])
        dMd = torch.matmul(dy_h, xdt.transpose(-1, -2)).mul_(dec)  # dM * decay, (B, C, H, L, L)
        del xdt
        dCB = dMd.view(b, c, chunks.g, -1, L, L).sum(3)  # (B, C, G, L, L)
        dS = chunks.within(dMd, CB)  # d(log decay)
        dcs += (dS.sum(-1) - dS.sum(-2)).transpose(2, 3)
        del dS, dMd
        M = chunks.within(dec, CB)
        dxdt = torch.matmul(M.transpose(-1, -2), dy_h).transpose(2, 3)  # (B, C, L, H, P)
        del M, dy_h
        dx.addcmul_(dxdt, chunks.dt[..., None])
        ddt += torch.linalg.vecdot(dxdt, chunks.x)
        del dxdt
        dC += torch.matmul(dCB, chunks.B)
        dB += torch.matmul(dCB.transpose(-1, -2), chunks.C)
        # cs = cumsum(dt * A) within each chunk
        dlog = dcs.flip(2).cumsum(2).flip(2)  # (B, C, L, H)
        dA = (dlog * chunks.dt).sum((0, 1, 2))
        ddt += dlog * A
        dx = chunks.unpad(dx)
        dD = None
        if D is not None:
            dx.addcmul_(dy, D[:, None])
            dD = torch.linalg.vecdot(dy, x).sum((0, 1))
        dB = chunks.unpad(dB.transpose(2, 3))
        dC = chunks.unpad(dC.transpose(2, 3))
        return dx, chunks.unpad(ddt), dA, dB, dC, dD, d_initial, None, None


def ssd_scan(x, dt, A, B, C, chunk_size, D=None, initial_state=None, seq_idx=None):
    """`ssd_scan_ref`'s contract (same arguments, float32 results), computed by `SSDChunkScan`."""
    x, dt, A, B, C = x.float(), dt.float(), A.float(), B.float(), C.float()
    D = D.float() if D is not None else None
    init = initial_state.float() if initial_state is not None else None
    return SSDChunkScan.apply(x, dt, A, B, C, D, init, seq_idx, chunk_size)


class RMSNormFunction(torch.autograd.Function):
    """`rms_norm_ref` with a hand-written backward that keeps only the inputs and the per-group
    statistic: the normalised tensor is recomputed, which saves the several full-size intermediates
    autograd would keep and their extra passes.
    """

    @staticmethod
    def forward(ctx, x, weight, gate, eps, group_size):
        # rms_norm_ref's arithmetic, keeping the statistic
        h = _at_least_fp32(x)
        if gate is not None:
            h = h * F.silu(_at_least_fp32(gate))
        grouped = h.view(*h.shape[:-1], -1, group_size)
        rstd = torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)  # (..., groups, 1)
        out = weight * (grouped * rstd).view(x.shape).to(x.dtype)
        ctx.save_for_backward(x, weight, gate, rstd)
        ctx.group_size = group_size
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, gate, rstd = ctx.saved_tensors
        gs = ctx.group_size
        xf = _at_least_fp32(x)
        if gate is not None:
            g = _at_least_fp32(gate)
            silu = F.silu(g)
            h = xf * silu
        else:
            h = xf
        n = h.view(*h.shape[:-1], -1, gs) * rstd  # the normalised input, (..., groups, group size)
        dweight = None
        if ctx.needs_input_grad[1]:
            dweight = (dout * n.view(x.shape).to(x.dtype)).reshape(-1, x.shape[-1]).sum(0)
        dn = _at_least_fp32(dout * weight).view(n.shape)
        mean = torch.linalg.vecdot(dn, n).unsqueeze(-1) / gs
        dh = (torch.addcmul(dn, n, mean, value=-1) * rstd).view(x.shape)
        dgate = None
        if gate is not None:
            if ctx.needs_input_grad[2]:
                dgate = torch.ops.aten.silu_backward(dh * xf, g).to(gate.dtype)
            dh = dh * silu
        return dh.to(x.dtype), dweight, dgate, None, None


def rms_norm(x, weight, gate=None, eps=1e-6, group_size=None):
    """`rms_norm_ref`'s contract, computed by `RMSNormFunction` when a gradient is wanted; without one
    (inference, decode) by `rms_norm_ref` itself, without the autograd.Function's per-call overhead."""
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (gate is not None and gate.requires_grad)
    ):
        return RMSNormFunction.apply(x, weight, gate, eps, group_size or x.shape[-1])
    return rms_norm_ref(x, weight, gate, eps, group_size)


@_autocast_off
def selective_scan_ref(u, delta, A, B, C, D=None, initial_state=None, seq_idx=None, chunk_size=64):
    """Selective scan of Mamba-1 without a loop over tokens, in plain autograd (tested against the
    token-by-token recurrence): the reference, and the fast set's scan under torch.compile.

    u, delta (B, T, E), A (E, N) negative, B and C (B, T, N), D (E,), initial_state (B, E, N).
    Within a chunk the linear recurrence h_t = a_t h_{t-1} + b_t is solved by log-depth doubling
    (products of decays only, so no overflow); chunks are chained one after another.
    Returns y (B, T, E) and the final state (B, E, N), float32.
    """
    u, delta, B, C = u.float(), delta.float(), B.float(), C.float()
    b, t, e = u.shape
    decay = torch.exp(delta.unsqueeze(-1) * A.float())  # (B, T, E, N)
    if seq_idx is not None:  # a new segment starts from a zero state
        start = F.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0), value=False)
        decay = decay.masked_fill(start[:, :, None, None], 0.0)
    inp = (delta * u).unsqueeze(-1) * B.unsqueeze(2)  # (B, T, E, N)
    state = initial_state.float() if initial_state is not None else u.new_zeros(b, e, A.shape[-1])
    ys = []
    for s in range(0, t, chunk_size):
        a, x = decay[:, s : s + chunk_size], inp[:, s : s + chunk_size]
        step = 1
        while step < a.shape[1]:  # inclusive scan: (a, x)_t <- (a_t a_{t-step}, x_t + a_t x_{t-step})
            x = torch.cat([x[:, :step], x[:, step:] + a[:, step:] * x[:, :-step]], dim=1)
            a = torch.cat([a[:, :step], a[:, step:] * a[:, :-step]], dim=1)
            step *= 2
        hs = x + a * state.unsqueeze(1)  # (B, L, E, N)
        ys.append(torch.einsum("blen,bln->ble", hs, C[:, s : s + chunk_size]))
        state = hs[:, -1]
    y = torch.cat(ys, dim=1)
    if D is not None:
        y = y + u * D.float()
    return y, state


class SelectiveScan(torch.autograd.Function):
    """`selective_scan_ref` with a hand-written backward, token by token.

    Per chunk of L tokens the decays exp(dt A) and inputs dt u B are formed at once (L, B, E, N), then
    the recurrence h_t = a_t h_{t-1} + b_t runs one token at a time on (B, E, N) states that stay in
    cache: one fused multiply-add per token instead of the log-depth doubling's full-size passes. Only
    the inputs and the state at each chunk start are kept; the backward recomputes a chunk's states and
    runs the adjoint recurrence dh_t = C_t dy_t + a_{t+1} dh_{t+1} backwards through it. Float32 inputs.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, initial_state, start, chunk_size):
        b, t, e = u.shape
        state = initial_state if initial_state is not None else u.new_zeros(b, e, A.shape[-1])
        time_major = [x.transpose(0, 1) for x in (u, delta, B, C)]  # (T, B, ...)
        start_t = start.transpose(0, 1) if start is not None else None
        y = u.new_empty(t, b, e)
        chunk_starts = []
        for s in range(0, t, chunk_size):
            chunk_starts.append(state)
            hs, _, _ = SelectiveScan._states(time_major, A, start_t, state, s, chunk_size)  # (L, B, E, N)
            y[s : s + hs.shape[0]] = torch.matmul(hs, time_major[3][s : s + hs.shape[0]].unsqueeze(-1)).squeeze(-1)
            state = hs[-1].clone()
        y = y.transpose(0, 1)
        if D is not None:
            y = y + u * D
        ctx.save_for_backward(u, delta, A, B, C, D, start, *chunk_starts)
        ctx.chunk_size = chunk_size
        return y.contiguous(), state

    @staticmethod
    def _states(time_major, A, start_t, state, s, chunk_size):
        """States h_s .. h_{s+L-1} of one chunk from the state before it; also its decays and dt u."""
        u, delta, B = time_major[0][s : s + chunk_size], time_major[1][s : s + chunk_size], time_major[2]
        a = torch.exp(delta.unsqueeze(-1) * A)  # (L, B, E, N)
        if start_t is not None:  # a new segment starts from a zero state
            a = a.masked_fill(start_t[s : s + chunk_size, :, None, None], 0.0)
        du = delta * u
        inp = du.unsqueeze(-1) * B[s : s + chunk_size].unsqueeze(2)
        hs = torch.empty_like(inp)
        h = state
        for i in range(inp.shape[0]):
            h = torch.addcmul(inp[i], a[i], h, out=hs[i])
        return hs, a, du

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dfinal):
        u, delta, A, B, C, D, start, *chunk_starts = ctx.saved_tensors
        chunk_size = ctx.chunk_size
        time_major = [x.transpose(0, 1) for x in (u, delta, B, C)]
        start_t = start.transpose(0, 1) if start is not None else None
        dy_t = dy.transpose(0, 1)
        du, ddelta = torch.empty_like(time_major[0]), torch.empty_like(time_major[1])
        dB, dC = torch.empty_like(time_major[2]), torch.empty_like(time_major[3])
        dA = torch.zeros_like(A)
        carry = dfinal if dfinal is not None else torch.zeros_like(chunk_starts[0])  # a_{t+1} dh_{t+1}
        for index in reversed(range(len(chunk_starts))):
            s = index * chunk_size
            hs, a, du_chunk = SelectiveScan._states(time_major, A, start_t, chunk_starts[index], s, chunk_size)
            n = hs.shape[0]
            dyc, Bc = dy_t[s : s + n], time_major[2][s : s + n]
            dh = dyc.unsqueeze(-1) * time_major[3][s : s + n].unsqueeze(2)  # C_t dy_t, (L, B, E, N)
            dh[n - 1] += carry
            for i in range(n - 2, -1, -1):
                dh[i].addcmul_(a[i + 1], dh[i + 1])
            carry = a[0] * dh[0]
            dC[s : s + n] = torch.matmul(dyc.unsqueeze(-2), hs).squeeze(-2)
            d_du = torch.matmul(dh, Bc.unsqueeze(-1)).squeeze(-1)  # d(dt u), (L, B, E)
            dB[s : s + n] = torch.matmul(du_chunk.unsqueeze(-2), dh).squeeze(-2)
            h_prev = torch.cat([chunk_starts[index].unsqueeze(0), hs[:-1]])
            dlog = dh.mul_(h_prev).mul_(a)  # d(dt A)
            ddelta[s : s + n] = d_du * time_major[0][s : s + n] + (dlog * A).sum(-1)
            dA += torch.einsum("lben,lbe->en", dlog, time_major[1][s : s + n])
            du[s : s + n] = d_du * time_major[1][s : s + n]
        du, ddelta, dB, dC = (x.transpose(0, 1) for x in (du, ddelta, dB, dC))
        dD = None
        if D is not None:
            du = du + dy * D
            dD = (dy * u).sum((0, 1))
        d_init = carry if ctx.needs_input_grad[6] else None
        return du, ddelta, dA, dB, dC, dD, d_init, None, None


@_autocast_off
def selective_scan(u, delta, A, B, C, D=None, initial_state=None, seq_idx=None, chunk_size=64):
    """Selective scan of Mamba-1: `selective_scan_ref`'s contract, computed by `SelectiveScan` (eagerly;
    under torch.compile the reference, whose tensor-wide doubling compiles without unrolling a token loop).
    On CUDA, mamba-ssm's `selective_scan_fn` replaces it when there are no segments and no initial state.

    u, delta (B, T, E), A (E, N) negative, B and C (B, T, N), D (E,), initial_state (B, E, N).
    Returns y (B, T, E) and the final state (B, E, N), float32.
    """
    if torch.compiler.is_compiling():
        return selective_scan_ref(u, delta, A, B, C, D, initial_state, seq_idx, chunk_size)
    start = None
    if seq_idx is not None:
        start = F.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0), value=False)
    D = D.float() if D is not None else None
    init = initial_state.float() if initial_state is not None else None
    return SelectiveScan.apply(u.float(), delta.float(), A.float(), B.float(), C.float(), D, init, start, chunk_size)


@dataclass(frozen=True)
class MambaOps:
    """One implementation of each operator family the Mamba mixers and the norms call; both sets keep
    the contracts of the references."""

    causal_conv1d: Callable
    ssd_scan: Callable
    selective_scan: Callable
    rms_norm: Callable


# `config.mamba_ops` picks one. "reference" runs the readable operators (a fast one under suspicion is
# ruled out by switching to it) and never the CUDA kernels. Under torch.compile the fast Mamba-1 scan is the reference too.
MAMBA_OPS = {
    "fast": MambaOps(causal_conv1d, ssd_scan, selective_scan, rms_norm),
    "reference": MambaOps(causal_conv1d_ref, ssd_scan_ref, selective_scan_ref, rms_norm_ref),
}


def _use_kernels(module: nn.Module, x: torch.Tensor) -> bool:
    """mamba-ssm / causal-conv1d kernels (those importable) in place of the fast operators, never the references."""
    fast = module.ops is MAMBA_OPS["fast"]
    return x.is_cuda and fast and module.config.use_mamba_kernels and not torch.compiler.is_compiling()


# Modules


class HybridMambaRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6, ops="fast"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.rms_norm = MAMBA_OPS[ops].rms_norm

    def forward(self, hidden_states):
        return self.rms_norm(hidden_states, self.weight, None, self.variance_epsilon)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class HybridMambaRMSNormGated(nn.Module):
    """norm(y * silu(z)) with one RMS statistic per group of channels (mamba-ssm, norm_before_gate=False)."""

    def __init__(self, hidden_size, group_size, eps=1e-6, ops="fast"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.group_size = group_size
        self.rms_norm = MAMBA_OPS[ops].rms_norm

    def forward(self, hidden_states, gate):
        return self.rms_norm(hidden_states, self.weight, gate, self.variance_epsilon, self.group_size)


class HybridMambaRotaryEmbedding(nn.Module):
    def __init__(self, config: HybridMambaConfig):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config, device=None, **kwargs):
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    b, h_kv, t, d = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    return hidden_states[:, :, None].expand(b, h_kv, n_rep, t, d).reshape(b, h_kv * n_rep, t, d)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class HybridMambaAttention(nn.Module):
    """Grouped-query attention with RoPE (or none), as in Llama."""

    def __init__(self, config: HybridMambaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.q_proj = nn.Linear(
            config.hidden_size, config.num_attention_heads * self.head_dim, bias=config.attention_bias
        )
        self.k_proj = nn.Linear(
            config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias
        )
        self.v_proj = nn.Linear(
            config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(
            config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.attention_bias
        )

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, T, P)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hkv, T, P)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if position_embeddings is not None:
            q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention_interface(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights


class HybridMambaMLP(nn.Module):
    def __init__(self, config: HybridMambaConfig, intermediate_size: int | None = None):
        super().__init__()
        # a layer's own width when the config gives one per layer (a pruned model)
        inter = config.intermediate_size if intermediate_size is None else intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, inter, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, inter, bias=config.mlp_bias)
        self.down_proj = nn.Linear(inter, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class _MambaMixerBase(nn.Module):
    """Shared parts of both Mamba versions: sizes, the causal conv with its cache, parameter tags."""

    def __init__(self, config: HybridMambaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.ops = MAMBA_OPS[config.mamba_ops]  # the operators every call below goes through
        self.hidden_size = config.hidden_size
        self.d_inner = config.layer_mamba_d_inner(layer_idx)
        self.d_state = config.mamba_d_state
        self.conv_kernel_size = config.mamba_d_conv

    def _tag_ssm_parameters(self):
        # Read by trainers: no weight decay on these (mamba-ssm's convention).
        for p in (self.A_log, self.D, getattr(self, "dt_bias", None)):
            if p is not None:
                p._no_weight_decay = True

    def _conv(self, xBC, cache, seq_idx, prefix=None):
        """xBC (B, E, T) -> silu(conv(xBC)) (B, E, T), updating the conv cache.

        The earlier inputs come from the cache when there is one, else from `prefix` (B, E, >= K - 1).
        """
        prefix = cache.get_conv_state(self.layer_idx) if cache is not None else prefix
        w, bias = self.conv1d.weight.squeeze(1), self.conv1d.bias
        if prefix is None and seq_idx is None and _use_kernels(self, xBC) and causal_conv1d_fn is not None:
            out = causal_conv1d_fn(xBC, w, bias, activation="silu")
        else:
            out = self.ops.causal_conv1d(xBC, w, bias, prefix=prefix, seq_idx=seq_idx, silu=True)
        if cache is not None:  # after the conv: the cached tensor is updated in place
            cache.update_conv_state(xBC, self.layer_idx, conv_kernel_size=self.conv_kernel_size)
        return out

    def _conv_step(self, xBC, cache):
        """One decode step: xBC (B, E, 1)."""
        full = cache.update_conv_state(xBC, self.layer_idx, conv_kernel_size=self.conv_kernel_size)
        w = self.conv1d.weight.squeeze(1)  # (E, K)
        out = (full[..., -self.conv_kernel_size :].to(w.dtype) * w).sum(-1, keepdim=True)
        return out if self.conv1d.bias is None else out + self.conv1d.bias[:, None]


class HybridMamba2Mixer(_MambaMixerBase):
    """Mamba-2 (SSD) mixer, laid out as mamba-ssm's `Mamba2` (and transformers' `Mamba2Mixer`)."""

    def __init__(self, config: HybridMambaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.head_dim = config.mamba_head_dim
        self.num_heads = self.d_inner // self.head_dim
        self.n_groups = config.mamba_n_groups
        self.chunk_size = config.mamba_chunk_size
        self.dt_limit = tuple(config.mamba_dt_limit)
        self.conv_dim = self.d_inner + 2 * self.n_groups * self.d_state
        self.in_proj = nn.Linear(
            self.hidden_size, self.d_inner + self.conv_dim + self.num_heads, bias=config.mamba_proj_bias
        )
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            config.mamba_d_conv,
            groups=self.conv_dim,
            padding=config.mamba_d_conv - 1,
            bias=config.mamba_conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads, dtype=torch.float32))
        self.A_log = nn.Parameter(torch.empty(self.num_heads, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(self.num_heads, dtype=torch.float32))
        self.norm = HybridMambaRMSNormGated(
            self.d_inner, self.d_inner // self.n_groups, eps=config.rms_norm_eps, ops=config.mamba_ops
        )
        self.out_proj = nn.Linear(self.d_inner, self.hidden_size, bias=config.mamba_proj_bias)
        self._tag_ssm_parameters()

    def forward(self, hidden_states, cache=None, pad_mask=None, seq_idx=None):
        t = hidden_states.shape[1]
        state = cache.get_recurrent_state(self.layer_idx) if cache is not None else None
        # A long input without segments runs on CPU in blocks of tokens, the conv inputs and the state
        # carried from block to block: the same result, with intermediates the size of one block, so the
        # cost per token stays flat with length instead of growing with the working set.
        block = CPU_BLOCK_TOKENS if (seq_idx is None and not hidden_states.is_cuda) else t
        if t <= block:
            return self._forward(hidden_states, cache, pad_mask, seq_idx, state, None)[0]
        outs, prefix = [], None
        for s in range(0, t, block):
            mask = pad_mask[:, s : s + block] if pad_mask is not None else None
            y, state, prefix = self._forward(hidden_states[:, s : s + block], cache, mask, None, state, prefix)
            outs.append(y)
        return torch.cat(outs, dim=1)

    def _forward(self, hidden_states, cache, pad_mask, seq_idx, state, prefix):
        """One block: output, final state and the conv inputs' last K - 1 columns (the next block's prefix).

        `state` and `prefix` are what the previous block left; with a cache they are read from it.
        """
        b, t, _ = hidden_states.shape
        zxbcdt = self.in_proj(hidden_states)  # (B, T, d_inner + conv_dim + H)
        z, xBC, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        if pad_mask is not None:
            xBC = xBC * pad_mask[..., None].to(xBC.dtype)
        A = -torch.exp(self.A_log.float())  # (H,)

        if state is not None and t == 1 and cache is not None:
            y, final, xBC_in = self._step(xBC, dt, A, cache, state), None, None
        else:
            xBC_in = xBC.transpose(1, 2)  # (B, conv_dim, T)
            xBC = self._conv(xBC_in, cache, seq_idx, prefix).transpose(1, 2)  # (B, T, conv_dim), after silu
            x, B, C = xBC.split([self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)
            x = x.reshape(b, t, self.num_heads, self.head_dim)
            B = B.reshape(b, t, self.n_groups, self.d_state)
            C = C.reshape(b, t, self.n_groups, self.d_state)
            if _use_kernels(self, x) and mamba_chunk_scan_combined is not None:
                y, final = mamba_chunk_scan_combined(
                    x,
                    dt,
                    A,
                    B,
                    C,
                    self.chunk_size,
                    D=self.D,
                    dt_bias=self.dt_bias,
                    dt_softplus=True,
                    dt_limit=self.dt_limit,
                    initial_states=state,
                    seq_idx=seq_idx.to(torch.int32) if seq_idx is not None else None,
                    return_final_states=True,
                )
            else:
                dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.dt_limit)
                chunk = self.chunk_size if x.is_cuda else min(self.chunk_size, CPU_CHUNK_SIZE)
                y, final = self.ops.ssd_scan(x, dt, A, B, C, chunk, D=self.D, initial_state=state, seq_idx=seq_idx)
            if cache is not None:
                cache.update_recurrent_state(final, self.layer_idx)
            y = y.reshape(b, t, self.d_inner)
            if prefix is not None:
                xBC_in = torch.cat([prefix, xBC_in], dim=-1)
            xBC_in = xBC_in[..., -(self.conv_kernel_size - 1) :]
        y = self.norm(y.to(hidden_states.dtype), z)
        return self.out_proj(y), final, xBC_in

    @_autocast_off
    def _step(self, xBC, dt, A, cache, state):
        """One decode step with the recurrent form; cost independent of the context length."""
        b = xBC.shape[0]
        xBC = F.silu(self._conv_step(xBC.transpose(1, 2), cache)).squeeze(-1)  # (B, conv_dim)
        x, B, C = xBC.split([self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)
        x = x.reshape(b, self.num_heads, self.head_dim)
        B = B.reshape(b, self.n_groups, self.d_state)
        C = C.reshape(b, self.n_groups, self.d_state)
        # mamba-ssm's step kernel has no dt clamp: use it only when the limit is the default (0, inf)
        if _use_kernels(self, x) and selective_state_update is not None and self.dt_limit == (0.0, float("inf")):
            y = selective_state_update(
                state,
                x,
                dt[:, 0, :, None].expand(-1, -1, self.head_dim),
                A[:, None, None].expand(-1, self.head_dim, self.d_state),
                B,
                C,
                D=self.D[:, None].expand(-1, self.head_dim),
                dt_bias=self.dt_bias[:, None].expand(-1, self.head_dim),
                dt_softplus=True,
            )
            return y.reshape(b, 1, self.d_inner)
        dt = F.softplus(dt[:, 0].float() + self.dt_bias.float()).clamp(*self.dt_limit)  # (B, H)
        hg = self.num_heads // self.n_groups
        B = B.float().repeat_interleave(hg, dim=1)  # (B, H, N)
        C = C.float().repeat_interleave(hg, dim=1)
        x = x.float()
        decay, dtx = torch.exp(dt * A)[..., None, None], (dt[..., None] * x)[..., None]  # (B, H, 1, 1), (B, H, P, 1)
        if state.dtype == torch.float32 and not torch.is_grad_enabled():
            # in the cache's own buffer, which update_recurrent_state would overwrite anyway (as mamba-ssm's
            # selective_state_update does): two passes over the state instead of five at large batch
            new_state = state.mul_(decay).addcmul_(dtx, B[:, :, None])
        else:
            new_state = torch.addcmul(state.float() * decay, dtx, B[:, :, None])  # (B, H, P, N)
        cache.update_recurrent_state(new_state.to(state.dtype), self.layer_idx)
        # vecdot rather than a (P, N) @ (N, 1) matmul per head: a batch of matrix-vector products is
        # per-call overhead at decode sizes (decode step 119 -> 53 us per layer, 2 threads)
        y = torch.linalg.vecdot(new_state, C[:, :, None]) + x * self.D.float()[:, None]  # (B, H, P)
        return y.reshape(b, 1, self.d_inner)


class HybridMambaTimestepProj(nn.Linear):
    """Mamba-1's `dt_proj`: a Linear whose bias (the timestep offset, Mamba-2's `dt_bias`) stays fp32 when
    the model is loaded in bf16/fp16, as mamba-ssm keeps it; the output is fp32, ready for the softplus.
    Still an `nn.Linear`, so PEFT adapters wrap it as any projection."""

    def forward(self, x):
        return F.linear(x, self.weight).float() + self.bias.float()


class HybridMamba1Mixer(_MambaMixerBase):
    """Mamba-1 (selective scan) mixer, laid out as mamba-ssm's `Mamba` (and transformers' `MambaMixer`)."""

    def __init__(self, config: HybridMambaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.dt_rank = config.mamba_dt_rank
        self.in_proj = nn.Linear(self.hidden_size, 2 * self.d_inner, bias=config.mamba_proj_bias)
        self.conv1d = nn.Conv1d(
            self.d_inner,
            self.d_inner,
            config.mamba_d_conv,
            groups=self.d_inner,
            padding=config.mamba_d_conv - 1,
            bias=config.mamba_conv_bias,
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = HybridMambaTimestepProj(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(self.d_inner, dtype=torch.float32))
        self.out_proj = nn.Linear(self.d_inner, self.hidden_size, bias=config.mamba_proj_bias)
        self._tag_ssm_parameters()

    def forward(self, hidden_states, cache=None, pad_mask=None, seq_idx=None):
        b, t, _ = hidden_states.shape
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)  # (B, T, E) each
        if pad_mask is not None:
            x = x * pad_mask[..., None].to(x.dtype)
        A = -torch.exp(self.A_log.float())  # (E, N)
        state = cache.get_recurrent_state(self.layer_idx) if cache is not None else None
        step = state is not None and t == 1
        if step:
            x = F.silu(self._conv_step(x.transpose(1, 2), cache)).transpose(1, 2)
        else:
            x = self._conv(x.transpose(1, 2), cache, seq_idx).transpose(1, 2)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt).float())  # (B, T, E); the module call keeps adapters on dt_proj active
        if step:
            y = self._step(x, dt, A, B, C, cache, state)
        elif _use_kernels(self, x) and selective_scan_fn is not None and seq_idx is None and state is None:
            y, final = selective_scan_fn(
                x.transpose(1, 2),
                dt.transpose(1, 2),
                A,
                B.transpose(1, 2),
                C.transpose(1, 2),
                self.D.float(),
                return_last_state=True,
            )
            y = y.transpose(1, 2)
            if cache is not None:
                cache.update_recurrent_state(final, self.layer_idx)
        else:
            y, final = self.ops.selective_scan(x, dt, A, B, C, D=self.D, initial_state=state, seq_idx=seq_idx)
            if cache is not None:
                cache.update_recurrent_state(final, self.layer_idx)
        y = y.to(hidden_states.dtype) * F.silu(z)
        return self.out_proj(y)

    @_autocast_off
    def _step(self, x, dt, A, B, C, cache, state):
        """One decode step of the recurrence: x (B, 1, E), dt (B, 1, E) fp32, B and C (B, 1, N); y (B, 1, E) fp32."""
        decay = torch.exp(dt[:, 0, :, None] * A)  # (B, E, N)
        new_state = state.float() * decay + (dt[:, 0] * x[:, 0].float())[..., None] * B[:, 0, None].float()
        cache.update_recurrent_state(new_state.to(state.dtype), self.layer_idx)
        y = (new_state @ C[:, 0, :, None].float()).squeeze(-1) + x[:, 0].float() * self.D.float()
        return y.unsqueeze(1)


MIXER_CLASSES = {"attention": HybridMambaAttention, "mamba1": HybridMamba1Mixer, "mamba2": HybridMamba2Mixer}


class HybridMambaDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm residual block: token mixer (Mamba or attention), then SwiGLU MLP (when configured)."""

    def __init__(self, config: HybridMambaConfig, layer_idx: int):
        super().__init__()
        self.mixer_type = config.mixer_type(layer_idx)
        self.input_layernorm = HybridMambaRMSNorm(config.hidden_size, eps=config.rms_norm_eps, ops=config.mamba_ops)
        mixer = MIXER_CLASSES[self.mixer_type](config, layer_idx)
        if self.mixer_type == "attention":
            self.self_attn = mixer
        else:
            self.mamba = mixer
        intermediate_size = config.layer_intermediate_size(layer_idx)
        if intermediate_size > 0:
            self.pre_mlp_layernorm = HybridMambaRMSNorm(
                config.hidden_size, eps=config.rms_norm_eps, ops=config.mamba_ops
            )
            self.mlp = HybridMambaMLP(config, intermediate_size)
        else:
            self.mlp = None

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_embeddings=None,
        cache=None,
        pad_mask=None,
        seq_idx=None,
        past_key_values=None,
        **kwargs,
    ):
        cache = _one_cache(cache, past_key_values)
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        if self.mixer_type == "attention":
            hidden_states, _ = self.self_attn(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                cache=cache,
                **kwargs,
            )
        else:
            hidden_states = self.mamba(hidden_states, cache=cache, pad_mask=pad_mask, seq_idx=seq_idx)
        hidden_states = residual + hidden_states
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.pre_mlp_layernorm(hidden_states))
        return hidden_states


# Models


class HybridMambaPreTrainedModel(PreTrainedModel):
    config_class = HybridMambaConfig
    config: HybridMambaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridMambaDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _is_stateful = True
    # no data-dependent Python branch under torch.compile (tests/test_compile.py): generate() compiles the
    # decode step with a static cache
    _can_compile_fullgraph = True
    # The SSM's decay and timestep parameters: Mamba-2's dt_bias, Mamba-1's dt_proj.bias.
    _keep_in_fp32_modules_strict = ["mamba.A_log", "mamba.D", "mamba.dt_bias", "mamba.dt_proj.bias"]
    _can_record_outputs = {"hidden_states": HybridMambaDecoderLayer, "attentions": HybridMambaAttention}

    @torch.no_grad()
    def _init_weights(self, module):
        # Linear and Embedding ~ N(0, initializer_range), norms to one, RoPE buffers
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, nn.Conv1d):
            # PyTorch's default for a depthwise conv, as mamba-ssm keeps it
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight.shape[1] * module.weight.shape[2])
                init.uniform_(module.bias, -bound, bound)

        if isinstance(module, (HybridMamba1Mixer, HybridMamba2Mixer)):
            cfg = self.config
            n = module.dt_bias.shape[0] if isinstance(module, HybridMamba2Mixer) else module.d_inner
            # dt ~ log-uniform in [dt_min, dt_max]; stored through the inverse softplus
            dt = torch.exp(
                torch.rand(n) * (math.log(cfg.mamba_dt_max) - math.log(cfg.mamba_dt_min)) + math.log(cfg.mamba_dt_min)
            ).clamp(min=cfg.mamba_dt_init_floor)
            inv_dt = dt + torch.log(-torch.expm1(-dt))
            init.ones_(module.D)
            if isinstance(module, HybridMamba2Mixer):
                init.copy_(module.dt_bias, inv_dt)
                init.copy_(module.A_log, torch.log(torch.empty(module.num_heads).uniform_(1, 16)))
            else:
                init.copy_(module.dt_proj.bias, inv_dt)
                dt_std = module.dt_rank**-0.5
                init.uniform_(module.dt_proj.weight, -dt_std, dt_std)
                A = torch.arange(1, module.d_state + 1, dtype=torch.float32).expand(module.d_inner, -1)
                init.copy_(module.A_log, torch.log(A))

        if self.config.rescale_prenorm_residual:
            # Projections writing into the residual stream: std / sqrt(residual branches), as GPT-2 and mamba-ssm
            cfg = self.config
            branches = cfg.num_hidden_layers + sum(
                cfg.layer_intermediate_size(i) > 0 for i in range(cfg.num_hidden_layers)
            )
            for name in ("out_proj", "o_proj", "down_proj"):
                proj = getattr(module, name, None)
                if isinstance(proj, nn.Linear):
                    init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(branches))

    if not hasattr(PreTrainedModel, "activation_checkpointing_enable"):  # the name before transformers 5.23

        def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None):
            self.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs)

    def no_weight_decay_parameter_names(self) -> set[str]:
        """Names of the parameters tagged `_no_weight_decay` (A_log, D, dt_bias)."""
        return {name for name, p in self.named_parameters() if getattr(p, "_no_weight_decay", False)}

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus the remote code: the folder loads with
        `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` without this repository."""
        self.config.auto_map = dict(REMOTE_CODE_AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_remote_code(save_directory)


class HybridMambaModel(HybridMambaPreTrainedModel):
    def __init__(self, config: HybridMambaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([HybridMambaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = HybridMambaRMSNorm(config.hidden_size, eps=config.rms_norm_eps, ops=config.mamba_ops)
        uses_rope = config.position_embedding_type == "rope" and "attention" in config.layer_types
        self.rotary_emb = HybridMambaRotaryEmbedding(config) if uses_rope else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""cache: a `Cache` from an earlier call (`past_key_values`, its name before transformers 5.24, is accepted too)."""
        cache = _one_cache(cache, past_key_values)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        b, t = inputs_embeds.shape[:2]
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        # A 2D mask without zeros carries no information: dropping it keeps the fast unmasked paths
        # (eager only: compiled graphs take no data-dependent branch, and the masked path is exact).
        if (
            attention_mask is not None
            and attention_mask.dim() == 2
            and not torch.compiler.is_compiling()
            and bool(attention_mask.all())
        ):
            attention_mask = None
        mask_2d = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        positions_given = position_ids is not None
        if position_ids is None:
            if mask_2d is not None:  # left padding: each row counts from its first real token
                position_ids = (mask_2d.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
            else:
                past = 0
                if cache is not None and "attention" in self.config.layer_types:
                    past = cache.get_seq_length()
                position_ids = torch.arange(past, past + t, device=inputs_embeds.device).unsqueeze(0)
        pad_mask = mask_2d[:, -t:].bool() if mask_2d is not None else None
        # Positions counted here from 0 or the cache with no padding make one segment per row.
        segmented = t > 1 and (positions_given or pad_mask is not None)
        seq_idx = segment_ids(position_ids.expand(b, -1), pad_mask) if segmented else None

        causal_mask = None
        if "attention" in self.config.layer_types:
            mask_cache = cache
            if (
                seq_idx is not None
                and attention_mask is None
                and mask_cache is not None
                and mask_cache.get_seq_length() == 0
            ):
                # Packed documents in a first forward: transformers builds the block-causal mask only
                # when it sees no cache.
                mask_cache = None
            causal_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                **{_MASK_CACHE_KWARG: mask_cache},
            )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids) if self.rotary_emb is not None else None

        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                pad_mask=pad_mask,
                **{CACHE_NAME: cache},
                seq_idx=seq_idx,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_NAME: cache})


class HybridMambaForCausalLM(HybridMambaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: HybridMambaConfig):
        super().__init__(config)
        self.model = HybridMambaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""labels (B, T): next-token targets are `labels` shifted inside the loss; -100 is ignored.
        cache: a `Cache` from an earlier call (`past_key_values`, its name before transformers 5.24, is accepted too)."""
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_one_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_NAME: _cache_of(outputs)},
        )

    def prepare_inputs_for_generation(
        self, input_ids, cache=None, inputs_embeds=None, past_key_values=None, cache_params=None, **kwargs
    ):
        # generate() passes the cache as `cache` (>= 5.24) or `past_key_values`; before 5.24 it filed the
        # cache of a class named "*mamba*" under `cache_params`. `inputs_embeds` is named so that generate()
        # knows the prompt may come as embeddings.
        cache = _one_cache(cache, past_key_values)
        if cache is None:
            cache = cache_params
        return super().prepare_inputs_for_generation(
            input_ids, inputs_embeds=inputs_embeds, **{CACHE_NAME: cache}, **kwargs
        )


class HybridMambaForSequenceClassification(GenericForSequenceClassification, HybridMambaPreTrainedModel):
    pass


# Remote code

REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_hybrid_mamba.HybridMambaConfig",
    "AutoModel": "modeling_hybrid_mamba.HybridMambaModel",
    "AutoModelForCausalLM": "modeling_hybrid_mamba.HybridMambaForCausalLM",
    "AutoModelForSequenceClassification": "modeling_hybrid_mamba.HybridMambaForSequenceClassification",
}


def write_remote_code(save_directory) -> list[Path]:
    """Copy this file and the configuration file into `save_directory` (the model's remote code)."""
    import inspect
    import shutil

    out = Path(save_directory)
    written = []
    for obj, name in (
        (HybridMambaConfig, "configuration_hybrid_mamba.py"),
        (HybridMambaModel, "modeling_hybrid_mamba.py"),
    ):
        src = Path(inspect.getsourcefile(obj))
        dst = out / name
        if src.resolve() != dst.resolve():
            tmp = dst.with_suffix(".py.tmp")
            shutil.copyfile(src, tmp)
            tmp.replace(dst)
        written.append(dst)
    return written


__all__ = [
    "HybridMambaPreTrainedModel",
    "HybridMambaModel",
    "HybridMambaForCausalLM",
    "HybridMambaForSequenceClassification",
    "HybridMamba1Mixer",
    "HybridMamba2Mixer",
    "HybridMambaAttention",
    "MAMBA_OPS",
    "causal_conv1d_ref",
    "ssd_scan_ref",
    "rms_norm_ref",
    "causal_conv1d",
    "ssd_scan",
    "rms_norm",
    "selective_scan",
    "selective_scan_ref",
    "segment_ids",
    "write_remote_code",
]
