"""Quantize a hybrid_mamba model for inference on the PyTorch path, and measure what it costs and gains.

    python -m hybrid_mamba.hub_cards.quantize --model MODEL_DIR [--method all|dynamic-int8,int8-weight-only,nf4]
        [--eval DATA] [--out results/quantize] [--threads 2] [--save true]

Methods (`quantize(model, method, skip=DEFAULT_SKIP)` in memory, `load_quantized(folder, method)` from a
save_pretrained folder):

* ``dynamic-int8``: ``torch.ao.quantization.quantize_dynamic`` on the ``nn.Linear`` layers (int8 weights,
  per-tensor; activations quantized per batch at run time; fbgemm/x86 kernels, CPU only). torch marks
  ``torch.ao.quantization`` deprecated in favour of torchao; it still ships and runs in torch 2.13.
  Not savable as a Hugging Face folder (the packed weights are no tensors that safetensors or
  transformers' loader know): quantize at load time, `load_quantized(folder, "dynamic-int8")`.
* ``int8-weight-only``: torchao's ``quantize_(model, Int8WeightOnlyConfig())`` (int8 weights, one
  scale per output row; activations stay fp32). Savable: a model loaded through
  `load_quantized` (transformers' ``TorchAoConfig``) saves with ``save_pretrained`` as safetensors
  (tested with torchao 0.18 and transformers 5.24; config.json records the quantization) and reloads with a plain
  ``from_pretrained`` to the same logits (tested). A model quantized in memory by `quantize` holds the
  same tensors but no transformers quantizer, and ``save_pretrained`` fails on it: save through
  `load_quantized`. Needs ``pip install -e ".[torchao]"`` (torchao 0.18 needs torch >= 2.11).
* ``nf4``: bitsandbytes 4-bit NF4 with double quantization, fp32 compute, as trainers/qlora.py loads
  the QLoRA base. Savable (bitsandbytes 4-bit serialization through `load_quantized`; reloads to the
  same logits). On CPU every 4-bit layer keeps bitsandbytes' training layout (trainers.qlora's
  `guard_cpu_repack`): bitsandbytes 0.50's eval-mode CPU repack crashes on output sizes that are not a
  multiple of 32 (this model's Mamba in_proj usually is not), computes in bf16 and does not reproduce
  its logits after a save and reload. Dequantize-then-matmul in fp32 is slow on CPU: nf4 is a memory
  format here, not a speed-up. Needs bitsandbytes (the dev and cuda extras).

What stays fp32 with every method: the SSM parameters ``A_log``, ``D``, ``dt_bias``, the depthwise
``conv1d`` (none of them is an ``nn.Linear``), norms, embeddings, and the modules named in ``skip``
(default `DEFAULT_SKIP`, trainers.qlora's list: ``lm_head`` and ``score``, the output layers, and
Mamba-1's ``x_proj`` and ``dt_proj``, small layers that produce the step size dt whose quantization
error goes straight into exp(A dt); ``dt_proj`` is `HybridMambaTimestepProj`, whose fp32 bias is the
timestep offset). A skip entry matches a module whose dotted name is it or ends with ``.`` + it, and
everything inside that module (``layers.0`` keeps the first layer fp32).
`fp32_problems(model, skip)` lists any that is not; the command checks it for every method.

The command loads MODEL_DIR in fp32 and once per method, then measures, interleaved across the
models (eval_harness.bench_speed's timing code, ``torch.set_num_threads(--threads)``): decode latency
per token (batch 1, a ``--decode_prompt`` token prompt, ``--decode_steps`` steps after 3 warmup steps,
repeated ``--decode_reps`` times; median of all steps), prefill latency at ``--prefill_len`` (median
of ``--prefill_reps``), the weight bytes (state dict, quantized tensors at their stored size) and, with
``--eval DATA``, the validation token loss and perplexity on DATA/validation (first ``--eval_blocks``
packed blocks, position_ids as packed; trainers.data.load_packed) with the top-1 agreement with fp32.
Writes OUT/quantize.json and OUT/quantize.md; with ``--save`` (default true) also OUT/<method>/, a
save_pretrained folder (with the tokenizer when MODEL_DIR has one), for each savable method, reloaded
once and checked against the measured model's logits.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shlex
import statistics
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hybrid_mamba.common.args import parse_args
from hybrid_mamba.common.files import write_json_atomic, write_text_atomic
from hybrid_mamba.trainers.qlora import DEFAULT_SKIP_MODULES

logger = logging.getLogger(__name__)

METHODS = ("dynamic-int8", "int8-weight-only", "nf4")
SAVABLE = ("int8-weight-only", "nf4")
DEFAULT_SKIP = tuple(DEFAULT_SKIP_MODULES)
SSM_PARAMETERS = ("A_log", "D", "dt_bias")
PACKAGES = {"dynamic-int8": None, "int8-weight-only": "torchao", "nf4": "bitsandbytes"}
INSTALL_HINTS = {
    "torchao": 'pip install -e ".[torchao]" (torchao)',
    "bitsandbytes": "pip install bitsandbytes>=0.45 (or the dev or cuda extra)",
}
STEM = "quantize"


class QuantizeError(ValueError):
    """A bad method, skip list or argument, or a quantized model that breaks a promise made here."""


def check_method(method: str) -> str:
    if method not in METHODS:
        raise QuantizeError(f"Unknown quantization method {method!r}: choose one of {', '.join(METHODS)}.")
    return method


def missing_package(method: str) -> str | None:
    """The package `method` needs that is not installed (None when it can run)."""
    package = PACKAGES[check_method(method)]
    if package is None:
        return None
    import importlib.util

    return None if importlib.util.find_spec(package) is not None else package


def require(method: str) -> None:
    package = missing_package(method)
    if package is not None:
        raise ImportError(f"--method {method} needs {package}: {INSTALL_HINTS[package]}.")


def is_skipped(name: str, skip) -> bool:
    """Whether module `name` or a module it lies in is `s` or ends with "." + `s`, for an `s` in `skip`."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(p == s or p.endswith("." + s) for p in prefixes for s in skip)


