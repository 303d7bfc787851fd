"""QLoRA: a 4-bit NF4 base through bitsandbytes, with the CPU eval-mode guard.

The base linear layers are stored in 4 bits (NF4, double quantization); LoRA adapters and everything
that is not a linear layer stay in higher precision. Kept unquantized on purpose: the SSM parameters
(`A_log`, `D`, `dt_bias`, the conv; they are not linear layers), the output layer (`lm_head`, or the
classifier `score`) and, by default, the Mamba-1 `x_proj` and `dt_proj`, which produce the step
size dt that the scan exponentiates (small layers, where 4-bit error goes straight into exp(A dt)).

The guard. bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks a 4-bit weight into a CPU-only layout
the first time `Linear4bit` runs in eval mode on an input without grad (`Linear4bit.forward`, the
`support_avx512bf16_for_cpu` branch). From then on `matmul_4bit` goes through `gemv_4bit`, which has
no autograd kernel: gradients through the base weights are silently dropped (LoRA gradients change,
or become None), and layers whose output size is not a multiple of 32 crash with "N must be
divisible by block_n". `guard_cpu_repack` turns the repack off on every 4-bit layer, and
`check_not_repacked` raises if a weight was repacked anyway (a bitsandbytes whose internals moved);
the fine-tuning evaluation calls it after every evaluation. tests/test_finetune_qlora.py holds both.
"""

import logging

import torch

logger = logging.getLogger(__name__)

# Modules never quantized (suffix match, transformers' `llm_int8_skip_modules`).
DEFAULT_SKIP_MODULES = ["lm_head", "score", "x_proj", "dt_proj"]


def _bnb():
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(
            "QLoRA needs bitsandbytes: `pip install -e '.[cuda]'` (GPU machines) or `pip install bitsandbytes>=0.45` "
            "(CPU: 4-bit loads and trains, slowly)."
        ) from err
    import bitsandbytes

    return bitsandbytes


def bnb_4bit_config(compute_dtype: torch.dtype, skip_modules: list[str] | None = None):
    from transformers import BitsAndBytesConfig

    _bnb()
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(DEFAULT_SKIP_MODULES if skip_modules is None else skip_modules),
    )


def load_4bit(
    model_cls,
    path: str,
    compute_dtype: torch.dtype,
    skip_modules=None,
    device_map=None,
    gradient_checkpointing: bool = False,
    **kwargs,
):
    """`model_cls.from_pretrained(path)` with an NF4 base, prepared for k-bit training and guarded."""
    from peft import prepare_model_for_kbit_training

    model = model_cls.from_pretrained(
        path, quantization_config=bnb_4bit_config(compute_dtype, skip_modules), device_map=device_map, **kwargs
    )
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
    )
    n = guard_cpu_repack(model)
    logger.info("4-bit NF4 base: %d linear layers quantized, skipped %s", n, skip_modules or DEFAULT_SKIP_MODULES)
    return model


def linear_4bit_modules(model) -> list[tuple[str, torch.nn.Module]]:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def guard_cpu_repack(model) -> int:
    """Turn off the eval-mode CPU repack of every 4-bit layer; returns how many layers were guarded."""
    layers = linear_4bit_modules(model)
    for _, module in layers:
        # Read only in Linear4bit.forward's repack condition (bitsandbytes 0.50); False keeps the
        # training layout, whose matmul has a backward, in eval mode too.
        module.support_avx512bf16_for_cpu = False
    return len(layers)


def check_not_repacked(model) -> None:
    """Raise if any 4-bit weight is in the CPU inference layout (gradients through it are lost)."""
    packed = [
        n for n, m in linear_4bit_modules(model) if getattr(m.weight.quant_state, "packing_format_for_cpu", False)
    ]
    if packed:
        raise RuntimeError(
            f"{len(packed)} 4-bit layer(s) (first: {packed[0]}) were repacked by bitsandbytes for CPU inference during an "
            "eval-mode forward; LoRA gradients through them would be wrong or None from now on. This bitsandbytes "
            "no longer honours trainers.qlora.guard_cpu_repack: pin bitsandbytes==0.50.2 or update the guard."
        )
