"""Distillation entry point: train a student to match a frozen teacher's next-token distributions.

    python -m hybrid_mamba.modeling.distill_init --teacher TEACHER --attention_layers 2,6 --out STUDENT
    accelerate launch -m hybrid_mamba.trainers.distill --teacher TEACHER --student STUDENT \
        --data_dir data/demo --output_dir runs/distill [--kl_weight 1 --lm_weight 0 --temperature 1]

The same loop as pretraining (trainers/loop.py) with its training objective replaced (`loss_fn`):

    loss = kl_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + lm_weight * next-token loss

the KL summed over the vocabulary and averaged over the real tokens of the batch (all of them in packed
blocks; those with `attention_mask` 1 in padded ones), as in "The Mamba in the Llama" (Wang et al., 2024),
whose distillation stage uses this loss with an optional cross-entropy term. The T^2 factor (Hinton et al.)
keeps the gradient's scale independent of T. The teacher is loaded once, frozen (no gradients), kept in
eval mode and outside `accelerator.prepare`: it is never in a checkpoint, and a resumed run reloads it from
its folder. Evaluation reports the student's validation loss (which picks best/) and its KL to the teacher.
"""

import contextlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import hybrid_mamba.modeling  # noqa: F401  (registers hybrid_mamba with the Auto classes)
from hybrid_mamba.common.args import parse_args
from hybrid_mamba.modeling import HybridMambaForCausalLM
from hybrid_mamba.modeling.distill_init import load_teacher
from hybrid_mamba.trainers.args import TrainArgs
from hybrid_mamba.trainers.data import collate_packed, load_packed, unigram_baseline
from hybrid_mamba.trainers.loop import make_accelerator, train

logger = logging.getLogger("hybrid_mamba.trainers.distill")


