"""Memory and time planner: can a preset be trained on N GPUs of M GiB, and if not, what would it take?

    python -m hybrid_mamba.trainers.plan --preset 13b --gpus 2 --gpu-memory 24
    python -m hybrid_mamba.trainers.plan --preset 1.3b --gpus 8 --gpu-memory 80 --micro-batch 8 --activation-checkpointing \\
        --tokens 2.6e10 --mfu 0.4 --peak-tflops 989 --json plan.json
    python -m hybrid_mamba.trainers.plan --preset tiny --device cpu --precision fp32 --micro-batch 2 --seq-len 256 --gpu-memory 16

Models the run of trainers/loop.py: AdamW, FSDP2 through accelerate (trainers/accelerate/fsdp.yaml: full
shard over --gpus, one unit per decoder layer plus the root), bf16 autocast or fp32, optional activation
checkpointing of every decoder layer (non-reentrant) and CPU offload (fsdp_offload.yaml). Prints per-GPU
memory at the peak of a training step (weights, gradients, optimizer state, activations, FSDP buffers,
overhead), a verdict with the margin, what it takes when it does not fit, the host RAM, and the time
for a token budget.

Assumptions, each a named constant below and printed with every plan:
- Bytes per parameter: 16, sharded over the GPUs. FSDP2 keeps the sharded parameters in fp32 (accelerate
  upcasts them; they are the master weights, 4), their gradients in fp32 (reduced in bf16 and stored in
  the parameter's dtype, 4) and AdamW's exp_avg and exp_avg_sq in the parameter's dtype (8). bf16
  exists only in the unsharded copies of the units being computed (FSDP buffers below). fp32 runs have
  the same 16 bytes, with fp32 unsharded copies.
- FSDP buffers: the root unit (embedding, tied lm_head, norms) stays unsharded from its forward to the
  end of the backward, with its unsharded gradient; of the decoder layers, the one computing and the
  one prefetched are unsharded, with one unsharded gradient.
- Activations: derived per layer type from config.layer_types by `activation_bytes_per_token`, for the
  pure-torch path of the model (what runs on CPU and without mamba-ssm), whose Mamba-2 scan keeps only
  its inputs and the chunk states and recomputes the rest in its backward, as mamba-ssm's kernels do.
- Overhead: CUDA context, cuBLAS/NCCL workspaces (CUDA_CONTEXT_GIB) plus allocator fragmentation
  (FRAGMENTATION of activations and FSDP buffers); on CPU only the runtime's own memory (CPU_RUNTIME_MIB).

The CPU mode is checked against the measured peak RSS of real training steps in tests/test_plan.py.
"""

import dataclasses
import inspect
import itertools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hybrid_mamba.common.args import parse_args
from hybrid_mamba.configuration import get_preset
from hybrid_mamba.configuration.param_counts import count_parameters

logger = logging.getLogger(__name__)

GiB = 2**30
MiB = 2**20
FP32 = 4
COMPUTE_BYTES = {"bf16": 2, "fp32": 4}

# Persistent per-parameter state, sharded over the GPUs (or moved to host RAM by CPU offload).
MASTER_WEIGHT_BYTES = 4  # fp32 sharded parameters
GRADIENT_BYTES = 4  # fp32 sharded gradients
ADAMW_BYTES = 8  # exp_avg + exp_avg_sq, fp32
# AdamW's foreach step on CUDA builds sqrt(exp_avg_sq) for the whole decay group: one fp32 copy.
FOREACH_STEP_BYTES = 4
# Fixed costs.
CUDA_CONTEXT_GIB = 1.0  # CUDA context and kernel images (~0.5 GiB), cuBLAS workspaces, NCCL buffers
FRAGMENTATION = 0.10  # caching-allocator slack on activations and FSDP buffers (reserved over allocated)
# CPU runtime touched by the first training steps (thread stacks, small-block heap): anonymous peak RSS over
# the built model of 2 steps of the debug preset at 1 x 32 tokens, whose tensors need ~2 MiB. Library code
# pages the steps map in (25-75 MiB, depending on the page cache) are file-backed and reclaimable: not counted.
CPU_RUNTIME_MIB = 4
HOST_RUNTIME_GIB = 4.0  # per GPU process on the host: Python, torch and CUDA libraries, data loader


