"""Convert between `HybridMambaForCausalLM` and transformers' own causal LMs, weight for weight.

    python -m hybrid_mamba.modeling.convert --src SRC_DIR --out OUT_DIR [--dtype float32|bfloat16|float16]
    python -m hybrid_mamba.modeling.convert --to bamba --src OUR_DIR --out OUT_DIR [--dtype ...]
    python -m hybrid_mamba.modeling.convert --to granitemoehybrid --src OUR_DIR --out OUT_DIR [--dtype ...]

Into ours (the default, `--to hybrid_mamba`): `LlamaForCausalLM` becomes an all-"attention" stack,
`MambaForCausalLM` an all-"mamba1" stack and `Mamba2ForCausalLM` an all-"mamba2" stack, both without
MLPs (`intermediate_size=0`); `BambaForCausalLM` and `GraniteMoeHybridForCausalLM` (dense: no experts)
keep their Mamba-2/attention layout. From Python, `convert(model_or_folder)` returns the converted model
in eval mode. A source setting that our architecture cannot represent raises one ValueError naming the
field, before any weight is copied; weights load with `strict=True`, so a source tensor without a place
(or a place without a tensor) fails. The CLI also copies the tokenizer when the source folder has one
that `AutoTokenizer` can load.

Out of ours (`--to bamba`, `--to granitemoehybrid`, or `export(model_or_folder, to)`): a transformers-native
folder (no remote code) whose logits equal ours. Our layout (Mamba-2 with a gated RMSNorm per group, GQA
attention with RoPE, SwiGLU MLP after every mixer) is Bamba's, with `partial_rotary_factor` 1.0 where
Bamba defaults to 0.5. GraniteMoeHybrid is the same layout with scalar multipliers and a shared MLP:
with no experts, the embedding, residual and logits multipliers 1.0, `attention_multiplier`
`head_dim ** -0.5` and the shared MLP's `input_linear` the concatenation of our gate and up projections,
it computes ours exactly, and it also has NoPE attention (`position_embedding_type=None`), which Bamba
lacks (its attention always rotates). A config either target cannot express (Mamba-1 layers, no MLP, a
conv activation other than SiLU, ...) raises `ExportError` naming the field, before any weight is read.
Init-only fields (`mamba_dt_min`, `mamba_dt_max`, `mamba_dt_init_floor`, `rescale_prenorm_residual`) and
run-time switches (`use_mamba_kernels`, `mamba_ops`) have no place in either config and are dropped.
"""

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    BambaConfig,
    BambaForCausalLM,
    GenerationConfig,
    GraniteMoeHybridConfig,
    GraniteMoeHybridForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaForCausalLM,
)

from hybrid_mamba.common.args import parse_args
from hybrid_mamba.common.files import atomic_dir
from hybrid_mamba.configuration.configuration_hybrid_mamba import HybridMambaConfig
from hybrid_mamba.modeling.modeling_hybrid_mamba import HybridMambaForCausalLM

logger = logging.getLogger(__name__)

SOURCE_CLASSES = {
    "llama": LlamaForCausalLM,
    "mamba": MambaForCausalLM,
    "mamba2": Mamba2ForCausalLM,
    "bamba": BambaForCausalLM,
    "granitemoehybrid": GraniteMoeHybridForCausalLM,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Our rotary embedding is Llama's (same ROPE_INIT_FUNCTIONS); partial rotation is not implemented by either.
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

# Source key -> our key. Llama already uses our names except the second norm.
LLAMA_RENAMES = [(r"\.post_attention_layernorm\.", ".pre_mlp_layernorm.")]
MAMBA_RENAMES = [
    (r"^backbone\.embeddings\.", "model.embed_tokens."),
    (r"^backbone\.norm_f\.", "model.norm."),
    (r"^backbone\.layers\.(\d+)\.norm\.", r"model.layers.\1.input_layernorm."),
    (r"^backbone\.layers\.(\d+)\.mixer\.", r"model.layers.\1.mamba."),
]
# Bamba and GraniteMoeHybrid name the mixers, attention and Mamba parameters as we do.
BAMBA_RENAMES = [
    (r"^model\.final_layernorm\.", "model.norm."),
    (r"\.pre_ff_layernorm\.", ".pre_mlp_layernorm."),
    (r"\.feed_forward\.", ".mlp."),
]
GRANITE_RENAMES = [
    (r"\.post_attention_layernorm\.", ".pre_mlp_layernorm."),
    (r"\.shared_mlp\.output_linear\.", ".mlp.down_proj."),
]


def _unsupported(field: str, value, why: str) -> ValueError:
    return ValueError(f"Cannot convert: source config field {field}={value!r} {why}.")


def _common_kwargs(c) -> dict:
    return dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        initializer_range=c.initializer_range,
        tie_word_embeddings=c.tie_word_embeddings,
        use_cache=c.use_cache,
        pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
    )


