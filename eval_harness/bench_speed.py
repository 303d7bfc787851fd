"""Speed and memory of HybridMambaForCausalLM against transformers baselines of matched size.

    python -m hybrid_mamba.eval_harness.bench_speed [--out results/bench_speed] [--threads 2] [--quick]
    python -m hybrid_mamba.eval_harness.bench_speed --model RUN/final|PRESET [--baselines llama,bamba,mamba2]
                                       [--device cpu|cuda] [--out results/bench] [--threads 2] [--quick]

Without --model, the fixed benchmark (`make bench`): four models, fp32, random init: ours (hidden
512, 8 layers of which layers 2 and 6 are attention and the rest Mamba-2 with 16 heads of 64 and
state 128, SwiGLU 1536, vocab 8192, untied; BENCH_CONFIG); transformers' Bamba with the same config
(layout and sizes); an equal-size transformers Llama ("llama": same hidden size, depth, heads and
vocabulary, attention in every layer, MLP widened until its parameter count matches ours); and a
Llama of ours' shape ("llama_shape": MLP 1536 too, so about 16% fewer parameters, because a Mamba-2
mixer of this width has more parameters than an attention mixer).

With --model, a save_pretrained folder (its config.json; the weights are re-initialised at random,
which does not change speed) or a preset name (configuration/presets.yaml) against --baselines
(default llama,bamba): llama, llama_shape, bamba (needs no Mamba-1 layers) and mamba2
(Mamba2ForCausalLM: same hidden size, depth, vocabulary and Mamba-2 mixer sizes; it has no MLP).
Every baseline's config is derived from ours by modeling.convert.

Measured, with warmup iterations not counted:
- training step: forward with labels, backward, AdamW step at batch 4 x 512; tokens/s, median;
- prefill latency (no grad, batch 1, use_cache=False) at 512, 2048 and 8192 tokens; median;
- one Mamba mixer of ours alone at the same lengths: time per token (constant if linear in length);
- decode latency per token (no grad, batch 1): a prompt of 128, 1024 or 4096 tokens is prefilled
  with use_cache=True (its time is the time to first token), then 32 single-token steps are timed
  one by one; p50/p95/p99;
- peak memory of the training step: on CPU each model trains in a fresh subprocess, which reports
  ru_maxrss minus its RSS after building the model, and ru_maxrss itself; on CUDA
  torch.cuda.max_memory_allocated, one model at a time.
Timing uses time.perf_counter on torch.set_num_threads(--threads) (CUDA events on --device cuda).
The models take turns inside every repetition (and every decode step), so machine noise hits all of
them alike. Prefill and decode ask for the last token's logits only (logits_to_keep=1), as
generate() does.

Writes STEM.json (every raw number, the machine, the plan), STEM.md (one table per measurement with
a ratio column ours/baseline for each baseline) and STEM.png (prefill, decode p50 and time to first
token against sequence length, log-log) into --out, and prints the tables; STEM is bench_speed for
the fixed benchmark (default --out results/bench_speed) and bench with --model (default --out
results/bench). A full run of the fixed benchmark should take about 5 minutes on 2 cores (estimated
from --quick timings; the 8192-token prefills take a third of it); --quick shrinks every size and
repetition count for a smoke test of well under a minute.
"""

import gc
import inspect
import json
import logging
import multiprocessing
import os
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import (
    BambaForCausalLM,
    HfArgumentParser,
    LlamaConfig,
    LlamaForCausalLM,
    Mamba2ForCausalLM,
    StaticCache,
)

from hybrid_mamba.common.files import save_figure, write_json_atomic, write_text_atomic
from hybrid_mamba.common.machine import machine
from hybrid_mamba.configuration import HybridMambaConfig, get_preset
from hybrid_mamba.configuration.param_counts import total_parameters
from hybrid_mamba.modeling import HybridMambaForCausalLM
from hybrid_mamba.modeling.convert import to_bamba_config, to_llama_config, to_mamba2_config

logger = logging.getLogger(__name__)

# bamba: ours' config (layer layout, sizes). llama: an equal-size Llama (same hidden size, depth, heads
# and vocabulary, MLP widened until the parameter count matches ours). llama_shape: a Llama with ours'
# shape (same MLP width too), which is smaller, because a Mamba layer has more parameters than an
# attention layer of the same width.
MODEL_CLASSES = {
    "ours": HybridMambaForCausalLM,
    "bamba": BambaForCausalLM,
    "llama": LlamaForCausalLM,
    "llama_shape": LlamaForCausalLM,
}
DEFAULT_BASELINES = ("bamba", "llama", "llama_shape")
BASELINE_NOTES = {
    "bamba": "bamba: transformers' Bamba with ours' config.",
    "llama": "llama: an equal-size Llama (MLP widened until its parameter count matches ours).",
    "llama_shape": "llama_shape: a Llama of ours' shape (hidden, MLP width, depth), hence smaller.",
    "mamba2": "mamba2: Mamba2ForCausalLM with ours' Mamba-2 sizes and no MLP, hence smaller.",
}
# Baselines beyond the fixed benchmark's default set (--model ... --baselines).
ALL_CLASSES = {**MODEL_CLASSES, "mamba2": Mamba2ForCausalLM}

# Run modes (--modes), each applied to ours and every baseline alike: the precision (fp32; bf16 = autocast to
# bfloat16 with fp32 parameters, as accelerate's mixed_precision: bf16 runs on CPU and GPU) and optionally
# torch.compile (inductor; ours with fullgraph=True; decode through a StaticCache, as generate() compiles it).
# The first mode's columns are named by model ("ours"); other modes' get "@mode" ("ours@bf16").
MODES = ("fp32", "bf16", "fp32+compile", "bf16+compile")
COMPILE_BACKEND = "inductor"  # the tests trace with "eager" (same graphs, no C++ compilation)


