"""The model card: metadata and sections built from artefacts (config, DATA/report.json, RUN/, lm-eval and bench JSON).

Every number in the card is read from a file a command in this repo wrote; a section whose artefact
was not given says so instead of being filled by hand.
"""

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

logger = logging.getLogger(__name__)

MAMBA_COLOR, ATTENTION_COLOR = "#4C78A8", "#F58518"
# the card body: a Jinja template filled by build_card with one string per section
TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"


@dataclass
class CardInputs:
    """What the card is built from. Every path is optional except the model's config."""

    model_name: str
    config: dict  # config.json of the published model (or of the adapter's base)
    repo_id: str  # what users pass to from_pretrained
    license: str = "apache-2.0"
    adapter_config: dict | None = None
    param_counts: dict | None = None
    data_report: dict | None = None
    data_dir: str | None = None
    summary: dict | None = None
    run_config: dict | None = None
    run_config_source: str | None = None
    metrics_path: Path | None = None
    eval_results: dict | None = None  # task -> {metric: (value, stderr)}
    eval_source: str | None = None
    eval_documents: dict | None = None  # task -> (evaluated, in the task)
    bench: dict | None = None
    bench_source: str | None = None
    transformers_range: tuple[str, str] | None = None  # (floor, newest tested) of the shipped remote code
    # config.json of a transformers-native export (publish --format bamba): the repo holds that class, no remote code
    native_config: dict | None = None
    tags: list = field(default_factory=list)


# artefact readers


def read_bench(path: Path) -> dict:
    data = json.loads(Path(path).read_text())
    missing = [k for k in ("machine", "configs", "training", "prefill", "decode", "memory") if k not in data]
    if missing:
        raise ValueError(f"{path} is not a bench_speed JSON (missing {missing}); see docs/results/bench_speed.json")
    return data


def read_transformers_range(modeling_file: Path) -> tuple[str, str] | None:
    """(floor, newest tested) transformers releases declared by a model folder's remote code, or None."""
    if not modeling_file.is_file():
        return None
    text = modeling_file.read_text(encoding="utf-8")
    found = [re.search(rf'^{name} = "([^"]+)"', text, re.M) for name in ("TRANSFORMERS_FLOOR", "TRANSFORMERS_TESTED")]
    return (found[0].group(1), found[1].group(1)) if all(found) else None


def read_metrics(path: Path) -> tuple[list, list]:
    """metrics.jsonl -> ([(step, train loss)], [(step, val loss)])."""
    train, val = [], []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "loss" in row:
            train.append((row["step"], row["loss"]))
        if "val_loss" in row:
            val.append((row["step"], row["val_loss"]))
    return train, val


# figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_layer_strip(layer_types: list, out: Path) -> None:
    """One box per layer, Mamba and attention in two colours, in order from the embedding up."""
    from matplotlib.patches import Patch

    plt = _pyplot()
    n = len(layer_types)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * n + 2.2), 1.4))
    for i, kind in enumerate(layer_types):
        color = ATTENTION_COLOR if kind == "attention" else MAMBA_COLOR
        ax.add_patch(plt.Rectangle((i, 0), 0.92, 1, color=color))
        ax.text(i + 0.46, 0.5, "A" if kind == "attention" else "M", ha="center", va="center", color="white", fontsize=9)
    ax.set_xlim(-0.1, n)
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.set_xticks([i + 0.46 for i in range(n)], [str(i) for i in range(n)], fontsize=7)
    ax.set_xlabel("layer")
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.legend(
        handles=[Patch(color=MAMBA_COLOR, label="Mamba"), Patch(color=ATTENTION_COLOR, label="attention")],
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        frameon=False,
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def draw_loss_curve(train: list, val: list, out: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


# sections


def _fmt_count(n) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def _architecture(inp: CardInputs, assets: Path) -> str:
    cfg = inp.config
    layer_types = cfg.get("layer_types") or []
    lines = ["## Architecture", ""]
    if layer_types:
        draw_layer_strip(layer_types, assets / "layers.png")
        attn = [i for i, t in enumerate(layer_types) if t == "attention"]
        lines += [
            "![layer layout](assets/layers.png)",
            "",
            f"{len(layer_types)} layers: {len(layer_types) - len(attn)} Mamba{cfg.get('mamba_version', '')} "
            f"and {len(attn)} attention (at {attn}). Layout from `layer_types` in config.json.",
            "",
        ]
    keys = [
        "hidden_size",
        "intermediate_size",
        "intermediate_size_per_layer",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "mamba_version",
        "mamba_d_state",
        "mamba_head_dim",
        "mamba_expand",
        "mamba_d_inner_per_layer",
        "mamba_d_conv",
        "vocab_size",
        "max_position_embeddings",
        "position_embedding_type",
        "tie_word_embeddings",
        "dtype",
    ]
    lines += (
        ["| field | value |", "|---|---|"] + [f"| `{k}` | {cfg[k]} |" for k in keys if cfg.get(k) is not None] + [""]
    )
    per_layer = [k for k in ("intermediate_size_per_layer", "mamba_d_inner_per_layer") if cfg.get(k) is not None]
    if per_layer:
        lines += [
            "Widths differ by layer (a structurally pruned model): "
            + " and ".join(f"`{k}`" for k in per_layer)
            + " give each layer's width, and replace `intermediate_size` and `mamba_expand` * `hidden_size` there.",
            "",
        ]
    if inp.param_counts:
        c = inp.param_counts
        lines += [
            "Parameters (`configuration.param_counts.count_parameters`, tied weights counted once):",
            "",
            "| total | non-embedding | embedding | Mamba mixers | attention | MLP |",
            "|---|---|---|---|---|---|",
            f"| {_fmt_count(c['total'])} | {_fmt_count(c['non_embedding'])} | {_fmt_count(c['embedding'])} | "
            f"{_fmt_count(c['mamba'])} | {_fmt_count(c['attention'])} | {_fmt_count(c['mlp'])} |",
            "",
        ]
    if inp.adapter_config:
        a = inp.adapter_config
        lines += [
            f"This repository holds a PEFT adapter ({a.get('peft_type')}, r={a.get('r')}, alpha={a.get('lora_alpha')}, "
            f"targets {a.get('target_modules')}) for the base model `{a.get('base_model_name_or_path')}`.",
            "",
        ]
    return "\n".join(lines)


def _training_data(inp: CardInputs) -> str:
    lines = ["## Training data", ""]
    report = inp.data_report
    if not report:
        return "\n".join(
            lines
            + [
                "No data report was given (`--data DATA_DIR` with a `report.json` from data_scripts), "
                "so this card does not describe the training data.",
                "",
            ]
        )
    train = report.get("splits", {}).get("train", {})
    shares = train.get("sources", {})
    lines += [
        f"Prepared by `data_scripts` (recipe `{report.get('recipe')}`, fingerprint `{str(report.get('fingerprint'))[:12]}`): "
        f"{train.get('tokens', 0):,} training tokens in blocks of {report.get('seq_len')} tokens, "
        f"tokenizer vocabulary {report.get('vocab_size')}.",
        "",
        "| source | licence | training tokens | share (target / achieved) | credit |",
        "|---|---|---|---|---|",
    ]
    for src in report.get("sources", []):
        s = shares.get(src["name"], {})
        achieved = s.get("achieved_share")
        lines.append(
            f"| {src['name']} | {src.get('license') or 'not recorded'} | {s.get('tokens', 0):,} | "
            f"{src.get('target_share', 0):.2f} / {achieved:.3f} | {src.get('attribution') or 'not recorded'} |"
            if achieved is not None
            else f"| {src['name']} | {src.get('license') or 'not recorded'} | not recorded | {src.get('target_share')} / - | "
            f"{src.get('attribution') or 'not recorded'} |"
        )
    return "\n".join(lines + [""])


def _training_procedure(inp: CardInputs, assets: Path) -> str:
    lines = ["## Training procedure", ""]
    s = inp.summary
    if not s:
        return "\n".join(
            lines
            + [
                "No run summary was found (RUN/summary.json beside the model folder), so this card "
                "does not describe the training run.",
                "",
            ]
        )
    hw = s.get("hardware", {})
    rows = [
        ("steps", s.get("steps")),
        ("tokens seen", f"{s['tokens_seen']:,}" if "tokens_seen" in s else None),
        ("global batch (sequences)", s.get("global_batch_sequences")),
        ("sequence length", s.get("seq_len")),
        ("wall time", f"{s['wall_time_s']:.0f} s" if "wall_time_s" in s else None),
        ("final validation loss", f"{s['final_val_loss']:.3f} nats/token" if "final_val_loss" in s else None),
        (
            "best validation loss",
            f"{s['best_val_loss']:.3f} at step {s.get('best_step')}" if "best_val_loss" in s else None,
        ),
        (
            "unigram baseline (validation)",
            f"{s['unigram_baseline_val_loss']:.3f} nats/token" if "unigram_baseline_val_loss" in s else None,
        ),
        (
            "hardware",
            f"{hw.get('device')}, {hw.get('processes')} process(es), {hw.get('threads_per_process')} threads each, "
            f"{hw.get('distributed_type')}, mixed precision {hw.get('mixed_precision')}"
            if hw
            else None,
        ),
    ]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows if v is not None] + [""]
    if inp.run_config:
        lines += [f"Hyperparameters (from `{inp.run_config_source}`):", "", "| field | value |", "|---|---|"]
        lines += [f"| `{k}` | {v} |" for k, v in inp.run_config.items() if not isinstance(v, (dict, list)) or v] + [""]
    else:
        lines += [
            "The run folder does not record its training config; pass `--train-config` to list the hyperparameters.",
            "",
        ]
    if inp.metrics_path:
        train, val = read_metrics(inp.metrics_path)
        if train or val:
            draw_loss_curve(train, val, assets / "loss.png")
            lines += ["![loss curve](assets/loss.png)", "", "Loss curve from RUN/metrics.jsonl.", ""]
    return "\n".join(lines)


def _evaluation(inp: CardInputs) -> str:
    lines = ["## Evaluation", ""]
    if not inp.eval_results:
        return "\n".join(
            lines
            + [
                "No evaluation results were given (`--eval` with lm-eval results JSON): this model "
                "has not been evaluated for this card.",
                "",
            ]
        )
    lines += [
        f"lm-evaluation-harness results read from `{inp.eval_source}`.",
        "",
        "| task | documents | metric | value | stderr |",
        "|---|---|---|---|---|",
    ]
    documents = inp.eval_documents or {}
    for task, metrics in sorted(inp.eval_results.items()):
        n = documents.get(task)
        shown = "not recorded" if n is None else f"{n[0]} of {n[1]}" if n[1] not in (None, n[0]) else str(n[0])
        for metric, (value, stderr) in metrics.items():
            lines.append(
                f"| {task} | {shown} | {metric} | {value:.4f} | {'-' if stderr is None else f'{stderr:.4f}'} |"
            )
    return "\n".join(lines + [""])


def _speed(inp: CardInputs) -> str:
    lines = ["## Speed and memory", ""]
    b = inp.bench
    if not b:
        return "\n".join(
            lines
            + [
                "No benchmark was given (`--bench` with a bench_speed JSON): speed and memory were "
                "not measured for this card.",
                "",
            ]
        )
    m = b["machine"]
    models = list(b["configs"])
    ours = b["configs"].get("ours", {})
    same = all(
        ours.get(k) == inp.config.get(k) for k in ("layer_types", "hidden_size", "intermediate_size", "mamba_d_state")
    )
    lines += [
        f"From `{inp.bench_source}` (`{b.get('command', 'eval_harness.bench_speed')}`) on {m.get('cpu')}, "
        f"{m.get('threads')} threads, torch {m.get('torch')}, {m.get('date')}.",
        ""
        if same
        else f"\nThe benchmark measured a model of the same family with hidden size {ours.get('hidden_size')} "
        f"and layers {ours.get('layer_types')}, not this checkpoint's exact size; read the figures as relative.",
        "",
        "| measurement | " + " | ".join(models) + " |",
        "|---|" + "---|" * len(models),
    ]
    lines.append(
        "| training tokens/s | " + " | ".join(f"{b['training'][k]['median_tokens_per_s']:.0f}" for k in models) + " |"
    )
    for length, row in b["prefill"].items():
        lines.append(
            f"| prefill {length} tokens (ms) | " + " | ".join(f"{row[k]['median_s'] * 1e3:.1f}" for k in models) + " |"
        )
    for length, row in b["decode"].items():
        lines.append(
            f"| decode p50 after {length} (ms/token) | "
            + " | ".join(f"{row[k]['p50_s'] * 1e3:.2f}" for k in models)
            + " |"
        )
    lines.append(
        "| training peak RSS (MiB) | " + " | ".join(f"{b['memory'][k]['peak_rss_mib']:.0f}" for k in models) + " |"
    )
    return "\n".join(lines + [""])


def _native_class(inp: CardInputs) -> str | None:
    return (inp.native_config.get("architectures") or [None])[0] if inp.native_config else None


def _how_to_load_native(inp: CardInputs) -> str:
    cls, version = _native_class(inp), inp.native_config.get("transformers_version")
    return "\n".join(
        [
            "## How to load",
            "",
            f"This repository holds transformers' own `{cls}` (`model_type: {inp.native_config.get('model_type')}`), "
            "exported weight for weight from the hybrid_mamba model described above (layout and sizes from its "
            f"config.json) by `python -m hybrid_mamba.modeling.convert --to {inp.native_config.get('model_type')}`, "
            "whose tests check that the export has the same logits. No remote code: load it without "
            "`trust_remote_code`.",
            "",
            *(
                [
                    f"Written with transformers {version}. The export rotates whole heads, which {cls} reads from "
                    "`rope_parameters['partial_rotary_factor']` (1.0 here; Bamba's own default is 0.5) as transformers "
                    f"{version} does: on another release, compare its logits with the hybrid_mamba model first.",
                    "",
                ]
                if version
                else []
            ),
            "```python",
            f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{inp.repo_id}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{inp.repo_id}")\n'
            f'ids = tokenizer("To be, or not to be", return_tensors="pt")\n'
            f"print(tokenizer.decode(model.generate(**ids, max_new_tokens=40)[0]))\n"
            "```",
            "",
            f"With lm-evaluation-harness: `lm_eval --model hf --model_args pretrained={inp.repo_id} --tasks ...`",
            "",
        ]
    )


def _how_to_load(inp: CardInputs) -> str:
    if inp.native_config:
        return _how_to_load_native(inp)
    if inp.adapter_config:
        base = inp.adapter_config.get("base_model_name_or_path")
        code = (
            f"from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base}", trust_remote_code=True)\n'
            f'model = PeftModel.from_pretrained(base, "{inp.repo_id}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{inp.repo_id}", trust_remote_code=True)\n'
        )
    else:
        code = (
            f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{inp.repo_id}", trust_remote_code=True)\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{inp.repo_id}", trust_remote_code=True)\n'
            f'ids = tokenizer("To be, or not to be", return_tensors="pt")\n'
            f"print(tokenizer.decode(model.generate(**ids, max_new_tokens=40)[0]))\n"
        )
    versions = []
    if inp.transformers_range:
        floor, tested = inp.transformers_range
        versions = [
            f"Requires `transformers>={floor},<6`; tested with {floor} to {tested} (the code checks the installed "
            "release when it is imported and warns on a release newer than the tested one).",
            "",
        ]
    return "\n".join(
        [
            "## How to load",
            "",
            "The modeling code ships in this repository (`configuration_hybrid_mamba.py`, `modeling_hybrid_mamba.py`): "
            "pass `trust_remote_code=True` to the model and to the tokenizer.",
            "",
            *versions,
            "```python",
            code + "```",
            "",
            f"With lm-evaluation-harness: `lm_eval --model hf --model_args pretrained={inp.repo_id},trust_remote_code=True --tasks ...`",
            "",
        ]
    )


