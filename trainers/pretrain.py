"""Pretraining entry point.

    accelerate launch -m hybrid_mamba.trainers.pretrain --config trainers/configs/tiny.yaml [--field value ...]
    accelerate launch --config_file trainers/accelerate/fsdp.yaml -m hybrid_mamba.trainers.pretrain --config trainers/configs/1.3b.yaml
    python -m hybrid_mamba.trainers.pretrain --config trainers/configs/tiny.yaml   # one process, no launcher

From the repository root or with the package installed (`make install`: editable).

Reads DATA/ from data_scripts, builds the model from a preset (or `init_from`), runs the shared loop
(trainers/loop.py) and writes RUN/: checkpoints/, best/, final/ (save_pretrained with remote code
and tokenizer), metrics.jsonl and summary.json. Prints the validation loss against the unigram
baseline and a sample generation at the end.
"""

import logging
from pathlib import Path

import torch

import hybrid_mamba.modeling  # noqa: F401  (registers hybrid_mamba with the Auto classes)
from hybrid_mamba.common.args import parse_args
from hybrid_mamba.configuration import get_preset
from hybrid_mamba.modeling import HybridMambaForCausalLM
from hybrid_mamba.trainers.args import PretrainArgs
from hybrid_mamba.trainers.data import collate_packed, load_packed, unigram_baseline
from hybrid_mamba.trainers.loop import make_accelerator, train

logger = logging.getLogger("hybrid_mamba.trainers.pretrain")


def build_model(args: PretrainArgs, tokenizer, seq_len: int) -> HybridMambaForCausalLM:
    if args.init_from:
        return HybridMambaForCausalLM.from_pretrained(args.init_from)
    overrides = dict(args.model_overrides)
    overrides.setdefault("vocab_size", len(tokenizer))
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        overrides.setdefault(name, getattr(tokenizer, name))
    config = get_preset(args.model_preset, **overrides)
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {config.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens.")
    if seq_len > config.max_position_embeddings:
        raise ValueError(f"data seq_len {seq_len} exceeds max_position_embeddings {config.max_position_embeddings}.")
    return HybridMambaForCausalLM(config)


def main(argv=None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise
    args = parse_args(PretrainArgs, argv)
    train_ds, val_ds, tokenizer = load_packed(args.data_dir)  # fails before any work on a bad DATA/
    accelerator = make_accelerator(args)
    seq_len = int(train_ds[0]["input_ids"].shape[-1])
    torch.manual_seed(args.seed)
    model = build_model(args, tokenizer, seq_len)
    if accelerator.is_main_process:
        n = sum(p.numel() for p in model.parameters())
        logger.info(
            "model: %s preset, %.2fM parameters, layers %s", args.model_preset, n / 1e6, model.config.layer_types
        )
    out = Path(args.output_dir)

    def baseline_and_sample(summary: dict) -> dict:
        """The unigram baseline and a sample from final/, for summary.json (main process only)."""
        if not accelerator.is_main_process:
            return {}
        baseline = unigram_baseline(train_ds, val_ds, len(tokenizer))
        final = HybridMambaForCausalLM.from_pretrained(out / "final").eval()
        prompt = tokenizer(args.sample_prompt, return_tensors="pt")
        torch.manual_seed(args.seed)
        generated = final.generate(
            **prompt, max_new_tokens=args.sample_tokens, do_sample=True, top_k=40, temperature=0.8
        )
        return {
            "unigram_baseline_val_loss": baseline,
            "sample": tokenizer.decode(generated[0], skip_special_tokens=True),
        }

    summary = train(
        args, accelerator, model, train_ds, val_ds, collate_packed, tokenizer, summary_extras=baseline_and_sample
    )
    if accelerator.is_main_process:
        print(
            f"validation loss {summary['final_val_loss']:.3f} (best {summary['best_val_loss']:.3f} at step "
            f"{summary['best_step']}); unigram baseline {summary['unigram_baseline_val_loss']:.3f} nats/token"
        )
        print(f"{summary['tokens_seen']:,} tokens in {summary['wall_time_s']:.0f} s; model in {out / 'final'}")
        print(f"sample: {summary['sample']!r}")
    return summary


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
