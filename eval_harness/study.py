"""Architecture studies: model layouts x widths x seeds x tasks, trained and scored cell by cell.

    python -m hybrid_mamba.eval_harness.study --spec eval_harness/studies/mqar_width.yaml \
        [--out results/study/mqar_width] [--scale full] [--max_cells N] [--dry_run]

A study spec (YAML, the `StudySpec` dataclass below; every key is checked before any work, and a bad
one is one `error: ...` line) names a grid. Every cell, one (layout, width, seed, task), is

1. trained by this repository's trainer, `python -m hybrid_mamba.trainers.pretrain --config
   OUT/cells/<cell_id>/train.yaml`, in a subprocess, into OUT/cells/<cell_id>/run/ (metrics.jsonl,
   summary.json, final/, checkpoints/); its log goes to OUT/cells/<cell_id>/train.log;
2. scored: `kind: synthetic` cells with `eval_harness.synthetic_eval.score` on the task's test split
   (accuracy per sequence length, training lengths and longer); `kind: lm` cells from the run's
   validation-loss curve (loss against tokens, against training time, the loss at `time_budget_s`)
   and by `position_losses`: the loss per position bucket on validation text cut into sequences of
   `eval.position_factor` times the training length;
3. written as OUT/cells/<cell_id>/result.json, atomically and last.

`cell_id` is `<layout>_w<width>_<task>_s<seed>_<hash>`, the hash (8 hex digits of SHA-1) taken over
the cell's full configuration (`cell.json` beside it: model overrides, training arguments, data,
evaluation settings), so a changed setting is a new cell and never reuses an old result. A rerun
skips every cell whose result.json says `status: ok`; an unfinished cell is rerun and the trainer
resumes it from its newest good checkpoint (a run whose summary.json shows every step done is not
trained again, only scored). A failed cell (trainer exit status, scoring error) writes a result with
`status: failed` and the tail of the error, the study goes on, and the next run retries it.
`--max_cells N` stops after N cells that needed work (trained or scored) and still writes the outputs
of what is done (`complete: false`).

Model sizes from a width W (`model_sizes`): hidden_size W, intermediate_size mlp_ratio * W (SwiGLU
MLP after every mixer), num_attention_heads W / head_dim, num_key_value_heads half of those (GQA, when
even), mamba_head_dim, mamba_d_state and mamba_chunk_size from the spec, max_position_embeddings
large enough for the longest evaluated sequence; the rest from `model_preset`. A layout's `overrides`
win over all of these. With `equal: params`, every layout's intermediate_size is set (at least 8)
so that its non-embedding parameter count is the closest to that of the reference layout
(`equal_reference`, default the first) at the same width (within 3 * width * layers / 2 parameters:
half an MLP unit per layer); `equal: tokens` keeps the sizes and only the token budget is equal
(the same steps, batch and sequence length in every cell).
Parameter counts are computed on the meta device (`configuration.param_counts.count_parameters`).

Layouts are explicit (`layer_types: [attention, mamba2, ...]`) or compact (`attention_ratio`,
`placement`, `num_layers`, `mamba`): n = round(ratio * num_layers) attention layers (at least one
when the ratio is above 0), the other layers `mamba` (mamba2 or mamba1), placed by `placement_indices`:
`early` (the first n), `late` (the last n), `spread` (configuration's place_attention_layers: the
middle of n equal slices) and `seed_rule` (the early/middle/top rule: attention in up to three
contiguous groups, in the middle of the stack, at its start and at its top, filled round robin in that
order; the middle group grows from layer num_layers // 2 alternately up and down: 8 layers, n=1 [4],
n=2 [0, 4], n=3 [0, 4, 7], n=4 [0, 4, 5, 7]; 16 layers, n=8 [0, 1, 2, 7, 8, 9, 14, 15]).

Training time. A cell's own clock (the trainer's tokens/s rows) measures whatever else the machine did
while that cell ran, so on a shared machine layouts run early and late in the grid are timed under
different loads. With `speed_reps: N`, after the grid every layout of a (task, width) is rebuilt from a
finished cell in one process and N training steps of each are timed with the layouts taking turns
(`calibrated_speeds`, cached in OUT/speed.json); every time axis and the loss at `time_budget_s` then
come from tokens / that throughput, and the cell's clock is kept as `logged_train_time_s`.

OUT/results.json holds every cell (config, parameters, metrics, timings, status) and the
aggregates across seeds per (layout, width, task, metric): n, mean, std, stderr and the 95% t-interval
(common.stats.summarize). OUT/results.md holds the tables, and the plots are OUT/accuracy_vs_width.png,
OUT/accuracy_vs_length.png (synthetic), OUT/loss_vs_tokens.png, OUT/loss_vs_time.png (every study,
from metrics.jsonl) and OUT/loss_vs_position.png (lm).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from hybrid_mamba.common.args import deep_merge, load_dataclass, parse_args, read_yaml_mapping
from hybrid_mamba.common.files import save_figure, write_json_atomic, write_text_atomic
from hybrid_mamba.common.stats import format_cell, summarize

logger = logging.getLogger(__name__)

STUDIES_DIR = Path(__file__).resolve().parent / "studies"
FORMAT = "hybrid_mamba.study/1"
# PretrainArgs fields the runner sets per cell; a spec's `train` section may not set them.
RESERVED_TRAIN = ("data_dir", "output_dir", "seed", "model_preset", "model_overrides", "init_from")
# Training defaults of a study cell (any PretrainArgs field may be given in the spec's `train`).
TRAIN_DEFAULTS = {
    "max_steps": 200,
    "micro_batch_size": 16,
    "learning_rate": 3e-3,
    "warmup_steps": 20,
    "eval_every": 50,
    "eval_batches": 8,
    "checkpoint_every": 100,
    "log_every": 10,
    "keep_checkpoints": 1,
    "sample_tokens": 1,
}
PLACEMENTS = ("early", "spread", "late", "seed_rule")
ACCURACIES = ("token_accuracy", "example_accuracy")


class StudyError(ValueError):
    """A study spec that cannot run (the message names the field), or a missing input folder."""


@dataclass
class LayoutSpec:
    """One model layout: explicit `layer_types`, or the compact form (`attention_ratio` and `placement`)."""

    layer_types: list[str] | None = field(
        default=None, metadata={"help": "One entry per layer: attention, mamba2 or mamba1."}
    )
    attention_ratio: float | None = field(
        default=None, metadata={"help": "Compact form: fraction of attention layers (0 to 1)."}
    )
    placement: Literal["early", "spread", "late", "seed_rule"] = field(
        default="spread", metadata={"help": "Compact form: where the attention layers go."}
    )
    num_layers: int | None = field(
        default=None, metadata={"help": "Compact form: layers in the stack (default: the study's num_layers)."}
    )
    mamba: Literal["mamba2", "mamba1"] = field(
        default="mamba2", metadata={"help": "Compact form: the mixer of the non-attention layers."}
    )
    position_embedding_type: Literal["rope", "none"] | None = field(
        default=None, metadata={"help": "rope or none (NoPE); default: the preset's (rope)."}
    )
    overrides: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Other HybridMambaConfig fields; they win over the width rule."}
    )

    def __post_init__(self):
        if (self.layer_types is None) == (self.attention_ratio is None):
            raise StudyError("give exactly one of layer_types and attention_ratio")
        if self.layer_types is not None:
            bad = [t for t in self.layer_types if t not in ("attention", "mamba2", "mamba1")]
            if bad or not self.layer_types:
                raise StudyError(f"layer_types: {bad or 'empty'}; entries are attention, mamba2 or mamba1")
        elif not 0.0 <= self.attention_ratio <= 1.0:
            raise StudyError(f"attention_ratio must be in [0, 1], got {self.attention_ratio}")
        if self.num_layers is not None and self.num_layers < 1:
            raise StudyError(f"num_layers must be at least 1, got {self.num_layers}")
        for key in ("layer_types", "num_hidden_layers", "hidden_size", "position_embedding_type"):
            if key in self.overrides:
                raise StudyError(f"overrides.{key}: set it with the layout's own field or the study's widths")


@dataclass
class EvalSpec:
    """How cells are scored."""

    batch_size: int = field(
        default=32,
        metadata={"help": "Sequences per forward when scoring (lm: sequences of position_factor x train length)."},
    )
    device: str = field(default="cpu", metadata={"help": "Device for scoring (cpu, cuda)."})
    lengths: list[int] | None = field(
        default=None, metadata={"help": "synthetic: test lengths scored (default: all of the task's)."}
    )
    position_factor: int = field(
        default=4, metadata={"help": "lm: loss by position on sequences this many times the training length."}
    )
    position_buckets: int = field(default=8, metadata={"help": "lm: equal position buckets over those sequences."})
    position_sequences: int = field(default=8, metadata={"help": "lm: long sequences cut from validation."})

    def __post_init__(self):
        for name in ("batch_size", "position_factor", "position_buckets", "position_sequences"):
            if getattr(self, name) < 1:
                raise StudyError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lengths is not None and (not self.lengths or min(self.lengths) < 1):
            raise StudyError(f"lengths must be positive integers, got {self.lengths}")


@dataclass
class StudySpec:
    """A grid of layouts x widths x seeds x tasks (see the module docstring)."""

    name: str = field(metadata={"help": "Study name (default output folder results/study/<name>)."})
    kind: Literal["synthetic", "lm"] = field(metadata={"help": "synthetic tasks, or language modelling."})
    layouts: dict[str, LayoutSpec] = field(metadata={"help": "Layout name -> LayoutSpec."})
    widths: list[int] = field(metadata={"help": "Hidden sizes; the other sizes follow model_sizes()."})
    seeds: list[int] = field(metadata={"help": "Training seeds (model init and data order)."})
    tasks: dict[str, dict[str, Any]] = field(
        default_factory=dict, metadata={"help": "synthetic: task name -> data spec (data_scripts.synthetic.build)."}
    )
    task: str | None = field(default=None, metadata={"help": "synthetic: one task (shorthand for tasks)."})
    task_spec: dict[str, Any] = field(default_factory=dict, metadata={"help": "synthetic: the data spec of task."})
    data_dir: str | None = field(default=None, metadata={"help": "lm: DATA/ folder (data_scripts.prepare)."})
    model_preset: str = field(default="debug", metadata={"help": "Preset the sizes start from."})
    num_layers: int = field(default=4, metadata={"help": "Layers of compact layouts without their own."})
    mlp_ratio: float = field(default=2.0, metadata={"help": "intermediate_size = mlp_ratio * width."})
    head_dim: int = field(default=16, metadata={"help": "Attention head size: heads = width / head_dim."})
    mamba_head_dim: int = field(default=16, metadata={"help": "Mamba-2 head size."})
    mamba_d_state: int = field(default=16, metadata={"help": "SSM state size."})
    mamba_chunk_size: int = field(default=32, metadata={"help": "Mamba-2 chunk size."})
    equal: Literal["tokens", "params"] = field(
        default="tokens", metadata={"help": "tokens: sizes as the width rule gives; params: match parameters."}
    )
    equal_reference: str | None = field(
        default=None, metadata={"help": "equal: params: the layout others are matched to (default the first)."}
    )
    time_budget_s: float | None = field(
        default=None, metadata={"help": "Equal wall-clock: val loss of the last eval within this training time."}
    )
    speed_reps: int = field(
        default=0,
        metadata={
            "help": "Training steps timed per layout, side by side after the grid (0: off); the time axis then "
            "comes from these throughputs instead of the cells' logged ones (see calibrated_speeds)."
        },
    )
    speed_warmup: int = field(default=2, metadata={"help": "Untimed steps per layout before speed_reps."})
    train: dict[str, Any] = field(default_factory=dict, metadata={"help": "PretrainArgs fields for every cell."})
    eval: EvalSpec = field(default_factory=EvalSpec, metadata={"help": "Scoring settings."})
    threads: int | None = field(
        default=None, metadata={"help": "Torch threads of the trainer and the scoring (default: torch's)."}
    )
    cell_timeout_s: float | None = field(default=None, metadata={"help": "Kill a cell's trainer after this long."})
    scales: dict[str, dict[str, Any]] = field(
        default_factory=dict, metadata={"help": "Named overrides of this spec, chosen with --scale."}
    )

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.name):
            raise StudyError(f"name: {self.name!r} may hold only letters, digits, '.', '_' and '-'")
        if not self.layouts or not self.widths or not self.seeds:
            raise StudyError("layouts, widths and seeds each need at least one entry")
        for name in self.layouts:
            if not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
                raise StudyError(f"layouts: name {name!r} may hold only letters, digits and . _ + -")
        if len(set(self.seeds)) != len(self.seeds) or len(set(self.widths)) != len(self.widths):
            raise StudyError("widths and seeds must not repeat")
        for w in self.widths:
            if w < 1 or w % self.head_dim or (2 * w) % self.mamba_head_dim:
                raise StudyError(
                    f"widths: {w} must be a positive multiple of head_dim ({self.head_dim}) with 2 * width a "
                    f"multiple of mamba_head_dim ({self.mamba_head_dim})"
                )
        if self.task is not None:
            if self.tasks:
                raise StudyError("give tasks or task (with task_spec), not both")
            self.tasks = {self.task: dict(self.task_spec)}
        elif self.task_spec:
            raise StudyError("task_spec needs task")
        if self.kind == "synthetic":
            if not self.tasks:
                raise StudyError("kind synthetic needs tasks (or task and task_spec)")
            if self.data_dir is not None:
                raise StudyError("data_dir is for kind lm; synthetic studies build their data from tasks")
        else:
            if self.tasks:
                raise StudyError("tasks are for kind synthetic; kind lm reads data_dir")
            if not self.data_dir:
                raise StudyError("kind lm needs data_dir")
        if self.equal_reference is not None and self.equal_reference not in self.layouts:
            raise StudyError(
                f"equal_reference: {self.equal_reference!r} is not one of the layouts {list(self.layouts)}"
            )
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise StudyError(f"time_budget_s must be positive, got {self.time_budget_s}")
        if self.speed_reps < 0 or self.speed_warmup < 0:
            raise StudyError(
                f"speed_reps and speed_warmup must be at least 0, got {self.speed_reps}, {self.speed_warmup}"
            )
        if self.threads is not None and self.threads < 1:
            raise StudyError(f"threads must be at least 1, got {self.threads}")
        if bad := [k for k in self.train if k in RESERVED_TRAIN]:
            raise StudyError(f"train: {bad} are set by the study runner per cell")


@dataclass
class StudyArgs:
    """Run (or resume) a study: train and score every cell of a spec, then write results and plots."""

    spec: str = field(metadata={"help": "Study YAML (eval_harness/studies/*.yaml)."})
    out: str | None = field(default=None, metadata={"help": "Output folder (default results/study/<name>)."})
    scale: str | None = field(default=None, metadata={"help": "Apply the spec's scales.<name> overrides (e.g. full)."})
    max_cells: int | None = field(
        default=None, metadata={"help": "Stop after this many cells that needed work (the rest on a rerun)."}
    )
    dry_run: bool = field(default=False, metadata={"help": "Print the cells (ids, layouts, parameters); run nothing."})


# ---------------------------------------------------------------- the spec


def load_spec(path: str | Path, scale: str | None = None) -> StudySpec:
    """The spec at `path` (with `scales[scale]` merged over it), checked: every key, every layout's
    model config at every width, the training arguments, the task names and the data folder.
    Raises StudyError (or FileNotFoundError) naming what is wrong; nothing is built or trained."""
    path = Path(path)
    try:
        raw = read_yaml_mapping(path)
    except ValueError as e:
        raise StudyError(str(e)) from None
    if scale is not None:
        scales = raw.get("scales") or {}
        if scale not in scales:
            raise StudyError(f"{path}: --scale {scale!r}: the spec's scales are {list(scales) or 'none'}")
        raw = deep_merge({k: v for k, v in raw.items() if k != "scales"}, scales[scale])
    try:
        spec = load_dataclass(StudySpec, raw, error=StudyError)
    except StudyError as e:
        raise StudyError(f"{path}: {e}") from None
    try:
        check_spec(spec)
    except StudyError as e:
        raise StudyError(f"{path}: {e}") from None
    return spec


def check_spec(spec: StudySpec) -> None:
    """The checks that need other modules: training arguments, tasks and their data specs, the data
    folder, and every layout's model config at every width (built, not instantiated)."""
    from hybrid_mamba.trainers.args import PretrainArgs

    try:
        load_dataclass(PretrainArgs, {**TRAIN_DEFAULTS, **spec.train}, "train", error=ValueError)
    except ValueError as e:
        raise StudyError(str(e)) from None
    if spec.kind == "synthetic":
        from hybrid_mamba.data_scripts.synthetic import TASKS, SpecError

        if bad := [t for t in spec.tasks if t not in TASKS]:
            raise StudyError(f"tasks: unknown task(s) {bad}; the synthetic tasks are {list(TASKS)}")
        for task in spec.tasks:
            try:
                resolved_task_spec(spec, task)
            except SpecError as e:
                raise StudyError(f"tasks.{task}: {e}") from None
    else:
        root = Path(spec.data_dir)
        if not all((root / part).exists() for part in ("train", "validation", "tokenizer")):
            raise StudyError(
                f"data_dir: {root} is not a DATA/ folder with train/, validation/ and tokenizer/ (build the demo "
                "corpus with `python -m hybrid_mamba.data_scripts.prepare --recipe data_scripts/recipes/demo.yaml "
                "--output data/demo`)"
            )
    for name, layout in spec.layouts.items():
        for width in spec.widths:
            try:
                model_overrides(spec, name, layout, width, spec.eval.lengths and max(spec.eval.lengths) or 0)
            except ValueError as e:
                raise StudyError(f"layouts.{name} at width {width}: {e}") from None