def split_column(column: str) -> tuple[str, str]:
    """("ours@bf16") -> ("ours", "bf16"); a name without "@" is in the run's first mode (returned as "")."""
    base, _, mode = column.partition("@")
    return base, mode


def mode_parts(mode: str) -> tuple[str, bool]:
    """ "bf16+compile" -> ("bf16", True)."""
    precision, _, compiled = mode.partition("+")
    return precision, compiled == "compile"


def apply_mode(model, base: str, mode: str):
    """The model as a column of `mode` runs it: autocast around forward for bf16, torch.compile'd forward
    for +compile (the eager forward kept as `model.eager_forward`, which decode prefills with)."""
    precision, compiled = mode_parts(mode)
    forward = model.forward
    if precision == "bf16":
        forward = torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16)(forward)
    model.eager_forward = forward
    if compiled:
        forward = torch.compile(forward, fullgraph=base == "ours", backend=COMPILE_BACKEND)
    model.forward = forward
    model.bench_compiled = compiled
    return model


# Names a model's cache goes by, across transformers releases and model classes.
CACHE_NAMES = ("cache", "cache_params", "past_key_values")


def cache_arg(model) -> str:
    """The name under which `model` takes and returns its cache: `cache` (transformers >= 5.24), else
    `cache_params` (Mamba2ForCausalLM before 5.24) or `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return next(n for n in CACHE_NAMES if n in params)


def returned_cache(output):
    """The cache in a model output, under whichever of the names the installed transformers uses."""
    return next((output[n] for n in CACHE_NAMES if output.get(n) is not None), None)


# The benchmarked size. Bamba's and Llama's configs are derived from the config built from this.
BENCH_CONFIG = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    attn_layer_indices=[2, 6],
    mamba_version=2,
    mamba_head_dim=64,
    mamba_expand=2,  # d_inner 1024 = 16 heads of 64
    mamba_d_state=128,
    mamba_n_groups=1,
    mamba_chunk_size=256,
    tie_word_embeddings=False,
    max_position_embeddings=16384,  # above the longest prefill; RoPE is computed on the fly either way
)


@dataclass
class Plan:
    """Sizes and repetition counts of every measurement. Warmup iterations precede the counted ones."""

    train_batch: int = 4
    train_seq: int = 512
    train_reps: int = 5
    memory_steps: int = 2  # training steps in each memory subprocess; the first allocates AdamW's state
    prefill_lengths: tuple[int, ...] = (512, 2048, 8192)
    prefill_reps: tuple[int, ...] = (7, 5, 3)  # one count per length: long prefills are slow on CPU
    decode_prompts: tuple[int, ...] = (128, 1024, 4096)
    decode_steps: int = 32
    decode_batches: tuple[int, ...] = (8, 32)  # generated tokens/s of batched decoding
    batched_decode_prompt: int = 128
    warmup: int = 1
    decode_warmup: int = 3


QUICK_PLAN = Plan(
    train_batch=2,
    train_seq=128,
    train_reps=2,
    prefill_lengths=(256, 512),
    prefill_reps=(2, 2),
    decode_prompts=(32, 64),
    decode_steps=8,
    decode_batches=(4,),
    batched_decode_prompt=32,
    decode_warmup=2,
)


@dataclass
class BenchArgs:
    model: str | None = field(
        default=None,
        metadata={"help": "Model folder (config.json) or preset name; unset: the fixed benchmark size (BENCH_CONFIG)."},
    )
    baselines: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated: llama, llama_shape, bamba, mamba2. Default: bamba,llama,llama_shape "
            "for the fixed size, llama,bamba with --model."
        },
    )
    device: str = field(default="cpu", metadata={"help": "cpu or cuda[:N]."})
    out: str | None = field(
        default=None,
        metadata={
            "help": "Output folder. Default: results/bench_speed (bench_speed.json, .md, .png), "
            "with --model results/bench (bench.json, .md, .png)."
        },
    )
    threads: int = field(default=2, metadata={"help": "torch.set_num_threads here and in the memory subprocesses."})
    quick: bool = field(default=False, metadata={"help": "Smoke-test sizes and repetitions (well under a minute)."})
    seed: int = field(default=0, metadata={"help": "Seed of the weights and of the random token ids."})
    modes: str = field(
        default="fp32",
        metadata={
            "help": "Comma-separated run modes, each applied to ours and every baseline, interleaved in one run: "
            "fp32, bf16 (autocast, fp32 parameters), fp32+compile, bf16+compile (torch.compile; decode with a "
            "static cache). Columns beyond the first mode are named model@mode."
        },
    )

    onnx: bool = field(
        default=False,
        metadata={
            "help": "Also export ours to ONNX (hub_cards.onnx_export) and time its decode on onnxruntime "
            "(needs the onnx extra; fp32 first mode)."
        },
    )

    def __post_init__(self):
        if self.onnx:
            from hybrid_mamba.hub_cards.onnx_export import require_onnx

            require_onnx()
            if not self.modes.strip().startswith("fp32") or self.device != "cpu":
                raise ValueError("--onnx compares against ours in fp32 on CPU: make fp32 the first of --modes")
        modes = [m.strip() for m in self.modes.split(",") if m.strip()]
        unknown = [m for m in modes if m not in MODES]
        if not modes or unknown:
            raise ValueError(f"--modes {self.modes!r}: choose one or more of {', '.join(MODES)}")
        if len(set(modes)) != len(modes):
            raise ValueError(f"--modes {self.modes!r} names a mode twice")


# Models


def check_baselines(baselines: tuple[str, ...]) -> None:
    choices = set(ALL_CLASSES) - {"ours"}
    if set(baselines) - choices:
        raise ValueError(f"unknown baselines {sorted(set(baselines) - choices)}: choose from {sorted(choices)}")


def matched_configs(ours: HybridMambaConfig, baselines: tuple[str, ...] = DEFAULT_BASELINES) -> dict:
    """Configs of ours and each baseline with the sizes of `ours` (see MODEL_CLASSES).

    The field mapping lives in modeling.convert. Bamba keeps its default RoPE (partial_rotary_factor 0.5)
    and Mamba2 its default biases and dt range, as this benchmark has always measured them.
    """
    check_baselines(baselines)
    build = {
        "bamba": to_bamba_config,
        "llama": equal_size_llama,
        "llama_shape": to_llama_config,
        "mamba2": to_mamba2_config,
    }
    return {"ours": ours, **{name: build[name](ours) for name in baselines}}


def equal_size_llama(ours: HybridMambaConfig) -> LlamaConfig:
    """A Llama with ours' hidden size, depth, heads and vocabulary, its MLP width set so the parameter
    count matches ours (to within one MLP column per layer)."""
    shape = to_llama_config(ours)
    per_column = 3 * shape.hidden_size * shape.num_hidden_layers  # gate, up, down: one column each
    gap = total_parameters(HybridMambaForCausalLM, ours) - total_parameters(LlamaForCausalLM, shape)
    return to_llama_config(ours, intermediate_size=max(1, shape.intermediate_size + round(gap / per_column)))


def build_model(name: str, config, seed: int, device: str = "cpu", mode: str = "fp32"):
    """A column's model: `name` may carry "@mode"; else `mode` applies. Same seed, same weights in every mode."""
    base, column_mode = split_column(name)
    torch.manual_seed(seed)
    model = ALL_CLASSES[base](config).to(device).eval()
    return apply_mode(model, base, column_mode or mode)


