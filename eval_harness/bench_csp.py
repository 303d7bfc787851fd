"""Latency of a model before and after CSP (modeling/csp.py), measured side by side.

    python -m hybrid_mamba.eval_harness.bench_csp [--model DIR|PRESET] [--prompts 128,1024] [--decode_steps 32]
        [--reps 5] [--threads 2] [--out results/bench_csp]

Three models take turns in every repetition, and in every decode step: the original, its CSP-permuted
copy (same function: the largest logit difference on a test input is recorded) and a control, an
unpermuted deep copy of the original. The order rotates from one repetition to the next, so none
always runs on a warmer cache or a quieter machine. The control's ratio to the original shows what a
ratio means on this machine: two identical models differ by that much from noise and memory placement
alone, and a CSP ratio within the control's spread is no effect.
Without --model: the fixed size of eval_harness/bench_speed.py (BENCH_CONFIG), randomly initialised
(seeded); a preset name: that preset, randomly initialised; a folder: its weights.

Measured (no grad, batch 1, fp32, logits of the last token only, as generate() asks):
- prefill latency, use_cache=False, at each --prompts length: median over --reps (after --warmup);
- decode: the prompt is prefilled with a cache, then --decode_warmup + --decode_steps one-token steps,
  each timed; per prompt length this runs max(1, reps // 2) times; median and p90 of all counted steps.
The ratios are csp / original (below 1: CSP faster) and copy / original, of the medians, and the
medians of the per-repetition (per-step) paired ratios. Writes bench_csp.json (every time, the machine, the arguments) and
bench_csp.md into --out and prints the markdown.

What to expect: the same. A permutation changes which row of a weight holds which head, channel or
state dimension, not the shapes, the operations or the memory layout the kernels see (see modeling/csp.py).
"""

import copy
import gc
import logging
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hybrid_mamba.common.args import parse_args
from hybrid_mamba.common.files import write_json_atomic, write_text_atomic
from hybrid_mamba.common.machine import machine
from hybrid_mamba.configuration import HybridMambaConfig
from hybrid_mamba.eval_harness.bench_speed import (
    BENCH_CONFIG,
    cache_arg,
    random_ids,
    resolve_config,
    returned_cache,
    timed,
    turn_order,
)
from hybrid_mamba.modeling import HybridMambaForCausalLM
from hybrid_mamba.modeling.csp import calibration_ids, csp_permute

logger = logging.getLogger(__name__)

NAMES = ("original", "csp", "copy")  # copy: the original, deep-copied and not permuted (the control)


@dataclass
class BenchCSPArgs:
    """Prefill and decode latency of a model and its CSP-permuted copy, interleaved."""

    model: str | None = field(
        default=None,
        metadata={"help": "Model folder (its weights) or preset name (random weights); unset: BENCH_CONFIG."},
    )
    prompts: str = field(default="128,1024", metadata={"help": "Comma-separated prompt lengths."})
    decode_steps: int = field(default=32, metadata={"help": "Timed one-token decode steps per run."})
    decode_warmup: int = field(default=2, metadata={"help": "Untimed decode steps before them."})
    reps: int = field(default=5, metadata={"help": "Counted prefill repetitions (decode runs: reps // 2, at least 1)."})
    warmup: int = field(default=1, metadata={"help": "Uncounted prefill repetitions first."})
    threads: int = field(default=2, metadata={"help": "torch.set_num_threads."})
    seed: int = field(default=0, metadata={"help": "Seed of the weights, the inputs and the calibration ids."})
    calibration_tokens: int = field(default=2048, metadata={"help": "CSP calibration tokens (random ids)."})
    out: str = field(default="results/bench_csp", metadata={"help": "Output folder."})

    def __post_init__(self):
        if self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}.")
        if self.reps < 1 or self.decode_steps < 1 or self.warmup < 0 or self.decode_warmup < 0:
            raise ValueError("--reps and --decode_steps must be at least 1, --warmup and --decode_warmup at least 0.")
        lengths = self.prompt_lengths()
        if not lengths or min(lengths) < 1:
            raise ValueError(f"--prompts must be positive lengths, got {self.prompts!r}.")

    def prompt_lengths(self) -> list[int]:
        try:
            return [int(p) for p in self.prompts.split(",") if p.strip()]
        except ValueError as e:
            raise ValueError(f"--prompts must be comma-separated integers, got {self.prompts!r}.") from e


