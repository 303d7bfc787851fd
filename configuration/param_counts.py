"""Parameter counts of every preset, computed from the real module on the meta device.

    python -m hybrid_mamba.configuration.param_counts [--json FILE] [--readme README.md]

prints the markdown table of parameter counts, writes the counts as JSON, and with --readme replaces
the README's table (between the param-table markers) with it.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from hybrid_mamba.common.args import parse_args
from hybrid_mamba.common.files import write_text_atomic

from .configuration_hybrid_mamba import HybridMambaConfig
from .presets import PRESET_NAMES, get_preset


def meta_model(model_class, config):
    """`model_class(config)` built on the meta device: every shape, no memory, no initialisation."""
    import torch

    with torch.device("meta"):
        return model_class(config)


def total_parameters(model_class, config) -> int:
    """Parameters of any model class (ours, or transformers' Llama, Bamba, Mamba2) built from `config`;
    tied weights are counted once."""
    return sum(p.numel() for p in meta_model(model_class, config).parameters())


def count_parameters(config: HybridMambaConfig) -> dict:
    """Parameter counts of the real module by part, built on the meta device (no memory is allocated)."""
    from hybrid_mamba.modeling.modeling_hybrid_mamba import HybridMambaForCausalLM

    model = meta_model(HybridMambaForCausalLM, config)
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    embedding = model.model.embed_tokens.weight.numel()
    by_kind = {"attention": 0, "mamba": 0, "mlp": 0}
    for layer in model.model.layers:
        mixer = layer.self_attn if layer.mixer_type == "attention" else layer.mamba
        by_kind["attention" if layer.mixer_type == "attention" else "mamba"] += sum(
            p.numel() for p in mixer.parameters()
        )
        if layer.mlp is not None:
            by_kind["mlp"] += sum(p.numel() for p in layer.mlp.parameters())
    return {"total": total, "non_embedding": total - embedding, "embedding": embedding, **by_kind}


def _fmt(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


README_START, README_END = "<!-- param-table:start -->", "<!-- param-table:end -->"


def markdown_table() -> tuple[str, dict]:
    rows = {}
    lines = [
        "| preset | params | non-embedding | hidden | layers | attention layers | heads (kv) | MLP | Mamba heads x dim, state |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in PRESET_NAMES:
        cfg = get_preset(name)
        counts = count_parameters(cfg)
        attn = [i for i, t in enumerate(cfg.layer_types) if t == "attention"]
        rows[name] = {**counts, "layer_types": cfg.layer_types}
        lines.append(
            f"| `{name}` | {_fmt(counts['total'])} | {_fmt(counts['non_embedding'])} | {cfg.hidden_size} | "
            f"{cfg.num_hidden_layers} | {len(attn)} {attn} | {cfg.num_attention_heads} ({cfg.num_key_value_heads}) | "
            f"{cfg.intermediate_size} | {cfg.mamba_n_heads} x {cfg.mamba_head_dim}, {cfg.mamba_d_state} |"
        )
    return "\n".join(lines), rows


def check_readme(readme: Path) -> str:
    """The README's text, or an error when it has no table block to replace (checked before counting)."""
    if not readme.is_file():
        raise FileNotFoundError(f"--readme {readme} does not exist.")
    text = readme.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme} has no {README_START} ... {README_END} block to replace.")
    return text


def replace_readme_table(readme: Path, table: str) -> None:
    text = check_readme(readme)
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    write_text_atomic(readme, f"{head}{README_START}\n{table}\n{README_END}{tail}")


@dataclass
class ParamCountArgs:
    """Print the markdown table of parameter counts of every preset; optionally write it to JSON or a README."""

    json_out: Path | None = field(
        default=None, metadata={"aliases": ["--json"], "help": "Also write the counts to this JSON file."}
    )
    readme: Path | None = field(
        default=None, metadata={"help": "Replace the parameter table (between the param-table markers) in this README."}
    )


def main(argv=None):
    args = parse_args(ParamCountArgs, argv)
    if args.readme:
        check_readme(args.readme)
    table, rows = markdown_table()
    print(table)
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2) + "\n")
    if args.readme:
        replace_readme_table(args.readme, table)


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