def random_ids(vocab_size: int, shape: tuple, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def train_step(model, optimizer, batch):
    optimizer.zero_grad(set_to_none=True)
    # use_cache=False: otherwise every model fills a cache it never reads
    model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
    optimizer.step()


# Measurements


def timed(fn, device: torch.device | None = None) -> float:
    """Seconds of fn(): CUDA events on a CUDA device (the GPU's own clock), perf_counter otherwise."""
    if device is not None and device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def turn_order(names, i: int) -> tuple:
    """The models' turn order in repetition (or step) `i`: rotated by one each time, so on a machine whose speed
    drifts each model runs first, second and last alike and no model always follows the same one."""
    names = tuple(names)
    k = i % len(names)
    return names[k:] + names[:k]


def _device(models: dict) -> torch.device:
    return next(next(iter(models.values())).parameters()).device


def _round_robin(
    models: dict, reps: int, warmup: int, call, label: str, first: dict | None = None
) -> dict[str, list[float]]:
    """Seconds of `call(name, model)` per model; every repetition runs each model once, in `turn_order`.
    `first`, when given, receives each model's first (warmup) call: compilation time in +compile modes."""
    times = {name: [] for name in models}
    for rep in range(warmup + reps):
        step = {name: timed(lambda: call(name, models[name]), _device(models)) for name in turn_order(models, rep)}
        if rep == 0 and first is not None:
            first.update(step)
        if rep >= warmup:
            for name, dt in step.items():
                times[name].append(dt)
        tag = "warmup" if rep < warmup else f"rep {rep - warmup + 1}/{reps}"
        logger.info("%s %s: %s", label, tag, ", ".join(f"{n} {dt * 1e3:.0f} ms" for n, dt in step.items()))
    return times


def measure_training(models: dict, plan: Plan, seed: int) -> dict:
    batch = random_ids(next(iter(models.values())).config.vocab_size, (plan.train_batch, plan.train_seq), seed).to(
        _device(models)
    )
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}
    for model in models.values():
        model.train()
    first = {}
    try:
        times = _round_robin(
            models,
            plan.train_reps,
            max(plan.warmup, 1),
            lambda name, m: train_step(m, optimizers[name], batch),
            "train",
            first,
        )
    finally:
        for model in models.values():
            model.eval()
            model.zero_grad(set_to_none=True)
    tokens = plan.train_batch * plan.train_seq
    flops = {}  # per base model: the same in every mode
    for name, model in models.items():
        base = split_column(name)[0]
        if base not in flops:
            flops[base] = training_flops_per_token(model, batch)
    results = {}
    for name, ts in times.items():
        rates = [tokens / t for t in ts]
        per_token = flops[split_column(name)[0]]
        results[name] = {
            "step_s": ts,
            "tokens_per_s": rates,
            "median_tokens_per_s": statistics.median(rates),
            "first_step_s": first[name],  # the warmup step: includes compilation in +compile modes
            "flops_per_token": per_token,
            "achieved_flops": per_token * statistics.median(rates),
        }
    return results


def training_flops_per_token(model, batch) -> float:
    """FLOPs of one forward with labels and its backward, per token, as `torch.utils.flop_counter` counts
    them: matmuls, convolutions and attention (elementwise work is not counted). Run eagerly (a +compile
    column's `eager_forward`); the count is the same in every mode."""
    from torch.utils.flop_counter import FlopCounterMode

    forward = getattr(model, "eager_forward", model.forward)
    model.train()
    try:
        with FlopCounterMode(display=False) as counter:
            forward(input_ids=batch, labels=batch, use_cache=False).loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    return counter.get_total_flops() / batch.numel()