def build_models(args: BenchCSPArgs) -> tuple[dict, dict]:
    """{"original": model, "csp": its permuted copy, "copy": an unpermuted copy}, and the CSP report."""
    if args.model is not None and Path(args.model).is_dir():
        resolve_config(args.model)  # a folder without config.json fails here, in one line
        original = HybridMambaForCausalLM.from_pretrained(args.model, local_files_only=True, dtype=torch.float32)
    else:
        config = HybridMambaConfig(**BENCH_CONFIG) if args.model is None else resolve_config(args.model)
        torch.manual_seed(args.seed)
        original = HybridMambaForCausalLM(config)
    original = original.float().eval()
    control = copy.deepcopy(original)  # the same weights in fresh memory, as the permuted copy has
    permuted = copy.deepcopy(original)
    report: dict = {}
    ids = calibration_ids(original.config.vocab_size, args.calibration_tokens, 256, args.seed)
    perms = csp_permute(permuted, ids, report=report)
    moved = sum(bool((p != torch.arange(p.shape[-1])).any()) for p in perms.values())
    return {"original": original, "csp": permuted, "copy": control}, {
        "sets": len(perms),
        "reordered": moved,
        "scores": report,
    }


@torch.no_grad()
def max_logit_diff(models: dict, seed: int) -> float:
    ids = random_ids(models["original"].config.vocab_size, (1, 64), seed + 7)
    a, b = (models[n](input_ids=ids, use_cache=False).logits for n in ("original", "csp"))
    return float((a - b).abs().max())


