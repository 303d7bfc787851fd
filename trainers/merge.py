"""Merge a saved LoRA adapter into its base: a plain save_pretrained folder (remote code, tokenizer).

    python -m hybrid_mamba.trainers.merge --adapter_dir RUN/final --out OUT [--base PATH]

The base is the one recorded in the adapter (adapter_config.json `base_model_name_or_path`), unless
--base is given; the model class (causal LM or classifier, with its label count) comes from the
run's finetune_config.json (a causal LM when there is none). The merged weights match the adapted
model within float rounding (tests/test_finetune.py checks 1e-5). A QLoRA adapter is merged into
the unquantized base.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import hybrid_mamba.modeling  # noqa: F401
from hybrid_mamba.common.args import parse_args
from hybrid_mamba.modeling import HybridMambaForCausalLM, HybridMambaForSequenceClassification


def merge(adapter_dir, out, base: str | None = None) -> Path:
    from peft import PeftModel
    from transformers import AutoTokenizer

    adapter_dir, out = Path(adapter_dir), Path(out)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} has no adapter_config.json; give a fine-tuning run's final/ or best/.")
    base = base or json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    # beside the adapter (written at the end of the run) or in the run folder (written at its start)
    found = [
        p for p in (adapter_dir / "finetune_config.json", adapter_dir.parent / "finetune_config.json") if p.is_file()
    ]
    cfg = json.loads(found[0].read_text()) if found else {"task": "chat"}
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=True)
    if cfg["task"] == "classification":
        model = HybridMambaForSequenceClassification.from_pretrained(
            base, num_labels=cfg["num_labels"], pad_token_id=tokenizer.pad_token_id
        )
    else:
        model = HybridMambaForCausalLM.from_pretrained(base)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@dataclass
class MergeArgs:
    """Merge a LoRA adapter folder into its base model and save a plain model folder."""

    adapter_dir: str = field(metadata={"help": "The adapter folder a fine-tuning run saved (RUN/final)."})
    out: str = field(metadata={"help": "Output folder for the merged model."})
    base: str | None = field(
        default=None, metadata={"help": "Base model folder (default: the one the adapter records)."}
    )


def main(argv=None):
    args = parse_args(MergeArgs, argv)
    print(f"merged model in {merge(args.adapter_dir, args.out, args.base)}")


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