@torch.no_grad()
def measure_prefill(models: dict, plan: Plan, seed: int) -> dict:
    vocab = next(iter(models.values())).config.vocab_size
    results = {}
    for length, reps in zip(plan.prefill_lengths, plan.prefill_reps, strict=True):
        ids = random_ids(vocab, (1, length), seed + length).to(_device(models))
        times = _round_robin(
            models,
            reps,
            plan.warmup,
            # eager forward in +compile modes too, as generate() prefills: one graph per prompt length, and
            # the long ones unroll every block and chunk of the scan (minutes of compilation each)
            lambda name, m: getattr(m, "eager_forward", m.forward)(input_ids=ids, use_cache=False, logits_to_keep=1),
            f"prefill {length}",
        )
        results[str(length)] = {name: {"times_s": ts, "median_s": statistics.median(ts)} for name, ts in times.items()}
        gc.collect()
    return results


@torch.no_grad()
def measure_mamba_mixer(model, plan: Plan, seed: int) -> dict | None:
    """Forward time per token of one Mamba mixer of ours alone (batch 1, no grad) at each prefill length.

    Linear cost in length means a constant time per token; the model's prefill mixes in the attention
    layers, whose cost per token grows with length. None when the model has no Mamba layer.
    """
    layers = [layer for layer in model.model.layers if getattr(layer, "mixer_type", "attention") != "attention"]
    if not layers:
        return None
    mixer, device = layers[0].mamba, next(model.parameters()).device
    results = {}
    for length, reps in zip(plan.prefill_lengths, plan.prefill_reps, strict=True):
        x = torch.randn(1, length, model.config.hidden_size, generator=torch.Generator().manual_seed(seed + length)).to(
            device
        )
        times = [timed(lambda: mixer(x), device) for _ in range(plan.warmup + reps)][plan.warmup :]
        med = statistics.median(times)
        results[str(length)] = {"times_s": times, "median_s": med, "us_per_token": med / length * 1e6}
        logger.info("mamba mixer %d tokens: %.1f us/token", length, med / length * 1e6)
    return results


def _decode_run(models: dict, prompt_len: int, batch: int, plan: Plan, seed: int) -> dict:
    """Prefill `batch` prompts of `prompt_len` tokens (timed: time to first token), then
    `plan.decode_warmup + plan.decode_steps` one-token steps, each model in turn at every step."""
    vocab = next(iter(models.values())).config.vocab_size
    n_steps = plan.decode_warmup + plan.decode_steps
    args = {name: cache_arg(m) for name, m in models.items()}  # looked up once, outside the timed steps
    dev = _device(models)
    prompt = random_ids(vocab, (batch, prompt_len), seed + prompt_len).to(dev)
    tokens = random_ids(vocab, (batch, n_steps), seed + prompt_len + 1).to(dev)
    caches, ttft, first_step = {}, {}, {}
    for name, m in models.items():
        # time to first token: the prompt's prefill with a cache, up to the first token's id. Compiled
        # models decode with a StaticCache of the whole length (shapes fixed, as generate() compiles
        # them) and prefill eagerly, as generate() does.
        def first(m=m, name=name):
            static = {}
            if getattr(m, "bench_compiled", False):
                static[args[name]] = StaticCache(config=m.config, max_cache_len=prompt_len + n_steps)
            forward = getattr(m, "eager_forward", m.forward)
            out = forward(input_ids=prompt, use_cache=True, logits_to_keep=1, **static)
            out.logits[:, -1].argmax(-1)
            caches[name] = returned_cache(out)

        ttft[name] = timed(first, dev)
    times = {name: [] for name in models}
    for i in range(n_steps):
        # position_ids given: Bamba does not derive them from the cache
        step = dict(
            input_ids=tokens[:, i : i + 1],
            position_ids=torch.full((batch, 1), prompt_len + i, device=dev),
            use_cache=True,
        )
        for name in turn_order(models, i):

            def one(model=models[name], name=name):
                caches[name] = returned_cache(model(**{args[name]: caches[name]}, **step))

            dt = timed(one, dev)
            if i == 0:
                first_step[name] = dt  # includes compilation in +compile modes
            if i >= plan.decode_warmup:
                times[name].append(dt)
    caches.clear()
    gc.collect()
    results = {}
    for name, ts in times.items():
        p50, p95, p99 = np.percentile(ts, [50, 95, 99]).tolist()
        results[name] = {
            "step_s": ts,
            "p50_s": p50,
            "p95_s": p95,
            "p99_s": p99,
            "ttft_s": ttft[name],
            "first_step_s": first_step[name],
        }
    return results


@torch.no_grad()
def measure_decode(models: dict, plan: Plan, seed: int) -> dict:
    """Batch 1 after each of `plan.decode_prompts`: per-token latency."""
    results = {}
    for prompt_len in plan.decode_prompts:
        results[str(prompt_len)] = _decode_run(models, prompt_len, 1, plan, seed)
        logger.info(
            "decode after %d: p50 %s",
            prompt_len,
            ", ".join(f"{n} {r['p50_s'] * 1e3:.1f} ms" for n, r in results[str(prompt_len)].items()),
        )
    return results


