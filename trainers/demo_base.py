"""A base model folder for the offline fine-tuning demo: a tokenizer trained on the shipped demo data
and a randomly initialised model of a preset.

    python -m hybrid_mamba.trainers.demo_base --out runs/demo-base [--preset debug]

The fine-tuning configs point at runs/demo-base so that they run on a fresh machine with no Hub and
no pretraining run. The model is not pretrained: it shows the pipeline, not what fine-tuning a real
base achieves. For that, point `base_model` at a pretraining run's final/ (trainers/pretrain.py).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

import hybrid_mamba.modeling  # noqa: F401
from hybrid_mamba.common.args import parse_args
from hybrid_mamba.configuration import get_preset
from hybrid_mamba.modeling import HybridMambaForCausalLM

from .chat_data import DEFAULT_CHAT_TEMPLATE

DEMO_DATA = Path(__file__).parent / "demo_data"


def demo_texts() -> list[str]:
    texts = []
    for path in sorted(DEMO_DATA.glob("chat_*.jsonl")):
        for line in path.read_text().splitlines():
            texts += [m["content"] for m in json.loads(line)["messages"]]
    for path in sorted(DEMO_DATA.glob("*.tsv")):
        texts += [row.split("\t")[0] for row in path.read_text().splitlines()[1:]]
    return texts


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # the chat template's role markers are plain text; they are in the training text so they merge well
    texts = demo_texts() + [f"<|{r}|>\n" for r in ("system", "user", "assistant")] * 50
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def make_demo_base(out, preset: str = "debug", vocab_size: int = 512, seed: int = 0, **overrides) -> Path:
    out = Path(out)
    get_preset(preset, **overrides)  # a bad preset or field fails before the tokenizer is trained
    tokenizer = build_tokenizer(vocab_size)
    torch.manual_seed(seed)
    config = get_preset(
        preset,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **overrides,
    )
    model = HybridMambaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@dataclass
class DemoBaseArgs:
    """A base model folder for the offline fine-tuning demo: a tokenizer trained on the demo data, a random-init model."""

    out: str = field(default="runs/demo-base", metadata={"help": "Output folder (save_pretrained with tokenizer)."})
    preset: str = field(default="debug", metadata={"help": "Preset from configuration/presets.yaml."})
    vocab_size: int = field(
        default=512, metadata={"help": "Vocabulary size of the tokenizer trained on the demo data."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the model init."})


def main(argv=None):
    args = parse_args(DemoBaseArgs, argv)
    out = make_demo_base(args.out, args.preset, args.vocab_size, args.seed)
    print(f"demo base ({args.preset}, random init, tokenizer of {args.vocab_size}) in {out}")


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
