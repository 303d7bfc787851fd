"""The training loop, shared by pretraining and fine-tuning (they differ by data and objective).

One process or many (`accelerate launch`): data is sharded across processes without overlap, the
optimizer is AdamW with parameter groups, the schedule cosine with warmup; evaluation every N
steps keeps the best model; checkpoints every N steps carry a record of their files (sizes, hashes),
and a run resumes from the newest one that verifies against it, with the same data order, RNG and schedule, so a killed run reaches the same
loss at step N as an uninterrupted one. Writes RUN/metrics.jsonl, RUN/final/ and RUN/summary.json
(its only writer: callers add their keys through `summary_extras`).

Fine-tuning hooks (trainers/finetune.py): `eval_fn` replaces the token-loss evaluation (e.g. with
classification metrics); `loss_fn(model, batch) -> loss` replaces the training objective (trainers/distill.py:
KL to a frozen teacher); a peft model is saved as its adapter alone in best/ and final/ (peft's
`save_pretrained`: adapter_config.json with the base model path, adapter_model.safetensors); batches
with an `attention_mask` (padded rows) count only their real tokens.
"""

import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, DynamoBackend, ProjectConfiguration, broadcast_object_list, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from hybrid_mamba.common.files import write_text_atomic

from .args import TrainArgs
from .checkpoint import RECORD, CheckpointError, CheckpointManager, atomic_save_pretrained
from .data import EpochSampler
from .fsdp_precision import fp32_mamba_mixers

logger = logging.getLogger(__name__)

# Dense bf16 peak of common accelerators (TFLOP/s), for the MFU estimate.
GPU_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "L4": 121.0,
    "4090": 165.0,
}


