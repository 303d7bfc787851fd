"""Initialise a hybrid student from an all-attention teacher, for distillation (trainers/distill.py).

    python -m hybrid_mamba.modeling.distill_init --teacher TEACHER_DIR --attention_layers 1,3 --out STUDENT_DIR

The route of "The Mamba in the Llama" (Wang et al., 2024; its code: MambaInLlama, `mamba2/hybrid_wrapper.py`)
and Llamba: attention without its softmax is linear attention, and linear attention is a Mamba-2 mixer whose
C, B and x play the parts of the queries, keys and values. Every attention layer not kept becomes a Mamba-2
mixer whose projections start from that layer's attention weights:

    q_proj -> C rows of in_proj      k_proj -> B rows      v_proj -> x rows      o_proj -> out_proj

and everything else (embeddings, norms, MLPs, the attention layers kept, the final norm, lm_head) is copied
unchanged. The teacher is a hybrid_mamba model whose layers are all attention (a Llama converted with
`modeling.convert`), or a Llama folder, converted here first.

Sizes chosen so that the mapping is exact (the paper's code does the same):

- heads `mamba_n_heads = num_attention_heads`, `mamba_head_dim = head_dim` (x of head h is the value of h);
- state size `mamba_d_state = head_dim` (a state row per key dimension);
- groups `mamba_n_groups = num_attention_heads`: every head has its own C (its own query). The paper's
  module keeps x and B at the size of the key/value heads and repeats them per query head after the conv;
  ours has no such repeat, so the rows of a key/value head are repeated in `in_proj` (and the conv weights
  of those channels start equal), which computes the same function at initialisation. A group per key/value
  head (`n_groups = num_key_value_heads`) would share one C between the query heads of a group: not exact
  under grouped-query attention, so it is not used. With plain multi-head attention both are the same.
- `mamba_expand = num_attention_heads * head_dim / hidden_size`, which must be a whole number (1 for Llama's
  default `head_dim = hidden_size / num_attention_heads`).
- `mamba_proj_bias = attention_bias`: q/k/v biases go to the same rows of `in_proj.bias`, o_proj's to out_proj.

Freshly initialised (the model's own `_init_weights`, seeded): the gate z rows and dt rows of `in_proj`,
`dt_bias` (dt log-uniform in [mamba_dt_min, mamba_dt_max]), `A_log` (A uniform in [1, 16]), `D` (ones), the
conv (PyTorch's default) and the gated norm's weight (ones). This is what the paper's released code does: it
copies q/k/v/o and leaves the rest at Mamba-2's default initialisation. It does not set the conv, dt or A to
make the mixer equal linear attention at step 0 (the conv, the SiLU after it, the decay and the gated norm
make it differ from the teacher's layer until distillation trains them); nor does this module.
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hybrid_mamba.common.args import parse_args
from hybrid_mamba.common.files import atomic_dir
from hybrid_mamba.configuration.configuration_hybrid_mamba import HybridMambaConfig
from hybrid_mamba.modeling.modeling_hybrid_mamba import HybridMambaForCausalLM

logger = logging.getLogger(__name__)

# Config keys that describe a saved file rather than the architecture; rebuilt for the student.
_DROPPED_KEYS = ("layer_types", "attn_layer_indices", "attn_layer_ratio", "architectures", "auto_map", "_name_or_path")


def student_config(teacher_config: HybridMambaConfig, attention_layers) -> HybridMambaConfig:
    """The student's config: the teacher's, with the layers outside `attention_layers` as Mamba-2 mixers
    sized for an exact q/k/v/o mapping (module docstring). ValueError when the teacher cannot be mapped."""
    c = teacher_config
    n = c.num_hidden_layers
    keep = sorted(set(int(i) for i in attention_layers))
    if bad := [i for i in keep if not 0 <= i < n]:
        raise ValueError(f"attention layers {bad} fall outside the teacher's {n} layers (0..{n - 1}).")
    if not_attention := [i for i in range(n) if c.layer_types[i] != "attention"]:
        raise ValueError(
            f"the teacher must be all attention; its layers {not_attention} are {c.layer_types[not_attention[0]]!r}."
        )
    width = c.num_attention_heads * c.head_dim
    if width % c.hidden_size:
        raise ValueError(
            f"num_attention_heads * head_dim = {width} is not a whole multiple of hidden_size {c.hidden_size}: "
            "the Mamba-2 inner width (mamba_expand * hidden_size) cannot hold one head per query head."
        )
    fields = {k: v for k, v in c.to_dict().items() if k not in _DROPPED_KEYS}
    fields.update(
        layer_types=["attention" if i in keep else "mamba2" for i in range(n)],
        mamba_version=2,
        mamba_expand=width // c.hidden_size,
        mamba_head_dim=c.head_dim,
        mamba_d_state=c.head_dim,
        mamba_n_groups=c.num_attention_heads,
        mamba_proj_bias=c.attention_bias,
    )
    return HybridMambaConfig.from_dict(fields)


def in_proj_slices(config: HybridMambaConfig) -> dict[str, slice]:
    """Rows of a Mamba-2 `in_proj` (output order z, x, B, C, dt, as mamba-ssm and our mixer split them)."""
    d, gn, h = config.mamba_d_inner, config.mamba_n_groups * config.mamba_d_state, config.mamba_n_heads
    return {
        "z": slice(0, d),
        "x": slice(d, 2 * d),
        "B": slice(2 * d, 2 * d + gn),
        "C": slice(2 * d + gn, 2 * d + 2 * gn),
        "dt": slice(2 * d + 2 * gn, 2 * d + 2 * gn + h),
    }


def _per_query_head(t: torch.Tensor, kv_heads: int, n_rep: int) -> torch.Tensor:
    """Rows of key/value heads (Hkv * P, ...) -> rows per query head (Hkv * n_rep * P, ...), as repeat_kv orders them."""
    return t.reshape(kv_heads, 1, -1, *t.shape[1:]).expand(-1, n_rep, *([-1] * t.dim())).flatten(0, 2)


@torch.no_grad()
def distill_init(teacher: HybridMambaForCausalLM, attention_layers, seed: int = 0) -> HybridMambaForCausalLM:
    """The student of `teacher` (an all-attention HybridMambaForCausalLM) that keeps `attention_layers` as
    attention and turns the others into Mamba-2 mixers initialised from their attention weights.

    Returned in eval mode, in the teacher's dtype and on its device. `seed` seeds the fresh parts."""
    config = student_config(teacher.config, attention_layers)
    torch.manual_seed(seed)
    student = HybridMambaForCausalLM(config)  # fresh parameters everywhere (float32, CPU)
    teacher_sd = {k: v.detach().to("cpu", torch.float32) for k, v in teacher.state_dict().items()}
    sd = student.state_dict()
    copied = set()
    for key in sd:
        if key in teacher_sd:  # embeddings, norms, MLPs, kept attention layers, lm_head
            sd[key] = teacher_sd[key].clone()
            copied.add(key)

    rows = in_proj_slices(config)
    kv, p = config.num_key_value_heads, config.head_dim
    n_rep = config.num_attention_heads // kv
    conv_x = slice(0, config.mamba_d_inner)  # conv channels: x, then B, then C
    conv_b = slice(config.mamba_d_inner, config.mamba_d_inner + config.mamba_n_groups * config.mamba_d_state)
    for i, kind in enumerate(config.layer_types):
        if kind == "attention":
            continue
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mamba."
        w = sd[m + "in_proj.weight"]  # (d_inner + conv_dim + H, D)
        w[rows["x"]] = _per_query_head(teacher_sd[a + "v_proj.weight"], kv, n_rep)
        w[rows["B"]] = _per_query_head(teacher_sd[a + "k_proj.weight"], kv, n_rep)
        w[rows["C"]] = teacher_sd[a + "q_proj.weight"]
        if config.attention_bias:
            b = sd[m + "in_proj.bias"]
            b[rows["x"]] = _per_query_head(teacher_sd[a + "v_proj.bias"], kv, n_rep)
            b[rows["B"]] = _per_query_head(teacher_sd[a + "k_proj.bias"], kv, n_rep)
            b[rows["C"]] = teacher_sd[a + "q_proj.bias"]
            sd[m + "out_proj.bias"] = teacher_sd[a + "o_proj.bias"].clone()
        sd[m + "out_proj.weight"] = teacher_sd[a + "o_proj.weight"].clone()
        # The repeated x/B channels of a key/value head start with that head's first copy's conv weights,
        # as in the paper's module, where the conv runs before the repeat.
        for name in ("conv1d.weight", "conv1d.bias"):
            if m + name in sd:
                t = sd[m + name]
                for ch in (conv_x, conv_b):
                    first = t[ch].reshape(kv, n_rep, p, *t.shape[1:])[:, :1]
                    t[ch] = first.expand(-1, n_rep, *([-1] * t.dim())).flatten(0, 2)
    student.load_state_dict(sd, strict=True)
    if teacher.config.tie_word_embeddings:
        student.tie_weights()
    param = next(teacher.parameters())
    if param.dtype != torch.float32:
        from hybrid_mamba.modeling.convert import cast

        cast(student, param.dtype)
    student.to(param.device)
    if teacher.generation_config is not None:
        student.generation_config = type(teacher.generation_config).from_dict(teacher.generation_config.to_dict())
    converted = [i for i, t in enumerate(config.layer_types) if t != "attention"]
    logger.info(
        "Student: layers %s became Mamba-2 (heads %d x %d, state %d, groups %d) from their attention; "
        "layers %s kept as attention; %d tensors copied unchanged.",
        converted,
        config.mamba_n_heads,
        config.mamba_head_dim,
        config.mamba_d_state,
        config.mamba_n_groups,
        [i for i in range(config.num_hidden_layers) if i not in converted],
        len(copied),
    )
    return student.eval()


