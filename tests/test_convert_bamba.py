"""modeling.convert export: ours as transformers-native BambaForCausalLM / GraniteMoeHybridForCausalLM, and back."""

import json

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BambaConfig,
    BambaForCausalLM,
    GraniteMoeHybridConfig,
    GraniteMoeHybridForCausalLM,
)

from hybrid_mamba.modeling import convert as convert_mod
from hybrid_mamba.modeling.convert import ExportError, convert, export
from hybrid_mamba.modeling.modeling_hybrid_mamba import HybridMambaForCausalLM

TARGETS = {"bamba": BambaForCausalLM, "granitemoehybrid": GraniteMoeHybridForCausalLM}
SEQ_LEN = 29  # chunk size 8: three full chunks and a partial one

M2, ATT = "mamba2", "attention"
LAYOUTS = {
    # name: (layer types, config overrides); tiny_config: hidden 64, 4 heads of 16, 8 Mamba heads of 16
    "all-mamba2": ([M2, M2], {}),
    "attention-middle-gqa": ([M2, ATT, M2], dict(num_key_value_heads=2)),
    "attention-first-mha": ([ATT, M2, M2], dict(num_key_value_heads=4)),
    "attention-last-mqa": ([M2, M2, ATT], dict(num_key_value_heads=1)),
    "all-attention": ([ATT, ATT], dict(num_key_value_heads=2)),
    "two-attention-groups-biases-untied": (
        [ATT, M2, ATT, M2],
        dict(
            num_key_value_heads=2,
            mamba_n_groups=2,
            mamba_conv_bias=False,
            mamba_proj_bias=True,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=False,
        ),
    ),
    "head-dim-eps-theta-dtlimit": (
        [M2, ATT, M2],
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0},
            mamba_dt_limit=(0.0, 0.05),
            mamba_n_groups=4,
        ),
    ),
    "llama3-rope": (
        [ATT, M2],
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 5e5,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        ),
    ),
}


def make_ours(layer_types, **overrides) -> HybridMambaForCausalLM:
    torch.manual_seed(0)
    model = HybridMambaForCausalLM(tiny_config(layer_types, **overrides))
    with torch.no_grad():  # move norms, biases, A_log, D and dt_bias off their init, so a misplaced one shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def input_ids(vocab, batch=2, t=SEQ_LEN):
    torch.manual_seed(1)
    return torch.randint(3, vocab, (batch, t))


@torch.no_grad()
def assert_same_logits(ours, theirs, **inputs):
    ids = inputs.pop("input_ids", None)
    ids = input_ids(ours.config.vocab_size) if ids is None else ids
    ref = ours(ids, use_cache=False, **inputs).logits
    got = theirs(ids, use_cache=False, **inputs).logits
    assert ref.std() > 0.1  # the comparison means something
    keep = inputs.get("attention_mask", torch.ones_like(ids)).bool()  # padded positions' logits are not compared
    torch.testing.assert_close(got[keep], ref[keep], atol=1e-4, rtol=0)
    return (got[keep] - ref[keep]).abs().max().item()


def assert_same_state_dict(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("to", list(TARGETS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_export_has_our_logits_and_round_trips(layout, to):
    layer_types, overrides = LAYOUTS[layout]
    if to == "granitemoehybrid":  # its shared MLP has no biases (refused: test_inexpressible_config_is_refused...)
        overrides = {**overrides, "mlp_bias": False}
    ours = make_ours(layer_types, **overrides)
    theirs = export(ours, to)
    assert type(theirs) is TARGETS[to] and not theirs.training
    assert theirs.config.layer_types == [
        "full_attention" if t == ATT else "linear_attention" for t in ours.config.layer_types
    ]
    assert (theirs.lm_head.weight is theirs.model.embed_tokens.weight) == ours.config.tie_word_embeddings
    assert_same_logits(ours, theirs)
    back = convert(theirs)
    assert isinstance(back, HybridMambaForCausalLM)
    assert_same_state_dict(ours, back)
    for name in ("layer_types", "head_dim", "num_key_value_heads", "rope_parameters", "mamba_dt_limit", "rms_norm_eps"):
        if name != "head_dim" or ATT in layer_types:
            assert getattr(back.config, name) == getattr(ours.config, name), name


@pytest.mark.parametrize("to", list(TARGETS))
def test_padded_batch_matches(to):
    # Left padding, positions counted from each row's first token (as ours and generate() do). Bamba and
    # GraniteMoeHybrid zero the padded inputs before in_proj (ours zeroes them after), so an in_proj bias
    # would reach the conv of the first real tokens there: this holds for mamba_proj_bias=False.
    ours = make_ours([M2, ATT, M2], num_key_value_heads=2)
    theirs = export(ours, to)
    ids = input_ids(ours.config.vocab_size, batch=3)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :11] = 0
    ids = ids.masked_fill(mask == 0, 0)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    assert_same_logits(ours, theirs, input_ids=ids, attention_mask=mask, position_ids=position_ids)


@pytest.mark.parametrize("to", list(TARGETS))
def test_greedy_generation_with_cache_matches(to):
    ours = make_ours([M2, ATT, M2], num_key_value_heads=2)
    theirs = export(ours, to)
    ids = input_ids(ours.config.vocab_size, batch=1, t=12)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kw), theirs.generate(ids, **kw))


