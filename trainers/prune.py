"""Structured pruning of a saved model: learn hard-concrete masks toward a target sparsity, then remove.

    python -m hybrid_mamba.trainers.prune --model runs/tiny/final --data data/demo --sparsity 0.3 --out runs/tiny-p30

Attaches the masks of modeling/prune.py (Mamba-2 heads, Mamba-1 channels, MLP channels) to the model,
trains weights and masks together with the shared loop (trainers/loop.py), the loss being the LM loss
plus the Lagrangian sparsity term (`loss_fn`; the logged training loss includes that term, which can
be large or negative while the multipliers settle); the run's files (metrics.jsonl with the validation
loss of the masked model as it will be pruned, checkpoints, summary.json) go to `--output_dir`; its
best/ and final/ hold the unpruned weights with the masks (`prune_masks.*`). Then
the masks are made deterministic, the dropped units are removed, and `--out` receives a
`save_pretrained` folder of the smaller model (per-layer widths in its config, remote code, tokenizer)
and `pruning.json`: the widths, the sparsity reached, parameter counts, validation losses (dense,
masked, pruned) and the largest logit difference between the masked and the pruned model, which must
be rounding only. A short recovery fine-tune is a pretraining run started from it:
`python -m hybrid_mamba.trainers.pretrain --init_from <out> --data_dir <DATA> ...`.
"""

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import hybrid_mamba.modeling  # noqa: F401  (registers hybrid_mamba with the Auto classes)
from hybrid_mamba.common.args import parse_args
from hybrid_mamba.common.files import write_json_atomic
from hybrid_mamba.modeling import HybridMambaForCausalLM
from hybrid_mamba.modeling.prune import (
    attach_masks,
    detach_masks,
    non_embedding_parameters,
    remove_units,
)
from hybrid_mamba.trainers.args import TrainArgs
from hybrid_mamba.trainers.checkpoint import atomic_save_pretrained
from hybrid_mamba.trainers.data import collate_packed, load_packed
from hybrid_mamba.trainers.loop import evaluate, lm_loss, make_accelerator, train

logger = logging.getLogger("hybrid_mamba.trainers.prune")

UNIT_KINDS = ("mamba2_heads", "mamba1_channels", "mlp_channels")
# The largest masked-vs-pruned logit difference accepted (fp32): removal is exact up to rounding.
MAX_LOGIT_DIFF = 1e-4


@dataclass
class PruneArgs(TrainArgs):
    """Learn structured masks toward a target sparsity with the training loop, then remove the pruned units."""

    model: str = field(default="", metadata={"help": "save_pretrained folder of the model to prune."})
    data: str = field(
        default="data/demo", metadata={"help": "DATA/ folder from data_scripts: train/, validation/, tokenizer/."}
    )
    sparsity: float = field(
        default=0.3, metadata={"help": "Target fraction of the non-embedding parameters to remove."}
    )
    out: str = field(default="", metadata={"help": "Folder for the pruned model (save_pretrained) and pruning.json."})
    prune_units: list[str] = field(
        default_factory=lambda: list(UNIT_KINDS),
        metadata={"help": f"Kinds of units to prune, from {list(UNIT_KINDS)}."},
    )
    sparsity_warmup_steps: int | None = field(
        default=None,
        metadata={"help": "Steps over which the target rises linearly from 0 (default: half of max_steps)."},
    )
    mask_learning_rate: float = field(
        default=0.3,
        metadata={"help": "Peak learning rate of the gates' log-alpha."},
    )
    lagrangian_learning_rate: float = field(
        default=1.0,
        metadata={"help": "Peak learning rate of the Lagrange multipliers (gradient ascent)."},
    )
    init_keep_prob: float = field(default=0.9, metadata={"help": "Initial probability that a gate is open."})
    # training defaults for a short phase on a trained model (the loop's are for pretraining)
    output_dir: str = field(
        default="runs/prune", metadata={"help": "RUN/ folder of the mask training: checkpoints/, metrics.jsonl."}
    )
    max_steps: int = field(default=200, metadata={"help": "Optimizer steps of the mask training."})
    learning_rate: float = field(default=3e-4, metadata={"help": "Peak learning rate of the weights (AdamW)."})
    warmup_steps: int = field(default=10, metadata={"help": "Linear warmup steps."})
    eval_every: int = field(default=50, metadata={"help": "Evaluate (the masked model as pruned) every N steps."})

    def __post_init__(self):
        super().__post_init__()
        if not self.model:
            raise ValueError("--model is required: a save_pretrained folder of a hybrid_mamba model.")
        if not self.out:
            raise ValueError("--out is required: the folder the pruned model is written to.")
        if not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"--sparsity must be in (0, 1), got {self.sparsity}.")
        bad = [k for k in self.prune_units if k not in UNIT_KINDS]
        if bad or not self.prune_units:
            raise ValueError(f"--prune_units must be taken from {list(UNIT_KINDS)}, got {self.prune_units}.")
        if Path(self.out).resolve() == Path(self.model).resolve():
            raise ValueError("--out must differ from --model: the pruned model does not overwrite its source.")