@dataclass
class PlanArgs:
    """What to train and on what. Sizes are per GPU; --gpu-memory is host RAM for --device cpu."""

    preset: str = field(metadata={"help": "Preset from configuration/presets.yaml (debug, tiny, ..., 13b)."})
    gpus: int = field(
        default=1, metadata={"help": "GPUs; FSDP shards parameters, gradients and AdamW state over all of them."}
    )
    gpu_memory: float = field(
        default=80.0, metadata={"help": "Memory of one GPU in GiB (24 for a 24 GB card, 80 for an H100)."}
    )
    micro_batch: int = field(default=1, metadata={"help": "Sequences per GPU per forward."})
    seq_len: int = field(default=2048, metadata={"help": "Tokens per sequence."})
    precision: Literal["bf16", "fp32"] = field(
        default="bf16", metadata={"help": "bf16: FSDP2 bf16 compute with fp32 master weights; fp32: everything fp32."}
    )
    activation_checkpointing: bool = field(
        default=False, metadata={"help": "Keep only each decoder layer's input; recompute the layer in backward."}
    )
    cpu_offload: bool = field(
        default=False,
        metadata={"help": "FSDP2 CPU offload: sharded parameters, gradients and AdamW state in host RAM."},
    )
    optimizer: Literal["adamw"] = field(default="adamw", metadata={"help": "Optimizer (the loop uses AdamW)."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per step; above 1 the gradients are held during every backward."}
    )
    packed: bool = field(
        default=True,
        metadata={
            "help": "Rows pack several documents (position_ids restart, as data_scripts writes them): document masks."
        },
    )
    device: Literal["cuda", "cpu"] = field(
        default="cuda",
        metadata={
            "help": "cuda: FSDP2 on GPUs; cpu: one fp32 process, no FSDP and no CUDA overheads (what the tests measure)."
        },
    )
    tokens: float | None = field(default=None, metadata={"help": "Token budget of the run, for the time estimate."})
    tokens_per_s: float | None = field(
        default=None, metadata={"help": "Training throughput of the whole run (all GPUs), tokens/s."}
    )
    mfu: float | None = field(
        default=None,
        metadata={"help": "Model FLOPs utilisation; with --peak-tflops gives tokens/s from FLOPs per token."},
    )
    peak_tflops: float | None = field(
        default=None,
        metadata={"help": "Peak dense TFLOP/s of one GPU in the chosen precision (989 for an H100 in bf16)."},
    )
    json_out: str | None = field(
        default=None, metadata={"aliases": ["--json"], "help": "Also write the plan to this JSON file."}
    )

    def __post_init__(self):
        for name in ("gpus", "micro_batch", "seq_len", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if self.gpu_memory <= 0:
            raise ValueError(f"--gpu-memory must be positive (GiB), got {self.gpu_memory}.")
        if self.device == "cpu" and (self.gpus != 1 or self.cpu_offload or self.precision != "fp32"):
            raise ValueError(
                "--device cpu models one fp32 process without FSDP: use --gpus 1 --precision fp32, no --cpu-offload."
            )
        if self.tokens_per_s is not None and (self.mfu is not None or self.peak_tflops is not None):
            raise ValueError("Give either --tokens-per-s or --mfu with --peak-tflops, not both.")
        if (self.mfu is None) != (self.peak_tflops is None):
            raise ValueError("--mfu and --peak-tflops go together: tokens/s = mfu * peak * gpus / FLOPs per token.")
        if self.mfu is not None and not 0 < self.mfu <= 1:
            raise ValueError(f"--mfu is a fraction in (0, 1], got {self.mfu}.")


def activation_bytes_per_token(
    config, kind: str, seq_len: int, act_bytes: int, packed: bool, device: str = "cuda", layer_idx: int | None = None
) -> tuple[float, float]:
    """Bytes per token that one `kind` keeps for backward, and the extra bytes its backward needs at once.

    `kind` is a mixer ("attention", "mamba1", "mamba2"), "mlp", or "head" (final norm, logits and the
    loss, plus the model-wide tensors). Counted from the model's forward on the pure-torch path: every
    tensor autograd saves, once per storage (a view keeps its whole base alive). `act_bytes` is the
    compute dtype (2 under bf16 autocast, where linear, conv and matmul outputs and operands are bf16);
    tensors the code upcasts stay fp32 (f). Shapes: B batch, T tokens, D hidden, E Mamba inner size,
    H heads, P head size, G groups, N state size, K conv width, L chunk length, C chunks, V vocabulary.
    The backward extra is two copies of the largest per-token tensor (its gradient and the gradient
    flowing out of it), or what cross-entropy's backward allocates. `device` picks the Mamba-2 scan's
    chunk length (on CPU, at most the modeling file's CPU_CHUNK_SIZE). `layer_idx` reads that layer's MLP
    and Mamba widths (a pruned model's `intermediate_size_per_layer`, `mamba_d_inner_per_layer`); without it,
    the global widths.
    """
    per_kind = {
        "mlp": _mlp_bytes,
        "attention": _attention_bytes,
        "mamba2": _mamba2_bytes,
        "mamba1": _mamba1_bytes,
        "head": _head_bytes,
    }
    if kind not in per_kind:
        raise ValueError(f"Unknown kind {kind!r}: one of attention, mamba1, mamba2, mlp, head.")
    a = act_bytes
    # RMSNorm (a hand-written backward): its input, the rsqrt statistic (B, T, 1) in fp32, and the
    # output (the next linear layer's input).
    norm = 2 * a * config.hidden_size + FP32
    if layer_idx is None:
        inter, E = config.intermediate_size, config.mamba_d_inner
    else:
        inter, E = config.layer_intermediate_size(layer_idx), config.layer_mamba_d_inner(layer_idx)
    return per_kind[kind](config, a, norm, T=seq_len, packed=packed, device=device, inter=inter, E=E)


def _mlp_bytes(config, a: int, norm: float, inter: int, **_) -> tuple[float, float]:
    saved = norm + 4 * a * inter  # gate, silu(gate), up, silu(gate) * up (down_proj's input)
    return saved, 2 * a * inter


def _attention_bytes(config, a: int, norm: float, T: int, packed: bool, **_) -> tuple[float, float]:
    f = FP32
    hq, hkv, p = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    # A document mask makes transformers give SDPA repeat_kv copies of k and v (no GQA kernel).
    kv = hq if packed else hkv
    # q and k after RoPE, v, the SDPA output (B, T, Hq*P) that o_proj reads, fp32 log-sum-exp
    # (B, Hq, T): SDPA's flash / memory-efficient kernels keep no T x T matrix.
    saved = norm + a * p * (2 * hq + 2 * kv) + f * hq
    if packed:
        saved += a * T  # the block-causal mask (B, 1, T, T), converted to the query dtype per call
    # Backward: gradients of the output, q, k and v, and an fp32 accumulator for q's (flash kernels).
    return saved, a * p * (2 * hq + 2 * kv) + f * p * hq


def _mamba2_bytes(config, a: int, norm: float, T: int, device: str, E: int, **_) -> tuple[float, float]:
    from hybrid_mamba.modeling.modeling_hybrid_mamba import CPU_CHUNK_SIZE

    f = FP32
    H, G, N = E // config.mamba_head_dim, config.mamba_n_groups, config.mamba_d_state
    conv = E + 2 * G * N
    L = min(config.mamba_chunk_size, T) if device == "cuda" else min(config.mamba_chunk_size, CPU_CHUNK_SIZE, T)
    C = math.ceil(T / L)
    saved = norm
    # in_proj output [z, xBC, dt], kept whole by the views of it that the conv (xBC) and the gated
    # norm (z) keep. The conv + SiLU keeps nothing else: its backward recomputes the rest.
    saved += a * (2 * E + 2 * G * N + H)
    # The scan keeps its inputs, the state entering each chunk (B, C, H, P, N) and the entering
    # states' share of its output (B, T, H, P), and recomputes every within-chunk tensor in its
    # backward: x, B, C in fp32 (silu's output, or fp32 copies of it under bf16), dt + bias,
    # softplus and the clamped dt (B, T, H).
    saved += f * conv + 3 * f * H + f * E * N * C / T + f * E
    # Gated RMSNorm (a hand-written backward): y in the compute dtype, the output (out_proj's
    # input), rsqrt per group in fp32; z is a view of in_proj's output.
    saved += 2 * a * E + f * G
    # Backward: the two (B, C, H, L, L) decay tensors of the within-chunk step (recomputed decays
    # and their gradient) are its largest transients; the measured peaks in tests/test_plan.py
    # agree with this within their tolerance.
    extra = 2 * H * L * C * L / T
    return saved, f * extra


def _mamba1_bytes(config, a: int, norm: float, T: int, packed: bool, E: int, **_) -> tuple[float, float]:
    from hybrid_mamba.modeling.modeling_hybrid_mamba import selective_scan

    f = FP32
    low = a < f  # bf16: upcasts make fp32 copies where fp32 runs reuse the tensor
    N, R = config.mamba_d_state, config.mamba_dt_rank
    chunk = inspect.signature(selective_scan).parameters["chunk_size"].default  # the mixer calls it with the default
    saved = norm + a * 2 * E  # in_proj output [x, z]
    saved += a * E + a * (R + 2 * N)  # x_proj's input u = silu(conv) (contiguous), its output [dt, B, C]
    saved += 2 * f * E  # dt_proj output in fp32, softplus(dt)
    saved += f * (E + 2 * N) if low else 0  # fp32 copies of u, B and C for the scan under bf16
    # The scan (SelectiveScan, a hand-written backward) keeps its inputs and the (B, E, N) fp32 state
    # entering each chunk, and a bool segment start per token when documents are packed.
    saved += f * E * N * math.ceil(T / chunk) / T + (1 if packed else 0)
    saved += 3 * a * E  # y, silu(z), y * silu(z) (out_proj's input)
    # Backward: one chunk's recomputed decays, inputs and states, and the state gradients, (l, B, E, N) fp32.
    return saved, 5 * f * E * N * min(chunk, T) / T


def _head_bytes(config, a: int, norm: float, **_) -> tuple[float, float]:
    f, V = FP32, config.vocab_size
    low = a < f
    # Final norm, the fp32 log-softmax (B*T, V) that cross-entropy keeps, input ids and shifted
    # labels (int64), RoPE cos and sin (B, T, P) when attention layers use RoPE.
    saved = norm + f * V + 16
    if config.position_embedding_type == "rope" and "attention" in config.layer_types:
        saved += 2 * a * config.head_dim
    # Backward: the gradients of the log-softmax output and of the fp32 logits, and the logits'
    # gradient in the compute dtype under bf16.
    return saved, 2 * f * V + (a * V if low else 0)


@dataclass
class Breakdown:
    """Bytes on one device at one moment of the step."""

    phase: str
    weights: float
    gradients: float
    optimizer: float
    activations: float
    fsdp_buffers: float
    overhead: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.fsdp_buffers + self.overhead


@dataclass
class Plan:
    """The estimate for `args`: the peak moment, every moment considered, and host RAM."""

    args: PlanArgs
    params: dict  # count_parameters(config), plus the root unit, the largest layer unit and the layer kinds
    peak: Breakdown
    phases: list[Breakdown]
    host_ram: float  # bytes on the host for all GPUs of one machine (offloaded state + processes)
    startup_host_ram: float  # bytes while trainers/pretrain.py builds the fp32 model in every process

    @property
    def capacity(self) -> float:
        return self.args.gpu_memory * GiB

    @property
    def fits(self) -> bool:
        return self.peak.total <= self.capacity

    @property
    def margin(self) -> float:
        """Free bytes at the peak (negative: short by that much)."""
        return self.capacity - self.peak.total


def layer_parameters(config, counts: dict) -> tuple[list[float], float]:
    """Parameters of each decoder layer (its mixer and MLP) and of the root FSDP unit (the rest).

    Mixers of one kind share their count; Mamba-1 and Mamba-2 layers in one stack share the Mamba count
    evenly. Layer norms are left in the root: a few thousand parameters per layer. A pruned model (widths
    per layer) is counted layer by layer on the meta device.
    """
    if config.intermediate_size_per_layer is not None or config.mamba_d_inner_per_layer is not None:
        from hybrid_mamba.configuration.param_counts import meta_model
        from hybrid_mamba.modeling.modeling_hybrid_mamba import HybridMambaForCausalLM

        per_layer = []
        for layer in meta_model(HybridMambaForCausalLM, config).model.layers:
            mixer = layer.self_attn if layer.mixer_type == "attention" else layer.mamba
            mlp = layer.mlp.parameters() if layer.mlp is not None else ()
            per_layer.append(sum(p.numel() for p in mixer.parameters()) + sum(p.numel() for p in mlp))
        return per_layer, counts["total"] - sum(per_layer)
    kinds = [config.mixer_type(i) for i in range(config.num_hidden_layers)]
    n_attn = sum(k == "attention" for k in kinds)
    n_mamba = len(kinds) - n_attn
    mlp = counts["mlp"] / len(kinds)
    per_layer = [(counts["attention"] / n_attn if k == "attention" else counts["mamba"] / n_mamba) + mlp for k in kinds]
    return per_layer, counts["total"] - sum(per_layer)


def estimate(args: PlanArgs, config=None, counts: dict | None = None) -> Plan:
    """Peak per-device memory of one training step under `args` (see the module docstring)."""
    config = config or get_preset(args.preset)
    if args.seq_len > config.max_position_embeddings:
        raise ValueError(
            f"--seq-len {args.seq_len} exceeds the preset's max_position_embeddings {config.max_position_embeddings}."
        )
    counts = counts or count_parameters(config)
    P, g = counts["total"], args.gpus
    a = COMPUTE_BYTES[args.precision]
    tokens = args.micro_batch * args.seq_len
    cuda = args.device == "cuda"

    layers, root = layer_parameters(config, counts)

    def per_token(kind: str, i: int | None = None) -> tuple[float, float]:
        return activation_bytes_per_token(config, kind, args.seq_len, a, args.packed, args.device, layer_idx=i)

    saved, extra = [], []
    for i in range(config.num_hidden_layers):
        s, x = per_token(config.mixer_type(i), i)
        if config.layer_intermediate_size(i) > 0:
            mlp = per_token("mlp", i)
            s, x = s + mlp[0], max(x, mlp[1])
        saved.append(s * tokens)
        extra.append(x * tokens)
    head_saved, head_extra = (v * tokens for v in per_token("head"))
    kept_input = a * config.hidden_size * tokens  # a checkpointed layer keeps only its input (B, T, D)

    # Persistent state on the device (none with CPU offload: it lives in host RAM).
    on_device = 0 if args.cpu_offload else 1
    weights = MASTER_WEIGHT_BYTES * P / g * on_device
    optimizer = ADAMW_BYTES * P / g * on_device
    grad_bytes = GRADIENT_BYTES / g * on_device
    # FSDP2: root unit unsharded (params and gradient) through the backward; the decoder layer
    # computing and the one prefetched unsharded, with one unsharded gradient.
    unit = max(layers)
    buffers = (root * 2 * a + unit * 3 * a) if cuda else 0.0

    def overhead(activations: float, fsdp: float) -> float:
        if not cuda:
            return CPU_RUNTIME_MIB * MiB
        return CUDA_CONTEXT_GIB * GiB + FRAGMENTATION * (activations + fsdp)

    def at(phase, grads, activations, fsdp=buffers, opt=optimizer):
        return Breakdown(phase, weights, grads, opt, activations, fsdp, overhead(activations, fsdp))

    held = P if args.gradient_accumulation_steps > 1 else 0  # gradients of earlier micro-batches
    phases = []
    # Backward of the loss: everything the forward kept, plus cross-entropy's gradients.
    kept = kept_input * len(saved) if args.activation_checkpointing else sum(saved)
    phases.append(at("backward: loss and lm_head", grad_bytes * held, kept + head_saved + head_extra))
    # Backward of each decoder layer, last to first: the layers below it still hold their activations
    # (or inputs), the layer itself its saved tensors (recomputed under checkpointing) and its extra.
    below = list(itertools.accumulate(saved))  # saved tensors of layers 0..i
    done = root  # lm_head's gradient is the root's, made first
    for i in reversed(range(config.num_hidden_layers)):
        done += layers[i]
        if args.activation_checkpointing:
            act = kept_input * (i + 1) + saved[i] + extra[i]
        else:
            act = below[i] + extra[i]
        phases.append(at(f"backward: layer {i} ({config.mixer_type(i)})", grad_bytes * max(done, held), act))
    # Optimizer step: all gradients, AdamW's state (made at the first step) and the update's temporaries.
    if cuda and not args.cpu_offload:
        step_tmp = FOREACH_STEP_BYTES * P / g
    elif not cuda:
        step_tmp = 2 * FP32 * counts["embedding"]  # single-tensor AdamW: sqrt and denominator of the largest tensor
    else:
        step_tmp = 0.0  # offloaded: the step runs on the host
    phases.append(at("optimizer step", grad_bytes * P, 0.0, fsdp=0.0, opt=optimizer + step_tmp * on_device))
    peak = max(phases, key=lambda b: b.total)

    host = 0.0
    if cuda:
        offloaded = (MASTER_WEIGHT_BYTES + GRADIENT_BYTES + ADAMW_BYTES) * P if args.cpu_offload else 0.0
        host = offloaded + HOST_RUNTIME_GIB * GiB * g
    startup = MASTER_WEIGHT_BYTES * P * g if cuda else 0.0
    logger.debug("plan %s: peak %.2f GiB in %s", args.preset, peak.total / GiB, peak.phase)
    params = {
        **counts,
        "root": root,
        "unit": unit,
        "layer_kinds": [config.mixer_type(i) for i in range(config.num_hidden_layers)],
    }
    return Plan(args, params, peak, phases, host, startup)


def _fits(args: PlanArgs, config, counts) -> Plan | None:
    try:
        plan = estimate(args, config, counts)
    except ValueError:
        return None
    return plan if plan.fits else None


def search_fixes(args: PlanArgs, config=None, counts=None) -> list[tuple[str, Plan]]:
    """The smallest combinations of {checkpointing, CPU offload, micro-batch 1, shorter seq-len} that fit.

    Tries single changes, then pairs, and so on, and returns every combination of the first size that
    fits; a shorter sequence is the longest of seq_len/2, seq_len/4, ... (down to 64) that fits.
    """
    config = config or get_preset(args.preset)
    counts = counts or count_parameters(config)
    options = []
    if not args.activation_checkpointing:
        options.append(("activation checkpointing", {"activation_checkpointing": True}))
    if not args.cpu_offload and args.device == "cuda":
        options.append(("CPU offload", {"cpu_offload": True}))
    if args.micro_batch > 1:
        options.append(("micro-batch 1", {"micro_batch": 1}))
    options.append(("shorter seq-len", None))
    for size in range(1, len(options) + 1):
        found = []
        for combo in itertools.combinations(options, size):
            changes = {}
            for _, change in combo:
                changes.update(change or {})
            trial = dataclasses.replace(args, **changes)
            if any(change is None for _, change in combo):
                seq = args.seq_len // 2
                while seq >= 64 and not _fits(dataclasses.replace(trial, seq_len=seq), config, counts):
                    seq //= 2
                if seq < 64:
                    continue
                trial = dataclasses.replace(trial, seq_len=seq)
            plan = _fits(trial, config, counts)
            if plan:
                names = [n if n != "shorter seq-len" else f"seq-len {trial.seq_len}" for n, _ in combo]
                found.append((" + ".join(names), plan))
        if found:
            return found
    return []


def min_gpus(args: PlanArgs, config=None, counts=None, limit: int = 4096) -> int | None:
    """The fewest GPUs of --gpu-memory that fit `args` (per-GPU memory falls as GPUs are added)."""
    config = config or get_preset(args.preset)
    counts = counts or count_parameters(config)
    if args.device != "cuda" or not _fits(dataclasses.replace(args, gpus=limit), config, counts):
        return None
    lo, hi = 1, limit  # the answer lies in (lo - 1, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if _fits(dataclasses.replace(args, gpus=mid), config, counts):
            hi = mid
        else:
            lo = mid + 1
    return hi


def training_time(args: PlanArgs, config) -> dict | None:
    """Seconds for --tokens at --tokens-per-s, or at mfu * peak * gpus / FLOPs per token (trainers.loop)."""
    if args.tokens is None:
        return None
    out = {"tokens": args.tokens}
    if args.mfu is not None:
        import torch

        from hybrid_mamba.modeling import HybridMambaForCausalLM
        from hybrid_mamba.trainers.loop import flops_per_token

        with torch.device("meta"):
            model = HybridMambaForCausalLM(config)
        fpt = flops_per_token(model, args.seq_len)
        out.update(flops_per_token=fpt, tokens_per_s=args.mfu * args.peak_tflops * 1e12 * args.gpus / fpt)
    elif args.tokens_per_s is not None:
        out["tokens_per_s"] = args.tokens_per_s
    else:
        return out
    out["seconds"] = args.tokens / out["tokens_per_s"]
    out["gpu_hours"] = out["seconds"] * args.gpus / 3600
    return out


# Report


def _gib(x: float) -> str:
    return f"{x / GiB:,.2f} GiB"


def _verdict(plan: Plan) -> str:
    m, cap = plan.margin, plan.capacity
    need = f"needs {_gib(plan.peak.total)} of {plan.args.gpu_memory:g} GiB per {'GPU' if plan.args.device == 'cuda' else 'device'}"
    if m >= 0:
        return f"FITS: {need}, {_gib(m)} ({100 * m / cap:.1f}%) free"
    return f"DOES NOT FIT: {need}, {_gib(-m)} ({100 * -m / cap:.1f}%) over"


def _setting(args: PlanArgs) -> str:
    parts = [
        f"{args.gpus} x {args.gpu_memory:g} GiB {'GPU' if args.device == 'cuda' else 'CPU'}",
        f"micro-batch {args.micro_batch} x seq-len {args.seq_len}",
        args.precision,
        "activation checkpointing" if args.activation_checkpointing else "no checkpointing",
        "CPU offload" if args.cpu_offload else "no offload",
        "packed documents" if args.packed else "one document per row",
    ]
    if args.gradient_accumulation_steps > 1:
        parts.append(f"gradient accumulation {args.gradient_accumulation_steps}")
    return ", ".join(parts)


def _duration(seconds: float) -> str:
    return f"{seconds / 86400:,.1f} days" if seconds >= 86400 else f"{seconds / 3600:,.2f} hours"


def _parts(b: Breakdown) -> str:
    return (
        f"weights {_gib(b.weights)}, gradients {_gib(b.gradients)}, optimizer {_gib(b.optimizer)}, "
        f"activations {_gib(b.activations)}, FSDP buffers {_gib(b.fsdp_buffers)}, overhead {_gib(b.overhead)}"
    )


def _state_bytes(plan: Plan) -> tuple[int, float]:
    """Bytes per parameter of weights, gradients and AdamW state, and their total."""
    per_param = MASTER_WEIGHT_BYTES + GRADIENT_BYTES + ADAMW_BYTES
    return per_param, per_param * plan.params["total"]


def _assumptions(plan: Plan) -> list[str]:
    args, p = plan.args, plan.params
    cuda = args.device == "cuda"
    per_param, state = _state_bytes(plan)
    kinds = p["layer_kinds"]
    layout = ", ".join(f"{kinds.count(k)} {k}" for k in sorted(set(kinds)))
    lines = [
        "Assumptions:",
        f"  state: {MASTER_WEIGHT_BYTES} (fp32 master weights) + {GRADIENT_BYTES} (fp32 gradients) + {ADAMW_BYTES} (AdamW moments, fp32)"
        f" = {per_param} bytes/parameter = {_gib(state)}, {_gib(state / args.gpus)} per {'GPU' if cuda else 'process'}"
        + (" in host RAM (CPU offload)" if args.cpu_offload else ""),
    ]
    if cuda:
        lines.append(
            f"  FSDP buffers: root unit ({p['root'] / 1e6:,.0f}M: embedding, lm_head, norms) unsharded with its gradient,"
            f" 2 decoder layers unsharded and 1 layer gradient ({p['unit'] / 1e6:,.0f}M each),"
            f" {COMPUTE_BYTES[args.precision]} bytes each"
        )
        lines.append(
            f"  overhead: {CUDA_CONTEXT_GIB:g} GiB CUDA context and workspaces + {FRAGMENTATION:.0%} allocator fragmentation"
            " of activations and FSDP buffers"
        )
    else:
        lines.append(f"  overhead: {CPU_RUNTIME_MIB} MiB CPU runtime (no CUDA context, no FSDP buffers)")
    lines.append(
        f"  activations: per layer type ({layout} layers), pure-torch path in {args.precision}"
        + (" (an upper bound for Mamba layers run by mamba-ssm kernels)" if cuda else "")
    )
    return lines


def _peak_lines(plan: Plan) -> list[str]:
    args = plan.args
    cuda = args.device == "cuda"
    _, state = _state_bytes(plan)
    b = plan.peak
    lines = [f"Per-{'GPU' if cuda else 'device'} memory at the peak ({b.phase}):"]
    rows = [
        ("weights", b.weights),
        ("gradients", b.gradients),
        ("optimizer state", b.optimizer),
        ("activations", b.activations),
        ("FSDP buffers", b.fsdp_buffers),
        ("overhead", b.overhead),
        ("total", b.total),
        ("available", plan.capacity),
    ]
    lines += [f"  {name:<16}{_gib(v):>16}" for name, v in rows]
    if plan.phases[-1] is not b:
        lines.append(f"  (optimizer step: {_gib(plan.phases[-1].total)}; loss backward: {_gib(plan.phases[0].total)})")
    lines += ["", _verdict(plan)]
    if cuda:
        offloaded = f"{_gib(state)} offloaded state + " if args.cpu_offload else ""
        lines.append(
            f"Host RAM: {_gib(plan.host_ram)} for {args.gpus} GPU process(es) ({offloaded}{HOST_RUNTIME_GIB:g} GiB per process);"
            f" {_gib(plan.startup_host_ram)} at startup, while trainers/pretrain.py builds the fp32 model in every process"
        )
    return lines


def _fix_lines(plan: Plan, fixes, gpus_needed, gpus_needed_ckpt) -> list[str]:
    args = plan.args
    cuda = args.device == "cuda"
    lines = [""]
    if fixes:
        lines.append("What fits instead (smallest change):")
        for name, fix in fixes:
            lines.append(
                f"  {name}: {_gib(fix.peak.total)} per GPU, {_gib(fix.margin)} ({100 * fix.margin / fix.capacity:.0f}%) free"
            )
            lines.append(f"    {_parts(fix.peak)}; host RAM {_gib(fix.host_ram)}")
    else:
        lines.append("No combination of checkpointing, CPU offload, micro-batch 1 and a shorter sequence fits.")
    if cuda:
        mem = f"{args.gpu_memory:g} GiB"
        lines.append(f"Fewest GPUs of {mem} with these settings: {gpus_needed or 'none up to 4096'}")
        if not args.activation_checkpointing:
            lines.append(f"Fewest GPUs of {mem} with activation checkpointing: {gpus_needed_ckpt or 'none up to 4096'}")
    return lines


def _time_lines(plan: Plan, time: dict) -> list[str]:
    args = plan.args
    lines = [""]
    if "seconds" not in time:
        lines.append(f"Time for {time['tokens']:.3g} tokens: give --tokens-per-s, or --mfu and --peak-tflops.")
    else:
        src = "given"
        if "flops_per_token" in time:
            src = (
                f"{args.mfu:g} MFU x {args.peak_tflops:g} TFLOP/s x {args.gpus} GPU(s) / {time['flops_per_token'] / 1e9:.1f} GFLOP"
                " per token, 6N + attention as trainers.loop.flops_per_token"
            )
        lines.append(f"Time for {time['tokens']:.3g} tokens at {time['tokens_per_s']:,.0f} tokens/s ({src}):")
        lines.append(f"  {_duration(time['seconds'])} ({time['gpu_hours']:,.0f} GPU-hours)")
    return lines


def render(plan: Plan, fixes=None, gpus_needed=None, gpus_needed_ckpt=None, time=None) -> str:
    """The plan as the CLI prints it."""
    args, p = plan.args, plan.params
    lines = [
        f"Plan for preset {args.preset}: {p['total'] / 1e9:.2f}B parameters ({p['non_embedding'] / 1e9:.2f}B non-embedding)",
        f"  {_setting(args)}",
        "",
        *_assumptions(plan),
        "",
        *_peak_lines(plan),
    ]
    if fixes is not None:
        lines += _fix_lines(plan, fixes, gpus_needed, gpus_needed_ckpt)
    if time is not None:
        lines += _time_lines(plan, time)
    return "\n".join(lines)


def to_json(plan: Plan, fixes, gpus_needed, gpus_needed_ckpt, time) -> dict:
    def breakdown(b: Breakdown) -> dict:
        return {**dataclasses.asdict(b), "total": b.total}

    return {
        "args": dataclasses.asdict(plan.args),
        "parameters": plan.params,
        "assumptions": {
            "bytes_per_parameter": {
                "master_weights": MASTER_WEIGHT_BYTES,
                "gradients": GRADIENT_BYTES,
                "adamw": ADAMW_BYTES,
            },
            "foreach_step_bytes_per_parameter": FOREACH_STEP_BYTES,
            "cuda_context_gib": CUDA_CONTEXT_GIB,
            "fragmentation": FRAGMENTATION,
            "cpu_runtime_mib": CPU_RUNTIME_MIB,
            "host_runtime_gib_per_process": HOST_RUNTIME_GIB,
        },
        "peak": breakdown(plan.peak),
        "phases": [breakdown(b) for b in plan.phases],
        "capacity_bytes": plan.capacity,
        "fits": plan.fits,
        "margin_bytes": plan.margin,
        "margin_percent": 100 * plan.margin / plan.capacity,
        "host_ram_bytes": plan.host_ram,
        "startup_host_ram_bytes": plan.startup_host_ram,
        "fixes": [
            {"change": n, "peak": breakdown(f.peak), "margin_bytes": f.margin, "host_ram_bytes": f.host_ram}
            for n, f in fixes or []
        ],
        "min_gpus": gpus_needed,
        "min_gpus_with_checkpointing": gpus_needed_ckpt,
        "time": time,
    }


def main(argv=None) -> dict:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    args = parse_args(PlanArgs, argv)
    config = get_preset(args.preset)
    counts = count_parameters(config)
    plan = estimate(args, config, counts)
    fixes = gpus_needed = gpus_needed_ckpt = None
    if not plan.fits:
        fixes = search_fixes(args, config, counts)
        gpus_needed = min_gpus(args, config, counts)
        if not args.activation_checkpointing:
            gpus_needed_ckpt = min_gpus(dataclasses.replace(args, activation_checkpointing=True), config, counts)
    time = training_time(args, config)
    print(render(plan, fixes, gpus_needed, gpus_needed_ckpt, time))
    result = to_json(plan, fixes, gpus_needed, gpus_needed_ckpt, time)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
