"""Configuration of the hybrid Mamba/attention causal language model.

This file is self-contained (it imports only transformers and huggingface_hub): it is copied as
remote code into every saved model folder, beside ``modeling_hybrid_mamba.py``.

The layer layout is derived here, once, and read by everything else: ``layer_types`` holds one
entry per layer, ``"attention"``, ``"mamba"`` (the version given by ``mamba_version``), ``"mamba1"``
or ``"mamba2"``.
"""

import math

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

LAYER_TYPES = ("attention", "mamba", "mamba1", "mamba2")
# transformers rewrites the legacy names "mamba"/"attention" to its cache vocabulary when a config is
# built; both spellings are accepted and stored in ours.
_LAYER_TYPE_ALIASES = {"full_attention": "attention", "linear_attention": "mamba"}
POSITION_EMBEDDING_TYPES = ("rope", "none")
MAMBA_OPS = ("fast", "reference")


def place_attention_layers(num_layers: int, ratio: float) -> list[int]:
    """Spread ``round(ratio * num_layers)`` attention layers evenly over the depth.

    Layer ``k`` of ``n`` sits in the middle of the ``k``-th of ``n`` equal slices of the stack, so a
    handful of attention layers covers early, middle and final layers (8 layers at 0.25 -> [2, 6];
    24 layers at 0.125 -> [4, 12, 20]).
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"attn_layer_ratio must be in [0, 1], got {ratio}.")
    n = round(ratio * num_layers)
    if ratio > 0 and n == 0:
        n = 1
    return sorted({int((k + 0.5) * num_layers / n) for k in range(n)})


@strict
class HybridMambaConfig(PreTrainedConfig):
    r"""
    Configuration of a [`HybridMambaForCausalLM`]: a stack of decoder layers whose token mixer is either
    a Mamba block (selective scan, version 1, or SSD, version 2) or grouped-query attention, each
    followed by a SwiGLU MLP (none when `intermediate_size == 0`, as in pure Mamba stacks).

    Args:
        vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
        num_key_value_heads, head_dim, hidden_act, max_position_embeddings, initializer_range,
        rms_norm_eps, tie_word_embeddings, use_cache, pad_token_id, bos_token_id, eos_token_id,
        rope_parameters, attention_bias, attention_dropout, mlp_bias:
            As in `LlamaConfig`. `intermediate_size=0` removes the MLP from every layer.
        position_embedding_type (`str`, defaults to `"rope"`):
            `"rope"`, or `"none"` for attention layers without position encoding (NoPE), as in Jamba
            and Mamba2-Hybrid, where the Mamba layers carry position.
        layer_types (`list[str]`, *optional*):
            One entry per layer: `"attention"`, `"mamba"`, `"mamba1"` or `"mamba2"`. When not given, it
            is derived from `attn_layer_indices`, or else from `attn_layer_ratio`.
        attn_layer_indices (`list[int]`, *optional*):
            Indices of the attention layers; every other layer is `"mamba"`.
        attn_layer_ratio (`float`, defaults to 0.125):
            Fraction of attention layers, spread evenly over the depth, used when neither
            `layer_types` nor `attn_layer_indices` is given.
        mamba_version (`int`, defaults to 2):
            Version of plain `"mamba"` layers: 1 = selective scan (mamba-ssm `Mamba`), 2 = SSD
            (mamba-ssm `Mamba2`).
        mamba_d_state, mamba_d_conv, mamba_expand, mamba_head_dim, mamba_n_groups, mamba_chunk_size:
            State size, depthwise convolution width, inner expansion, SSD head size, number of B/C
            groups and SSD chunk length.
        mamba_dt_min, mamba_dt_max, mamba_dt_init_floor, mamba_dt_limit:
            Range of the initial time step, its floor, and the clamp applied to the time step (v2).
        mamba_dt_rank (`int` or `"auto"`):
            Rank of the time-step projection of version-1 layers (`ceil(hidden_size / 16)` when auto).
        mamba_conv_bias, mamba_proj_bias: Biases of the convolution and of `in_proj`/`out_proj`.
        rescale_prenorm_residual (`bool`, defaults to `True`):
            Scale the output projections feeding the residual stream by `1/sqrt(num_hidden_layers)` at
            initialisation, as mamba-ssm and GPT-2 do.
        use_mamba_kernels (`bool`, defaults to `True`):
            Use mamba-ssm / causal-conv1d kernels on CUDA when they are installed; the pure-torch path
            is used otherwise, and always on CPU.
        intermediate_size_per_layer (`list[int]`, *optional*):
            One MLP width per layer, in place of `intermediate_size` (a structurally pruned model,
            `modeling/prune.py`); 0 removes that layer's MLP. When not given every layer has
            `intermediate_size`.
        mamba_d_inner_per_layer (`list[int]`, *optional*):
            One Mamba inner width per layer, in place of `mamba_expand * hidden_size`: Mamba-2 layers
            hold `d_inner / mamba_head_dim` heads (a multiple of `mamba_n_groups`), Mamba-1 layers
            `d_inner` channels; attention layers take 0. When not given every Mamba layer has
            `mamba_expand * hidden_size`.
        mamba_ops (`str`, defaults to `"fast"`):
            Operators the Mamba mixers and the RMS norms run: `"fast"` (hand-written backwards, and the
            kernels above where enabled) or `"reference"` (the readable pure-torch definitions the fast
            ones are tested against, never the kernels), to rule out a fast operator in one switch.
    """

    model_type = "hybrid_mamba"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 24
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    rope_parameters: RopeParameters | dict | None = None
    position_embedding_type: str = "rope"
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    mlp_bias: bool = False

    layer_types: list[str] | None = None
    attn_layer_indices: list[int] | None = None
    attn_layer_ratio: float | int = 0.125

    mamba_version: int = 2
    mamba_d_state: int = 128
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_head_dim: int = 64
    mamba_n_groups: int = 1
    mamba_chunk_size: int = 256
    mamba_dt_min: float = 0.001
    mamba_dt_max: float = 0.1
    mamba_dt_init_floor: float = 1e-4
    mamba_dt_limit: list[float] | tuple[float, float] = (0.0, float("inf"))
    mamba_dt_rank: int | str = "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    rescale_prenorm_residual: bool = True
    use_mamba_kernels: bool = True
    mamba_ops: str = "fast"
    intermediate_size_per_layer: list[int] | None = None
    mamba_d_inner_per_layer: list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.mamba_dt_rank == "auto":
            self.mamba_dt_rank = math.ceil(self.hidden_size / 16)
        self.mamba_dt_limit = tuple(self.mamba_dt_limit)
        self.layer_types = self._derive_layer_types()
        self._check()
        super().__post_init__(**kwargs)
        # The base class maps "mamba"/"attention" to its own cache names: keep ours.
        self.layer_types = [_LAYER_TYPE_ALIASES.get(t, t) for t in self.layer_types]

    def _derive_layer_types(self) -> list[str]:
        if self.layer_types is not None:
            if isinstance(self.layer_types, str):
                raise ValueError("layer_types must be a list with one entry per layer, not a string.")
            types = [_LAYER_TYPE_ALIASES.get(t, t) for t in self.layer_types]
            unknown = sorted({t for t in types if t not in LAYER_TYPES})
            if unknown:
                raise ValueError(
                    f"Unknown layer type(s) {unknown} in layer_types; valid types are {list(LAYER_TYPES)}."
                )
            if len(types) != self.num_hidden_layers:
                raise ValueError(
                    f"layer_types has {len(types)} entries but num_hidden_layers is {self.num_hidden_layers}: "
                    "give one entry per layer."
                )
            return types
        if self.attn_layer_indices is not None:
            bad = [i for i in self.attn_layer_indices if not 0 <= i < self.num_hidden_layers]
            if bad:
                raise ValueError(
                    f"attn_layer_indices {bad} fall outside the {self.num_hidden_layers} layers (0..{self.num_hidden_layers - 1})."
                )
            attn = set(self.attn_layer_indices)
        else:
            attn = set(place_attention_layers(self.num_hidden_layers, self.attn_layer_ratio))
        return ["attention" if i in attn else "mamba" for i in range(self.num_hidden_layers)]

    def _check(self):
        if self.mamba_version not in (1, 2):
            raise ValueError(f"mamba_version must be 1 or 2, got {self.mamba_version}.")
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(
                f"position_embedding_type must be one of {list(POSITION_EMBEDDING_TYPES)}, got {self.position_embedding_type!r}."
            )
        if "attention" in self.layer_types:
            if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size ({self.hidden_size})."
                )
            if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads != 0:
                raise ValueError(
                    f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                    f"({self.num_attention_heads})."
                )
            if self.position_embedding_type == "rope" and self.head_dim % 2:
                raise ValueError(
                    f"RoPE needs an even head_dim, got {self.head_dim}: change the head count or set head_dim."
                )
        if self.mamba_version_set() & {2}:
            d_inner = self.mamba_expand * self.hidden_size
            if d_inner % self.mamba_head_dim != 0:
                raise ValueError(
                    f"mamba_head_dim ({self.mamba_head_dim}) must divide mamba_expand * hidden_size ({d_inner})."
                )
            if (d_inner // self.mamba_head_dim) % self.mamba_n_groups != 0:
                raise ValueError(
                    f"mamba_n_groups ({self.mamba_n_groups}) must divide the number of Mamba heads "
                    f"({d_inner // self.mamba_head_dim})."
                )
        if self.mamba_ops not in MAMBA_OPS:
            raise ValueError(f"mamba_ops must be one of {list(MAMBA_OPS)}, got {self.mamba_ops!r}.")
        if self.mamba_chunk_size <= 0:
            raise ValueError(f"mamba_chunk_size must be positive, got {self.mamba_chunk_size}.")
        self._check_per_layer_widths()

    def _check_per_layer_widths(self):
        for name in ("intermediate_size_per_layer", "mamba_d_inner_per_layer"):
            widths = getattr(self, name)
            if widths is None:
                continue
            if len(widths) != self.num_hidden_layers or any(not isinstance(w, int) or w < 0 for w in widths):
                raise ValueError(
                    f"{name} must hold one non-negative integer per layer ({self.num_hidden_layers}), got {widths}; "
                    "or leave it unset for the same width in every layer."
                )
        if self.mamba_d_inner_per_layer is None:
            return
        for i, d in enumerate(self.mamba_d_inner_per_layer):
            kind = self.mixer_type(i)
            if kind == "attention" and d != 0:
                raise ValueError(
                    f"mamba_d_inner_per_layer[{i}] is {d} but layer {i} is an attention layer: give 0 there."
                )
            if kind == "mamba1" and d == 0:
                raise ValueError(f"mamba_d_inner_per_layer[{i}] is 0: a Mamba-1 layer needs at least one channel.")
            if kind == "mamba2":
                unit = self.mamba_head_dim * self.mamba_n_groups
                if d == 0 or d % unit:
                    raise ValueError(
                        f"mamba_d_inner_per_layer[{i}] is {d}: a Mamba-2 layer needs a positive multiple of "
                        f"mamba_head_dim * mamba_n_groups = {unit} (the same number of heads in every group)."
                    )

    def mixer_type(self, layer_idx: int) -> str:
        """The mixer of layer `layer_idx`: `"attention"`, `"mamba1"` or `"mamba2"`."""
        t = self.layer_types[layer_idx]
        return f"mamba{self.mamba_version}" if t == "mamba" else t

    def mamba_version_set(self) -> set[int]:
        return {
            int(self.mixer_type(i)[-1]) for i in range(self.num_hidden_layers) if self.layer_types[i] != "attention"
        }

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def mamba_n_heads(self) -> int:
        return self.mamba_d_inner // self.mamba_head_dim

    def layer_intermediate_size(self, layer_idx: int) -> int:
        """MLP width of layer `layer_idx` (0: no MLP)."""
        if self.intermediate_size_per_layer is not None:
            return self.intermediate_size_per_layer[layer_idx]
        return self.intermediate_size

    def layer_mamba_d_inner(self, layer_idx: int) -> int:
        """Inner width of the Mamba mixer of layer `layer_idx` (heads * head_dim for Mamba-2)."""
        if self.mamba_d_inner_per_layer is not None:
            return self.mamba_d_inner_per_layer[layer_idx]
        return self.mamba_d_inner

    # Validators run by `@strict` on save and on `validate()`; construction already raised plain
    # ValueErrors above. These replace the base checks that do not know our layer vocabulary.
    def validate_layer_type(self):
        if any(t not in LAYER_TYPES for t in self.layer_types) or len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types must have {self.num_hidden_layers} entries from {list(LAYER_TYPES)}.")

    def validate_architecture(self):
        self._check()

    def validate_rope(self):
        # Only attention layers use RoPE: a Mamba-only stack (e.g. converted mamba-2.8b, whose default
        # head_dim would be odd) must not fail RoPE's checks.
        if self.position_embedding_type == "rope" and "attention" in self.layer_types:
            super().validate_rope()


__all__ = ["HybridMambaConfig", "place_attention_layers", "LAYER_TYPES"]