def _limitations(inp: CardInputs) -> str:
    lines = ["## Limitations", ""]
    s, r = inp.summary or {}, inp.data_report or {}
    if "tokens_seen" in s:
        lines.append(
            f"- Trained on {s['tokens_seen']:,} tokens only"
            + (
                f"; validation loss {s['final_val_loss']:.2f} against a unigram baseline of {s['unigram_baseline_val_loss']:.2f} nats/token"
                if "final_val_loss" in s and "unigram_baseline_val_loss" in s
                else ""
            )
            + ": expect text that is locally plausible and globally incoherent."
        )
    if r.get("sources"):
        lines.append(f"- It has seen only {', '.join(x['name'] for x in r['sources'])}; it knows nothing outside them.")
    if "seq_len" in s:
        lines.append(f"- Trained on sequences of {s['seq_len']} tokens; longer contexts are untested.")
    lines += [
        "- Not instruction-tuned, not evaluated for bias, toxicity or factuality; not for any use where its output matters."
        if not inp.adapter_config
        else "- The adapter inherits every limitation of its base model.",
        "- The pure-PyTorch path runs anywhere; the CUDA kernels (mamba-ssm, causal-conv1d) are optional speed-ups.",
        "",
    ]
    return "\n".join(lines)


def build_card(inp: CardInputs, assets: Path) -> ModelCard:
    """The card (metadata + markdown); PNG figures are written into `assets`."""
    assets.mkdir(parents=True, exist_ok=True)
    eval_results = [
        EvalResult(
            task_type="text-generation", dataset_type=task, dataset_name=task, metric_type=metric, metric_value=value
        )
        for task, metrics in sorted((inp.eval_results or {}).items())
        for metric, (value, _) in metrics.items()
    ]
    datasets = [s["dataset"] for s in (inp.data_report or {}).get("sources", []) if s.get("dataset")]
    base_model = (inp.adapter_config or {}).get("base_model_name_or_path")
    data = ModelCardData(
        license=inp.license,
        library_name="peft" if inp.adapter_config else "transformers",
        tags=["hybrid-mamba", "mamba", "mamba2", "hybrid"]
        + ([inp.native_config["model_type"]] if inp.native_config else ["custom_code"])
        + inp.tags
        + (["lora", "peft"] if inp.adapter_config else []),
        datasets=datasets or None,
        pipeline_tag="text-generation",
        base_model=base_model,
        model_name=inp.model_name,
        eval_results=eval_results or None,
    )
    if inp.native_config:
        kind = (
            f"a `{_native_class(inp)}` exported from a hybrid_mamba model (a hybrid Mamba/attention causal "
            "language model); it loads with transformers alone, no `trust_remote_code`"
        )
    elif inp.adapter_config:
        kind = "a PEFT adapter for a hybrid Mamba/attention causal language model"
    else:
        kind = "a hybrid Mamba/attention causal language model"
    return ModelCard.from_template(
        data,
        template_path=str(TEMPLATE),
        model_name=inp.model_name,
        kind=kind,
        model_type=(inp.native_config or inp.config).get("model_type"),
        architecture=_architecture(inp, assets),
        training_data=_training_data(inp),
        training_procedure=_training_procedure(inp, assets),
        evaluation=_evaluation(inp),
        speed=_speed(inp),
        how_to_load=_how_to_load(inp),
        limitations=_limitations(inp),
    )


def read_run_config(path: Path) -> dict:
    text = Path(path).read_text()
    return json.loads(text) if Path(path).suffix == ".json" else yaml.safe_load(text)