def placement_indices(num_layers: int, n: int, placement: str) -> list[int]:
    """Indices of `n` attention layers among `num_layers` by `placement` (see the module docstring)."""
    from hybrid_mamba.configuration.configuration_hybrid_mamba import place_attention_layers

    if not 0 <= n <= num_layers:
        raise StudyError(f"{n} attention layers do not fit in {num_layers}")
    if n == 0:
        return []
    if placement == "early":
        return list(range(n))
    if placement == "late":
        return list(range(num_layers - n, num_layers))
    if placement == "spread":
        return place_attention_layers(num_layers, n / num_layers)
    if placement == "seed_rule":
        # three groups, each grown away from its anchor: the middle one alternately up and down
        mid = num_layers // 2
        middle = [mid + (k + 1) // 2 * (1 if k % 2 else -1) for k in range(num_layers)]
        middle = [i for i in middle if 0 <= i < num_layers]
        streams = [iter(middle), iter(range(num_layers)), iter(range(num_layers - 1, -1, -1))]
        chosen: list[int] = []
        while len(chosen) < n:
            for s in streams:
                if len(chosen) == n:
                    break
                for i in s:
                    if i not in chosen:
                        chosen.append(i)
                        break
        return sorted(chosen)
    raise StudyError(f"placement {placement!r} is not one of {PLACEMENTS}")


def expand_layout(layout: LayoutSpec, num_layers: int) -> list[str]:
    """The layout's layer_types, one entry per layer."""
    if layout.layer_types is not None:
        return list(layout.layer_types)
    layers = layout.num_layers or num_layers
    n = round(layout.attention_ratio * layers)
    if layout.attention_ratio > 0 and n == 0:
        n = 1
    attn = set(placement_indices(layers, n, layout.placement))
    return ["attention" if i in attn else layout.mamba for i in range(layers)]


def model_sizes(spec: StudySpec, width: int) -> dict:
    """The HybridMambaConfig sizes of `width` (module docstring: the width rule)."""
    heads = max(1, width // spec.head_dim)
    kv = heads // 2 if heads % 2 == 0 and heads > 1 else heads
    return {
        "hidden_size": width,
        "intermediate_size": max(8, int(round(spec.mlp_ratio * width / 8)) * 8),
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "mamba_head_dim": spec.mamba_head_dim,
        "mamba_d_state": spec.mamba_d_state,
        "mamba_chunk_size": spec.mamba_chunk_size,
    }


def model_overrides(spec: StudySpec, name: str, layout: LayoutSpec, width: int, max_len: int) -> dict:
    """The `model_overrides` of a cell (before parameter matching), checked by building the config."""
    from hybrid_mamba.configuration import get_preset

    types = expand_layout(layout, spec.num_layers)
    over = {**model_sizes(spec, width), "num_hidden_layers": len(types), "layer_types": types}
    if layout.position_embedding_type is not None:
        over["position_embedding_type"] = layout.position_embedding_type
    over.update(layout.overrides)
    preset_len = get_preset(spec.model_preset).max_position_embeddings
    if max_len > over.get("max_position_embeddings", preset_len):
        if "max_position_embeddings" in layout.overrides:
            raise StudyError(
                f"layouts.{name}: max_position_embeddings {layout.overrides['max_position_embeddings']} is below "
                f"the longest evaluated sequence ({max_len})"
            )
        over["max_position_embeddings"] = max_len
    get_preset(spec.model_preset, **over)  # raises ValueError on a config that cannot be built
    return over


def non_embedding_params(preset: str, overrides: dict) -> dict:
    """count_parameters of the config (meta device), with the vocabulary of the preset."""
    from hybrid_mamba.configuration import get_preset
    from hybrid_mamba.configuration.param_counts import count_parameters

    return count_parameters(get_preset(preset, **overrides))


def plan_params(spec: StudySpec, max_len: int = 0) -> dict[tuple[str, int], dict]:
    """{(layout, width): {"overrides", "params" (count_parameters), "target" (equal: params)}}.

    With `equal: params`, intermediate_size of every layout without its own is chosen (at least 8) to
    bring its non-embedding count closest to the reference layout's at that width: the MLP count is
    linear in intermediate_size, so one more count at +8 gives the slope."""
    reference = spec.equal_reference or next(iter(spec.layouts))
    plan: dict[tuple[str, int], dict] = {}
    for width in spec.widths:
        target = None
        if spec.equal == "params":
            ref = model_overrides(spec, reference, spec.layouts[reference], width, max_len)
            target = non_embedding_params(spec.model_preset, ref)["non_embedding"]
        for name, layout in spec.layouts.items():
            over = model_overrides(spec, name, layout, width, max_len)
            counts = non_embedding_params(spec.model_preset, over)
            if target is not None and name != reference and "intermediate_size" not in layout.overrides:
                i0 = over["intermediate_size"]
                slope = (
                    non_embedding_params(spec.model_preset, {**over, "intermediate_size": i0 + 8})["non_embedding"]
                    - counts["non_embedding"]
                ) / 8
                if slope > 0:
                    best = i0 + (target - counts["non_embedding"]) / slope
                    over["intermediate_size"] = max(8, int(round(best)))
                    counts = non_embedding_params(spec.model_preset, over)
            entry = {"overrides": over, "params": counts}
            if target is not None:
                entry["target_non_embedding"] = target
                entry["relative_gap"] = counts["non_embedding"] / target - 1
            plan[(name, width)] = entry
    return plan


# ---------------------------------------------------------------- cells


@dataclass
class Cell:
    """One (layout, width, seed, task) of the grid. `config` holds everything its result depends on
    (written as cell.json); `params` is its plan_params entry; `cell_id` and `config_hash` are derived."""

    layout: str
    width: int
    seed: int
    task: str
    config: dict  # everything the result depends on; hashed into the id
    params: dict
    cell_id: str = ""

    def __post_init__(self):
        digest = hashlib.sha1(json.dumps(self.config, sort_keys=True).encode()).hexdigest()[:8]
        safe = re.sub(r"[^A-Za-z0-9._+-]", "_", f"{self.layout}_w{self.width}_{self.task}_s{self.seed}")
        self.cell_id = f"{safe}_{digest}"
        self.config_hash: str = digest


def synthetic_data_dir(out: Path, task: str, task_spec: dict) -> Path:
    """OUT/data/<task>_<hash of the data spec>: built once, shared by every cell of the task."""
    digest = hashlib.sha1(json.dumps(task_spec, sort_keys=True).encode()).hexdigest()[:8]
    return out / "data" / f"{task}_{digest}"


def resolved_task_spec(spec: StudySpec, task: str) -> dict:
    """A synthetic task's data spec with every default filled in (data_scripts.synthetic.spec_from_dict)."""
    from hybrid_mamba.data_scripts.synthetic import spec_from_dict

    return asdict(spec_from_dict(task, spec.tasks[task]))


def max_eval_length(spec: StudySpec, task: str, train_len: int) -> int:
    """The longest sequence a cell's model sees, known before any data is built: lm, position_factor x
    the training length; synthetic, the longest of the task's block_len, train_lengths, eval_lengths
    and the study's eval.lengths."""
    if spec.kind == "lm":
        return spec.eval.position_factor * train_len
    task_spec = resolved_task_spec(spec, task)
    lengths = [*task_spec["train_lengths"], *task_spec["eval_lengths"], *(spec.eval.lengths or [])]
    return max([train_len, task_spec["block_len"], *lengths])


def block_length(data_dir: Path) -> int:
    """Tokens per packed training block of a DATA/ folder."""
    from datasets import load_from_disk

    return len(load_from_disk(str(data_dir / "train"))[0]["input_ids"])


def plan_cells(spec: StudySpec, out: Path, build_data: bool = True) -> tuple[list[Cell], dict]:
    """Every cell of the grid, in run order (task, width, layout, seed), and {task: data folder}.

    With build_data, synthetic data folders are built (or reused) first, so every model's
    max_position_embeddings covers the longest test length the data holds."""
    data_dirs: dict[str, Path] = {}
    if spec.kind == "synthetic":
        for task, task_spec in spec.tasks.items():
            data_dirs[task] = synthetic_data_dir(out, task, task_spec)
            if build_data:
                from hybrid_mamba.data_scripts.synthetic import build

                logger.info("data: %s -> %s", task, data_dirs[task])
                data_dirs[task] = Path(build(task, task_spec, data_dirs[task]))
    else:
        data_dirs["lm"] = Path(spec.data_dir).resolve()
    train = {**TRAIN_DEFAULTS, **spec.train}
    cells = []
    for task, data_dir in data_dirs.items():
        train_len = block_length(data_dir) if spec.kind == "lm" else 0
        max_len = max_eval_length(spec, task, train_len)
        plan = plan_params(spec, max_len)
        for width in spec.widths:
            for layout in spec.layouts:
                entry = plan[(layout, width)]
                for seed in spec.seeds:
                    config = {
                        "study_kind": spec.kind,
                        "task": task,
                        "data": spec.tasks[task] if spec.kind == "synthetic" else str(data_dir),
                        "layout": layout,
                        "width": width,
                        "seed": seed,
                        "model_preset": spec.model_preset,
                        "model_overrides": entry["overrides"],
                        "train": train,
                        "eval": asdict(spec.eval),
                        "time_budget_s": spec.time_budget_s,
                    }
                    cells.append(Cell(layout, width, seed, task, config, entry))
    return cells, data_dirs


def train_config(cell: Cell, data_dir: Path, run_dir: Path) -> dict:
    """The trainer's YAML config of a cell."""
    return {
        **cell.config["train"],
        "data_dir": str(data_dir),
        "output_dir": str(run_dir),
        "seed": cell.seed,
        "model_preset": cell.config["model_preset"],
        "model_overrides": cell.config["model_overrides"],
    }


def child_env(threads: int | None) -> dict:
    """The trainer's environment: this one, the repository importable, OMP threads when the spec sets them."""
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
        env["MKL_NUM_THREADS"] = str(threads)
    return env


def tail(text: str, lines: int = 20) -> str:
    """The last `lines` non-empty lines of `text`."""
    kept = [line for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def run_finished(run_dir: Path, train: dict) -> bool:
    """Whether the trainer already finished this run: final/ saved and summary.json with every step
    (max_steps, or the tokens of max_tokens) done."""
    summary = run_dir / "summary.json"
    if not summary.is_file() or not (run_dir / "final" / "config.json").is_file():
        return False
    try:
        done = json.loads(summary.read_text())
    except json.JSONDecodeError:
        return False
    if train.get("max_tokens"):
        return done.get("tokens_seen", 0) >= train["max_tokens"]
    return done.get("steps") == train["max_steps"]


def train_cell(cell: Cell, data_dir: Path, cell_dir: Path, spec: StudySpec) -> tuple[float, str | None]:
    """Run (or resume) the trainer for a cell, its output (stdout and stderr) appended to train.log;
    (seconds this call took, None or the error: exit status and the last lines of this run's log)."""
    run_dir = cell_dir / "run"
    if run_finished(run_dir, cell.config["train"]):
        return 0.0, None
    config_path = cell_dir / "train.yaml"
    write_text_atomic(config_path, yaml.safe_dump(train_config(cell, data_dir, run_dir), sort_keys=False))
    cmd = [sys.executable, "-m", "hybrid_mamba.trainers.pretrain", "--config", str(config_path)]
    log_path = cell_dir / "train.log"
    start = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        offset = log.tell()
        try:
            proc = subprocess.run(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env(spec.threads),
                timeout=spec.cell_timeout_s,
            )
            error = None if proc.returncode == 0 else f"trainer exit status {proc.returncode}"
        except subprocess.TimeoutExpired:
            error = f"trainer timed out after {spec.cell_timeout_s} s"
    elapsed = time.perf_counter() - start
    if error is None:
        return elapsed, None
    with open(log_path, errors="replace") as f:
        f.seek(offset)
        return elapsed, f"{error}\n{tail(f.read())}"


# ---------------------------------------------------------------- metrics


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training rows, evaluation rows) of RUN/metrics.jsonl; a half-written last line is skipped."""
    train_rows, eval_rows = [], []
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "val_loss" in row:
            eval_rows.append(row)
        elif "loss" in row:
            train_rows.append(row)
    return train_rows, eval_rows


def loss_curve(run_dir: Path) -> list[dict]:
    """Validation loss against step, tokens and training time, one entry per evaluation.

    The trainer logs no clock, but every training row holds the tokens of the steps since the previous
    row and their throughput (tokens_per_s, measured over the optimizer steps only), so the training
    time up to a row is the sum of tokens / tokens_per_s over the rows so far; evaluation and
    checkpoint time are left out, which makes the time comparable across layouts. An evaluation between
    two rows gets the time and token count interpolated linearly in steps."""
    train_rows, eval_rows = read_metrics(run_dir)
    points = [(0, 0, 0.0)]  # (step, tokens, seconds)
    for row in sorted(train_rows, key=lambda r: r["step"]):
        step0, tokens0, secs0 = points[-1]
        if row["step"] <= step0:
            continue
        rate = row.get("tokens_per_s") or 0.0
        secs = secs0 + ((row["tokens"] - tokens0) / rate if rate > 0 else 0.0)
        points.append((row["step"], row["tokens"], secs))
    curve = []
    for row in sorted(eval_rows, key=lambda r: r["step"]):
        s = row["step"]
        tokens, secs = None, None
        for (a, ta, sa), (b, tb, sb) in zip(points, points[1:]):
            if a <= s <= b:
                f = (s - a) / (b - a)
                tokens, secs = ta + f * (tb - ta), sa + f * (sb - sa)
                break
        curve.append({"step": s, "tokens": tokens, "train_time_s": secs, "val_loss": row["val_loss"]})
    return curve


def loss_at_budget(curve: list[dict], budget_s: float | None) -> float | None:
    """Validation loss of the last evaluation within `budget_s` seconds of training (None when none is)."""
    if budget_s is None:
        return None
    within = [p for p in curve if p["train_time_s"] is not None and p["train_time_s"] <= budget_s]
    return within[-1]["val_loss"] if within else None


def position_losses(
    model_dir: str | Path,
    data_dir: str | Path,
    factor: int = 4,
    buckets: int = 8,
    sequences: int = 8,
    batch_size: int = 1,
    device: str = "cpu",
) -> dict:
    """Mean next-token loss per position bucket on sequences `factor` times the training length.

    The validation split's blocks are concatenated in order into one token stream and cut into up to
    `sequences` sequences of factor * train_len tokens (train_len: the training block length), with
    positions 0, 1, ... over the whole sequence (documents run into each other, as in packed training,
    but the positions do not restart). Positions are split into `buckets` equal buckets; a bucket's loss
    averages the tokens it predicts (the token at position p is predicted from positions < p).
    Returns {"train_len", "seq_len", "sequences", "bucket_edges", "loss", "ppl"}."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from datasets import load_from_disk

    import hybrid_mamba.modeling  # noqa: F401  (registers the Auto classes)
    from hybrid_mamba.modeling import HybridMambaForCausalLM

    data_dir = Path(data_dir)
    train_len = block_length(data_dir)
    seq_len = factor * train_len
    val = load_from_disk(str(data_dir / "validation")).with_format("numpy")
    stream = np.concatenate(list(val["input_ids"]))
    n = min(sequences, len(stream) // seq_len)
    if n < 1:
        raise StudyError(f"{data_dir}/validation holds {len(stream)} tokens, fewer than one sequence of {seq_len}")
    ids = torch.from_numpy(stream[: n * seq_len].astype(np.int64)).view(n, seq_len)
    model = HybridMambaForCausalLM.from_pretrained(str(model_dir)).to(device).eval()
    sums = torch.zeros(seq_len - 1, dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, n, batch_size):
            x = ids[i : i + batch_size].to(device)
            pos = torch.arange(seq_len, device=device).expand(x.shape[0], -1)
            logits = model(input_ids=x, position_ids=pos, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), x[:, 1:], reduction="none")
            sums += loss.double().sum(0).cpu()
    per_pos = sums / n  # entry p: the loss of predicting position p + 1
    edges = [round(k * seq_len / buckets) for k in range(buckets + 1)]
    losses = []
    for lo, hi in zip(edges, edges[1:]):
        chunk = per_pos[max(lo - 1, 0) : hi - 1]  # targets at positions lo..hi-1 (position 0 is never a target)
        losses.append(float(chunk.mean()) if len(chunk) else None)
    return {
        "train_len": train_len,
        "seq_len": seq_len,
        "sequences": n,
        "bucket_edges": edges,
        "loss": losses,
        "ppl": [math.exp(min(v, 50)) if v is not None else None for v in losses],
    }


def score_cell(cell: Cell, data_dir: Path, run_dir: Path, spec: StudySpec) -> dict:
    """The metrics of a trained cell (synthetic: the scorer's result; lm: curve, budget loss, position losses)."""
    curve = loss_curve(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics: dict[str, Any] = {
        "final_val_loss": summary.get("final_val_loss"),
        "val_loss_at_time_budget": loss_at_budget(curve, spec.time_budget_s),
        "train_time_s": curve[-1]["train_time_s"] if curve else None,
        "tokens": summary.get("tokens_seen"),
    }
    if spec.kind == "synthetic":
        from hybrid_mamba.eval_harness.synthetic_eval import score

        metrics["synthetic"] = score(
            str(run_dir / "final"), str(data_dir), batch_size=spec.eval.batch_size, lengths=spec.eval.lengths,
            device=spec.eval.device,
        )  # fmt: skip
    else:
        metrics["position"] = position_losses(
            run_dir / "final",
            data_dir,
            spec.eval.position_factor,
            spec.eval.position_buckets,
            spec.eval.position_sequences,
            batch_size=spec.eval.batch_size,
            device=spec.eval.device,
        )
    return {"metrics": metrics, "curve": curve, "summary": summary}


def flat_metrics(result: dict) -> dict[str, float | None]:
    """The scalar metrics of a cell's result, by name: losses, training time, synthetic accuracies
    (`len<L>/<metric>` per test length, `overall/<metric>` over all test rows and
    `trained_lengths/<metric>` over the test lengths within the training lengths, for token_accuracy
    and example_accuracy), position losses (`pos<lo>-<hi>/loss`)."""
    m = result.get("metrics") or {}
    out: dict[str, float | None] = {
        k: m.get(k)
        for k in ("final_val_loss", "val_loss_at_time_budget", "train_time_s", "logged_train_time_s", "tokens_per_s")
        if k in m
    }
    syn = m.get("synthetic")
    if isinstance(syn, dict):
        seen = {"correct_tokens": 0.0, "tokens": 0, "correct_examples": 0.0, "examples": 0}
        for length, r in syn["lengths"].items():
            for k in ACCURACIES:
                out[f"len{length}/{k}"] = r[k]
            if not r["extrapolation"]:
                seen["correct_tokens"] += r["token_accuracy"] * r["n_answer_tokens"]
                seen["tokens"] += r["n_answer_tokens"]
                seen["correct_examples"] += r["example_accuracy"] * r["n_examples"]
                seen["examples"] += r["n_examples"]
        for k in ACCURACIES:
            out[f"overall/{k}"] = syn["overall"][k]
        if seen["examples"]:
            out["trained_lengths/token_accuracy"] = seen["correct_tokens"] / max(seen["tokens"], 1)
            out["trained_lengths/example_accuracy"] = seen["correct_examples"] / seen["examples"]
    pos = m.get("position")
    if isinstance(pos, dict):
        edges = pos["bucket_edges"]
        for lo, hi, v in zip(edges, edges[1:], pos["loss"]):
            out[f"pos{lo}-{hi}/loss"] = v
    return out


def run_cell(cell: Cell, data_dir: Path, out: Path, spec: StudySpec) -> dict:
    """Train (or resume) and score one cell; writes and returns its result (status ok or failed)."""
    cell_dir = out / "cells" / cell.cell_id
    cell_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cell_dir / "cell.json", {"cell_id": cell.cell_id, **cell.config})
    result: dict[str, Any] = {
        "cell_id": cell.cell_id,
        "config_hash": cell.config_hash,
        "layout": cell.layout,
        "width": cell.width,
        "seed": cell.seed,
        "task": cell.task,
        "layer_types": cell.config["model_overrides"]["layer_types"],
        "params": cell.params["params"],
        "status": "failed",
    }
    train_s, error = train_cell(cell, data_dir, cell_dir, spec)
    result["timings"] = {"trainer_wall_s": train_s}
    if error is None:
        start = time.perf_counter()
        try:
            result.update(score_cell(cell, data_dir, cell_dir / "run", spec))
            result["status"] = "ok"
        except Exception as e:  # recorded and the study goes on; the traceback is in the log
            logger.exception("cell %s: scoring failed", cell.cell_id)
            error = f"scoring: {type(e).__name__}: {e}"
        result["timings"]["score_s"] = time.perf_counter() - start
        if "summary" in result:
            result["timings"]["trainer_summary_wall_s"] = result["summary"].get("wall_time_s")
    if error is not None:
        result["error"] = error
        logger.error("cell %s failed: %s", cell.cell_id, error.splitlines()[0])
    write_json_atomic(cell_dir / "result.json", result)
    return result


def load_result(out: Path, cell: Cell) -> dict | None:
    """A finished cell's result (status ok, same config hash), or None."""
    path = out / "cells" / cell.cell_id / "result.json"
    if not path.is_file():
        return None
    try:
        res = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if res.get("status") != "ok" or res.get("config_hash") != cell.config_hash:
        return None
    return res


# ---------------------------------------------------------------- equal wall-clock, side by side

SPEED_FORMAT = "hybrid_mamba.study.speed/1"


def _timed_train_step(model, optimizer, ids) -> float:
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def calibrated_speeds(spec: StudySpec, cells: list[Cell], results: list[dict], data_dirs: dict, out: Path) -> dict:
    """Training throughput of every (task, width, layout), measured side by side: {"task/width/layout":
    {"tokens_per_s", "step_s" (median), "times_s"}} (empty when `speed_reps` is 0 or nothing has run).

    The cells' own clocks (the trainer's tokens_per_s rows) measure whatever else the machine was doing
    while each cell ran: on a shared machine the first and the last layouts of a grid run under different
    loads. Here one process builds every layout of a (task, width) from a finished cell's final/ model, and
    times `speed_reps` optimizer steps (forward, backward, AdamW; the cells' micro-batch of training blocks,
    random token ids) with the layouts taking turns (`bench_speed.turn_order`), after `speed_warmup`
    untimed ones, on `threads` threads. Ratios between layouts are then measured under one load. Cached in
    OUT/speed.json, keyed by the cells' config hashes and these settings."""
    if spec.speed_reps <= 0:
        return {}
    import torch

    from hybrid_mamba.eval_harness.bench_speed import turn_order
    from hybrid_mamba.modeling import HybridMambaForCausalLM

    done = {(r["task"], r["width"], r["layout"]): r for r in results if r.get("status") == "ok"}
    groups: dict[tuple[str, int], dict[str, Cell]] = {}
    for c in cells:
        if (c.task, c.width, c.layout) in done:
            groups.setdefault((c.task, c.width), {}).setdefault(c.layout, c)
    key = {
        "format": SPEED_FORMAT,
        "reps": spec.speed_reps,
        "warmup": spec.speed_warmup,
        "threads": spec.threads,
        "micro_batch_size": {**TRAIN_DEFAULTS, **spec.train}["micro_batch_size"],
        "cells": sorted(f"{t}/{w}/{name}:{c.config_hash}" for (t, w), g in groups.items() for name, c in g.items()),
    }
    path = out / "speed.json"
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                return cached["speeds"]
        except json.JSONDecodeError:
            pass
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    speeds = {}
    for (task, width), layouts in groups.items():
        block = block_length(data_dirs[task])  # tokens per training block, as the cells trained on
        models, optimizers = {}, {}
        for name, cell in layouts.items():
            model = HybridMambaForCausalLM.from_pretrained(out / "cells" / cell.cell_id / "run" / "final").train()
            models[name], optimizers[name] = model, torch.optim.AdamW(model.parameters(), lr=1e-4)
        vocab = min(m.config.vocab_size for m in models.values())
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (key["micro_batch_size"], block), generator=generator)
        times: dict[str, list[float]] = {name: [] for name in models}
        for rep in range(spec.speed_warmup + spec.speed_reps):
            for name in turn_order(models, rep):
                dt = _timed_train_step(models[name], optimizers[name], ids)
                if rep >= spec.speed_warmup:
                    times[name].append(dt)
        for name, ts in times.items():
            step = sorted(ts)[len(ts) // 2]
            speeds[f"{task}/{width}/{name}"] = {"tokens_per_s": ids.numel() / step, "step_s": step, "times_s": ts}
            logger.info("speed %s width %d %s: %.0f tokens/s", task, width, name, ids.numel() / step)
        del models, optimizers
    write_json_atomic(path, {"key": key, "speeds": speeds})
    return speeds


def with_calibrated_time(result: dict, speeds: dict, spec: StudySpec) -> dict:
    """A copy of a cell's result whose training times come from `speeds` (tokens / the layout's measured
    tokens/s): the curve's train_time_s, train_time_s and val_loss_at_time_budget; the cell's own clock is
    kept as logged_train_time_s. Unchanged without a speed for the cell."""
    speed = speeds.get(f"{result.get('task')}/{result.get('width')}/{result.get('layout')}")
    if speed is None or result.get("status") != "ok":
        return result
    r = copy.deepcopy(result)
    rate = speed["tokens_per_s"]
    for p in r.get("curve") or []:
        p["logged_train_time_s"] = p["train_time_s"]
        p["train_time_s"] = p["tokens"] / rate if p["tokens"] is not None else None
    m = r["metrics"]
    m["logged_train_time_s"] = m.get("train_time_s")
    m["train_time_s"] = (m.get("tokens") or 0) / rate
    m["val_loss_at_time_budget"] = loss_at_budget(r.get("curve") or [], spec.time_budget_s)
    m["tokens_per_s"] = rate
    return r


# ---------------------------------------------------------------- aggregates, tables, plots


def aggregate(results: list[dict]) -> list[dict]:
    """One entry per (task, layout, width, metric) over seeds: summarize() plus the seeds and parameters."""
    grouped: dict[tuple[str, str, int], list[dict]] = {}
    for r in results:
        if r.get("status") == "ok":
            grouped.setdefault((r["task"], r["layout"], r["width"]), []).append(r)
    out = []
    for (task, layout, width), rs in grouped.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        flats = [flat_metrics(r) for r in rs]
        names = sorted({k for f in flats for k in f})
        for metric in names:
            s = summarize([f.get(metric) for f in flats])
            out.append(
                {
                    "task": task,
                    "layout": layout,
                    "width": width,
                    "metric": metric,
                    "seeds": [r["seed"] for r in rs],
                    "params_non_embedding": rs[0]["params"]["non_embedding"],
                    **s,
                }
            )
    return out


def _length_of(metric: str) -> int | None:
    """The test length L of a `len<L>/...` metric name, else None."""
    m = re.match(r"len(\d+)/", metric)
    return int(m.group(1)) if m else None


def metric_groups(metrics: list[str]) -> list[tuple[str, list[str]]]:
    """Table groups: (title, metric names as columns)."""
    groups: dict[str, list[str]] = {}
    for metric in metrics:
        if metric.startswith("len"):
            key = "accuracy by test length: " + metric.split("/", 1)[1]
        elif metric.startswith("pos"):
            key = "validation loss by position"
        elif metric.startswith(("overall/", "trained_lengths/")):
            key = "overall accuracy"
        else:
            key = "training"
        groups.setdefault(key, []).append(metric)
    order = ["training", "overall accuracy"]

    def sort_key(m: str):
        numbers = [int(x) for x in re.findall(r"\d+", m.split("/")[0])]
        return (numbers, m)

    return [(k, sorted(groups[k], key=sort_key)) for k in order + sorted(set(groups) - set(order)) if k in groups]


def markdown_report(
    spec: StudySpec, agg: list[dict], results: list[dict], plan: dict, complete: bool, speeds: dict | None = None
) -> str:
    """results.md: per task and metric group a table, rows (layout, width), mean ± stderr [95% interval] (n)."""
    lines = [f"# Study {spec.name} ({spec.kind})", ""]
    if not complete:
        lines += ["**Incomplete**: not every cell has run yet; rerun the study to finish it.", ""]
    if speeds:
        timing = (
            f"Training time (train_time_s, val_loss_at_time_budget, loss against time): tokens / the layout's "
            f"training tokens/s measured side by side after the grid ({spec.speed_reps} steps per layout, "
            f"layouts taking turns, {spec.threads or 'default'} thread(s); table below), so that every layout is "
            "timed under the same load; logged_train_time_s is the cell's own clock (optimizer steps only)."
        )
    else:
        timing = (
            "Training time: the optimizer steps only (from the trainer's throughput rows), not evaluation or "
            "checkpoints."
        )
    lines += [
        f"mean ± standard error across seeds [95% t-interval] (n seeds). {timing}",
        "",
        "| layout | width | layer types | non-embedding params | total params |",
        "|---|---:|---|---:|---:|",
    ]
    for (layout, width), entry in plan.items():
        types = "".join({"attention": "A", "mamba2": "M", "mamba1": "m"}[t] for t in entry["overrides"]["layer_types"])
        p = entry["params"]
        lines.append(f"| {layout} | {width} | `{types}` | {p['non_embedding']:,} | {p['total']:,} |")
    lines += ["", "Layer types: A attention, M Mamba-2, m Mamba-1 (first layer first).", ""]
    if speeds:
        lines += ["| task | width | layout | training tokens/s | step (ms, median) |", "|---|---:|---|---:|---:|"]
        for name, sp in speeds.items():
            task, width, layout = name.split("/", 2)
            lines.append(f"| {task} | {width} | {layout} | {sp['tokens_per_s']:,.0f} | {sp['step_s'] * 1e3:.1f} |")
        lines.append("")
    by_task: dict[str, list[dict]] = {}
    for a in agg:
        by_task.setdefault(a["task"], []).append(a)
    for task, entries in by_task.items():
        lookup = {(a["layout"], a["width"], a["metric"]): a for a in entries}
        rows = sorted(
            {(a["layout"], a["width"]) for a in entries}, key=lambda r: (list(spec.layouts).index(r[0]), r[1])
        )
        for title, metrics in metric_groups(sorted({a["metric"] for a in entries})):
            cols = [m.split("/")[0] if "/" in m and title != "overall accuracy" else m for m in metrics]
            lines += [f"## {task}: {title}", "", "| layout | width | " + " | ".join(cols) + " |"]
            lines.append("|---|---:|" + "---|" * len(cols))
            for layout, width in rows:
                vals = [format_cell(lookup.get((layout, width, m))) for m in metrics]
                lines.append(f"| {layout} | {width} | " + " | ".join(vals) + " |")
            lines.append("")
    failed = [r for r in results if r.get("status") != "ok"]
    if failed:
        lines += ["## Failed cells", ""]
        for r in failed:
            first = (r.get("error") or "").splitlines()[:1]
            lines.append(f"- {r['cell_id']}: {first[0] if first else 'failed'}")
        lines.append("")
    return "\n".join(lines)


def _plt():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(plt, panels: int):
    """A figure of `panels` axes, up to 3 per row (the unused ones hidden); (figure, list of axes)."""
    cols = min(3, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    return fig, list(axes.flat)


def _err(s: dict) -> float:
    """Half the width of a summary's 95% interval (0 without one), for error bars."""
    return s["ci95"][1] - s["mean"] if s["ci95"] else 0.0


def _accuracy_err(entries: list[dict]) -> list[list[float]]:
    """Error bars of accuracies: the 95% interval clipped to [0, 1] (with 3 seeds it often reaches past)."""
    return [[min(_err(a), a["mean"]) for a in entries], [min(_err(a), 1.0 - a["mean"]) for a in entries]]


def plot_accuracy_vs_width(spec: StudySpec, agg: list[dict], path: Path, metric: str) -> bool:
    """Overall accuracy against width, one line per layout, one panel per task (error bars: 95% interval)."""
    entries = [a for a in agg if a["metric"] == metric and a["mean"] is not None]
    if not entries:
        return False
    plt = _plt()
    tasks = list(dict.fromkeys(a["task"] for a in entries))
    fig, axes = _grid(plt, len(tasks))
    for ax, task in zip(axes, tasks):
        for layout in spec.layouts:
            pts = sorted((a["width"], a) for a in entries if a["task"] == task and a["layout"] == layout)
            if pts:
                ax.errorbar([w for w, _ in pts], [a["mean"] for _, a in pts], yerr=_accuracy_err([a for _, a in pts]),
                            marker="o", capsize=3, label=layout)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width (hidden size)")
        ax.set_ylabel(metric.split("/")[-1])
        ax.set_title(task)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def plot_accuracy_vs_length(spec: StudySpec, agg: list[dict], path: Path, name: str, train_lengths: dict) -> bool:
    """Accuracy against test length, one line per layout, one panel per (task, width); a dotted line
    marks the longest training length."""
    entries = [a for a in agg if _length_of(a["metric"]) is not None and a["metric"].endswith("/" + name)]
    entries = [a for a in entries if a["mean"] is not None]
    if not entries:
        return False
    plt = _plt()
    panels = sorted({(a["task"], a["width"]) for a in entries})
    fig, axes = _grid(plt, len(panels))
    for ax, (task, width) in zip(axes, panels):
        for layout in spec.layouts:
            pts = sorted(
                (_length_of(a["metric"]), a)
                for a in entries
                if a["task"] == task and a["width"] == width and a["layout"] == layout
            )
            if pts:
                ax.errorbar([x for x, _ in pts], [a["mean"] for _, a in pts], yerr=_accuracy_err([a for _, a in pts]),
                            marker="o", capsize=3, label=layout)  # fmt: skip
        if train_lengths.get(task):
            ax.axvline(train_lengths[task], ls=":", c="grey")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel(name)
        ax.set_title(f"{task}, width {width}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def mean_curves(results: list[dict]) -> dict[tuple[str, int, str], list[tuple[float, float, float]]]:
    """{(task, width, layout): [(tokens, train_time_s, val_loss) averaged over seeds, per evaluation step]}."""
    by: dict[tuple[str, int, str], dict[int, list[dict]]] = {}
    for r in results:
        if r.get("status") != "ok":
            continue
        for p in r.get("curve") or []:
            if p["tokens"] is None:
                continue
            by.setdefault((r["task"], r["width"], r["layout"]), {}).setdefault(p["step"], []).append(p)
    out = {}
    for key, steps in by.items():
        out[key] = [
            (
                sum(p["tokens"] for p in ps) / len(ps),
                sum(p["train_time_s"] for p in ps) / len(ps),
                sum(p["val_loss"] for p in ps) / len(ps),
            )
            for _, ps in sorted(steps.items())
        ]
    return out


def plot_loss_curves(spec: StudySpec, results: list[dict], path: Path, x: Literal["tokens", "time"]) -> bool:
    """Validation loss (mean over seeds) against tokens or training time, one line per layout, one panel per (task, width)."""
    curves = mean_curves(results)
    if not curves:
        return False
    plt = _plt()
    panels = sorted({(t, w) for t, w, _ in curves})
    fig, axes = _grid(plt, len(panels))
    col = 0 if x == "tokens" else 1
    for ax, (task, width) in zip(axes, panels):
        for layout in spec.layouts:
            pts = curves.get((task, width, layout))
            if pts:
                ax.plot([p[col] for p in pts], [p[2] for p in pts], marker=".", label=layout)
        if x == "time" and spec.time_budget_s:
            ax.axvline(spec.time_budget_s, ls=":", c="grey")
        ax.set_xlabel("tokens" if x == "tokens" else "training time (s)")
        ax.set_ylabel("validation loss")
        ax.set_title(f"{task}, width {width}")
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def plot_loss_vs_position(spec: StudySpec, results: list[dict], path: Path) -> bool:
    """Loss per position bucket (mean over seeds) against the bucket's middle position, one line per
    layout, one panel per width; a dotted line marks the training length."""
    by: dict[tuple[int, str], list[dict]] = {}
    for r in results:
        pos = (r.get("metrics") or {}).get("position") if r.get("status") == "ok" else None
        if pos:
            by.setdefault((r["width"], r["layout"]), []).append(pos)
    if not by:
        return False
    plt = _plt()
    widths = sorted({w for w, _ in by})
    fig, axes = _grid(plt, len(widths))
    for ax, width in zip(axes, widths):
        train_len = None
        for layout in spec.layouts:
            ps = by.get((width, layout))
            if not ps:
                continue
            edges = ps[0]["bucket_edges"]
            train_len = ps[0]["train_len"]
            mids = [(lo + hi) / 2 for lo, hi in zip(edges, edges[1:])]
            means = []
            for i in range(len(mids)):
                vals = [p["loss"][i] for p in ps if p["loss"][i] is not None]
                means.append(sum(vals) / len(vals) if vals else float("nan"))
            ax.plot(mids, means, marker=".", label=layout)
        if train_len:
            ax.axvline(train_len, ls=":", c="grey")
        ax.set_xlabel("position")
        ax.set_ylabel("validation loss")
        ax.set_title(f"width {width}")
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def training_lengths(spec: StudySpec) -> dict[str, int]:
    """{task: the longest training example length} of a synthetic study (empty for lm)."""
    if spec.kind != "synthetic":
        return {}
    return {task: max(resolved_task_spec(spec, task)["train_lengths"]) for task in spec.tasks}


def write_outputs(spec: StudySpec, out: Path, cells: list[Cell], results: list[dict], data_dirs: dict) -> dict:
    """results.json, results.md and the plots; returns the results.json object. With `speed_reps`, the
    layouts' throughputs are measured side by side first and every training time comes from them."""
    speeds = calibrated_speeds(spec, cells, results, data_dirs, out)
    results = [with_calibrated_time(r, speeds, spec) for r in results]
    agg = aggregate(results)
    plan = {(c.layout, c.width): c.params for c in cells}
    complete = len(results) == len(cells) and all(r.get("status") == "ok" for r in results)
    plots = []
    for fname, made in (
        ("loss_vs_tokens.png", lambda p: plot_loss_curves(spec, results, p, "tokens")),
        ("loss_vs_time.png", lambda p: plot_loss_curves(spec, results, p, "time")),
        ("accuracy_vs_width.png", lambda p: plot_accuracy_vs_width(spec, agg, p, "trained_lengths/token_accuracy")),
        (
            "accuracy_vs_length.png",
            lambda p: plot_accuracy_vs_length(spec, agg, p, "example_accuracy", training_lengths(spec)),
        ),
        ("loss_vs_position.png", lambda p: plot_loss_vs_position(spec, results, p)),
    ):
        if made(out / fname):
            plots.append(fname)
    summary = {
        "format": FORMAT,
        "name": spec.name,
        "kind": spec.kind,
        "complete": complete,
        "spec": asdict(spec),
        "data": {k: str(v) for k, v in data_dirs.items()},
        "layouts": {
            f"{layout}@{width}": {
                "layout": layout,
                "width": width,
                "layer_types": e["overrides"]["layer_types"],
                "model_overrides": e["overrides"],
                "params": e["params"],
                **({"relative_gap": e["relative_gap"]} if "relative_gap" in e else {}),
            }
            for (layout, width), e in plan.items()
        },
        "cells": results,
        "failed": [r["cell_id"] for r in results if r.get("status") != "ok"],
        "not_run": [c.cell_id for c in cells if c.cell_id not in {r["cell_id"] for r in results}],
        "aggregates": agg,
        "speeds": speeds,
        "plots": plots,
    }
    write_json_atomic(out / "results.json", summary)
    write_text_atomic(out / "results.md", markdown_report(spec, agg, results, plan, complete, speeds))
    return summary


# ---------------------------------------------------------------- the runner


def run_study(spec: StudySpec, out: Path, max_cells: int | None = None) -> dict:
    """Run every cell not yet finished (at most `max_cells` of them), then write the outputs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if spec.threads is not None:
        import torch

        torch.set_num_threads(spec.threads)
    cells, data_dirs = plan_cells(spec, out)
    results, worked, left = [], 0, 0
    for i, cell in enumerate(cells):
        cached = load_result(out, cell)
        if cached is not None:
            logger.info("[%d/%d] cached: %s", i + 1, len(cells), cell.cell_id)
            results.append(cached)
        elif max_cells is not None and worked >= max_cells:
            left += 1  # --max_cells reached: finished cells further on are still collected
        else:
            logger.info("[%d/%d] running: %s", i + 1, len(cells), cell.cell_id)
            results.append(run_cell(cell, data_dirs[cell.task], out, spec))
            worked += 1
    if left:
        logger.info("stopped after %d cells (--max_cells); %d left for the next run", worked, left)
    summary = write_outputs(spec, out, cells, results, data_dirs)
    logger.info("wrote %s, results.md and %d plots", out / "results.json", len(summary["plots"]))
    return summary


def describe(spec: StudySpec, out: Path) -> str:
    """The dry run's listing: every cell with its id, layer types and parameter counts, and its state."""
    cells, _ = plan_cells(spec, out, build_data=False)
    lines = [f"study {spec.name}: {len(cells)} cells into {out}"]
    for c in cells:
        p = c.params["params"]
        done = "done" if load_result(out, c) is not None else "todo"
        types = "".join(
            {"attention": "A", "mamba2": "M", "mamba1": "m"}[t] for t in c.config["model_overrides"]["layer_types"]
        )
        lines.append(f"{done:4}  {c.cell_id}  {types}  non-embedding {p['non_embedding']:,}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(StudyArgs, argv)
    if args.max_cells is not None and args.max_cells < 0:
        raise StudyError(f"--max_cells must be at least 0, got {args.max_cells}")
    spec = load_spec(args.spec, args.scale)
    out = Path(args.out or f"results/study/{spec.name}")
    if args.dry_run:
        print(describe(spec, out))
        return 0
    summary = run_study(spec, out, args.max_cells)
    print((out / "results.md").read_text())
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