def test_nope_attention_exports_to_granitemoehybrid_only():
    ours = make_ours([M2, ATT, M2, ATT], num_key_value_heads=2, position_embedding_type="none")
    theirs = export(ours, "granitemoehybrid")
    assert theirs.config.position_embedding_type is None and theirs.model.rotary_emb is None
    assert_same_logits(ours, theirs)
    back = convert(theirs)
    assert back.config.position_embedding_type == "none"
    assert_same_state_dict(ours, back)
    with pytest.raises(ExportError, match=r"position_embedding_type='none'.*granitemoehybrid"):
        export(ours, "bamba")


def test_export_config_settings():
    ours = make_ours([M2, ATT, M2], num_key_value_heads=2, head_dim=8, mamba_n_groups=2)
    b = export(ours, "bamba").config
    assert b.rope_parameters["partial_rotary_factor"] == 1.0  # Bamba's own default is 0.5
    assert (b.attn_layer_indices, b.head_dim, b.mamba_n_groups, b.mamba_d_head) == ([1], 8, 2, 16)
    g = export(ours, "granitemoehybrid").config
    assert (g.num_local_experts, g.embedding_multiplier, g.residual_multiplier, g.logits_scaling) == (0, 1, 1, 1)
    assert g.attention_multiplier == 8**-0.5 and g.shared_intermediate_size == ours.config.intermediate_size


PARTIAL_ROPE = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}


@pytest.mark.parametrize(
    "layer_types, overrides, field, targets",
    [
        ([M2, "mamba1", ATT], {}, "layer_types", ["bamba", "granitemoehybrid"]),
        (["mamba", ATT], dict(mamba_version=1), "mamba_version=1", ["bamba", "granitemoehybrid"]),
        ([M2, ATT], dict(intermediate_size=0), "intermediate_size=0", ["bamba", "granitemoehybrid"]),
        ([M2, ATT], dict(hidden_act="gelu"), "hidden_act='gelu'", ["bamba", "granitemoehybrid"]),
        ([M2, ATT], dict(position_embedding_type="none"), "position_embedding_type='none'", ["bamba"]),
        ([M2, ATT], dict(rope_parameters=PARTIAL_ROPE), "partial_rotary_factor'\\]=0.5", ["bamba", "granitemoehybrid"]),
        ([M2, ATT], dict(mlp_bias=True), "mlp_bias=True", ["granitemoehybrid"]),
        # a structurally pruned model (modeling/prune.py): widths per layer
        ([M2, ATT], dict(intermediate_size_per_layer=[96, 128]), "intermediate_size_per_layer", ["bamba"]),
        ([M2, ATT], dict(mamba_d_inner_per_layer=[64, 0]), "mamba_d_inner_per_layer", ["granitemoehybrid"]),
    ],
)
def test_inexpressible_config_is_refused_before_any_work(layer_types, overrides, field, targets, tmp_path):
    ours = HybridMambaForCausalLM(tiny_config(layer_types, **overrides))
    ours.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()  # the refusal comes from the config, before the weights are read
    for to in targets:
        for src in (ours, tmp_path):
            with pytest.raises(ExportError, match=field) as err:
                export(src, to)
            assert isinstance(err.value, ValueError)


def test_what_differs_only_in_decoding_or_padding_is_exported_with_a_warning(caplog):
    # Bamba's one-token decode step does not clamp dt to time_step_limit; it zeroes padded tokens before in_proj
    ours = make_ours([M2, ATT], mamba_dt_limit=(0.0, 0.05), mamba_proj_bias=True)
    with caplog.at_level("WARNING", logger="hybrid_mamba.modeling.convert"):
        theirs = export(ours, "bamba")
    assert "decode step" in caplog.text and "mamba_proj_bias=True" in caplog.text
    assert_same_logits(ours, theirs)


