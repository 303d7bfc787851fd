"""Fine-tuning entry point: LoRA, QLoRA or all weights, on chat or classification data.

    accelerate launch -m hybrid_mamba.trainers.finetune --config trainers/configs/finetune_lora_chat.yaml
    accelerate launch -m hybrid_mamba.trainers.finetune --config trainers/configs/finetune_classification.yaml --seed 1
    python -m hybrid_mamba.trainers.finetune --config trainers/configs/finetune_qlora_chat.yaml   # needs bitsandbytes

From the repository root or with the package installed (`make install`: editable).

Loads the base model (a save_pretrained folder), wraps it with peft (targets from
trainers/peft_targets.py; ranks uniform or importance-allocated, trainers/rank_allocation.py) and
runs the shared loop (trainers/loop.py: checkpoints, resume, logging, best/ and final/). For an
adapter, best/ and final/ hold the adapter alone (adapter_config.json naming the base model,
adapter_model.safetensors), the tokenizer (with the chat template used) and finetune_config.json;
`python -m hybrid_mamba.trainers.merge --adapter_dir RUN/final --out OUT` merges it into a full model folder.
"""

import json
import logging
from pathlib import Path

import torch

import hybrid_mamba.modeling  # noqa: F401  (registers hybrid_mamba with the Auto classes)
from hybrid_mamba.common.args import parse_args
from hybrid_mamba.modeling import HybridMambaForCausalLM, HybridMambaForSequenceClassification
from hybrid_mamba.trainers import metrics as local_metrics
from hybrid_mamba.trainers.args import FinetuneArgs
from hybrid_mamba.trainers.chat_data import ensure_chat_template, load_chat
from hybrid_mamba.trainers.cls_data import (
    GLUE_TASKS,
    load_examples,
    resolve_task,
    tokenize_examples,
)
from hybrid_mamba.trainers.collate import right_pad
from hybrid_mamba.trainers.loop import evaluate_lm, make_accelerator, train
from hybrid_mamba.trainers.peft_targets import resolve_targets, target_module_names
from hybrid_mamba.trainers.qlora import check_not_repacked, guard_cpu_repack, load_4bit
from hybrid_mamba.trainers.rank_allocation import (
    allocate_ranks,
    measure_importance,
    rank_and_alpha_patterns,
    uniform_budget,
)

logger = logging.getLogger("hybrid_mamba.trainers.finetune")


def check_args(args: FinetuneArgs) -> None:
    """Everything that can be checked before loading anything."""
    if not args.base_model:
        raise ValueError(
            "base_model is required: a save_pretrained folder (e.g. runs/tiny/final, or trainers.demo_base's output)."
        )
    if not (Path(args.base_model) / "config.json").is_file():
        raise FileNotFoundError(f"base_model {args.base_model} has no config.json; give a save_pretrained folder.")
    # task, adapter and rank_allocation are checked by FinetuneArgs (Literal fields, __post_init__)
    if args.task == "chat":
        for name in ("train_file", "validation_file"):
            if not getattr(args, name):
                raise ValueError(f"task chat needs {name} (JSONL of {{'messages': [...]}}).")