def load_teacher(path) -> HybridMambaForCausalLM:
    """A saved teacher folder: a hybrid_mamba model (loaded as is) or a Llama (converted by modeling.convert)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: give a folder written by save_pretrained.")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type == HybridMambaConfig.model_type:
        return HybridMambaForCausalLM.from_pretrained(path, local_files_only=True).eval()
    if model_type == "llama":
        from hybrid_mamba.modeling.convert import convert

        return convert(path)
    raise ValueError(
        f"{path} holds model_type {model_type!r}; the teacher must be an all-attention hybrid_mamba model or a Llama."
    )


def parse_layers(text: str) -> list[int]:
    """'1,3' -> [1, 3]; '' -> [] (every layer becomes Mamba-2)."""
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"--attention_layers must be comma-separated layer indices like 1,3; got {text!r}.") from None


@dataclass
class DistillInitArgs:
    """Build a hybrid student from an all-attention teacher: kept layers stay attention, the others become
    Mamba-2 mixers initialised from q/k/v/o (The Mamba in the Llama)."""

    teacher: Path = field(metadata={"help": "Teacher folder: an all-attention hybrid_mamba model, or a Llama."})
    out: Path = field(metadata={"help": "Student folder (save_pretrained with remote code and the tokenizer)."})
    attention_layers: str = field(
        default="", metadata={"help": "Comma-separated indices of the layers kept as attention, e.g. 1,3."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the freshly initialised parts (z, dt, A, D, conv)."})


def main(argv=None):
    args = parse_args(DistillInitArgs, argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    layers = parse_layers(args.attention_layers)
    teacher = load_teacher(args.teacher)
    student = distill_init(teacher, layers, seed=args.seed)
    from hybrid_mamba.modeling.convert import copy_tokenizer

    with atomic_dir(args.out) as tmp:
        student.save_pretrained(tmp)
        copy_tokenizer(args.teacher, tmp)
    print(f"student ({student.config.layer_types}) in {args.out}")


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