def llama_config(c) -> HybridMambaConfig:
    rope = dict(c.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        raise _unsupported("rope_parameters['rope_type']", rope.get("rope_type"), f"is not one of {list(ROPE_TYPES)}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        factor = rope["partial_rotary_factor"]
        raise _unsupported("rope_parameters['partial_rotary_factor']", factor, "is not supported (full rotation only)")
    return HybridMambaConfig(
        **_common_kwargs(c),
        layer_types=["attention"] * c.num_hidden_layers,
        intermediate_size=c.intermediate_size,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=rope,
        position_embedding_type="rope",
        attention_bias=c.attention_bias,
        attention_dropout=c.attention_dropout,
        mlp_bias=c.mlp_bias,
        rescale_prenorm_residual=False,
    )


def _mamba_common_kwargs(c, version: int) -> dict:
    # The conv activation of our Mamba blocks is fixed to silu; transformers reads it from hidden_act.
    if c.hidden_act != "silu":
        raise _unsupported("hidden_act", c.hidden_act, "is not supported: Mamba blocks here use silu after the conv")
    if float(c.expand) != int(c.expand):
        raise _unsupported("expand", c.expand, "must be an integer")
    if c.residual_in_fp32:
        logger.info("residual_in_fp32 is not represented: the residual stream keeps the model dtype (same in float32).")
    return dict(
        **_common_kwargs(c),
        layer_types=[f"mamba{version}"] * c.num_hidden_layers,
        mamba_version=version,
        intermediate_size=0,
        # No attention: without this the default 12 heads give an odd head_dim for e.g. hidden 2560,
        # which the base config's RoPE validation rejects although no layer uses RoPE.
        num_attention_heads=0,
        rms_norm_eps=c.layer_norm_epsilon,
        mamba_d_state=c.state_size,
        mamba_d_conv=c.conv_kernel,
        mamba_expand=int(c.expand),
        mamba_conv_bias=c.use_conv_bias,
        mamba_proj_bias=c.use_bias,
        mamba_dt_min=c.time_step_min,
        mamba_dt_max=c.time_step_max,
        mamba_dt_init_floor=c.time_step_floor,
        rescale_prenorm_residual=c.rescale_prenorm_residual,
    )


def mamba_config(c) -> HybridMambaConfig:
    return HybridMambaConfig(**_mamba_common_kwargs(c, 1), mamba_dt_rank=int(c.time_step_rank))


def mamba2_config(c) -> HybridMambaConfig:
    d_inner = int(c.expand) * c.hidden_size
    if c.num_heads * c.head_dim != d_inner:
        raise _unsupported(
            "num_heads", c.num_heads, f"times head_dim={c.head_dim} must equal expand * hidden_size = {d_inner}"
        )
    return HybridMambaConfig(
        **_mamba_common_kwargs(c, 2),
        mamba_head_dim=c.head_dim,
        mamba_n_groups=c.n_groups,
        mamba_chunk_size=c.chunk_size,
        mamba_dt_limit=tuple(c.time_step_limit),
    )


def _hybrid_kwargs(c, attention: list[bool]) -> dict:
    """Our config from the fields Bamba and GraniteMoeHybrid share (the same names, the same meaning)."""
    rope = dict(c.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
    factor = rope.pop("partial_rotary_factor", 1.0)
    if any(attention) and factor != 1.0:
        raise _unsupported(
            "rope_parameters['partial_rotary_factor']", factor, "is not supported (our attention rotates whole heads)"
        )
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        raise _unsupported("rope_parameters['rope_type']", rope.get("rope_type"), f"is not one of {list(ROPE_TYPES)}")
    if not all(attention) and c.hidden_act != "silu":
        raise _unsupported("hidden_act", c.hidden_act, "is not supported: Mamba blocks here use silu after the conv")
    if c.mamba_expand * c.hidden_size != c.mamba_n_heads * c.mamba_d_head:
        raise _unsupported(
            "mamba_n_heads", c.mamba_n_heads, f"times mamba_d_head={c.mamba_d_head} must equal expand * hidden_size"
        )
    heads = c.num_attention_heads
    return dict(
        **_common_kwargs(c),
        layer_types=["attention" if a else "mamba2" for a in attention],
        mamba_version=2,
        intermediate_size=c.intermediate_size,
        num_attention_heads=heads,
        num_key_value_heads=c.num_key_value_heads,
        # both read an optional head_dim attribute, else hidden_size // heads
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=rope,
        attention_bias=c.attention_bias,
        attention_dropout=c.attention_dropout,
        mamba_d_state=c.mamba_d_state,
        mamba_d_conv=c.mamba_d_conv,
        mamba_expand=c.mamba_expand,
        mamba_head_dim=c.mamba_d_head,
        mamba_n_groups=c.mamba_n_groups,
        mamba_chunk_size=c.mamba_chunk_size,
        mamba_conv_bias=c.mamba_conv_bias,
        mamba_proj_bias=c.mamba_proj_bias,
        mamba_dt_limit=tuple(c.time_step_limit or (0.0, float("inf"))),
        rescale_prenorm_residual=False,
    )


def bamba_config(c) -> HybridMambaConfig:
    attention = [t == "full_attention" for t in c.layers_block_type]
    if c.intermediate_size <= 0:
        raise _unsupported("intermediate_size", c.intermediate_size, "must be positive (every Bamba layer has an MLP)")
    return HybridMambaConfig(**_hybrid_kwargs(c, attention), position_embedding_type="rope", mlp_bias=c.mlp_bias)


def granitemoehybrid_config(c) -> HybridMambaConfig:
    attention = [t == "full_attention" for t in c.layers_block_type]
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    # Each of these makes GraniteMoeHybrid compute something ours does not: a mixture of experts, or a
    # scale on the embeddings, on each residual branch, on the logits, or a softmax scale other than 1/sqrt(d).
    for name, value, ours in (
        ("num_local_experts", c.num_local_experts, 0),
        ("embedding_multiplier", c.embedding_multiplier, 1.0),
        ("residual_multiplier", c.residual_multiplier, 1.0),
        ("logits_scaling", c.logits_scaling, 1.0),
    ):
        if value != ours:
            raise _unsupported(name, value, f"is not supported (ours is fixed at {ours})")
    if any(attention) and c.attention_multiplier != head_dim**-0.5:
        raise _unsupported(
            "attention_multiplier", c.attention_multiplier, f"must be head_dim ** -0.5 = {head_dim**-0.5!r} here"
        )
    if c.shared_intermediate_size <= 0:
        raise _unsupported("shared_intermediate_size", c.shared_intermediate_size, "must be positive here")
    kwargs = _hybrid_kwargs(c, attention)
    kwargs["intermediate_size"] = c.shared_intermediate_size
    return HybridMambaConfig(
        **kwargs, position_embedding_type="rope" if c.position_embedding_type == "rope" else "none", mlp_bias=False
    )


def _split_shared_mlp(state_dict: dict) -> dict:
    # GraniteMoeHybridMLP: act(x @ W[:I]) * (x @ W[I:]) with W = input_linear.weight (2I, D): our gate, then up
    out = {}
    for key, w in state_dict.items():
        if key.endswith(".shared_mlp.input_linear.weight"):
            prefix = key[: -len("shared_mlp.input_linear.weight")]
            out[prefix + "mlp.gate_proj.weight"], out[prefix + "mlp.up_proj.weight"] = w.chunk(2, dim=0)
        else:
            out[key] = w
    return out


CONFIG_CONVERTERS = {
    "llama": (llama_config, LLAMA_RENAMES),
    "mamba": (mamba_config, MAMBA_RENAMES),
    "mamba2": (mamba2_config, MAMBA_RENAMES),
    "bamba": (bamba_config, BAMBA_RENAMES),
    "granitemoehybrid": (granitemoehybrid_config, GRANITE_RENAMES),
}
# Tensor rewrites after the renames, for sources whose tensors are not ours one for one.
STATE_DICT_HOOKS = {"granitemoehybrid": _split_shared_mlp}


# The other direction, ours -> transformers configs: the matched baselines of eval_harness.bench_speed.


def _llama_shape_kwargs(ours: HybridMambaConfig) -> dict:
    # The fields Llama and Bamba share with ours, under the same names.
    return dict(
        vocab_size=ours.vocab_size,
        hidden_size=ours.hidden_size,
        intermediate_size=ours.intermediate_size,
        num_hidden_layers=ours.num_hidden_layers,
        num_attention_heads=ours.num_attention_heads,
        num_key_value_heads=ours.num_key_value_heads,
        rms_norm_eps=ours.rms_norm_eps,
        max_position_embeddings=ours.max_position_embeddings,
        tie_word_embeddings=ours.tie_word_embeddings,
    )


def to_llama_config(ours: HybridMambaConfig, **overrides) -> LlamaConfig:
    """A Llama of ours' shape (hidden size, MLP width, depth, heads, vocabulary); `overrides` replace fields."""
    return LlamaConfig(**{**_llama_shape_kwargs(ours), **overrides})


def _bamba_mamba_kwargs(ours: HybridMambaConfig) -> dict:
    """Our Mamba-2 fields under the names Bamba and GraniteMoeHybrid give them."""
    return dict(
        mamba_n_heads=ours.mamba_n_heads,
        mamba_d_head=ours.mamba_head_dim,
        mamba_n_groups=ours.mamba_n_groups,
        mamba_d_state=ours.mamba_d_state,
        mamba_d_conv=ours.mamba_d_conv,
        mamba_expand=ours.mamba_expand,
        mamba_chunk_size=ours.mamba_chunk_size,
        mamba_conv_bias=ours.mamba_conv_bias,
        mamba_proj_bias=ours.mamba_proj_bias,
        time_step_limit=tuple(ours.mamba_dt_limit),
    )


def to_bamba_config(ours: HybridMambaConfig) -> BambaConfig:
    """transformers' Bamba with ours' layer layout and sizes.

    Only the sizes are mapped: RoPE settings keep Bamba's defaults (partial_rotary_factor 0.5, rotating half of
    each head where ours rotates all of it), which the speed benchmark has always measured; the parameter count
    is unaffected.
    """
    n = ours.num_hidden_layers
    if any(ours.mixer_type(i) == "mamba1" for i in range(n)):
        raise ValueError("Bamba has only Mamba-2 and attention layers: benchmark a config without Mamba-1 layers.")
    return BambaConfig(
        **_llama_shape_kwargs(ours),
        attn_layer_indices=[i for i in range(n) if ours.layer_types[i] == "attention"],
        **_bamba_mamba_kwargs(ours),
    )


def to_mamba2_config(ours: HybridMambaConfig) -> Mamba2Config:
    """Mamba2ForCausalLM with ours' Mamba-2 head count, head size, state and groups in every layer.

    It has no MLP and no attention, so only hidden size, depth and vocabulary match the whole model; the other
    fields (biases, dt range) keep Mamba2Config's defaults, as the speed benchmark has always measured.
    """
    return Mamba2Config(
        vocab_size=ours.vocab_size,
        hidden_size=ours.hidden_size,
        num_hidden_layers=ours.num_hidden_layers,
        num_heads=ours.mamba_n_heads,
        head_dim=ours.mamba_head_dim,
        state_size=ours.mamba_d_state,
        n_groups=ours.mamba_n_groups,
        expand=ours.mamba_expand,
        conv_kernel=ours.mamba_d_conv,
        chunk_size=ours.mamba_chunk_size,
        layer_norm_epsilon=ours.rms_norm_eps,
        tie_word_embeddings=ours.tie_word_embeddings,
    )


# Export: ours -> a transformers-native BambaForCausalLM or GraniteMoeHybridForCausalLM, weight for weight.


class ExportError(ValueError):
    """Our config has a setting the export target cannot express; raised before any weight is read."""


def _export_problems(ours: HybridMambaConfig, to: str) -> list[tuple[str, object, str]]:
    """(field, value, why) for every HybridMambaConfig setting that `to` cannot reproduce exactly."""
    target = EXPORT_TARGETS[to][0].__name__
    n = ours.num_hidden_layers
    mixers = [ours.mixer_type(i) for i in range(n)]
    has_attention, has_mamba = "attention" in mixers, any(m != "attention" for m in mixers)
    problems = []
    if "mamba1" in mixers:
        field = "layer_types" if "mamba1" in ours.layer_types else "mamba_version"
        value = ours.layer_types if field == "layer_types" else ours.mamba_version
        layers = [i for i, m in enumerate(mixers) if m == "mamba1"]
        problems.append(
            (field, value, f"gives Mamba-1 layers {layers}, and {target} has only Mamba-2 and attention layers")
        )
    if ours.intermediate_size <= 0:
        problems.append(
            ("intermediate_size", ours.intermediate_size, f"means no MLP, and every {target} layer has one")
        )
    for field in ("intermediate_size_per_layer", "mamba_d_inner_per_layer"):
        if getattr(ours, field) is not None:  # a structurally pruned model (modeling/prune.py)
            problems.append((field, getattr(ours, field), f"gives layers their own widths, and {target} has one width"))
    if has_mamba and ours.hidden_act != "silu":
        # Bamba and GraniteMoeHybrid apply hidden_act after the Mamba conv as well as in the MLP; ours applies SiLU there
        problems.append(("hidden_act", ours.hidden_act, f"would also replace SiLU after the Mamba conv in {target}"))
    if has_attention and ours.position_embedding_type != "rope" and to == "bamba":
        # BambaAttention rotates q and k unconditionally; GraniteMoeHybrid skips RoPE with position_embedding_type=None
        problems.append(
            (
                "position_embedding_type",
                ours.position_embedding_type,
                "(NoPE attention) cannot be expressed: Bamba always applies RoPE; export with --to granitemoehybrid",
            )
        )
    rope = ours.rope_parameters or {}
    if has_attention and ours.position_embedding_type == "rope":
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            problems.append(
                (
                    "rope_parameters['partial_rotary_factor']",
                    rope["partial_rotary_factor"],
                    "is not 1.0 (ours rotates whole heads)",
                )
            )
        if rope.get("rope_type", "default") not in ROPE_TYPES:
            problems.append(
                ("rope_parameters['rope_type']", rope.get("rope_type"), f"is not one of {list(ROPE_TYPES)}")
            )
    if ours.mlp_bias and to == "granitemoehybrid":
        problems.append(("mlp_bias", ours.mlp_bias, "cannot be expressed: GraniteMoeHybrid's shared MLP has no biases"))
    return problems


def check_exportable(ours: HybridMambaConfig, to: str) -> None:
    """Raise one ExportError naming every field of `ours` that `to` cannot express."""
    if to not in EXPORT_TARGETS:
        raise ValueError(f"Unknown export target {to!r}; supported: {list(EXPORT_TARGETS)}.")
    problems = _export_problems(ours, to)
    if problems:
        listed = "; ".join(f"{field}={value!r} {why}" for field, value, why in problems)
        raise ExportError(f"Cannot export to {EXPORT_TARGETS[to][0].__name__}: {listed}.")
    if ours.mamba_version_set() and tuple(ours.mamba_dt_limit) != (0.0, float("inf")):
        logger.warning(
            "mamba_dt_limit=%s is exported as time_step_limit, which %s applies in a full forward but not in its "
            "one-token decode step: generation with a cache may differ from ours.",
            ours.mamba_dt_limit,
            EXPORT_TARGETS[to][0].__name__,
        )
    if ours.mamba_version_set() and ours.mamba_proj_bias:
        logger.warning(
            "mamba_proj_bias=True: %s zeroes padded tokens before in_proj (ours after), so their in_proj bias "
            "reaches the conv of the first real tokens of a left-padded row: padded batches may differ from ours "
            "(unpadded inputs do not).",
            EXPORT_TARGETS[to][0].__name__,
        )


def _export_kwargs(ours: HybridMambaConfig) -> dict:
    """The fields Bamba and GraniteMoeHybrid share, from ours."""
    attention = any(ours.mixer_type(i) == "attention" for i in range(ours.num_hidden_layers))
    # Without attention layers the head fields are unused, but both build a rotary embedding from them.
    heads = ours.num_attention_heads if ours.num_attention_heads > 0 else 1
    kwargs = dict(
        _llama_shape_kwargs(ours),
        num_attention_heads=heads,
        num_key_value_heads=ours.num_key_value_heads if ours.num_attention_heads > 0 else 1,
        hidden_act=ours.hidden_act,
        initializer_range=ours.initializer_range,
        use_cache=ours.use_cache,
        pad_token_id=ours.pad_token_id,
        bos_token_id=ours.bos_token_id,
        eos_token_id=ours.eos_token_id,
        # Bamba's __post_init__ passes partial_rotary_factor=0.5; a value in rope_parameters takes precedence
        rope_parameters={
            **(ours.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}),
            "partial_rotary_factor": 1.0,
        },
        attention_bias=ours.attention_bias,
        attention_dropout=ours.attention_dropout,
        **_bamba_mamba_kwargs(ours),
    )
    if attention:
        # not a declared field of either config, but both attention modules and rotary embeddings read it
        kwargs["head_dim"] = ours.head_dim
    return kwargs


def export_bamba_config(ours: HybridMambaConfig) -> BambaConfig:
    """The BambaConfig computing exactly what `ours` computes (check_exportable first)."""
    n = ours.num_hidden_layers
    return BambaConfig(
        **_export_kwargs(ours),
        attn_layer_indices=[i for i in range(n) if ours.mixer_type(i) == "attention"],
        mlp_bias=ours.mlp_bias,
    )


def export_granitemoehybrid_config(ours: HybridMambaConfig) -> GraniteMoeHybridConfig:
    """The dense GraniteMoeHybridConfig computing exactly what `ours` computes (check_exportable first)."""
    n = ours.num_hidden_layers
    kwargs = _export_kwargs(ours)
    head_dim = kwargs.get("head_dim") or ours.hidden_size // kwargs["num_attention_heads"]
    return GraniteMoeHybridConfig(
        **kwargs,
        layer_types=["full_attention" if ours.mixer_type(i) == "attention" else "linear_attention" for i in range(n)],
        position_embedding_type="rope" if ours.position_embedding_type == "rope" else None,
        num_local_experts=0,
        shared_intermediate_size=ours.intermediate_size,
        embedding_multiplier=1.0,
        residual_multiplier=1.0,
        logits_scaling=1.0,
        attention_multiplier=head_dim**-0.5,  # GraniteMoeHybridAttention's softmax scale
    )


def _join_shared_mlp(state_dict: dict) -> dict:
    out = {}
    for key, w in state_dict.items():
        if key.endswith(".mlp.gate_proj.weight"):
            prefix = key[: -len("mlp.gate_proj.weight")]
            out[prefix + "shared_mlp.input_linear.weight"] = torch.cat([w, state_dict[prefix + "mlp.up_proj.weight"]])
        elif not key.endswith(".mlp.up_proj.weight"):
            out[key] = w
    return out


EXPORT_TARGETS = {
    # name: (class, config builder, our key -> its key, tensor rewrite after the renames)
    "bamba": (
        BambaForCausalLM,
        export_bamba_config,
        [
            (r"^model\.norm\.", "model.final_layernorm."),
            (r"\.pre_mlp_layernorm\.", ".pre_ff_layernorm."),
            (r"\.mlp\.", ".feed_forward."),
        ],
        None,
    ),
    "granitemoehybrid": (
        GraniteMoeHybridForCausalLM,
        export_granitemoehybrid_config,
        [
            (r"\.pre_mlp_layernorm\.", ".post_attention_layernorm."),
            (r"\.mlp\.down_proj\.", ".shared_mlp.output_linear."),
        ],
        _join_shared_mlp,
    ),
}


@torch.no_grad()
def export(src, to: str = "bamba", dtype: torch.dtype | None = None):
    """Our model (or a folder holding one) as a transformers-native `to` model with the same logits, in eval mode.

    The weights take `dtype` (default: ours'), except the SSM parameters (A_log, D, dt_bias), kept in
    float32 as ours keeps them.
    """
    if isinstance(src, (str, Path)):
        check_exportable(HybridMambaConfig.from_pretrained(src, local_files_only=True), to)  # before the weights
        src = HybridMambaForCausalLM.from_pretrained(src, local_files_only=True, dtype="auto")
    if not isinstance(src, HybridMambaForCausalLM):
        raise ValueError(f"Cannot export {type(src).__name__}: give a HybridMambaForCausalLM or its folder.")
    check_exportable(src.config, to)
    cls, make_config, renames, hook = EXPORT_TARGETS[to]
    config = make_config(src.config)
    state_dict = _renamed(src.state_dict(), renames)
    if hook is not None:
        state_dict = hook(state_dict)
    dst = cls(config)
    dst.load_state_dict(state_dict, strict=True)  # raises on any missing, unexpected or misshapen tensor
    dtype = dtype or next(src.parameters()).dtype
    dst.to(device=next(src.parameters()).device, dtype=dtype)
    keep = src._keep_in_fp32_modules_strict or []
    for name, p in dst.named_parameters():
        if any(k in name for k in keep):
            p.data = p.data.float()
    dst.config.dtype = dtype
    if src.generation_config is not None:
        dst.generation_config = GenerationConfig.from_dict(src.generation_config.to_dict())
    logger.info(
        "Exported HybridMambaForCausalLM (%d layers, attention at %s, %s) as %s.",
        config.num_hidden_layers,
        [i for i in range(src.config.num_hidden_layers) if src.config.mixer_type(i) == "attention"],
        dtype,
        cls.__name__,
    )
    return dst.eval()


def _renamed(state_dict: dict, renames: list) -> dict:
    out = {}
    for key, tensor in state_dict.items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        out[key] = tensor
    return out


def _check_mamba2_in_proj(state_dict: dict, cfg: HybridMambaConfig):
    # mamba-ssm checkpoints may carry a gated MLP (d_mlp) in front of z in in_proj; we have no place for it.
    expected = 2 * cfg.mamba_d_inner + 2 * cfg.mamba_n_groups * cfg.mamba_d_state + cfg.mamba_n_heads
    for key, w in state_dict.items():
        if key.endswith("mamba.in_proj.weight") and w.shape[0] != expected:
            layer = key.rsplit(".mamba.", 1)[0]
            raise ValueError(
                f"Cannot convert: in_proj of {layer} has {w.shape[0]} outputs, {expected} expected for z, xBC and dt; "
                f"the extra {w.shape[0] - expected} (a d_mlp part) cannot be represented here."
            )


def cast(model: HybridMambaForCausalLM, dtype: torch.dtype) -> HybridMambaForCausalLM:
    """Cast to `dtype`, keeping the parameters our model keeps in float32 (A_log, D, dt_bias)."""
    keep = model._keep_in_fp32_modules_strict or []
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if any(k in name for k in keep) else dtype)
    model.config.dtype = dtype
    return model


def load_source(path) -> torch.nn.Module:
    """Load a saved source folder (a model_type of SOURCE_CLASSES) with its transformers class, offline, in float32."""
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model_type = config.model_type
    if model_type not in SOURCE_CLASSES:
        raise ValueError(f"Cannot convert model_type {model_type!r} from {path}; supported: {list(SOURCE_CLASSES)}.")
    CONFIG_CONVERTERS[model_type][0](config)  # an unsupported setting fails here, before the weights are read
    return SOURCE_CLASSES[model_type].from_pretrained(path, local_files_only=True, dtype=torch.float32)


@torch.no_grad()
def convert(src) -> HybridMambaForCausalLM:
    """Convert a model of SOURCE_CLASSES (Llama, Mamba, Mamba-2, Bamba, GraniteMoeHybrid), or a folder holding one."""
    if isinstance(src, (str, Path)):
        src = load_source(src)
    model_type = getattr(getattr(src, "config", None), "model_type", None)
    expected_class = SOURCE_CLASSES.get(model_type)
    if expected_class is None or not isinstance(src, expected_class):
        raise ValueError(
            f"Cannot convert {type(src).__name__} (model_type {model_type!r}); "
            f"supported: {[c.__name__ for c in SOURCE_CLASSES.values()]}."
        )
    make_config, renames = CONFIG_CONVERTERS[model_type]
    config = make_config(src.config)

    state_dict = _renamed(src.state_dict(), renames)
    if model_type in STATE_DICT_HOOKS:
        state_dict = STATE_DICT_HOOKS[model_type](state_dict)
    if model_type == "mamba2":
        _check_mamba2_in_proj(state_dict, config)

    model = HybridMambaForCausalLM(config)
    model.load_state_dict(state_dict, strict=True)  # raises on any missing, unexpected or misshapen tensor
    src_param = next(src.parameters())
    src_dtype = src_param.dtype
    cast(model, src_dtype).to(src_param.device)
    logger.info(
        "Converted %s (%d layers, %s) into HybridMambaForCausalLM with layer type %r.",
        type(src).__name__,
        config.num_hidden_layers,
        src_dtype,
        config.layer_types[0],
    )
    return model.eval()


def copy_tokenizer(src_dir: Path, out_dir: Path):
    if not any((src_dir / name).exists() for name in TOKENIZER_FILES):
        logger.info("No tokenizer files in %s: none copied.", src_dir)
        return
    try:
        tokenizer = AutoTokenizer.from_pretrained(src_dir, local_files_only=True)
    except (OSError, ValueError, ImportError) as e:
        logger.warning("Tokenizer in %s could not be loaded (%s): not copied.", src_dir, e)
        return
    tokenizer.save_pretrained(out_dir)
    logger.info("Copied the tokenizer (%s) to %s.", type(tokenizer).__name__, out_dir)


@dataclass
class ConvertArgs:
    """Convert a saved causal LM folder into a HybridMambaForCausalLM folder, or ours into a transformers-native one."""

    src: Path = field(
        metadata={
            "help": "Saved folder: a Llama, Mamba, Mamba-2, Bamba or GraniteMoeHybrid causal LM (--to hybrid_mamba), "
            "or a HybridMambaForCausalLM (--to bamba / granitemoehybrid)."
        }
    )
    out: Path = field(metadata={"help": "Output folder (replaced as a whole when the conversion succeeds)."})
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "dtype of the saved weights."}
    )
    to: Literal["hybrid_mamba", "bamba", "granitemoehybrid"] = field(
        default="hybrid_mamba",
        metadata={
            "help": "hybrid_mamba: into ours (with remote code); bamba / granitemoehybrid: ours into "
            "BambaForCausalLM / GraniteMoeHybridForCausalLM, loadable without trust_remote_code."
        },
    )


def main(argv=None):
    args = parse_args(ConvertArgs, argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if not (args.src / "config.json").is_file():
        raise FileNotFoundError(f"{args.src} has no config.json: give a folder written by save_pretrained.")
    if args.to == "hybrid_mamba":
        model = cast(convert(args.src), DTYPES[args.dtype])
    else:
        model_type = json.loads((args.src / "config.json").read_text()).get("model_type")
        if model_type != HybridMambaConfig.model_type:
            raise ValueError(
                f"--to {args.to} exports a hybrid_mamba model; {args.src} holds model_type {model_type!r} "
                "(convert it into ours with the default --to hybrid_mamba)."
            )
        model = export(args.src, args.to, dtype=DTYPES[args.dtype])
    with atomic_dir(args.out) as tmp:
        model.save_pretrained(tmp)
        copy_tokenizer(args.src, tmp)
    logger.info("Saved %s %s to %s.", args.dtype, type(model).__name__, args.out)


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