def test_settings_without_effect_are_not_refused():
    # NoPE and hidden_act only matter where attention / Mamba layers exist
    ours = make_ours([M2, M2], position_embedding_type="none")
    assert_same_logits(ours, export(ours, "bamba"))
    ours = make_ours([ATT, ATT], hidden_act="gelu")
    assert_same_logits(ours, export(ours, "bamba"))


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: BambaForCausalLM(_bamba(rope_parameters=None)), "partial_rotary_factor"),  # Bamba's default: 0.5
        (lambda: BambaForCausalLM(_bamba(intermediate_size=0)), "intermediate_size"),
        (lambda: GraniteMoeHybridForCausalLM(_granite(num_local_experts=2)), "num_local_experts"),
        (lambda: GraniteMoeHybridForCausalLM(_granite(embedding_multiplier=12.0)), "embedding_multiplier"),
        (lambda: GraniteMoeHybridForCausalLM(_granite(residual_multiplier=0.22)), "residual_multiplier"),
        (lambda: GraniteMoeHybridForCausalLM(_granite(logits_scaling=8.0)), "logits_scaling"),
        (lambda: GraniteMoeHybridForCausalLM(_granite(attention_multiplier=0.0078125)), "attention_multiplier"),
    ],
)
def test_inexpressible_source_is_refused(make, field):
    with pytest.raises(ValueError, match=field):
        convert(make())


def _shared(**kw):
    base = dict(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mamba_n_heads=4,
        mamba_d_state=8,
        mamba_chunk_size=8,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.0},
    )
    return {**base, **kw}


def _bamba(**kw):
    return BambaConfig(**_shared(attn_layer_indices=[1], **kw))


def _granite(**kw):
    kw = (
        dict(
            layer_types=["linear_attention", "full_attention"],
            position_embedding_type="rope",
            num_local_experts=0,
            shared_intermediate_size=64,
            attention_multiplier=8**-0.5,
        )
        | kw
    )
    return GraniteMoeHybridConfig(**_shared(**kw))


@pytest.mark.parametrize("to", list(TARGETS))
def test_transformers_models_convert_into_ours(to):
    # the other direction, from a model made by transformers rather than exported by us
    torch.manual_seed(0)
    src = (BambaForCausalLM(_bamba()) if to == "bamba" else GraniteMoeHybridForCausalLM(_granite())).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = convert(src)
    assert ours.config.layer_types == ["mamba2", "attention"]
    assert_same_logits(ours, src)
    assert_same_state_dict(src, export(ours, to))


def _save_tiny_tokenizer(path, vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, **{f"w{i}": i for i in range(1, vocab)}}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)


@pytest.mark.parametrize("to", list(TARGETS))
def test_cli_exports_a_native_folder_and_converts_it_back(to, tmp_path):
    ours = make_ours([M2, ATT, M2], num_key_value_heads=2)
    ours.save_pretrained(tmp_path / "ours")
    _save_tiny_tokenizer(tmp_path / "ours", ours.config.vocab_size)
    out = tmp_path / "native"
    convert_mod.main(["--to", to, "--src", str(tmp_path / "ours"), "--out", str(out)])

    assert not list(out.glob("*.py"))  # no remote code
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == to and "auto_map" not in config
    assert config["architectures"] == [TARGETS[to].__name__]
    assert (out / "generation_config.json").is_file()
    assert AutoTokenizer.from_pretrained(out).encode("w3 w7 w9", add_special_tokens=False) == [3, 7, 9]
    loaded = AutoModelForCausalLM.from_pretrained(out)  # no trust_remote_code
    assert type(loaded) is TARGETS[to]
    assert_same_logits(ours, loaded)

    convert_mod.main(["--src", str(out), "--out", str(tmp_path / "back")])  # the default direction: into ours
    assert_same_state_dict(ours, HybridMambaForCausalLM.from_pretrained(tmp_path / "back"))


def test_cli_export_in_bfloat16_keeps_ssm_parameters_in_float32(tmp_path):
    make_ours([M2, ATT]).save_pretrained(tmp_path / "ours")
    convert_mod.main(
        ["--to", "bamba", "--src", str(tmp_path / "ours"), "--out", str(tmp_path / "b"), "--dtype", "bfloat16"]
    )
    for name, t in load_file(tmp_path / "b" / "model.safetensors").items():
        fp32 = name.rsplit(".", 1)[-1] in ("A_log", "D", "dt_bias")
        assert t.dtype == (torch.float32 if fp32 else torch.bfloat16), name


def test_cli_export_refuses_a_source_that_is_not_ours(tmp_path):
    BambaForCausalLM(_bamba()).save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match="exports a hybrid_mamba model"):
        convert_mod.main(["--to", "bamba", "--src", str(tmp_path / "b"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