@torch.no_grad()
def measure_batched_decode(models: dict, plan: Plan, seed: int) -> dict:
    """Each batch of `plan.decode_batches` after a `plan.batched_decode_prompt`-token prompt: generated
    tokens/s (batch / median step time)."""
    results = {}
    for batch in plan.decode_batches:
        run = _decode_run(models, plan.batched_decode_prompt, batch, plan, seed)
        for r in run.values():
            r["tokens_per_s"] = batch / statistics.median(r["step_s"])
        results[str(batch)] = run
        logger.info(
            "decode batch %d: %s",
            batch,
            ", ".join(f"{n} {r['tokens_per_s']:.0f} tok/s" for n, r in run.items()),
        )
    return results


@torch.no_grad()
def measure_onnx_decode(model, plan: Plan, seed: int, threads: int) -> dict:
    """Ours exported to ONNX (hub_cards.onnx_export) and run by onnxruntime on `threads` threads: the
    prompt through the prefill graph (in its fixed chunks; the remainder through decode steps), then
    per-token decode latency at batch 1 after each of `plan.decode_prompts`, and the largest logit
    difference from ours over the decoded steps. After the interleaved measurements, in the same process."""
    import tempfile

    from hybrid_mamba.hub_cards.onnx_export import OnnxGenerator, export_onnx

    vocab = model.config.vocab_size
    n_steps = plan.decode_warmup + plan.decode_steps
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        src, onnx_dir = Path(tmp) / "model", Path(tmp) / "onnx"
        model.save_pretrained(src)
        t0 = time.perf_counter()
        export_onnx(src, onnx_dir, model=model)
        results["export_s"] = time.perf_counter() - t0
        gen = OnnxGenerator(onnx_dir, threads=threads)
        for prompt_len in plan.decode_prompts:
            prompt = random_ids(vocab, (1, prompt_len), seed + prompt_len).numpy()
            tokens = random_ids(vocab, (1, n_steps), seed + prompt_len + 1).numpy()
            t0 = time.perf_counter()
            _, states = gen.run_prompt(prompt)
            ttft = time.perf_counter() - t0
            times, logits = [], []
            for i in range(n_steps):
                t0 = time.perf_counter()
                out, states = gen.step(tokens[:, i : i + 1], states)
                dt = time.perf_counter() - t0
                logits.append(out[:, -1])
                if i >= plan.decode_warmup:
                    times.append(dt)
            ids = torch.from_numpy(np.concatenate([prompt, tokens], axis=1))
            ref = model.eager_forward(input_ids=ids).logits[0, prompt_len:].float().numpy()
            p50, p95, p99 = np.percentile(times, [50, 95, 99]).tolist()
            results[str(prompt_len)] = {
                "step_s": times,
                "p50_s": p50,
                "p95_s": p95,
                "p99_s": p99,
                "ttft_s": ttft,
                "max_abs_logit_diff": float(np.abs(np.concatenate(logits) - ref).max()),
            }
            logger.info("onnx decode after %d: p50 %.1f ms", prompt_len, p50 * 1e3)
    return results


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def _rss_bytes() -> int:
    """Current resident set size (Linux); elsewhere the peak so far, an upper bound."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _maxrss_bytes()


def _training_memory_worker(name: str, config, plan: Plan, threads: int, seed: int, mode: str = "fp32") -> dict:
    """Runs in a fresh process: RSS around `plan.memory_steps` training steps of one model."""
    # A process started by (v)fork + exec begins with ru_maxrss = its parent's peak (Linux keeps the
    # old address space's high-water mark across exec), so the parent must be small when it spawns.
    inherited = _maxrss_bytes()
    torch.set_num_threads(threads)
    model = build_model(name, config, seed, mode=mode).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = random_ids(config.vocab_size, (plan.train_batch, plan.train_seq), seed)
    after_build = _rss_bytes()
    for _ in range(plan.memory_steps):
        train_step(model, optimizer, batch)
    peak = _maxrss_bytes()
    mib = 2**20
    return {
        "peak_over_build_mib": (peak - after_build) / mib,
        "peak_rss_mib": peak / mib,
        "rss_after_build_mib": after_build / mib,
        "inherited_maxrss_mib": inherited / mib,
        "steps": plan.memory_steps,
    }


def measure_cuda_training_memory(columns: dict, plan: Plan, seed: int, device: str) -> dict:
    """torch.cuda.max_memory_allocated around `plan.memory_steps` training steps, one model at a time.
    `columns`: name -> (config, mode)."""
    mib = 2**20
    results = {}
    for name, (config, mode) in columns.items():
        gc.collect()
        torch.cuda.empty_cache()
        model = build_model(name, config, seed, device, mode).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batch = random_ids(config.vocab_size, (plan.train_batch, plan.train_seq), seed).to(device)
        torch.cuda.synchronize(device)
        after_build = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(plan.memory_steps):
            train_step(model, optimizer, batch)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        results[name] = {
            "peak_over_build_mib": (peak - after_build) / mib,
            "peak_allocated_mib": peak / mib,
            "allocated_after_build_mib": after_build / mib,
            "steps": plan.memory_steps,
        }
        logger.info(
            "memory %s: peak allocated %.0f MiB, %.0f MiB over the built model",
            name,
            peak / mib,
            (peak - after_build) / mib,
        )
        del model, optimizer, batch
    return results


def measure_training_memory(columns: dict, plan: Plan, threads: int, seed: int) -> dict:
    """One fresh spawned process per model, so that each peak belongs to that model alone.
    `columns`: name -> (config, mode)."""
    ctx = multiprocessing.get_context("spawn")
    results = {}
    for name, (config, mode) in columns.items():
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            r = pool.submit(_training_memory_worker, name, config, plan, threads, seed, mode).result()
        if r["peak_rss_mib"] <= r["inherited_maxrss_mib"]:
            logger.warning(
                "memory %s: the peak RSS is the %.0f MiB inherited from the parent process, not this model's; "
                "measure memory before the parent grows.",
                name,
                r["inherited_maxrss_mib"],
            )
        logger.info(
            "memory %s: peak %.0f MiB, %.0f MiB over the built model", name, r["peak_rss_mib"], r["peak_over_build_mib"]
        )
        results[name] = r
    return results


# Report


def _ratio_pairs(names: list[str]) -> list[tuple[str, str]]:
    """(numerator, denominator) columns: ours against each baseline in the same mode, and ours in each
    further mode against ours in the first ("ours@bf16/ours")."""
    pairs = []
    for name in names:
        base, mode = split_column(name)
        if base == "ours":
            continue
        mine = "ours" + (f"@{mode}" if mode else "")
        if mine in names:
            pairs.append((mine, name))
    pairs += [(n, "ours") for n in names if split_column(n)[0] == "ours" and n != "ours"]
    return pairs


def _table(title: str, note: str, key: str, rows: list[tuple[str, dict]], fmt: str, ratios: bool = True) -> list[str]:
    names = list(rows[0][1])
    pairs = _ratio_pairs(names) if ratios else []
    head = [key, *names] + [f"{a}/{b}" for a, b in pairs]
    lines = [f"## {title}", "", note, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, values in rows:
        cells = [label] + [format(values[n], fmt) for n in names]
        if ratios:
            # "-": a zero denominator (a tiny model's training can stay under the RSS it was built at)
            cells += [f"{values[a] / values[b]:.2f}" if values[b] else "-" for a, b in pairs]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _header(results: dict) -> list[str]:
    m = results["machine"]
    return [
        f"# Speed ({m.get('device', 'cpu')}): " + " vs ".join(results["parameters"]),
        "",
        f"`{results['command']}` on "
        + (
            f"{m['gpu']} (host {m['cpu']}), "
            if m.get("gpu")
            else f"{m['cpu']} ({m['platform']}), {m['threads']} threads, "
        )
        + f"torch {m['torch']}, transformers {m['transformers']}, {m['date']}, commit {m['git_commit']}.",
        _modes_note(results.get("modes", ["fp32"]))
        + " Random init; warmup iterations excluded. "
        + " ".join(BASELINE_NOTES[n] for n in results["parameters"] if n in BASELINE_NOTES)
        + ("; CUDA events and max_memory_allocated." if m.get("device", "cpu").startswith("cuda") else "."),
        "",
    ]


def _modes_note(modes: list[str]) -> str:
    first, rest = modes[0], modes[1:]
    text = f"Mode {first}" + (
        f"; columns @{', @'.join(rest)} in those modes, interleaved in the same run." if rest else "."
    )
    if any(mode_parts(m)[0] == "bf16" for m in modes):
        text += " bf16: autocast to bfloat16, parameters fp32 (ours keeps the scan and its state in fp32)."
    if any(mode_parts(m)[1] for m in modes):
        text += (
            " +compile: torch.compile (inductor; ours fullgraph=True) for training and decode steps (through a"
            " StaticCache); prefill and time to first token stay eager, as generate() runs them; compilation times"
            " in their own table."
        )
    return text


def _compile_table(results: dict) -> list[str]:
    """The first training step and the first decode step of each model: compilation in +compile modes."""
    if not any(mode_parts(m)[1] for m in results.get("modes", [])):
        return []
    tr, decode = results["training"], results["decode"]
    rows = [("training step", {n: r["first_step_s"] for n, r in tr.items()})]
    rows += [(f"decode after {p}", {n: r["first_step_s"] for n, r in by.items()}) for p, by in decode.items()]
    return _table(
        "First call (s, includes compilation in +compile modes)",
        "The warmup training step, and the first decode step after each prompt (a new static cache size "
        "recompiles). Not in the steady-state figures above; ratios are of times.",
        "call",
        rows,
        ".2f",
    )


def _throughput_tables(results: dict) -> list[str]:
    """Parameters, training step throughput and prefill latency."""
    p, tr = results["plan"], results["training"]
    lines = _table(
        "Parameters", "Counted once per tensor.", "", [("parameters", results["parameters"])], ",", ratios=False
    )
    lines += _table(
        "Training step throughput (tokens/s, higher is better)",
        f"Forward with labels, backward, AdamW step at batch {p['train_batch']} x {p['train_seq']}; median of "
        f"{p['train_reps']}. Ratios are of tokens/s: above 1 means ours is faster.",
        "batch",
        [(f"{p['train_batch']} x {p['train_seq']}", {n: tr[n]["median_tokens_per_s"] for n in tr})],
        ".0f",
    )
    if all("flops_per_token" in r for r in tr.values()):
        lines += _table(
            "Training work per token and the rate it runs at",
            "FLOPs of a forward with labels and its backward, per token, as torch.utils.flop_counter counts them "
            "(matmuls, convolutions, attention; elementwise work and the optimizer are not counted), and those "
            "FLOPs times the median tokens/s above. At equal GFLOP/s, tokens/s go inversely with GFLOP per token: "
            "that ratio bounds how close ours can come to a baseline that does less work.",
            "measure",
            [
                ("GFLOP per token", {n: r["flops_per_token"] / 1e9 for n, r in tr.items()}),
                ("achieved GFLOP/s", {n: r["achieved_flops"] / 1e9 for n, r in tr.items()}),
            ],
            ".3f",
        )
    lines += _table(
        "Prefill latency (ms, lower is better)",
        "Batch 1, no grad, use_cache=False, last-token logits; median over repetitions "
        f"({', '.join(f'{n}: {r}' for n, r in zip(p['prefill_lengths'], p['prefill_reps']))}). "
        "Ratios are of times: below 1 means ours is faster.",
        "tokens",
        [
            (length, {n: r["median_s"] * 1e3 for n, r in by_model.items()})
            for length, by_model in results["prefill"].items()
        ],
        ".1f",
    )
    return lines


def _mixer_table(mix: dict | None) -> list[str]:
    if not mix:
        return []
    first = next(iter(mix.values()))["us_per_token"]
    return [
        "## Mamba mixer alone: time per token (us, lower is better)",
        "",
        "Ours' first Mamba mixer, batch 1, no grad, forward only, median over the prefill repetitions. "
        "A scan linear in length keeps this constant; the ratio is to the shortest length.",
        "",
        "| tokens | us/token | ratio to " + next(iter(mix)) + " |",
        "|---|---|---|",
        *[f"| {length} | {r['us_per_token']:.1f} | {r['us_per_token'] / first:.2f} |" for length, r in mix.items()],
        "",
    ]


def _decode_tables(results: dict) -> list[str]:
    """Decode latency per token and, when measured, time to first token."""
    p, decode = results["plan"], results["decode"]
    rows = []
    for prompt_len, by_model in decode.items():
        for q in ("p50", "p95", "p99"):
            rows.append((f"{prompt_len} {q}", {n: r[f"{q}_s"] * 1e3 for n, r in by_model.items()}))
    lines = _table(
        "Decode latency per token (ms, lower is better)",
        f"Batch 1, no grad, with a cache after a prompt of the given length; {p['decode_steps']} timed steps "
        "(so p99 is close to the slowest step). Ratios are of times: below 1 means ours is faster.",
        "prompt, quantile",
        rows,
        ".2f",
    )
    batched = results.get("batched_decode")
    if batched:
        lines += _table(
            "Batched decode throughput (generated tokens/s, higher is better)",
            f"Batch of the given size after a {p.get('batched_decode_prompt')}-token prompt, no grad; batch / "
            f"median step time over {p['decode_steps']} steps. Ratios are of tokens/s: above 1 means ours is faster.",
            "batch",
            [(b, {n: r["tokens_per_s"] for n, r in by_model.items()}) for b, by_model in batched.items()],
            ".0f",
        )
    onnx = results.get("onnx_decode")
    if onnx:
        rows = [
            (f"{length} p50", {"ours": decode[length]["ours"]["p50_s"] * 1e3, "onnx": r["p50_s"] * 1e3})
            for length, r in onnx.items()
            if length in decode
        ]
        lines += [
            "## ONNX Runtime decode (ms per token, lower is better)",
            "",
            f"Ours exported by hub_cards.onnx_export ({onnx['export_s']:.0f} s) and run by onnxruntime on the same "
            "threads after the interleaved measurements, batch 1; ours is the eager column above. Largest logit "
            "difference from ours over the decoded steps: "
            + ", ".join(f"{n}: {r['max_abs_logit_diff']:.1e}" for n, r in onnx.items() if n in decode)
            + ".",
            "",
            "| prompt, quantile | ours (eager) | onnxruntime | onnxruntime/ours |",
            "|---|---|---|---|",
            *[f"| {label} | {v['ours']:.2f} | {v['onnx']:.2f} | {v['onnx'] / v['ours']:.2f} |" for label, v in rows],
            "",
        ]
    first = next(iter(decode.values()), {})
    if first and "ttft_s" in next(iter(first.values())):
        lines += _table(
            "Time to first token (ms, lower is better)",
            "Batch 1, no grad: the prompt's prefill with use_cache=True up to the first token's id. "
            "Ratios are of times: below 1 means ours is faster.",
            "prompt",
            [
                (prompt_len, {n: r["ttft_s"] * 1e3 for n, r in by_model.items()})
                for prompt_len, by_model in decode.items()
            ],
            ".1f",
        )
    return lines


def _memory_table(results: dict) -> list[str]:
    """Peak memory of the training step: max_memory_allocated on CUDA, ru_maxrss on CPU."""
    p, mem = results["plan"], results["memory"]
    if "peak_allocated_mib" in next(iter(mem.values())):
        return _table(
            "Training step peak memory (MiB, lower is better)",
            f"torch.cuda.max_memory_allocated over {p['memory_steps']} training steps at batch {p['train_batch']} x "
            f"{p['train_seq']}; 'over model' subtracts the memory allocated after building the model.",
            "peak allocated",
            [
                ("over model", {n: r["peak_over_build_mib"] for n, r in mem.items()}),
                ("absolute", {n: r["peak_allocated_mib"] for n, r in mem.items()}),
            ],
            ".0f",
        )
    return _table(
        "Training step peak memory (MiB, lower is better)",
        f"One fresh process per model, {p['memory_steps']} training steps at batch {p['train_batch']} x {p['train_seq']}. "
        "'over model' is ru_maxrss minus the RSS after building the model (activations, gradients, AdamW state); "
        "'absolute' is ru_maxrss. Ratios are of memory: below 1 means ours uses less.",
        "peak RSS",
        [
            ("over model", {n: r["peak_over_build_mib"] for n, r in mem.items()}),
            ("absolute", {n: r["peak_rss_mib"] for n, r in mem.items()}),
        ],
        ".0f",
    )


def to_markdown(results: dict) -> str:
    lines = _header(results) + _throughput_tables(results) + _mixer_table(results.get("mamba_mixer"))
    return "\n".join(lines + _decode_tables(results) + _compile_table(results) + _memory_table(results))


def run_benchmark(
    ours_config: HybridMambaConfig,
    plan: Plan,
    out: Path,
    threads: int,
    seed: int = 0,
    command: str = "",
    baselines: tuple[str, ...] = DEFAULT_BASELINES,
    device: str = "cpu",
    stem: str = "bench_speed",
    modes: tuple[str, ...] = ("fp32",),
    onnx: bool = False,
) -> dict:
    """Every measurement, in one process (CPU memory in subprocesses); writes OUT/STEM.json and .md."""
    configs = matched_configs(ours_config, tuple(baselines))
    columns = {
        (name if i == 0 else f"{name}@{mode}"): (cfg, mode)
        for i, mode in enumerate(modes)
        for name, cfg in configs.items()
    }
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = {
            "command": command or " ".join(["python -m hybrid_mamba.eval_harness.bench_speed", *sys.argv[1:]]),
            "machine": {**machine(threads), "device": device}
            | ({"gpu": torch.cuda.get_device_name(device)} if device.startswith("cuda") else {}),
            "plan": asdict(plan),
            "modes": list(modes),
            # parse_constant: the time-step limits hold inf, which strict JSON lacks; keep it as a string
            "configs": {name: json.loads(cfg.to_json_string(), parse_constant=str) for name, cfg in configs.items()},
        }
        json.dumps(results, allow_nan=False)  # fail now, not after the run, on anything not JSON
        # Memory first, while this process is still small: children inherit its peak RSS.
        if device.startswith("cuda"):
            results["memory"] = measure_cuda_training_memory(columns, plan, seed, device)
        else:
            results["memory"] = measure_training_memory(columns, plan, threads, seed)
        models = {name: build_model(name, cfg, seed, device, mode) for name, (cfg, mode) in columns.items()}
        results["parameters"] = {
            name: total_parameters(ALL_CLASSES[split_column(name)[0]], cfg) for name, (cfg, _) in columns.items()
        }
        logger.info("parameters: %s", ", ".join(f"{n} {c / 1e6:.2f}M" for n, c in results["parameters"].items()))
        results["training"] = measure_training(models, plan, seed)
        results["prefill"] = measure_prefill(models, plan, seed)
        results["mamba_mixer"] = measure_mamba_mixer(models["ours"], plan, seed)
        results["decode"] = measure_decode(models, plan, seed)
        if plan.decode_batches:
            results["batched_decode"] = measure_batched_decode(models, plan, seed)
        if onnx:
            results["onnx_decode"] = measure_onnx_decode(models["ours"], plan, seed, threads)
    finally:
        torch.set_num_threads(previous_threads)
    results["elapsed_s"] = time.perf_counter() - start
    write_json_atomic(out / f"{stem}.json", results, allow_nan=False)
    write_text_atomic(out / f"{stem}.md", to_markdown(results) + "\n")
    logger.info("wrote %s and %s in %.0f s", out / f"{stem}.json", out / f"{stem}.md", results["elapsed_s"])
    return results


def resolve_config(model: str) -> HybridMambaConfig:
    """The config of a saved folder, or a preset's."""
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json; pass a save_pretrained folder or a preset name")
        return HybridMambaConfig.from_pretrained(str(path))
    try:
        return get_preset(model)
    except (KeyError, ValueError) as e:
        raise ValueError(f"--model {model!r} is neither a folder nor a preset: {e}") from e