@dataclass
class DistillArgs(TrainArgs):
    """Distillation of a teacher into a student on packed token blocks written by data_scripts."""

    teacher: str = field(
        default="", metadata={"help": "Teacher folder (save_pretrained): a hybrid_mamba model or a Llama."}
    )
    student: str = field(
        default="",
        metadata={"help": "Student init folder (save_pretrained), e.g. written by modeling.distill_init."},
    )
    data_dir: str = field(
        default="data/demo", metadata={"help": "DATA/ folder from data_scripts: train/, validation/, tokenizer/."}
    )
    kl_weight: float = field(default=1.0, metadata={"help": "Weight of KL(teacher || student) on the logits."})
    lm_weight: float = field(default=0.0, metadata={"help": "Weight of the student's next-token loss on the data."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of both distributions in the KL."})

    def __post_init__(self):
        super().__post_init__()
        if not self.teacher or not self.student:
            raise ValueError("--teacher and --student are both required (model folders).")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be positive, got {self.temperature}.")
        if self.kl_weight < 0 or self.lm_weight < 0 or self.kl_weight + self.lm_weight == 0:
            raise ValueError("--kl_weight and --lm_weight must be non-negative and not both zero.")


def kl_per_token(student_logits, teacher_logits, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) per position: (..., V) -> (...), in float32."""
    t = temperature
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * t * t


def real_tokens(batch) -> torch.Tensor:
    """(B, T) mask of the positions that count: `attention_mask` when the batch is padded, else all."""
    mask = batch.get("attention_mask")
    return torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask.bool()


def _model_inputs(batch) -> dict:
    return {k: v for k, v in batch.items() if k in ("input_ids", "position_ids", "attention_mask")}


class DistillLoss:
    """The `loss_fn` of the loop: `kl_weight * KL + lm_weight * LM`, KL averaged over real tokens."""

    def __init__(self, teacher, kl_weight=1.0, lm_weight=0.0, temperature=1.0, autocast=None):
        self.teacher = freeze(teacher)
        self.kl_weight, self.lm_weight, self.temperature = kl_weight, lm_weight, temperature
        self.autocast = autocast  # the accelerator's autocast: the teacher runs in the student's precision

    def teacher_logits(self, batch) -> torch.Tensor:
        with torch.no_grad(), self.autocast() if self.autocast else contextlib.nullcontext():
            return self.teacher(**_model_inputs(batch), use_cache=False).logits

    def __call__(self, model, batch) -> torch.Tensor:
        target = self.teacher_logits(batch) if self.kl_weight else None
        labels = {"labels": batch["labels"]} if self.lm_weight else {}
        out = model(**_model_inputs(batch), **labels, use_cache=False)
        loss = out.logits.new_zeros((), dtype=torch.float32)
        if self.kl_weight:
            mask = real_tokens(batch)
            kl = kl_per_token(out.logits, target, self.temperature)  # (B, T)
            loss = loss + self.kl_weight * (kl * mask).sum() / mask.sum().clamp(min=1)
        if self.lm_weight:
            loss = loss + self.lm_weight * out.loss
        return loss


def freeze(teacher):
    """Eval mode, no gradients: dropout off and nothing of the teacher in any optimizer or backward."""
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def evaluate_distill(model, teacher_logits, loader, accelerator, max_batches=None, temperature=1.0) -> dict:
    """Validation next-token loss of the student (val_loss, val_ppl) and its KL to the teacher (val_kl, at T)."""
    model.eval()
    rows = []
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        logits = model(**_model_inputs(batch), use_cache=False).logits
        labels = batch["labels"][:, 1:]
        ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
        mask = real_tokens(batch)
        kl = kl_per_token(logits, teacher_logits(batch), temperature)  # (B, T)
        parts = (ce.sum(-1), (labels != -100).sum(-1), (kl * mask).sum(-1), mask.sum(-1))
        per_row = torch.stack([t.double() for t in parts], dim=-1)
        rows.append(accelerator.gather_for_metrics(per_row))  # (B, 4); duplicates of the last batch dropped
    ce_sum, ce_n, kl_sum, kl_n = torch.cat(rows).sum(0).tolist()
    model.train()
    val = ce_sum / ce_n
    return {"val_loss": val, "val_ppl": math.exp(min(val, 50)), "val_kl": kl_sum / kl_n}


def check_pair(teacher, student, tokenizer) -> None:
    t, s = teacher.config, student.config
    if t.vocab_size != s.vocab_size:
        raise ValueError(f"teacher vocab_size {t.vocab_size} differs from the student's {s.vocab_size}.")
    if len(tokenizer) > s.vocab_size:
        raise ValueError(f"the data's tokenizer has {len(tokenizer)} tokens, more than the models' {s.vocab_size}.")


def main(argv=None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    args = parse_args(DistillArgs, argv)
    for name in ("teacher", "student"):
        if not (Path(getattr(args, name)) / "config.json").is_file():
            raise FileNotFoundError(
                f"--{name} {getattr(args, name)} has no config.json: give a save_pretrained folder."
            )
    train_ds, val_ds, tokenizer = load_packed(args.data_dir)
    accelerator = make_accelerator(args)
    teacher = load_teacher(args.teacher).to(accelerator.device)
    student = HybridMambaForCausalLM.from_pretrained(args.student, local_files_only=True)
    check_pair(teacher, student, tokenizer)
    if accelerator.is_main_process:
        logger.info(
            "teacher %s (%s), student %s (%s); loss %g * KL(T=%g) + %g * LM",
            args.teacher,
            teacher.config.layer_types,
            args.student,
            student.config.layer_types,
            args.kl_weight,
            args.temperature,
            args.lm_weight,
        )
    loss_fn = DistillLoss(teacher, args.kl_weight, args.lm_weight, args.temperature, accelerator.autocast)

    def eval_fn(model, loader, acc, max_batches):
        return evaluate_distill(model, loss_fn.teacher_logits, loader, acc, max_batches, args.temperature)

    def extras(summary: dict) -> dict:
        out = {"teacher": str(args.teacher), "student_init": str(args.student)}
        out.update(kl_weight=args.kl_weight, lm_weight=args.lm_weight, temperature=args.temperature)
        if accelerator.is_main_process:
            out["unigram_baseline_val_loss"] = unigram_baseline(train_ds, val_ds, len(tokenizer))
        return out

    summary = train(
        args,
        accelerator,
        student,
        train_ds,
        val_ds,
        collate_packed,
        tokenizer,
        eval_fn=eval_fn,
        summary_extras=extras,
        loss_fn=loss_fn,
    )
    if accelerator.is_main_process:
        final = summary["final_eval"]
        print(
            f"student validation loss {final['val_loss']:.3f}, KL to the teacher {final['val_kl']:.4f} nats/token "
            f"after {summary['tokens_seen']:,} tokens; model in {Path(args.output_dir) / 'final'}"
        )
    return summary


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