@dataclass
class TrainState:
    """Loop counters saved with every checkpoint (registered with `accelerator.save_state`)."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches this process consumed in the current epoch
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    best_step: int = -1

    def state_dict(self):
        return asdict(self)

    def load_state_dict(self, state):
        for k, v in state.items():
            setattr(self, k, v)


def make_accelerator(args: TrainArgs) -> Accelerator:
    mixed = args.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() else "no"
    fsdp_on_cpu = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not torch.cuda.is_available()
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    log_with = args.log_with or None
    if log_with == ["tensorboard"] or (log_with and "tensorboard" in log_with):
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            logger.warning("tensorboard is not installed: logging to metrics.jsonl only")
            log_with = [t for t in log_with if t != "tensorboard"] or None
    accelerator = Accelerator(
        # Without CUDA, processes started by torchrun (accelerate launch with several processes) must
        # be told they are CPU processes to form a gloo group (DDP over gloo, accelerate's MULTI_CPU).
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=mixed,
        log_with=log_with,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / "logs")
        ),
    )
    if fsdp_on_cpu:
        _enable_fsdp_on_cpu(accelerator)
    if args.torch_compile and accelerator.state.dynamo_plugin.backend != DynamoBackend.NO:
        raise ValueError(
            "torch_compile and accelerate's own compilation (--dynamo_backend, ACCELERATE_DYNAMO_BACKEND) are both "
            "on: keep one."
        )
    if args.torch_compile and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError(
            f"torch_compile compiles layers in place, which is tested with one process and DDP, not with "
            f"{accelerator.distributed_type.value}: drop torch_compile, or let accelerate compile the model "
            "(accelerate launch --dynamo_backend inductor)."
        )
    return accelerator


def compile_layers(model, backend: str = "inductor", mode: str | None = None) -> list[torch.nn.Module]:
    """torch.compile every block of the model's repeated layers (a ModuleList of one class), in place.

    This is regional compilation (accelerate's `compile_regions`, PyTorch's regional compilation recipe):
    the blocks share their compiled code, so a hybrid stack compiles one graph per kind of layer (Mamba,
    attention) for each grad mode and input variant (with or without document boundaries), whatever its depth. `nn.Module.compile` compiles a block's call without
    wrapping it, so parameter names, checkpoints and save_pretrained stay those of the uncompiled model
    and a run may resume with compilation switched on or off. Returns the compiled blocks (`uncompile`).
    """
    blocks = []

    def visit(module):
        for child in module.children():
            if isinstance(child, torch.nn.ModuleList) and len(child) > 1 and len({type(m) for m in child}) == 1:
                blocks.extend(child)
            else:
                visit(child)

    visit(model)
    if not blocks:
        raise ValueError(f"torch_compile: {type(model).__name__} has no repeated layers (a ModuleList of one class).")
    for block in blocks:
        block.compile(backend=backend, mode=mode)
    return blocks


def uncompile(blocks) -> None:
    """Undo `compile_layers`: the blocks run eagerly again (generation after training would otherwise
    recompile them for every new cache)."""
    for block in blocks:
        block._compiled_call_impl = None  # what nn.Module.compile sets; None is nn.Module's own default


def _enable_fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Run accelerate's FSDP path (FSDP2 over gloo) on CPU processes.

    accelerate maps CPU processes to DDP and drops an FSDP config, but FSDP2's `fully_shard` runs on
    CPU. Switching the state to FSDP lets `prepare`, `save_state`/`load_state` and `get_state_dict`
    take exactly the code path they take on GPUs (wrap policy from `_no_split_modules`, sharded
    checkpoints through torch.distributed.checkpoint), so the FSDP path is tested without a GPU.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* settings `accelerate launch` exported
    if accelerator.mixed_precision != "no":  # the policy accelerate builds on GPUs
        plugin.set_mixed_precision(accelerator.mixed_precision)
    if plugin.fsdp_version != 2:
        raise ValueError("FSDP on CPU processes needs fsdp_version: 2 in the accelerate config.")
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    logger.warning("FSDP2 on CPU processes (gloo): for testing the FSDP path; use GPUs for real runs")


def param_groups(model, weight_decay: float) -> list[dict]:
    """No decay on norms, biases, embeddings and the SSM parameters the model tags (A_log, D, dt_bias)."""
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or id(p) in embeddings or getattr(p, "_no_weight_decay", False)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def peak_flops_per_process(args: TrainArgs, accelerator: Accelerator) -> tuple[float, str]:
    if args.peak_tflops:
        return args.peak_tflops * 1e12, "given"
    if accelerator.device.type == "cuda":
        name = torch.cuda.get_device_name(accelerator.device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{name} bf16 peak"
        return math.nan, f"{name} (unknown peak)"
    # CPU: the fp32 matmul ceiling measured here, with this process's threads
    a = torch.randn(1024, 1024)
    a @ a
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 0.3:
        a @ a
        n += 1
    return 2 * 1024**3 * n / (time.perf_counter() - start), f"measured fp32 matmul, {torch.get_num_threads()} threads"


def flops_per_token(model, seq_len: int) -> float:
    """6N + 12 * attention layers * hidden * seq_len (PaLM's estimate; the Mamba scans are left out)."""
    cfg = model.config
    n = sum(p.numel() for p in model.parameters()) - cfg.vocab_size * cfg.hidden_size * (
        1 if cfg.tie_word_embeddings else 0
    )
    n_attn = sum(t == "attention" for t in cfg.layer_types)
    return 6 * n + 12 * n_attn * cfg.num_attention_heads * cfg.head_dim * seq_len


@torch.no_grad()
def evaluate(model, loader, accelerator, max_batches=None) -> float:
    """Mean token loss over the validation loader (exact across processes: duplicates dropped)."""
    model.eval()
    sums, counts = [], []
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        logits = model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"), use_cache=False).logits
        labels = batch["labels"][:, 1:]
        token_loss = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
        )  # (B, T-1)
        s, c = accelerator.gather_for_metrics(((token_loss.sum(-1)), (labels != -100).sum(-1)))
        sums.append(s.double())
        counts.append(c.double())
    model.train()
    return (torch.cat(sums).sum() / torch.cat(counts).sum()).item()


def lm_loss(model, batch) -> torch.Tensor:
    """The default `loss_fn`: the model's own next-token loss on `batch` (its `labels`)."""
    return model(**batch, use_cache=False).loss


def evaluate_lm(model, loader, accelerator, max_batches=None) -> dict:
    """The default `eval_fn`: validation token loss and perplexity."""
    val = evaluate(model, loader, accelerator, max_batches)
    return {"val_loss": val, "val_ppl": math.exp(min(val, 50))}


class MetricsLog:
    """RUN/metrics.jsonl on the main process; a resumed run drops the rows after its checkpoint."""

    def __init__(self, path: Path, accelerator: Accelerator):
        self.path, self.accelerator = path, accelerator

    def truncate_after(self, step: int) -> None:
        if self.accelerator.is_main_process and self.path.exists():
            rows = [r for r in self.path.read_text().splitlines() if r and json.loads(r)["step"] <= step]
            write_text_atomic(self.path, "".join(r + "\n" for r in rows))

    def write(self, row: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])


