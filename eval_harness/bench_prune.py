"""Structured pruning at several sparsities: size, FLOPs, CPU latency and validation loss.

    python -m hybrid_mamba.eval_harness.bench_prune --out docs/results/bench_prune [--model runs/tiny/final]
                                                   [--data data/demo] [--sparsities 0.1,0.3,0.5] [--quick]

For each target sparsity, the trained model (`--model`, by default the `make demo` run on the demo
corpus) is pruned by trainers/prune.py (hard-concrete masks on Mamba heads/channels and MLP channels,
`--mask_steps` steps of the shared training loop, then removal), and the pruned model gets a short
recovery fine-tune (`--recovery_steps` steps of the same loop, LM loss only). Measured for the dense
model and each pruned one:
- parameters (all, and non-embedding) and FLOPs per token (trainers/loop.flops_per_token: 6N plus
  the attention term, at the training sequence length; a forward pass is a third of it);
- validation loss on the first `--val_blocks` validation blocks: dense; pruned before any recovery
  (which equals the masked model's at the end of mask training, checked to 1e-4 in the logits); and
  after recovery. The dense model also gets the same recovery fine-tune, so that its gain from the
  extra steps is not credited to pruning;
- CPU latency at `--threads` threads, fp32, batch 1, with eval_harness/bench_speed.py's helpers (the
  models take turns in every repetition): prefill median at each `--prefill_lengths`, decode p50 per
  token after a prompt of `--decode_prompt`.
To keep it within minutes on a CPU, training and evaluation use blocks cut to `--seq_len` tokens
(the demo data's 512-token blocks split in pieces, positions kept). Writes bench_prune.json (every
number, the machine, the arguments) and bench_prune.md into --out. Timings on a shared machine are
noisy: compare the models within one run.
"""

import copy
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hybrid_mamba.common.args import parse_args
from hybrid_mamba.common.files import write_json_atomic, write_text_atomic
from hybrid_mamba.common.machine import machine
from hybrid_mamba.modeling.prune import non_embedding_parameters
from hybrid_mamba.trainers.args import TrainArgs
from hybrid_mamba.trainers.data import collate_packed, load_packed
from hybrid_mamba.trainers.loop import flops_per_token, make_accelerator, train
from hybrid_mamba.trainers.prune import PruneArgs, load_model, prune, validation_loss

from .bench_speed import Plan, measure_decode, measure_prefill

logger = logging.getLogger(__name__)