def load_model(folder: str) -> HybridMambaForCausalLM:
    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"--model {folder} has no config.json: give a save_pretrained folder.")
    return HybridMambaForCausalLM.from_pretrained(folder, dtype=torch.float32)


def validation_loss(model, val_ds, accelerator, micro_batch_size: int, max_batches: int | None) -> float:
    loader = DataLoader(val_ds, batch_size=micro_batch_size, collate_fn=collate_packed)
    return evaluate(model, accelerator.prepare_data_loader(loader), accelerator, max_batches)


@torch.no_grad()
def max_logit_difference(masked, pruned, val_ds, n: int = 2) -> float:
    """Largest |logit| difference between the masked model (eval: its deterministic masks) and the pruned one."""
    batch = collate_packed([val_ds[i] for i in range(min(n, len(val_ds)))])
    device = next(pruned.parameters()).device
    kwargs = {k: batch[k].to(device) for k in ("input_ids", "position_ids")}
    masked.eval()
    return (masked(**kwargs).logits - pruned(**kwargs).logits).abs().max().item()


def prune(args: PruneArgs, train_ds, val_ds, tokenizer, model=None) -> dict:
    """Mask training, removal and checks; writes `args.out` and returns what pruning.json holds."""
    model = model if model is not None else load_model(args.model)
    accelerator = make_accelerator(args)
    dense_params = non_embedding_parameters(model)
    dense_val = validation_loss(model, val_ds, accelerator, args.micro_batch_size, args.eval_batches)
    warmup = args.sparsity_warmup_steps if args.sparsity_warmup_steps is not None else args.max_steps // 2
    masks = attach_masks(
        model,
        args.sparsity,
        kinds=tuple(args.prune_units),
        warmup_steps=warmup,
        micro_batches_per_step=args.gradient_accumulation_steps,
        init_keep_prob=args.init_keep_prob,
        lr_scale=args.mask_learning_rate / args.learning_rate,
        lambda_lr_scale=args.lagrangian_learning_rate / args.learning_rate,
    )
    log_every = args.log_every * args.gradient_accumulation_steps

    def loss_fn(m, batch):
        penalty = masks.penalty()
        if int(masks.calls) % log_every == 0:
            logger.info(
                "expected sparsity %(expected_sparsity).3f (target now %(target).3f), "
                "lambda %(lambda_1).3f %(lambda_2).3f",
                masks.stats(),
            )
        return lm_loss(m, batch) + penalty

    summary = train(args, accelerator, model, train_ds, val_ds, collate_packed, tokenizer, loss_fn=loss_fn)
    model = accelerator.unwrap_model(model).eval()
    masks.plan = plan = masks.finalize()
    pruned = remove_units(model, plan, masks.groups)
    diff = max_logit_difference(model, pruned, val_ds)
    if not diff <= MAX_LOGIT_DIFF:
        raise RuntimeError(f"the pruned model's logits differ from the masked model's by {diff:.3g}: a bug.")
    masked_val = summary["final_val_loss"]
    mask_stats = masks.stats()
    detach_masks(model)
    pruned_val = validation_loss(pruned, val_ds, accelerator, args.micro_batch_size, args.eval_batches)
    pruned_params = non_embedding_parameters(pruned)
    cfg = pruned.config
    report = {
        "source": str(args.model),
        "target_sparsity": args.sparsity,
        "sparsity": 1 - pruned_params / dense_params,
        "masks_at_end": mask_stats,
        "non_embedding_parameters": {"dense": dense_params, "pruned": pruned_params},
        "parameters": {"pruned": sum(p.numel() for p in pruned.parameters())},
        "intermediate_size_per_layer": cfg.intermediate_size_per_layer,
        "mamba_d_inner_per_layer": cfg.mamba_d_inner_per_layer,
        "val_loss": {"dense": dense_val, "masked": masked_val, "pruned": pruned_val},
        "max_logit_diff_masked_vs_pruned": diff,
        "mask_training": {"steps": summary["steps"], "tokens": summary["tokens_seen"], "run": str(args.output_dir)},
    }
    if accelerator.is_main_process:
        out = Path(args.out)
        atomic_save_pretrained(pruned, tokenizer, out)
        write_json_atomic(out / "pruning.json", report)
    report["model"] = pruned
    return report


def main(argv=None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    args = parse_args(PruneArgs, argv)
    model = load_model(args.model)
    train_ds, val_ds, tokenizer = load_packed(args.data)  # fails before any training on a bad DATA/
    report = prune(args, train_ds, val_ds, tokenizer, model)
    report.pop("model")
    v = report["val_loss"]
    print(
        f"sparsity {report['sparsity']:.3f} (target {args.sparsity}); non-embedding parameters "
        f"{report['non_embedding_parameters']['dense']:,} -> {report['non_embedding_parameters']['pruned']:,}; "
        f"val loss dense {v['dense']:.3f}, pruned {v['pruned']:.3f}"
        + ("" if math.isnan(v["masked"]) else f" (masked {v['masked']:.3f})")
    )
    print(f"pruned model in {args.out}")
    return report


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
