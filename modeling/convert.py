"""Convert transformers Llama, Mamba and Mamba-2 causal LMs into `HybridMambaForCausalLM`, weight for weight.

    python -m hybrid_mamba.modeling.convert --src SRC_DIR --out OUT_DIR [--dtype float32|bfloat16|float16]

`LlamaForCausalLM` becomes an all-"attention" stack, `MambaForCausalLM` an all-"mamba1" stack and
`Mamba2ForCausalLM` an all-"mamba2" stack, both without MLPs (`intermediate_size=0`). From Python,
`convert(model_or_folder)` returns the converted model in eval mode. A source setting that our
architecture cannot represent raises one ValueError naming the field, before any weight is copied;
weights load with `strict=True`, so a source tensor without a place (or a place without a tensor) fails.
The CLI also copies the tokenizer when the source folder has one that `AutoTokenizer` can load.
"""

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
    LlamaConfig,
    LlamaForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaForCausalLM,
)

from hybrid_mamba.common.args import parse_args
from hybrid_mamba.configuration.configuration_hybrid_mamba import HybridMambaConfig
from hybrid_mamba.modeling.modeling_hybrid_mamba import HybridMambaForCausalLM

logger = logging.getLogger(__name__)

SOURCE_CLASSES = {"llama": LlamaForCausalLM, "mamba": MambaForCausalLM, "mamba2": Mamba2ForCausalLM}
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


CONFIG_CONVERTERS = {
    "llama": (llama_config, LLAMA_RENAMES),
    "mamba": (mamba_config, MAMBA_RENAMES),
    "mamba2": (mamba2_config, MAMBA_RENAMES),
}


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
        mamba_n_heads=ours.mamba_n_heads,
        mamba_d_head=ours.mamba_head_dim,
        mamba_n_groups=ours.mamba_n_groups,
        mamba_d_state=ours.mamba_d_state,
        mamba_d_conv=ours.mamba_d_conv,
        mamba_expand=ours.mamba_expand,
        mamba_chunk_size=ours.mamba_chunk_size,
        mamba_conv_bias=ours.mamba_conv_bias,
        mamba_proj_bias=ours.mamba_proj_bias,
        time_step_limit=ours.mamba_dt_limit,
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
    """Load a saved Llama/Mamba/Mamba-2 folder with its transformers class, offline, in float32."""
    model_type = AutoConfig.from_pretrained(path, local_files_only=True).model_type
    if model_type not in SOURCE_CLASSES:
        raise ValueError(f"Cannot convert model_type {model_type!r} from {path}; supported: {list(SOURCE_CLASSES)}.")
    return SOURCE_CLASSES[model_type].from_pretrained(path, local_files_only=True, dtype=torch.float32)


@torch.no_grad()
def convert(src) -> HybridMambaForCausalLM:
    """Convert a `LlamaForCausalLM`, `MambaForCausalLM` or `Mamba2ForCausalLM` (or a folder holding one)."""
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

    state_dict = {}
    for key, tensor in src.state_dict().items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        state_dict[key] = tensor
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
    """Convert a saved Llama, Mamba or Mamba-2 causal LM folder into a HybridMambaForCausalLM folder."""

    src: Path = field(metadata={"help": "Saved LlamaForCausalLM, MambaForCausalLM or Mamba2ForCausalLM folder."})
    out: Path = field(metadata={"help": "Output folder for the HybridMambaForCausalLM (with remote code)."})
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "dtype of the saved weights."}
    )


def main(argv=None):
    args = parse_args(ConvertArgs, argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if not (args.src / "config.json").is_file():
        raise FileNotFoundError(f"{args.src} has no config.json: give a folder written by save_pretrained.")
    model = cast(convert(args.src), DTYPES[args.dtype])
    model.save_pretrained(args.out)
    copy_tokenizer(args.src, args.out)
    logger.info("Saved %s to %s.", args.dtype, args.out)


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
