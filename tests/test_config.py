import json

import pytest

from hybrid_mamba.configuration import PRESET_NAMES, HybridMambaConfig, get_preset, place_attention_layers
from hybrid_mamba.configuration.param_counts import count_parameters


def test_layout_from_indices_and_ratio():
    c = HybridMambaConfig(num_hidden_layers=6, attn_layer_indices=[1, 4])
    assert c.layer_types == ["mamba", "attention", "mamba", "mamba", "attention", "mamba"]
    assert place_attention_layers(8, 0.25) == [2, 6]
    assert place_attention_layers(24, 0.125) == [4, 12, 20]
    assert place_attention_layers(4, 0.0) == []
    c = HybridMambaConfig(num_hidden_layers=8, attn_layer_ratio=0.25, mamba_version=1)
    assert [c.mixer_type(i) for i in range(8)].count("mamba1") == 6


def test_layer_types_given_and_version_per_layer():
    c = HybridMambaConfig(num_hidden_layers=3, layer_types=["mamba1", "attention", "mamba"], mamba_version=2)
    assert [c.mixer_type(i) for i in range(3)] == ["mamba1", "attention", "mamba2"]
    # transformers' cache vocabulary is accepted and stored in ours
    c = HybridMambaConfig(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"])
    assert c.layer_types == ["mamba", "attention"]


def test_round_trip_keeps_layout(tmp_path):
    c = HybridMambaConfig(
        num_hidden_layers=3, layer_types=["mamba1", "attention", "mamba2"], hidden_size=64, num_attention_heads=4
    )
    c.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["layer_types"] == ["mamba1", "attention", "mamba2"]
    assert saved["rope_parameters"]["rope_type"] == "default" and "torch_dtype" not in saved
    c2 = HybridMambaConfig.from_pretrained(tmp_path)
    assert c2.layer_types == c.layer_types and c2.mamba_dt_limit == c.mamba_dt_limit


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hidden_size=64, num_attention_heads=5), "must divide hidden_size"),
        (dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
        (dict(num_hidden_layers=2, layer_types=["mamba", "transformer"]), "Unknown layer type"),
        (dict(num_hidden_layers=3, layer_types=["mamba", "attention"]), "2 entries but num_hidden_layers is 3"),
        (dict(num_hidden_layers=4, attn_layer_indices=[4]), "outside"),
        (dict(mamba_version=3), "mamba_version"),
        (dict(hidden_size=64, num_attention_heads=4, mamba_head_dim=48), "mamba_head_dim"),
        (dict(position_embedding_type="alibi"), "position_embedding_type"),
    ],
)
def test_bad_configs_raise_one_clear_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HybridMambaConfig(**kwargs)


def test_attention_free_config_ignores_head_and_rope_checks():
    HybridMambaConfig(hidden_size=64, num_attention_heads=5, num_hidden_layers=2, layer_types=["mamba", "mamba"])
    # default 12 heads give an odd head_dim (5): irrelevant without attention layers
    HybridMambaConfig(hidden_size=64, num_hidden_layers=2, layer_types=["mamba2"] * 2, mamba_head_dim=16)
    with pytest.raises(ValueError, match="even head_dim"):
        HybridMambaConfig(hidden_size=60, num_attention_heads=4, num_hidden_layers=2, layer_types=["attention"] * 2)


def test_presets():
    assert {"debug", "tiny", "130m", "370m", "1.3b", "2.7b", "6.7b", "13b", "13b-wide"} <= set(PRESET_NAMES)
    wide = get_preset("13b-wide")
    assert (wide.hidden_size, wide.num_hidden_layers, wide.num_attention_heads, wide.intermediate_size) == (
        4352,
        56,
        64,
        17408,
    )
    with pytest.raises(ValueError, match="valid presets are .*'debug'"):
        get_preset("7b")
    assert get_preset("debug", vocab_size=100).vocab_size == 100


def test_parameter_counts_come_from_the_module():
    debug = count_parameters(get_preset("debug"))
    assert 1e5 < debug["total"] < 1e6  # "a few hundred thousand"
    tiny = count_parameters(get_preset("tiny"))
    assert 1e7 <= tiny["total"] <= 3e7
    assert debug["total"] == debug["non_embedding"] + debug["embedding"]


def test_readme_table_is_the_scripts_output():
    from pathlib import Path

    from hybrid_mamba.configuration.param_counts import README_END, README_START, markdown_table

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split(README_START, 1)[1].split(README_END, 1)[0].strip()
    assert block == markdown_table()[0], "run: python -m hybrid_mamba.configuration.param_counts --readme README.md"
