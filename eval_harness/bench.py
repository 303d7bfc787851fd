"""Speed and memory of a model folder or preset against transformers baselines of matched size.

    python -m eval_harness.bench --model RUN/final|PRESET [--baselines llama,bamba,mamba2] [--device cpu|cuda]
                                 [--out results/bench] [--threads 2] [--quick]

The measurements are eval_harness.bench_speed's (training step tokens/s, prefill latency at several
lengths, per-token decode latency p50/p95/p99 at several context lengths, time to first token, peak
memory), run with the models taking turns; on CUDA they are timed with CUDA events and memory is
torch.cuda.max_memory_allocated, on CPU perf_counter and ru_maxrss in a subprocess per model.
--model is a save_pretrained folder (its config.json; the weights are re-initialised at random,
which does not change speed) or a preset name (configuration/presets.yaml). Baselines are built
from its config: llama (same hidden size, depth, heads and vocabulary, attention in every layer, MLP
widened until the parameter count matches), llama_shape (the same but with its MLP width, so
smaller), bamba (also the same layer layout; needs no Mamba-1 layers), mamba2 (Mamba2ForCausalLM:
same hidden size, depth, vocabulary and Mamba-2 mixer sizes; it has no MLP).

Writes OUT/bench.json (bench_speed.json's schema: the machine, thread count and device included),
OUT/bench.md (tables with a ratio column against each baseline) and OUT/bench.png (prefill, decode
and time to first token against sequence length, one line per model).
"""

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from configuration import HybridMambaConfig, get_preset
from eval_harness.files import save_figure
from eval_harness.bench_speed import ALL_CLASSES, QUICK_PLAN, Plan, run_benchmark, to_markdown

logger = logging.getLogger(__name__)


@dataclass
class BenchArgs:
    model: str = field(metadata={"help": "Model folder (config.json) or preset name."})
    baselines: str = field(default="llama,bamba", metadata={"help": "Comma-separated: llama, llama_shape, bamba, mamba2."})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda[:N]."})
    out: str = field(default="results/bench", metadata={"help": "Folder for bench.json, bench.md, bench.png."})
    threads: int = field(default=2, metadata={"help": "torch.set_num_threads (CPU)."})
    quick: bool = field(default=False, metadata={"help": "Smoke-test sizes and repetitions."})
    seed: int = field(default=0, metadata={"help": "Seed of the weights and of the random token ids."})


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
    baselines = tuple(b.strip() for b in args.baselines.split(",") if b.strip())
    unknown = set(baselines) - (set(ALL_CLASSES) - {"ours"})
    if unknown:
        raise ValueError(f"unknown baselines {sorted(unknown)}: choose from {sorted(set(ALL_CLASSES) - {'ours'})}")
    if args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available")
    config = resolve_config(args.model)
    plan = QUICK_PLAN if args.quick else Plan()
    out = Path(args.out)
    results = run_benchmark(
        config, plan, out, args.threads, args.seed,
        command=" ".join(["python -m eval_harness.bench", *sys.argv[1:]]),
        baselines=baselines, device=args.device, stem="bench",
    )
    plot(results, out / "bench.png")
    return results


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    (args,) = HfArgumentParser(BenchArgs).parse_args_into_dataclasses(args=argv)
    print(to_markdown(run(args)))


if __name__ == "__main__":
    from configuration.cli import run_main

    run_main(main)