def plot(results: dict, path: Path) -> None:
    """Prefill, decode p50 and time to first token against sequence length (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("prefill (ms)", "tokens", results["prefill"], "median_s"),
        ("decode per token, p50 (ms)", "context tokens", results["decode"], "p50_s"),
        ("time to first token (ms)", "prompt tokens", results["decode"], "ttft_s"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5))
    for ax, (title, xlabel, by_len, key) in zip(axes, panels):
        lengths = sorted(by_len, key=int)
        for name in results["parameters"]:
            ax.plot([int(n) for n in lengths], [by_len[n][name][key] * 1e3 for n in lengths], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
    axes[0].legend(fontsize=8)
    m = results["machine"]
    fig.suptitle(f"{m.get('gpu') or m['cpu']}, {m['threads']} threads, {m.get('device', 'cpu')}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def run(args: BenchArgs) -> dict:
    """The fixed benchmark (no --model) or one of a folder or preset; writes STEM.json, .md and .png."""
    default_baselines = ",".join(DEFAULT_BASELINES) if args.model is None else "llama,bamba"
    baselines = tuple(b.strip() for b in (args.baselines or default_baselines).split(",") if b.strip())
    check_baselines(baselines)
    if args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}.")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available")
    import matplotlib  # noqa: F401  (the plot at the end needs it: fail before the benchmark, not after)

    config = HybridMambaConfig(**BENCH_CONFIG) if args.model is None else resolve_config(args.model)
    stem = "bench_speed" if args.model is None else "bench"
    out = Path(args.out or f"results/{stem}")
    plan = QUICK_PLAN if args.quick else Plan()
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    results = run_benchmark(
        config,
        plan,
        out,
        args.threads,
        args.seed,
        baselines=baselines,
        device=args.device,
        stem=stem,
        modes=modes,
        onnx=args.onnx,
    )
    plot(results, out / f"{stem}.png")
    return results


def main(argv=None):
    (args,) = HfArgumentParser(BenchArgs).parse_args_into_dataclasses(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    print(to_markdown(run(args)))


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
