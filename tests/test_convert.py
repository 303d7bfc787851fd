"""modeling.convert: converted Llama / Mamba / Mamba-2 models give the source model's logits."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
)

from hybrid_mamba.modeling.convert import cast, convert
from hybrid_mamba.modeling.modeling_hybrid_mamba import HybridMambaForCausalLM

REPO = Path(__file__).resolve().parents[1]
VOCAB = 101
SEQ_LEN = 29  # Mamba-2 chunk_size 8: three full chunks and a partial one


def llama_config(**kw):
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **kw,
    )


def mamba_config(**kw):
    return MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8, **kw)


# transformers' Mamba2 normalises the gated RMSNorm per group (as mamba-ssm and our model do) from 5.23 on;
# before, over all groups at once, so it is a reference for one group only.
MAMBA2_GROUPS = 2 if Version(transformers.__version__).release >= (5, 23) else 1


def mamba2_config(**kw):
    return Mamba2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_heads=8,
        head_dim=16,
        n_groups=MAMBA2_GROUPS,
        state_size=16,
        chunk_size=8,
        **kw,
    )


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
SOURCES = {
    # name: (source class, config, layer type we expect)
    "llama-gqa": (LlamaForCausalLM, lambda: llama_config(), "attention"),
    "llama-bias-tied-headdim-llama3": (
        LlamaForCausalLM,
        lambda: llama_config(
            head_dim=16,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
            rope_parameters=LLAMA3_ROPE,
        ),
        "attention",
    ),
    "mamba": (MambaForCausalLM, lambda: mamba_config(), "mamba1"),
    "mamba-bias-untied": (
        MambaForCausalLM,
        lambda: mamba_config(use_bias=True, time_step_rank=3, tie_word_embeddings=False),
        "mamba1",
    ),
    "mamba2": (Mamba2ForCausalLM, lambda: mamba2_config(), "mamba2"),
    "mamba2-bias-tied-dtlimit": (
        Mamba2ForCausalLM,
        lambda: mamba2_config(
            use_bias=True, tie_word_embeddings=True, time_step_limit=(0.0, 0.05), layer_norm_epsilon=1e-6
        ),
        "mamba2",
    ),
}


def make_source(name):
    cls, config, _ = SOURCES[name]
    torch.manual_seed(0)
    model = cls(config())
    with torch.no_grad():  # move norms, biases and D off their constant init, so a misplaced one shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def input_ids():
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (2, SEQ_LEN))


@torch.no_grad()
def logits(model, ids):
    return model(ids, use_cache=False).logits.float()


def assert_same_logits(src, dst):
    ids = input_ids()
    ref = logits(src, ids)
    assert ref.std() > 0.1  # the comparison means something
    torch.testing.assert_close(logits(dst, ids), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(SOURCES))
def test_logits_match_source(name):
    src = make_source(name)
    dst = convert(src)
    assert isinstance(dst, HybridMambaForCausalLM) and not dst.training
    assert dst.config.layer_types == [SOURCES[name][2]] * src.config.num_hidden_layers
    assert (dst.lm_head.weight is dst.model.embed_tokens.weight) == src.config.tie_word_embeddings
    if SOURCES[name][2] != "attention":
        assert dst.config.intermediate_size == 0 and all(layer.mlp is None for layer in dst.model.layers)
    assert_same_logits(src, dst)


def test_convert_from_folder(tmp_path):
    src = make_source("mamba2-bias-tied-dtlimit")
    src.save_pretrained(tmp_path / "src")
    assert_same_logits(src, convert(tmp_path / "src"))
    assert_same_logits(src, convert(str(tmp_path / "src")))


def _save_tiny_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
    src = make_source("llama-gqa")
    src.save_pretrained(tmp_path / "src")
    _save_tiny_tokenizer(tmp_path / "src")
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hybrid_mamba.modeling.convert",
            "--src",
            str(tmp_path / "src"),
            "--out",
            str(out),
            "--dtype",
            "float32",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "modeling_hybrid_mamba.py").is_file() and (out / "configuration_hybrid_mamba.py").is_file()
    assert AutoTokenizer.from_pretrained(out).encode("w3 w7 w9", add_special_tokens=False) == [3, 7, 9]
    assert_same_logits(src, HybridMambaForCausalLM.from_pretrained(out))


def test_cast_keeps_ssm_parameters_in_float32(tmp_path):
    model = cast(convert(make_source("mamba2")), torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = HybridMambaForCausalLM.from_pretrained(tmp_path)
    for name, p in loaded.named_parameters():
        fp32 = name.rsplit(".", 1)[-1] in ("A_log", "D", "dt_bias")
        assert p.dtype == (torch.float32 if fp32 else torch.bfloat16), name


PARTIAL_ROPE = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}


def _with_d_mlp(model):
    mixer = model.backbone.layers[0].mixer
    mixer.in_proj = nn.Linear(mixer.hidden_size, mixer.in_proj.out_features + 2 * 32, bias=False)
    return model


def _with_num_heads(model, n):
    model.config.num_heads = n  # bypasses Mamba2Config's own check, as an edited config.json would
    return model


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: MambaForCausalLM(mamba_config(hidden_act="gelu")), "hidden_act"),
        (lambda: Mamba2ForCausalLM(mamba2_config(hidden_act="relu")), "hidden_act"),
        (lambda: _with_num_heads(Mamba2ForCausalLM(mamba2_config()), 4), "num_heads"),
        (lambda: _with_d_mlp(Mamba2ForCausalLM(mamba2_config())), "d_mlp"),
        (lambda: LlamaForCausalLM(llama_config(rope_parameters=PARTIAL_ROPE)), "partial_rotary_factor"),
    ],
)
def test_unsupported_source_raises(make, field):
    with pytest.raises(ValueError, match=field):
        convert(make())


def test_unmapped_source_tensor_fails():
    src = make_source("llama-gqa")
    src.model.layers[0].self_attn.extra = nn.Parameter(torch.zeros(3))
    with pytest.raises(RuntimeError, match="extra"):
        convert(src)


def test_unknown_model_type_raises():
    with pytest.raises(ValueError, match="supported"):
        convert(nn.Linear(2, 2))