@dataclass
class BenchPruneArgs:
    """Prune a trained model at several sparsities; measure size, FLOPs, CPU latency and validation loss."""

    out: str = field(default="docs/results/bench_prune", metadata={"help": "Folder for bench_prune.json and .md."})
    model: str = field(default="runs/tiny/final", metadata={"help": "Trained model folder (`make demo` writes it)."})
    data: str = field(default="data/demo", metadata={"help": "DATA/ folder the model was trained on."})
    sparsities: str = field(default="0.1,0.3,0.5", metadata={"help": "Target sparsities, comma-separated."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per training/validation block (blocks are cut)."})
    micro_batch_size: int = field(default=2, metadata={"help": "Sequences per step (mask training and recovery)."})
    mask_steps: int = field(default=60, metadata={"help": "Steps of mask training per sparsity."})
    recovery_steps: int = field(default=30, metadata={"help": "Steps of the recovery fine-tune."})
    learning_rate: float = field(default=3e-4, metadata={"help": "Peak learning rate of the weights."})
    mask_learning_rate: float = field(default=0.3, metadata={"help": "Peak learning rate of the gates."})
    lagrangian_learning_rate: float = field(
        default=1.0, metadata={"help": "Peak learning rate of the Lagrange multipliers."}
    )
    val_blocks: int = field(default=32, metadata={"help": "Validation blocks (of seq_len tokens) evaluated."})
    threads: int = field(default=1, metadata={"help": "torch threads for everything."})
    prefill_lengths: str = field(default="256,1024", metadata={"help": "Prefill lengths timed, comma-separated."})
    prefill_reps: int = field(default=5, metadata={"help": "Timed prefills per length and model."})
    decode_prompt: int = field(default=128, metadata={"help": "Prompt tokens before the timed decode steps."})
    decode_steps: int = field(default=24, metadata={"help": "Timed decode steps per model."})
    seed: int = field(default=0, metadata={"help": "Seed of the mask training, the recovery and the inputs."})
    quick: bool = field(default=False, metadata={"help": "Tiny sizes: a smoke test, numbers meaningless."})

    def __post_init__(self):
        values = [float(s) for s in self.sparsities.split(",") if s.strip()]
        if not values or any(not 0 < s < 1 for s in values):
            raise ValueError(f"--sparsities must be numbers in (0, 1), got {self.sparsities!r}.")
        if self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}.")
        if self.quick:
            self.mask_steps, self.recovery_steps, self.val_blocks = 4, 2, 4
            self.prefill_lengths, self.prefill_reps, self.decode_steps, self.decode_prompt = "64", 1, 3, 16


def cut_blocks(ds, seq_len: int):
    """Blocks of `seq_len` tokens from longer packed blocks (the positions travel with the tokens)."""
    length = int(ds[0]["input_ids"].shape[-1])
    if seq_len > length or length % seq_len:
        raise ValueError(f"--seq_len {seq_len} must divide the data's block length {length}.")
    if seq_len == length:
        return ds

    def split(batch):
        return {
            k: [row[i : i + seq_len] for row in batch[k] for i in range(0, length, seq_len)]
            for k in ("input_ids", "position_ids")
        }

    ds = ds.with_format(None)
    cut = ds.map(split, batched=True, remove_columns=ds.column_names)
    return cut.with_format("torch", columns=["input_ids", "position_ids"])


def _train_args(cls, bench: BenchPruneArgs, output_dir: str, steps: int, **extra):
    return cls(
        output_dir=output_dir,
        seed=bench.seed,
        micro_batch_size=bench.micro_batch_size,
        max_steps=steps,
        learning_rate=bench.learning_rate,
        warmup_steps=max(1, steps // 10),
        eval_every=steps,
        eval_batches=None,
        checkpoint_every=10**9,
        resume=False,
        log_every=max(1, steps // 4),
        **extra,
    )


def recover(model, bench: BenchPruneArgs, train_ds, val_ds, tokenizer, run_dir: Path) -> float:
    """The recovery fine-tune: `recovery_steps` of the loop on the LM loss; returns the final validation loss."""
    args = _train_args(TrainArgs, bench, str(run_dir), bench.recovery_steps)
    summary = train(args, make_accelerator(args), model, train_ds, val_ds, collate_packed, tokenizer)
    model.eval()
    return summary["final_val_loss"]


def size_row(model, seq_len: int) -> dict:
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "non_embedding_parameters": non_embedding_parameters(model),
        "flops_per_token": flops_per_token(model, seq_len),
        "intermediate_size_per_layer": [
            layer.mlp.gate_proj.out_features if layer.mlp is not None else 0 for layer in model.model.layers
        ],
        "mamba_d_inner_per_layer": [
            layer.mamba.d_inner if layer.mixer_type != "attention" else 0 for layer in model.model.layers
        ],
    }


def run(bench: BenchPruneArgs) -> dict:
    start = time.perf_counter()
    torch.set_num_threads(bench.threads)
    dense = load_model(bench.model)
    train_ds, val_ds, tokenizer = load_packed(bench.data)
    train_ds = cut_blocks(train_ds, bench.seq_len)
    val_ds = cut_blocks(val_ds, bench.seq_len)
    val_ds = val_ds.select(range(min(bench.val_blocks, len(val_ds))))
    sparsities = [float(s) for s in bench.sparsities.split(",") if s.strip()]
    results = {
        "command": " ".join(["python -m hybrid_mamba.eval_harness.bench_prune", *sys.argv[1:]]),
        "machine": machine(bench.threads),
        "args": asdict(bench),
        "tokens": {
            "mask_training": bench.mask_steps * bench.micro_batch_size * bench.seq_len,
            "recovery": bench.recovery_steps * bench.micro_batch_size * bench.seq_len,
            "validation": len(val_ds) * bench.seq_len,
        },
        "models": {},
    }
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        probe = PruneArgs(model=bench.model, out=str(tmp / "x"), micro_batch_size=bench.micro_batch_size)
        dense_val = validation_loss(dense, val_ds, make_accelerator(probe), bench.micro_batch_size, None)
        dense_row = {"target_sparsity": 0.0, "sparsity": 0.0, **size_row(dense, bench.seq_len)}
        dense_row["val_loss"] = {"before": dense_val, "pruned": dense_val}
        torch.manual_seed(bench.seed)
        dense_row["val_loss"]["recovered"] = recover(
            copy.deepcopy(dense), bench, train_ds, val_ds, tokenizer, tmp / "dense_recovery"
        )
        dense_row["mask_training_s"], dense_row["recovery_s"] = 0.0, None
        results["models"]["dense"] = dense_row
        models["dense"] = dense.eval()
        for s in sparsities:
            name = f"pruned_{round(s * 100)}"
            t0 = time.perf_counter()
            args = _train_args(
                PruneArgs,
                bench,
                str(tmp / f"{name}_masks"),
                bench.mask_steps,
                model=bench.model,
                out=str(tmp / name),
                sparsity=s,
                mask_learning_rate=bench.mask_learning_rate,
                lagrangian_learning_rate=bench.lagrangian_learning_rate,
            )
            torch.manual_seed(bench.seed)
            report = prune(args, train_ds, val_ds, tokenizer, load_model(bench.model))
            pruned = report.pop("model")
            t1 = time.perf_counter()
            torch.manual_seed(bench.seed)
            recovered = recover(pruned, bench, train_ds, val_ds, tokenizer, tmp / f"{name}_recovery")
            row = {
                "target_sparsity": s,
                "sparsity": report["sparsity"],
                **size_row(pruned, bench.seq_len),
                "val_loss": {
                    "before": report["val_loss"]["dense"],
                    "masked": report["val_loss"]["masked"],
                    "pruned": report["val_loss"]["pruned"],
                    "recovered": recovered,
                },
                "max_logit_diff_masked_vs_pruned": report["max_logit_diff_masked_vs_pruned"],
                "masks_at_end": report["masks_at_end"],
                "mask_training_s": t1 - t0,
                "recovery_s": time.perf_counter() - t1,
            }
            results["models"][name] = row
            models[name] = pruned.eval()
            logger.info("%s: %s", name, {k: v for k, v in row.items() if k != "masks_at_end"})
    plan = Plan(
        prefill_lengths=tuple(int(n) for n in bench.prefill_lengths.split(",")),
        prefill_reps=tuple(bench.prefill_reps for _ in bench.prefill_lengths.split(",")),
        decode_prompts=(bench.decode_prompt,),
        decode_steps=bench.decode_steps,
        warmup=1,
        decode_warmup=3,
    )
    results["latency_plan"] = asdict(plan)
    results["prefill"] = measure_prefill(models, plan, bench.seed)
    results["decode"] = measure_decode(models, plan, bench.seed)
    results["elapsed_s"] = time.perf_counter() - start
    out = Path(bench.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "bench_prune.json", results, allow_nan=False)
    write_text_atomic(out / "bench_prune.md", to_markdown(results) + "\n")
    return results


def to_markdown(results: dict) -> str:
    a, m = results["args"], results["machine"]
    dense = results["models"]["dense"]
    lengths = sorted(results["prefill"], key=int)
    prompt = next(iter(results["decode"]))
    lines = [
        "# Structured pruning (hard-concrete masks, then removal)",
        "",
        f"`{results['command']}`",
        "",
        f"Model `{a['model']}` on `{a['data']}`; blocks of {a['seq_len']} tokens, batch {a['micro_batch_size']}: "
        f"{a['mask_steps']} steps of mask training ({results['tokens']['mask_training']:,} tokens) and "
        f"{a['recovery_steps']} of recovery ({results['tokens']['recovery']:,} tokens); validation on "
        f"{results['tokens']['validation']:,} tokens. The dense row's 'recovered' is the dense model after "
        "the same recovery steps. "
        f"{m.get('cpu', '')}, {a['threads']} thread(s), fp32, batch 1; {results['elapsed_s'] / 60:.1f} min in all. "
        "A shared, noisy machine: compare within this run only.",
        "",
        "| model | target | sparsity | params | non-emb. params | FLOPs/token | val loss before | pruned | "
        "after recovery | "
        + " | ".join(f"prefill {n} (ms)" for n in lengths)
        + f" | decode after {prompt}, p50 (ms) |",
        "|---" * (10 + len(lengths)) + "|",
    ]
    for name, row in results["models"].items():
        v = row["val_loss"]
        pre = [results["prefill"][n][name]["median_s"] * 1e3 for n in lengths]
        dec = results["decode"][prompt][name]["p50_s"] * 1e3
        share = row["non_embedding_parameters"] / dense["non_embedding_parameters"]
        lines.append(
            f"| {name} | {row['target_sparsity']:.0%} | {row['sparsity']:.1%} | {row['parameters'] / 1e6:.2f}M | "
            f"{row['non_embedding_parameters'] / 1e6:.2f}M ({share:.0%}) | "
            f"{row['flops_per_token'] / 1e6:.1f}M | {v['before']:.3f} | {v['pruned']:.3f} | {v['recovered']:.3f} | "
            + " | ".join(f"{p:.1f}" for p in pre)
            + f" | {dec:.2f} |"
        )
    lines += ["", "Widths per layer (MLP intermediate / Mamba inner):", ""]
    for name, row in results["models"].items():
        lines.append(f"- {name}: MLP {row['intermediate_size_per_layer']}, Mamba {row['mamba_d_inner_per_layer']}")
    return "\n".join(lines)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    bench = parse_args(BenchPruneArgs, argv)
    if not (Path(bench.model) / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {bench.model} has no config.json: run `make demo` first, or give a model folder."
        )
    print(to_markdown(run(bench)))


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
