"""Typed training arguments, read once from a YAML file and overridden from the command line.

    accelerate launch -m hybrid_mamba.trainers.pretrain --config trainers/configs/tiny.yaml --learning_rate 3e-4

Every field is documented in its dataclass (`--help` prints them); common/args.py's `parse_args` reads
them. A field name that does not exist, in the YAML file or on the command line, is an error listing the
valid names; checks on values that need no file live in `__post_init__`.
"""

from dataclasses import dataclass, field
from typing import Literal

from .qlora import DEFAULT_SKIP_MODULES


@dataclass
class TrainArgs:
    """Fields shared by pretraining and fine-tuning (one loop serves both)."""

    output_dir: str = field(
        default="runs/tiny", metadata={"help": "RUN/ folder: checkpoints/, final/, metrics.jsonl, summary.json."}
    )
    seed: int = field(default=0, metadata={"help": "Seeds model init, data order and dropout."})
    micro_batch_size: int = field(default=8, metadata={"help": "Sequences per process per forward."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_steps: int = field(default=1000, metadata={"help": "Optimizer steps; ignored when max_tokens is set."})
    max_tokens: int | None = field(
        default=None, metadata={"help": "Token budget; sets max_steps from the global batch."}
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (AdamW)."})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "Cosine decay ends at learning_rate * min_lr_ratio."})
    warmup_steps: int = field(default=100, metadata={"help": "Linear warmup steps."})
    weight_decay: float = field(
        default=0.1, metadata={"help": "AdamW decay; not applied to norms, biases, embeddings, SSM A_log/D/dt_bias."}
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    eval_every: int = field(
        default=200, metadata={"help": "Evaluate on the validation split every N steps (and at the end)."}
    )
    eval_batches: int | None = field(
        default=None, metadata={"help": "Validation batches per evaluation (all when unset)."}
    )
    checkpoint_every: int = field(default=200, metadata={"help": "Save an accelerate checkpoint every N steps."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Newest complete checkpoints kept."})
    resume: bool = field(default=True, metadata={"help": "Resume from the newest complete checkpoint in output_dir."})
    log_every: int = field(default=10, metadata={"help": "Log training metrics every N steps."})
    log_with: list[str] = field(
        default_factory=list, metadata={"help": "accelerate trackers: tensorboard, wandb, mlflow, all."}
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(
        default="auto", metadata={"help": "no, bf16, fp16, or auto (bf16 on CUDA, no on CPU)."}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass."}
    )
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    peak_tflops: float | None = field(
        default=None,
        metadata={"help": "Peak TFLOP/s per process for MFU; measured (matmul) on CPU, known GPUs looked up."},
    )
    torch_compile: bool = field(
        default=False,
        metadata={
            "help": "torch.compile each of the model's repeated layers in place (regional compilation): "
            "checkpoints and saved models are those of the uncompiled model. Compiling costs about a minute "
            "on CPU before the first step; README (Speed) says after how many steps it pays."
        },
    )
    torch_compile_backend: str = field(
        default="inductor", metadata={"help": "torch.compile backend: inductor; eager or aot_eager to debug."}
    )
    torch_compile_mode: str | None = field(
        default=None, metadata={"help": "torch.compile mode: default, reduce-overhead, max-autotune(-no-cudagraphs)."}
    )

    def __post_init__(self):
        if self.torch_compile:
            import torch._dynamo

            backends = torch._dynamo.list_backends(exclude_tags=())
            if self.torch_compile_backend not in backends:
                raise ValueError(
                    f"torch_compile_backend {self.torch_compile_backend!r} is not a torch.compile backend; "
                    f"choose one of {', '.join(sorted(backends))}."
                )


@dataclass
class PretrainArgs(TrainArgs):
    """Pretraining from packed token blocks written by data_scripts."""

    data_dir: str = field(
        default="data/demo", metadata={"help": "DATA/ folder from data_scripts: train/, validation/, tokenizer/."}
    )
    model_preset: str = field(default="tiny", metadata={"help": "Preset from configuration/presets.yaml."})
    model_overrides: dict = field(
        default_factory=dict, metadata={"help": "HybridMambaConfig fields overriding the preset (YAML mapping)."}
    )
    init_from: str | None = field(
        default=None, metadata={"help": "Start from this save_pretrained folder instead of random init."}
    )
    sample_prompt: str = field(
        default="To be, or not to be", metadata={"help": "Prompt of the sample generated at the end."}
    )
    sample_tokens: int = field(default=60, metadata={"help": "Tokens generated for the sample."})


@dataclass
class FinetuneArgs(TrainArgs):
    """Fine-tuning a saved model (LoRA, QLoRA or all weights) on chat or classification data."""

    base_model: str = field(
        default="", metadata={"help": "save_pretrained folder of the base model (e.g. runs/tiny/final)."}
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer folder; the base model's folder when unset."}
    )
    task: Literal["chat", "classification"] = field(
        default="chat", metadata={"help": "chat (instruction tuning, loss on assistant tokens) or classification."}
    )
    train_file: str | None = field(
        default=None, metadata={"help": "chat: JSONL of {messages}; classification: TSV with header, or JSONL."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Held-out file in the train_file format."})
    max_seq_len: int = field(default=512, metadata={"help": "Tokens per sequence; longer ones are cut."})
    adapter: Literal["lora", "qlora", "none"] = field(
        default="lora", metadata={"help": "lora, qlora (4-bit NF4 base, needs bitsandbytes) or none (all weights)."}
    )
    lora_r: int = field(
        default=8, metadata={"help": "LoRA rank (the uniform rank, and the budget of importance allocation)."}
    )
    lora_alpha: float = field(
        default=16.0, metadata={"help": "LoRA alpha; every module keeps the scaling lora_alpha / lora_r."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Targets (trainers/peft_targets.py): names like in_proj or mamba.out_proj, groups attention/mlp/mamba/all; empty: the default map."
        },
    )
    rank_allocation: Literal["uniform", "importance"] = field(
        default="uniform",
        metadata={"help": "uniform, or importance: ranks from gradient spectra at the same parameter budget."},
    )
    importance_batches: int = field(default=8, metadata={"help": "Training batches used to measure importance."})
    lora_rank_min: int = field(
        default=1, metadata={"help": "Smallest rank importance allocation gives a target module."}
    )
    lora_rank_max: int | None = field(
        default=None, metadata={"help": "Largest rank importance allocation gives (default 4 * lora_r)."}
    )
    quant_skip_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_SKIP_MODULES),
        metadata={"help": "qlora: modules kept unquantized (suffix match)."},
    )
    classification_task: str = field(
        default="sst2",
        metadata={"help": "A GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli) or your own name."},
    )
    text_columns: list[str] = field(
        default_factory=list, metadata={"help": "Text column(s) of a task of your own (GLUE tasks know theirs)."}
    )
    num_labels: int | None = field(default=None, metadata={"help": "Classes of a task of your own; 1 is regression."})
    data_source: Literal["auto", "local", "hub"] = field(
        default="auto",
        metadata={
            "help": "classification: local, hub (GLUE from the Hub), auto (the Hub when reachable, else local files)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.rank_allocation == "importance" and self.adapter == "none":
            raise ValueError("rank_allocation: importance needs adapter lora or qlora.")