def quantizable_linears(model: nn.Module, skip=DEFAULT_SKIP) -> list[tuple[str, nn.Linear]]:
    """The fp32 `nn.Linear` layers (subclasses included) a method quantizes: all but the skipped ones."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n and not is_skipped(n, skip)]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _linear_4bit(linear: nn.Linear):
    import bitsandbytes as bnb

    new = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=torch.float32,
        compress_statistics=True,  # double quantization, as trainers.qlora.bnb_4bit_config
        quant_type="nf4",
        device="meta",
    )
    new.weight = bnb.nn.Params4bit(
        linear.weight.detach().float().clone(), requires_grad=False, compress_statistics=True, quant_type="nf4"
    )
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
    return new.to(linear.weight.device)  # Params4bit quantizes when moved to a real device


def quantize(model: nn.Module, method: str, skip=DEFAULT_SKIP) -> nn.Module:
    """Quantize `model`'s Linear layers (all but `skip`) in place with `method`; returns it, in eval mode.

    The model must be fp32 on CPU (dynamic-int8 and nf4 here; int8-weight-only runs on any device).
    A model quantized here cannot be saved with save_pretrained: use `load_quantized` for that.
    """
    check_method(method)
    require(method)
    skip = tuple(skip)
    model.eval()
    targets = quantizable_linears(model, skip)
    if method != "int8-weight-only" and (other := [n for n, m in targets if m.weight.dtype != torch.float32]):
        raise QuantizeError(
            f"{method} quantizes fp32 Linear layers; {other[0]} is {dict(targets)[other[0]].weight.dtype}."
        )
    if not targets:
        raise QuantizeError(f"No Linear layer left to quantize with skip={list(skip)}.")
    if method == "dynamic-int8":
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

        spec = {name: default_dynamic_qconfig for name, _ in targets}
        with warnings.catch_warnings():  # torch.ao.quantization's deprecation notices
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
            quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
    elif method == "int8-weight-only":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        names = {name for name, _ in targets}
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, fqn: fqn in names)
    else:
        for name, linear in targets:
            _set_module(model, name, _linear_4bit(linear))
        _guard_4bit(model)
    n = sum(is_quantized(m) for m in model.modules())
    logger.info("%s: %d Linear layers quantized, skipped %s", method, n, list(skip))
    return model


def _guard_4bit(model: nn.Module) -> None:
    from hybrid_mamba.trainers.qlora import guard_cpu_repack

    guard_cpu_repack(model)


def _torchao_skip_patterns(skip) -> list[str]:
    # transformers matches these against parameter names ("...mamba.x_proj.weight"): a regex up to a
    # module boundary, so a skip name matches at any depth and only as a whole name component
    import re

    return [rf"(?:.*\.)?{re.escape(s)}" for s in skip]


def quantization_config(method: str, skip=DEFAULT_SKIP):
    """transformers' quantization config of a savable `method` (what `load_quantized` loads with)."""
    check_method(method)
    require(method)
    if method == "int8-weight-only":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=_torchao_skip_patterns(skip))
    if method == "nf4":
        from hybrid_mamba.trainers.qlora import bnb_4bit_config

        return bnb_4bit_config(torch.float32, list(skip))
    raise QuantizeError(f"{method} has no transformers quantization config: it is applied after loading.")