def load_tokenizer(args: FinetuneArgs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.base_model, trust_remote_code=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("The tokenizer has no pad and no EOS token; give it a pad_token.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_data(args: FinetuneArgs, tokenizer):
    """(train, validation, collate_fn, eval_fn factory, info)."""
    if args.task == "chat":
        ensure_chat_template(tokenizer)
        train_ds, p1 = load_chat(args.train_file, tokenizer, args.max_seq_len)
        val_ds, p2 = load_chat(args.validation_file, tokenizer, args.max_seq_len)
        info = {"malformed_records": p1 + p2}
        return train_ds, val_ds, right_pad(tokenizer.pad_token_id), None, info
    task = resolve_task(args.classification_task, args.text_columns, args.num_labels)
    train, val, problems = load_examples(
        args.classification_task, task, args.train_file, args.validation_file, args.data_source
    )
    train_ds = tokenize_examples(train, tokenizer, args.max_seq_len, task.num_labels)
    val_ds = tokenize_examples(val, tokenizer, args.max_seq_len, task.num_labels)
    metric_config = (
        args.classification_task
        if args.classification_task in GLUE_TASKS
        else ("regression" if task.num_labels == 1 else "classification")
    )
    info = {"malformed_records": problems, "num_labels": task.num_labels, "metric": metric_config}
    return (
        train_ds,
        val_ds,
        right_pad(tokenizer.pad_token_id),
        classification_eval(metric_config, task.num_labels),
        info,
    )


def classification_eval(metric_config: str, num_labels: int):
    """An `eval_fn` for the loop: validation loss and the task's metrics (trainers/metrics/glue.py)."""
    import torch.nn.functional as F

    @torch.no_grad()
    def eval_fn(model, loader, accelerator, max_batches=None) -> dict:
        model.eval()
        losses, preds, refs = [], [], []
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).logits.float()  # (B, C)
            labels = batch["labels"]
            if num_labels == 1:
                pred = logits.squeeze(-1)
                loss = F.mse_loss(pred, labels.float(), reduction="none")
            else:
                pred = logits.argmax(-1)
                loss = F.cross_entropy(logits, labels, reduction="none")
            loss, pred, labels = accelerator.gather_for_metrics((loss, pred, labels))
            losses.append(loss.double())
            preds.append(pred)
            refs.append(labels)
        model.train()
        metric = local_metrics.load(metric_config)
        scores = metric.compute(predictions=torch.cat(preds).tolist(), references=torch.cat(refs).tolist())
        return {"val_loss": torch.cat(losses).mean().item(), **{f"val_{k}": v for k, v in scores.items()}}

    return eval_fn


def guarded(eval_fn):
    """QLoRA: run `eval_fn` and fail loudly if bitsandbytes repacked a 4-bit weight during it."""

    def run(model, loader, accelerator, max_batches=None):
        result = eval_fn(model, loader, accelerator, max_batches)
        check_not_repacked(accelerator.unwrap_model(model))
        return result

    return run


def load_base(args: FinetuneArgs, info: dict, tokenizer, accelerator):
    if args.task == "chat":
        cls, kwargs = HybridMambaForCausalLM, {}
    else:
        cls, kwargs = (
            HybridMambaForSequenceClassification,
            {"num_labels": info["num_labels"], "pad_token_id": tokenizer.pad_token_id},
        )
    if args.adapter == "qlora":
        on_gpu = accelerator.device.type == "cuda"
        return load_4bit(
            cls,
            args.base_model,
            torch.bfloat16 if on_gpu else torch.float32,
            args.quant_skip_modules,
            device_map={"": accelerator.local_process_index} if on_gpu else None,
            **kwargs,
        )
    return cls.from_pretrained(args.base_model, **kwargs)


def wrap_with_lora(args: FinetuneArgs, model, train_ds, collate_fn) -> tuple[torch.nn.Module, dict]:
    from peft import LoraConfig, get_peft_model

    targets = resolve_targets(model, args.lora_target_modules)
    info = {"targets": targets, "rank_allocation": args.rank_allocation}
    config = dict(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM" if args.task == "chat" else "SEQ_CLS",
    )
    budget = uniform_budget(model, targets, args.lora_r)
    if args.rank_allocation == "importance":
        g = torch.Generator().manual_seed(args.seed)
        order = torch.randperm(len(train_ds), generator=g)[: args.importance_batches * args.micro_batch_size].tolist()
        batches = [
            collate_fn([train_ds[j] for j in order[i : i + args.micro_batch_size]])
            for i in range(0, len(order), args.micro_batch_size)
        ]
        device = next(model.parameters()).device
        batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
        spectra = measure_importance(model, batches, targets)
        r_max = args.lora_rank_max or 4 * args.lora_r
        ranks = allocate_ranks(model, spectra, budget, args.lora_rank_min, r_max)
        config["rank_pattern"], config["alpha_pattern"] = rank_and_alpha_patterns(ranks, args.lora_r, args.lora_alpha)
        info["ranks"] = ranks
    else:
        info["ranks"] = {n: args.lora_r for n in target_module_names(model, targets)}
    torch.manual_seed(args.seed)  # LoRA init does not depend on how much randomness importance used
    peft_model = get_peft_model(model, LoraConfig(**config))
    # adapter_config.json names the base model by absolute path: the adapter loads from anywhere
    peft_model.peft_config["default"].base_model_name_or_path = str(Path(args.base_model).resolve())
    info["lora_parameters"] = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    info["lora_budget"] = budget
    return peft_model, info


def public(finetune: dict) -> dict:
    return {k: v for k, v in finetune.items() if k != "malformed_records"}


def main(argv=None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    args = parse_args(FinetuneArgs, argv)
    check_args(args)
    tokenizer = load_tokenizer(args)
    train_ds, val_ds, collate_fn, eval_fn, info = load_data(args, tokenizer)  # bad data fails before the model loads
    accelerator = make_accelerator(args)
    torch.manual_seed(args.seed)  # the classifier head's init
    model = load_base(args, info, tokenizer, accelerator)
    finetune = {
        "task": args.task,
        "adapter": args.adapter,
        "base_model": str(Path(args.base_model).resolve()),
        "malformed_records": info["malformed_records"],
    }
    if args.task == "classification":
        finetune.update(
            num_labels=info["num_labels"], classification_task=args.classification_task, metric=info["metric"]
        )
    if args.adapter != "none":
        model, lora_info = wrap_with_lora(args, model, train_ds, collate_fn)
        finetune.update(lora_info)
    if args.adapter == "qlora":
        guard_cpu_repack(model)
        eval_fn = guarded(eval_fn or evaluate_lm)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    finetune["trainable_parameters"] = trainable
    if accelerator.is_main_process:  # what the adapter needs to be loaded, before any of it is saved
        Path(args.output_dir, "finetune_config.json").write_text(json.dumps(public(finetune), indent=2) + "\n")
    if accelerator.is_main_process:
        logger.info(
            "%s %s: %d trainable parameters of %d; %d train / %d validation examples; %d malformed records skipped",
            args.task,
            args.adapter,
            trainable,
            sum(p.numel() for p in model.parameters()),
            len(train_ds),
            len(val_ds),
            len(info["malformed_records"]),
        )
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)

    def finetune_summary(summary: dict) -> dict:
        if accelerator.device.type == "cuda":  # the QLoRA memory figure, per process
            finetune["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
        return {"finetune": finetune}

    summary = train(
        args, accelerator, model, train_ds, val_ds, collate_fn, tokenizer, eval_fn, summary_extras=finetune_summary
    )
    if accelerator.is_main_process:
        out = Path(args.output_dir)
        for folder in (out / "best", out / "final"):
            if folder.is_dir():
                (folder / "finetune_config.json").write_text(json.dumps(public(finetune), indent=2) + "\n")
        shown = {k: round(v, 4) for k, v in summary["final_eval"].items() if isinstance(v, float)}
        print(
            f"{args.task} / {args.adapter}: final {shown}; best val_loss {summary['best_val_loss']:.4f} at step "
            f"{summary['best_step']}; {trainable:,} trainable parameters; {out / 'final'}"
        )
    return summary


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