class Trainer:
    """One run: `__init__` builds (optimizer, schedule, loaders, resume, trackers, MFU probe), `fit`
    runs `train_step`, `log`, `evaluate` and the checkpoint manager's `save` until `max_steps`, and
    `finish` saves final/ and writes summary.json.

    The order of work in `__init__` is part of the numerics: the RNG is seeded first, restored by a
    resume, then advanced by the CPU MFU probe, identically in a fresh and a resumed run.
    """

    def __init__(
        self,
        args: TrainArgs,
        accelerator: Accelerator,
        model,
        train_ds,
        val_ds,
        collate_fn,
        tokenizer=None,
        eval_fn=None,
        loss_fn=None,
    ):
        self.args, self.accelerator, self.tokenizer = args, accelerator, tokenizer
        self.eval_fn = eval_fn or evaluate_lm
        self.loss_fn = loss_fn or lm_loss
        self.out = Path(args.output_dir)
        set_seed(args.seed)
        self.global_batch = args.micro_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
        self.seq_len = int(train_ds[0]["input_ids"].shape[-1])
        self.max_steps = args.max_steps
        if args.max_tokens:
            self.max_steps = math.ceil(args.max_tokens / (self.global_batch * self.seq_len))
        if len(train_ds) < args.micro_batch_size * accelerator.num_processes:
            raise ValueError(f"train split has {len(train_ds)} blocks, fewer than one global micro-batch.")
        self._build(model, train_ds, val_ds, collate_fn)
        self.ckpt = CheckpointManager(
            self.out / "checkpoints", args.keep_checkpoints, main_process=accelerator.is_main_process
        )
        self.metrics = MetricsLog(self.out / "metrics.jsonl", accelerator)
        self._resume()
        if accelerator.is_main_process:
            accelerator.init_trackers(
                "hybrid-mamba", config={k: str(v) if isinstance(v, (list, dict)) else v for k, v in vars(args).items()}
            )
        self.params_local = sum(
            p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in self.model.parameters()
        )
        self.params_total = sum(p.numel() for p in self.model.parameters())  # a DTensor's numel is the global one
        self.peak, self.peak_source = peak_flops_per_process(args, accelerator)
        self.flops_per_token = flops_per_token(accelerator.unwrap_model(self.model), self.seq_len)

    def _build(self, model, train_ds, val_ds, collate_fn) -> None:
        args, accelerator = self.args, self.accelerator
        if args.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        optimizer = torch.optim.AdamW(
            param_groups(model, args.weight_decay),
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
        )
        self.scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, args.warmup_steps, self.max_steps, min_lr_rate=args.min_lr_ratio
        )
        self.sampler = EpochSampler(len(train_ds), args.seed)
        train_loader = DataLoader(
            train_ds,
            batch_size=args.micro_batch_size,
            sampler=self.sampler,
            collate_fn=collate_fn,
            drop_last=True,
            num_workers=args.num_workers,
        )
        val_loader = DataLoader(
            val_ds, batch_size=args.micro_batch_size, collate_fn=collate_fn, num_workers=args.num_workers
        )
        # FSDP2 with bf16: the Mamba mixers' SSM parameters stay fp32 (trainers/fsdp_precision.py)
        with fp32_mamba_mixers(accelerator):
            self.model, self.optimizer, self.train_loader, self.val_loader = accelerator.prepare(
                model, optimizer, train_loader, val_loader
            )
        self.compiled = []
        if args.torch_compile:
            self.compiled = compile_layers(
                accelerator.unwrap_model(self.model), args.torch_compile_backend, args.torch_compile_mode
            )
        self.state = TrainState()
        accelerator.register_for_checkpointing(self.scheduler, self.state)
        if len(self.train_loader) < args.gradient_accumulation_steps:
            raise ValueError("an epoch has fewer micro-batches than gradient_accumulation_steps.")

    def _resume(self) -> None:
        """Load the newest checkpoint that verifies, or start a fresh metrics log. The main process picks it
        (CheckpointError when step_* folders exist and none verifies) and tells the others, and every process
        must see that folder: with a run folder local to each machine they would resume from different steps.
        """
        accelerator = self.accelerator
        choice = [None, None]  # the checkpoint's path or None, the main process's CheckpointError or None
        if accelerator.is_main_process:
            try:
                latest = self.ckpt.latest() if self.args.resume else None
                choice[0] = None if latest is None else str(latest)
            except CheckpointError as err:
                choice[1] = str(err)
        if accelerator.num_processes > 1:
            broadcast_object_list(choice)
        path, error = choice
        if error is not None:
            raise CheckpointError(error)
        sees = torch.tensor([path is None or (Path(path) / RECORD).is_file()], device=accelerator.device)
        if not bool(accelerator.gather(sees).all()):
            raise CheckpointError(
                f"Not every process sees {path}, the checkpoint the main process resumes from: output_dir must be "
                "one folder that every machine sees (a shared filesystem), not a local disk per machine."
            )
        if path is not None:
            unwrapped = accelerator.unwrap_model(self.model)
            quantized = getattr(unwrapped, "is_loaded_in_4bit", False) or getattr(unwrapped, "is_loaded_in_8bit", False)
            # bitsandbytes saves its quantization state beside each k-bit weight, and load_state_dict does
            # not take it back: not strict for those models (their frozen base is rebuilt from base_model).
            accelerator.load_state(path, **({"strict": False} if quantized else {}))
            logger.info("resumed from %s at step %d", path, self.state.step)
            self.metrics.truncate_after(self.state.step)
        elif accelerator.is_main_process and self.metrics.path.exists():
            self.metrics.path.unlink()

    def _batches(self):
        """Micro-batches forever, epoch after epoch, continuing a resumed epoch where its checkpoint left it."""
        state, accelerator = self.state, self.accelerator
        while True:
            self.sampler.set_epoch(state.epoch)
            loader = self.train_loader
            if state.batches_in_epoch:
                loader = accelerator.skip_first_batches(self.train_loader, state.batches_in_epoch)
            # accelerate's loaders reset their sampler's epoch from their own iteration counter when
            # iterated (0 for a fresh loader): without this, a resumed run replays epoch 0's order
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(state.epoch)
            for batch in loader:
                state.batches_in_epoch += 1
                yield batch
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0

    def fit(self) -> None:
        """Train until `max_steps`: one optimizer step, then its log row, evaluation and checkpoint as due."""
        args, state = self.args, self.state
        self.stream = self._batches()
        self.model.train()
        self.start_wall = time.perf_counter()
        bar = tqdm(
            total=self.max_steps,
            initial=state.step,
            disable=not self.accelerator.is_main_process,
            desc="train",
            dynamic_ncols=True,
        )
        self.window = {"tokens": 0, "time": 0.0, "wait": 0.0, "steps": 0}
        self.last_eval = None  # (step, eval_fn result)
        while state.step < self.max_steps:
            loss, grad_norm = self.train_step()
            bar.update(1)
            last = state.step == self.max_steps
            if state.step % args.log_every == 0 or last:
                row = self.log(loss, grad_norm)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            if state.step % args.eval_every == 0 or last:
                self.evaluate()
            if state.step % args.checkpoint_every == 0 and not last:
                self.ckpt.save(self.accelerator, state.step)
        bar.close()

    def train_step(self) -> tuple[float, torch.Tensor | None]:
        """One optimizer step over `gradient_accumulation_steps` micro-batches; (mean loss, grad norm).
        A non-finite loss raises before the update, naming the last good checkpoint."""
        accelerator, state = self.accelerator, self.state
        t0 = time.perf_counter()
        wait = 0.0
        losses = []
        real_tokens = []  # padded batches only
        for _ in range(self.args.gradient_accumulation_steps):
            tw = time.perf_counter()
            batch = next(self.stream)
            wait += time.perf_counter() - tw
            if "attention_mask" in batch:
                real_tokens.append(batch["attention_mask"].sum())
            with accelerator.accumulate(self.model):
                loss = self.loss_fn(self.model, batch)
                accelerator.backward(loss)
                losses.append(loss.detach())
        loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(
                f"Loss became {loss} at step {state.step + 1}; stopping without an update. The last good checkpoint is "
                f"{self.ckpt.last_good() or '(none)'}: lower the learning rate or check the data, then rerun to resume from it."
            )
        max_norm = self.args.max_grad_norm
        grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), max_norm) if max_norm else None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        step_tokens = self.global_batch * self.seq_len
        if real_tokens:
            step_tokens = int(accelerator.reduce(torch.stack(real_tokens).sum(), reduction="sum").item())
        state.tokens_seen += step_tokens
        self.window["tokens"] += step_tokens
        self.window["time"] += time.perf_counter() - t0
        self.window["wait"] += wait
        self.window["steps"] += 1
        return loss, grad_norm

    def log(self, loss: float, grad_norm) -> dict:
        """Write one metrics row with the throughput of the steps since the last row; returns it."""
        window = self.window
        tps = window["tokens"] / window["time"]
        row = {
            "step": self.state.step,
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens": self.state.tokens_seen,
            "tokens_per_s": tps,
            "data_wait_frac": window["wait"] / window["time"],
            "mfu": self.flops_per_token * tps / (self.peak * self.accelerator.num_processes),
        }
        self.metrics.write(row)
        self.window = {"tokens": 0, "time": 0.0, "wait": 0.0, "steps": 0}
        return row

    def evaluate(self) -> dict:
        """Run `eval_fn`, log its result, and save best/ when its val_loss is the lowest so far."""
        state = self.state
        result = self.eval_fn(self.model, self.val_loader, self.accelerator, self.args.eval_batches)
        self.last_eval = (state.step, result)
        self.metrics.write({"step": state.step, **result})
        if result["val_loss"] < state.best_val_loss:
            state.best_val_loss, state.best_step = result["val_loss"], state.step
            _save_model(self.accelerator, self.model, self.tokenizer, self.out / "best")
        return result

    def finish(self, summary_extras=None) -> dict:
        """Save final/, build the summary, add `summary_extras(summary)`'s keys, write RUN/summary.json
        (main process, atomically) and end the trackers; returns the summary."""
        accelerator, state = self.accelerator, self.state
        if self.last_eval and self.last_eval[0] == state.step:
            final_eval = self.last_eval[1]
        else:
            final_eval = self.eval_fn(self.model, self.val_loader, accelerator, self.args.eval_batches)
        _save_model(accelerator, self.model, self.tokenizer, self.out / "final")
        uncompile(self.compiled)
        summary = {
            "steps": state.step,
            "tokens_seen": state.tokens_seen,
            "global_batch_sequences": self.global_batch,
            "seq_len": self.seq_len,
            "wall_time_s": time.perf_counter() - self.start_wall,
            "final_val_loss": final_eval["val_loss"],
            "final_eval": final_eval,
            "best_val_loss": state.best_val_loss,
            "best_step": state.best_step,
            "hardware": self._hardware(),
        }
        if summary_extras is not None:
            summary.update(summary_extras(summary))
        if accelerator.is_main_process:
            write_text_atomic(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        accelerator.end_training()
        return summary

    def _hardware(self) -> dict:
        accelerator = self.accelerator
        return {
            "device": torch.cuda.get_device_name()
            if accelerator.device.type == "cuda"
            else platform.processor() or platform.machine(),
            "processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "mixed_precision": accelerator.mixed_precision,
            "threads_per_process": torch.get_num_threads(),
            "torch_compile": self.args.torch_compile_backend if self.args.torch_compile else None,
            "peak_flops_per_process": self.peak,
            "peak_flops_source": self.peak_source,
            "parameters_per_process": self.params_local,
            "parameters_total": self.params_total,
        }


def train(
    args: TrainArgs,
    accelerator: Accelerator,
    model,
    train_ds,
    val_ds,
    collate_fn,
    tokenizer=None,
    eval_fn=None,
    summary_extras=None,
    loss_fn=None,
) -> dict:
    """Train `model` on `train_ds`; returns the summary, also written to RUN/summary.json.

    `eval_fn(model, val_loader, accelerator, max_batches) -> dict` is called at every evaluation; its
    dict is written to metrics.jsonl and must hold `val_loss`, which picks best/. Default: `evaluate_lm`.
    `loss_fn(model, batch) -> loss` is the scalar each micro-batch backpropagates. Default: `lm_loss`.
    `summary_extras(summary) -> dict` is called on every process after final/ is saved; its keys are
    added to the summary before summary.json is written (the file's only writer is this function).
    """
    trainer = Trainer(args, accelerator, model, train_ds, val_ds, collate_fn, tokenizer, eval_fn, loss_fn)
    trainer.fit()
    return trainer.finish(summary_extras)


def _save_model(accelerator, model, tokenizer, folder: Path) -> None:
    """save_pretrained (safetensors, remote code, generation config) of the unwrapped model, atomically.
    A peft model saves its adapter alone (peft's save_pretrained keeps only the adapter's weights)."""
    state_dict = accelerator.get_state_dict(model)  # gathers sharded (FSDP) weights; collective
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        gen = getattr(unwrapped, "generation_config", None)  # None: a classifier, no generation
        if tokenizer is not None and gen is not None:
            gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = (
                tokenizer.bos_token_id,
                tokenizer.eos_token_id,
                tokenizer.pad_token_id,
            )
        atomic_save_pretrained(unwrapped, tokenizer, folder, state_dict=state_dict)
    accelerator.wait_for_everyone()