def load_quantized(path: str | Path, method: str, skip=DEFAULT_SKIP, model_cls=None) -> nn.Module:
    """`path` (a save_pretrained folder) loaded and quantized with `method`, in eval mode.

    Savable methods load through transformers' quantizers, so the result saves with save_pretrained;
    dynamic-int8 loads fp32 and quantizes in memory.
    """
    check_method(method)
    require(method)
    if model_cls is None:
        from hybrid_mamba.modeling import HybridMambaForCausalLM as model_cls
    if method == "dynamic-int8":
        return quantize(model_cls.from_pretrained(str(path), dtype=torch.float32), method, skip)
    model = model_cls.from_pretrained(
        str(path), dtype=torch.float32, quantization_config=quantization_config(method, skip)
    )
    if method == "nf4":
        _guard_4bit(model)
    return model.eval()


def load_saved(path: str | Path, model_cls=None) -> nn.Module:
    """A folder written by save_pretrained from a `load_quantized` model, loaded back (eval mode)."""
    if model_cls is None:
        from hybrid_mamba.modeling import HybridMambaForCausalLM as model_cls
    model = model_cls.from_pretrained(str(path))
    _guard_4bit(model)
    return model.eval()


# Inspecting a quantized model


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` is a Linear layer whose weight one of the methods quantized."""
    cls = type(module)
    if cls.__name__ == "Linear4bit" or (
        cls.__name__ == "Linear" and cls.__module__.startswith("torch.ao.nn.quantized")
    ):
        return True  # bitsandbytes' 4-bit layer, torch.ao's dynamic quantized Linear
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) and weight is not None and _is_subclass_tensor(weight)


def _is_subclass_tensor(t: torch.Tensor) -> bool:
    return type(t) not in (torch.Tensor, nn.Parameter)


def _plain_fp32(t) -> bool:
    return isinstance(t, torch.Tensor) and not _is_subclass_tensor(t) and t.dtype == torch.float32


def skipped(model: nn.Module, skip=DEFAULT_SKIP) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n and is_skipped(n, skip)]


def fp32_problems(model: nn.Module, skip=DEFAULT_SKIP) -> list[str]:
    """What should have stayed fp32 and did not: SSM parameters, conv1d, the skipped modules' tensors."""
    problems = []
    for name, module in model.named_modules():
        for p in SSM_PARAMETERS:
            if p in module._parameters and not _plain_fp32(module._parameters[p]):
                problems.append(f"{name}.{p}")
        if isinstance(module, nn.Conv1d):
            problems += [f"{name}.{p}" for p, t in module.named_parameters() if not _plain_fp32(t)]
    for name, module in skipped(model, skip):
        if is_quantized(module):
            problems.append(f"{name} (quantized)")
        problems += [f"{name}.{p}" for p, t in module.named_parameters() if not _plain_fp32(t)]
    return problems


def _tensor_bytes(t) -> int:
    if isinstance(t, (tuple, list)):
        return sum(_tensor_bytes(x) for x in t)
    if not isinstance(t, torch.Tensor):
        return 0
    if hasattr(t, "__tensor_flatten__") and _is_subclass_tensor(t):  # torchao: its inner tensors
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    n = t.numel() * t.element_size()
    if t.is_quantized and t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        n += _tensor_bytes(t.q_per_channel_scales()) + _tensor_bytes(t.q_per_channel_zero_points())
    elif t.is_quantized:
        n += 8 + 8  # one scale and zero point
    return n


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the state dict as stored (tied tensors once; quantized weights with their scales)."""
    seen, total = set(), 0
    for value in model.state_dict(keep_vars=True).values():
        key = id(value)
        if key not in seen:
            seen.add(key)
            total += _tensor_bytes(value)
    return total


# Measurements


@torch.no_grad()
def validation_eval(models: dict[str, nn.Module], data_dir: str | Path, blocks: int, batch: int) -> dict:
    """Token loss and perplexity of every model on the first `blocks` blocks of DATA/validation, and the
    share of target positions where each model's top-1 token equals the first model's; models in turn per batch."""
    from hybrid_mamba.trainers.data import collate_packed, load_packed

    _, validation, _ = load_packed(str(data_dir))
    n_blocks = min(blocks, len(validation))
    reference = next(iter(models))
    sums = {name: 0.0 for name in models}
    agree = {name: 0 for name in models}
    tokens = 0
    for start in range(0, n_blocks, batch):
        b = collate_packed([validation[i] for i in range(start, min(start + batch, n_blocks))])
        targets = b["labels"][:, 1:]
        mask = targets != -100
        count = int(mask.sum())
        if not count:
            continue
        tokens += count
        top1 = {}
        for name, model in models.items():
            logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits[:, :-1]
            loss = nn.functional.cross_entropy(logits.float()[mask], targets[mask], reduction="sum")
            sums[name] += loss.item()
            top1[name] = logits.argmax(-1)[mask]
        for name in models:
            agree[name] += int((top1[name] == top1[reference]).sum())
    results = {}
    for name in models:
        loss = sums[name] / tokens
        results[name] = {"loss": loss, "perplexity": math.exp(loss), "top1_agreement": agree[name] / tokens}
    return {"blocks": n_blocks, "tokens": tokens, "models": results}


def measure_speed(models: dict[str, nn.Module], args: QuantizeArgs) -> dict:
    """Decode latency per token and prefill latency, bench_speed's interleaved timing code."""
    from hybrid_mamba.eval_harness.bench_speed import Plan, measure_decode, measure_prefill

    plan = Plan(
        prefill_lengths=(args.prefill_len,),
        prefill_reps=(args.prefill_reps,),
        decode_prompts=(args.decode_prompt,),
        decode_steps=args.decode_steps,
        decode_warmup=3,
        warmup=1,
    )
    steps = {name: [] for name in models}
    for rep in range(args.decode_reps):
        run = measure_decode(models, plan, args.seed + rep)[str(args.decode_prompt)]
        for name in models:
            steps[name] += run[name]["step_s"]
    prefill = measure_prefill(models, plan, args.seed)[str(args.prefill_len)]
    return {
        name: {
            "decode_step_s": steps[name],
            "decode_p50_s": statistics.median(steps[name]),
            "decode_min_s": min(steps[name]),
            "prefill_times_s": prefill[name]["times_s"],
            "prefill_median_s": prefill[name]["median_s"],
        }
        for name in models
    }


@torch.no_grad()
def logits_check(a: nn.Module, b: nn.Module, vocab_size: int, seed: int) -> float:
    ids = torch.randint(0, vocab_size, (1, 64), generator=torch.Generator().manual_seed(seed))
    return (a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max().item()


def save_quantized(model: nn.Module, model_dir: Path, out: Path, seed: int) -> dict:
    """save_pretrained a `load_quantized` model (and MODEL_DIR's tokenizer), reload it, compare logits."""
    model.save_pretrained(str(out))
    if any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(out))
    reloaded = load_saved(out, type(model))
    diff = logits_check(model, reloaded, model.config.vocab_size, seed)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {"path": str(out), "safetensors_bytes": size, "reload_max_abs_logit_diff": diff}


# The command


@dataclass
class QuantizeArgs:
    """Quantize a hybrid_mamba model (dynamic int8, torchao int8 weight-only, bitsandbytes NF4) and measure it."""

    model: str = field(metadata={"help": "A hybrid_mamba save_pretrained folder (fp32 or bf16 weights)."})
    method: str = field(
        default="all",
        metadata={"help": f"Comma-separated of {', '.join(METHODS)}; 'all': every one whose package is installed."},
    )
    eval: str | None = field(
        default=None, metadata={"help": "DATA folder (data_scripts format): validation loss and perplexity."}
    )
    out: str = field(default="results/quantize", metadata={"help": "Output folder: quantize.json, quantize.md."})
    save: bool = field(default=True, metadata={"help": "Also write OUT/<method>/ for the savable methods."})
    skip: list[str] = field(
        default_factory=lambda: list(DEFAULT_SKIP), metadata={"help": "Module names never quantized (name suffix)."}
    )
    threads: int = field(default=2, metadata={"help": "torch.set_num_threads for every measurement."})
    eval_blocks: int = field(default=32, metadata={"help": "Validation blocks evaluated (the first ones)."})
    eval_batch: int = field(default=4, metadata={"help": "Validation blocks per forward."})
    decode_prompt: int = field(default=128, metadata={"help": "Prompt tokens before the timed decode steps."})
    decode_steps: int = field(default=32, metadata={"help": "Timed decode steps per repetition (3 more warm up)."})
    decode_reps: int = field(default=3, metadata={"help": "Decode repetitions (each a fresh prompt)."})
    prefill_len: int = field(default=512, metadata={"help": "Prefill length timed."})
    prefill_reps: int = field(default=5, metadata={"help": "Prefill repetitions (after one warmup)."})
    seed: int = field(default=0, metadata={"help": "Seed of the random token ids."})
    note: str | None = field(default=None, metadata={"help": "A line for the report (how loaded the machine was)."})

    def __post_init__(self):
        for name in ("threads", "eval_blocks", "eval_batch", "decode_prompt", "decode_steps", "decode_reps"):
            if getattr(self, name) < 1:
                raise QuantizeError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.prefill_len < 1 or self.prefill_reps < 1:
            raise QuantizeError("--prefill_len and --prefill_reps must be at least 1.")
        self.methods()  # a bad name fails before anything loads
        model = Path(self.model)
        if not (model / "config.json").is_file():
            raise FileNotFoundError(f"--model {model}: no config.json there (expected a save_pretrained folder).")
        if self.eval is not None and not Path(self.eval).is_dir():
            raise FileNotFoundError(f"--eval {self.eval}: no such DATA folder.")

    def methods(self) -> list[str]:
        if self.method.strip() == "all":
            return list(METHODS)
        names = [m.strip() for m in self.method.split(",") if m.strip()]
        if not names:
            raise QuantizeError(f"--method {self.method!r}: choose 'all' or some of {', '.join(METHODS)}.")
        for name in names:
            check_method(name)
        if len(set(names)) != len(names):
            raise QuantizeError(f"--method {self.method!r} names a method twice.")
        return names


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def to_markdown(results: dict) -> str:
    m = results["machine"]
    fp32 = results["models"]["fp32"]
    lines = [
        "# Quantization on the PyTorch path (CPU)",
        "",
        f"`{results['command']}` on {m['cpu']} ({m['platform']}), {m['threads']} threads, torch {m['torch']}, "
        f"transformers {m['transformers']}, torchao {m.get('torchao')}, bitsandbytes {m.get('bitsandbytes')}, "
        f"{m['date']}, commit {m['git_commit']}.",
        "",
        f"Model: `{results['model']}` ({results['parameters']:,} parameters). Skipped (kept fp32) besides the SSM "
        f"parameters and conv: {', '.join(results['skip'])}. Decode: batch 1 after a {results['plan']['decode_prompt']}"
        f"-token prompt, median (and min) of {results['plan']['decode_reps']} x {results['plan']['decode_steps']} steps; "
        f"prefill: {results['plan']['prefill_len']} tokens, median of {results['plan']['prefill_reps']}; models "
        "interleaved step by step. Weights: the state dict as stored (quantized tensors with their scales).",
        "",
    ]
    if results.get("note"):
        lines += [f"Note: {results['note']}", ""]
    ev = results.get("eval")
    head = "| model | quantized Linear | weight MB | vs fp32 | decode ms/token | vs fp32 | min | prefill ms | vs fp32 |"
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    if ev:
        head += " val loss | perplexity | ppl change | top-1 = fp32 |"
        sep += "---:|---:|---:|---:|"
    lines += [head, sep]
    for name, r in results["models"].items():
        row = (
            f"| {name} | {r['quantized_linear']} | {r['weight_bytes'] / 1e6:.2f} | "
            f"{_ratio(r['weight_bytes'], fp32['weight_bytes'])} | {r['decode_p50_s'] * 1e3:.2f} | "
            f"{_ratio(r['decode_p50_s'], fp32['decode_p50_s'])} | {min(r['decode_step_s']) * 1e3:.2f} | "
            f"{r['prefill_median_s'] * 1e3:.1f} | "
            f"{_ratio(r['prefill_median_s'], fp32['prefill_median_s'])} |"
        )
        if ev:
            e, e0 = ev["models"][name], ev["models"]["fp32"]
            change = (e["perplexity"] / e0["perplexity"] - 1) * 100
            row += f" {e['loss']:.4f} | {e['perplexity']:.3f} | {change:+.2f}% | {e['top1_agreement'] * 100:.1f}% |"
        lines.append(row)
    if ev:
        lines += ["", f"Validation: `{results['eval_data']}`, {ev['blocks']} blocks, {ev['tokens']:,} target tokens."]
    if results["saved"]:
        lines += ["", "| saved | safetensors MB | reload max abs logit diff |", "|---|---:|---:|"]
        for name, s in results["saved"].items():
            lines.append(f"| {name} | {s['safetensors_bytes'] / 1e6:.2f} | {s['reload_max_abs_logit_diff']:.2e} |")
    if results["not_run"]:
        lines += ["", "Not run: " + "; ".join(f"{k} ({v})" for k, v in results["not_run"].items()) + "."]
    not_savable = [n for n in results["models"] if n not in ("fp32", *SAVABLE)]
    if not_savable:
        lines += ["", f"{', '.join(not_savable)}: not savable as a Hugging Face folder; quantized at load time."]
    return "\n".join(lines) + "\n"


def run(args: QuantizeArgs) -> dict:
    from hybrid_mamba.common.machine import machine
    from hybrid_mamba.modeling import HybridMambaForCausalLM

    torch.set_num_threads(args.threads)
    model_dir, out = Path(args.model), Path(args.out)
    skip = tuple(args.skip)
    methods, not_run = [], {}
    for method in args.methods():
        package = missing_package(method)
        if package is None:
            methods.append(method)
        elif args.method.strip() == "all":
            not_run[method] = f"{package} is not installed: {INSTALL_HINTS[package]}"
        else:
            require(method)
    models = {"fp32": HybridMambaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()}
    for method in methods:
        logger.info("loading %s", method)
        models[method] = load_quantized(model_dir, method, skip)
        if problems := fp32_problems(models[method], skip):
            raise QuantizeError(f"{method}: not fp32 after quantization: {', '.join(problems[:5])}")
    results = {
        "command": shlex.join(["python", "-m", "hybrid_mamba.hub_cards.quantize", *sys.argv[1:]]),
        "machine": machine(args.threads, ("torch", "transformers", "torchao", "bitsandbytes")),
        "model": str(model_dir),
        "parameters": sum(p.numel() for p in models["fp32"].parameters()),
        "skip": list(skip),
        "plan": {
            k: getattr(args, k)
            for k in ("decode_prompt", "decode_steps", "decode_reps", "prefill_len", "prefill_reps", "seed")
        },
        "not_run": not_run,
        "note": args.note,
        "models": {},
        "saved": {},
    }
    with torch.no_grad():
        speed = measure_speed(models, args)
        for name, model in models.items():
            results["models"][name] = {
                "quantized_linear": sum(is_quantized(m) for m in model.modules()),
                "weight_bytes": weight_bytes(model),
                "max_abs_logit_diff_vs_fp32": 0.0
                if name == "fp32"
                else logits_check(models["fp32"], model, model.config.vocab_size, args.seed),
                **speed[name],
            }
        if args.eval is not None:
            results["eval_data"] = args.eval
            results["eval"] = validation_eval(models, args.eval, args.eval_blocks, args.eval_batch)
    out.mkdir(parents=True, exist_ok=True)
    if args.save:
        for name in (n for n in methods if n in SAVABLE):
            results["saved"][name] = save_quantized(models[name], model_dir, out / name, args.seed)
    write_json_atomic(out / f"{STEM}.json", results)
    write_text_atomic(out / f"{STEM}.md", to_markdown(results))
    return results


def main(argv=None):
    args = parse_args(QuantizeArgs, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with contextlib.suppress(ImportError):
        import transformers

        transformers.logging.set_verbosity_error()
    results = run(args)
    print(to_markdown(results))
    return results


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