class _OpTrace(TorchDispatchMode):
    """Every aten op run under it, with the shape, stride and dtype of each tensor argument."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = tuple((tuple(a.shape), a.stride(), str(a.dtype)) for a in flat if isinstance(a, torch.Tensor))
        self.ops.append((str(func), tensors))
        return func(*args, **kwargs)


@torch.no_grad()
def op_trace(model, seed: int, prompt: int = 64) -> list:
    """The aten ops (with argument shapes, strides and dtypes) of a prefill of `prompt` tokens with a
    cache and of one decode step after it: what the kernels are asked to compute, timing aside."""
    vocab = model.config.vocab_size
    ids = random_ids(vocab, (1, prompt + 1), seed + 11)
    with _OpTrace() as trace:
        cache = returned_cache(model(input_ids=ids[:, :prompt], use_cache=True, logits_to_keep=1))
        model(
            **{cache_arg(model): cache},
            input_ids=ids[:, prompt:],
            position_ids=torch.tensor([[prompt]]),
            use_cache=True,
        )
    return trace.ops


def same_ops(models: dict, seed: int) -> dict:
    """Whether the original and the permuted model run the same op sequence on tensors of the same layout."""
    a, b = op_trace(models["original"], seed), op_trace(models["csp"], seed)
    return {"identical": a == b, "ops": len(a), "ops_csp": len(b)}


def _summary(times: dict, paired: dict[str, list[float]]) -> dict:
    out = {
        n: {"times_s": ts, "median_s": statistics.median(ts), "p90_s": float(np.percentile(ts, 90))}
        for n, ts in times.items()
    }
    out["ratio"] = {
        name: {
            "of_medians": out[name]["median_s"] / out["original"]["median_s"],
            "median_paired": statistics.median(paired[name]),
        }
        for name in ("csp", "copy")
    }
    return out


@torch.no_grad()
def measure_prefill(models: dict, args: BenchCSPArgs) -> dict:
    results = {}
    for length in args.prompt_lengths():
        ids = random_ids(models["original"].config.vocab_size, (1, length), args.seed + length)
        times, paired = {n: [] for n in NAMES}, {"csp": [], "copy": []}
        for i in range(args.warmup + args.reps):
            step = {
                n: timed(lambda n=n: models[n](input_ids=ids, use_cache=False, logits_to_keep=1))
                for n in turn_order(NAMES, i)
            }
            if i >= args.warmup:
                for n in NAMES:
                    times[n].append(step[n])
                for name in paired:
                    paired[name].append(step[name] / step["original"])
        results[str(length)] = _summary(times, paired)
        logger.info(
            "prefill %d: original %.1f ms, csp %.1f ms",
            length,
            results[str(length)]["original"]["median_s"] * 1e3,
            results[str(length)]["csp"]["median_s"] * 1e3,
        )
        gc.collect()
    return results


@torch.no_grad()
def measure_decode(models: dict, args: BenchCSPArgs) -> dict:
    vocab = models["original"].config.vocab_size
    arg = cache_arg(models["original"])  # `cache` (transformers >= 5.24) or `past_key_values`
    n_steps = args.decode_warmup + args.decode_steps
    results = {}
    for length in args.prompt_lengths():
        times, paired, ttft = {n: [] for n in NAMES}, {"csp": [], "copy": []}, {n: [] for n in NAMES}
        for run in range(max(1, args.reps // 2)):
            prompt = random_ids(vocab, (1, length), args.seed + length + run)
            tokens = random_ids(vocab, (1, n_steps), args.seed + length + run + 1)
            caches = {}
            for n in turn_order(NAMES, run):

                def first(n=n):
                    caches[n] = returned_cache(models[n](input_ids=prompt, use_cache=True, logits_to_keep=1))

                ttft[n].append(timed(first))
            for i in range(n_steps):
                step_kw = dict(
                    input_ids=tokens[:, i : i + 1], position_ids=torch.tensor([[length + i]]), use_cache=True
                )
                step = {}
                for n in turn_order(NAMES, run + i):

                    def one(n=n):
                        caches[n] = returned_cache(models[n](**{arg: caches[n]}, **step_kw))

                    step[n] = timed(one)
                if i >= args.decode_warmup:
                    for n in NAMES:
                        times[n].append(step[n])
                    for name in paired:
                        paired[name].append(step[name] / step["original"])
            caches.clear()
            gc.collect()
        results[str(length)] = _summary(times, paired)
        for n in NAMES:
            results[str(length)][n]["ttft_s"] = ttft[n]
        logger.info(
            "decode after %d: original %.2f ms, csp %.2f ms per token",
            length,
            results[str(length)]["original"]["median_s"] * 1e3,
            results[str(length)]["csp"]["median_s"] * 1e3,
        )
    return results


def to_markdown(results: dict) -> str:
    m, a = results["machine"], results["args"]
    cfg = results["config"]
    lines = [
        "# CSP latency: original vs permuted",
        "",
        f"{m['cpu']}, {m['threads']} threads, torch {m['torch']}, {m['date']}; model {results['model']} "
        f"(hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers {','.join(sorted(set(cfg['layer_types'])))}, "
        f"Mamba state {cfg['mamba_d_state']}, {cfg['mamba_n_heads']} Mamba-2 heads of {cfg['mamba_head_dim']}), fp32, batch 1.",
        f"CSP reordered {results['csp']['reordered']} of {results['csp']['sets']} permutable sets "
        f"({a['calibration_tokens']} calibration tokens); largest logit difference after it "
        f"{results['max_abs_logit_diff']:.2e}. 1-minute load average {results['loadavg_1min']['start']:.1f} at the "
        f"start, {results['loadavg_1min']['end']:.1f} at the end, on {m['cores_available']} cores.",
        f"Op trace of a 64-token prefill and one decode step (aten ops with the shape, stride and dtype of every "
        f"tensor argument): {'identical' if results['op_trace']['identical'] else 'DIFFERENT'} "
        f"({results['op_trace']['ops']} ops), so both models ask the kernels for the same computation on the same layouts.",
        "The three models (copy: the original deep-copied, not permuted; the control) take turns inside every "
        "repetition (and decode step), the order rotated each time. Ratios to the original (below 1: faster), "
        "of the medians and, paired, the median of the per-repetition (per-step) ratios. A csp ratio no further "
        "from 1 than the copy's is noise.",
        "",
        "| measurement | original (ms) | csp (ms) | copy (ms) | csp/orig | copy/orig | csp/orig paired "
        "| copy/orig paired | n |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, key in (("prefill", "prefill"), ("decode per token, after", "decode")):
        for length, r in results[key].items():
            ms = " | ".join(f"{r[n]['median_s'] * 1e3:.2f}" for n in NAMES)
            ratios = " | ".join(
                f"{r['ratio'][n][k]:.3f}" for k in ("of_medians", "median_paired") for n in ("csp", "copy")
            )
            lines.append(f"| {label} {length} | {ms} | {ratios} | {len(r['csp']['times_s'])} |")
    lines += [
        "",
        "A permutation of heads, channels and state dimensions leaves every shape, operation and memory "
        "layout as it was, so no difference is expected from dense kernels; see modeling/csp.py.",
    ]
    return "\n".join(lines) + "\n"


def run(args: BenchCSPArgs) -> dict:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    models, report = build_models(args)
    cfg = models["original"].config
    results = {
        "machine": machine(args.threads),
        "args": asdict(args),
        "model": args.model or "BENCH_CONFIG",
        "config": {
            k: getattr(cfg, k)
            for k in (
                "hidden_size",
                "num_hidden_layers",
                "layer_types",
                "mamba_d_state",
                "mamba_head_dim",
                "mamba_n_heads",
                "mamba_n_groups",
            )
        },
        "csp": report,
        "max_abs_logit_diff": max_logit_diff(models, args.seed),
        "op_trace": same_ops(models, args.seed),
        "loadavg_1min": {"start": os.getloadavg()[0]},
    }
    results["prefill"] = measure_prefill(models, args)
    results["decode"] = measure_decode(models, args)
    results["loadavg_1min"]["end"] = os.getloadavg()[0]
    write_json_atomic(out / "bench_csp.json", results)
    write_text_atomic(out / "bench_csp.md", to_markdown(results))
    return results


def main(argv=None):
    args = parse_args(BenchCSPArgs, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    print(to_markdown(run(args)))


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
