"""lm-eval over models x tasks x seeds, cached per cell, aggregated across seeds.

    python -m hybrid_mamba.eval_harness.sweep --models RUN/final OTHER/final --tasks offline --seeds 0 1 2 [--limit 20]

--tasks takes suite names (`offline`, `standard`, see SUITES) and lm-eval task or group names,
mixed. Every (model, task, seed) cell runs `lm_eval.simple_evaluate` (the model is loaded once per
model, through lm-eval's HFLM with trust_remote_code) with random, numpy, torch and few-shot seeds
all set to the seed, and is written as lm-eval's own results JSON (what `lm_eval --output_path`
writes, without per-sample logs) to OUT/cells/<model>/<task>/seed<seed>.json, through a temporary
file and a rename. A rerun reuses every finished cell whose limit and few-shot count match, so an
interrupted sweep resumes where it stopped.

Before any model is loaded, every task is built once (its dataset loaded); a task that cannot be
built (unknown name, Hub data while offline) is listed with the reason and the rest run. A model
folder that does not load, or a cell that fails, is recorded with its error and the sweep goes on.

OUT/results.json holds, per model, task and metric, the per-seed values, their mean, sample
standard deviation, standard error (std / sqrt(n)) and the 95% t-interval across seeds
(mean +- t_{0.975, n-1} * stderr; none with one seed), plus lm-eval's own within-run stderr per
seed, the seeds, the skipped tasks and the errors. OUT/results.md is the table and OUT/results.png
a chart with one panel per (task, metric) and one bar per model (error bars: the 95% interval).
"""

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybrid_mamba.common.args import parse_args
from hybrid_mamba.common.files import save_figure, write_json_atomic, write_text_atomic
from hybrid_mamba.common.lm_eval_results import metric_values
from hybrid_mamba.common.stats import format_cell, summarize

logger = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

SUITES: dict[str, list[str]] = {
    "offline": ["demo_heldout_ppl", "demo_heldout_mc"],
    # Hub data. Code benchmarks (humaneval, mbpp) are left out: lm-eval runs the model's code on
    # this machine and requires --confirm_run_unsafe_code, which a sweep should not grant silently.
    "standard": [
        "mmlu",
        "hellaswag",
        "arc_easy",
        "arc_challenge",
        "truthfulqa_mc2",
        "piqa",
        "winogrande",
        "boolq",
        "gsm8k",
        "wikitext",
    ],
}


@dataclass
class SweepArgs:
    models: list[str] = field(metadata={"help": "Model folders (save_pretrained with tokenizer)."})
    tasks: list[str] = field(metadata={"help": f"Suites ({', '.join(SUITES)}) and/or lm-eval task names."})
    seeds: list[int] = field(
        default_factory=lambda: [0],
        metadata={"help": "Seeds; each sets lm-eval's random, numpy, torch and few-shot seeds."},
    )
    limit: float | None = field(
        default=None, metadata={"help": "lm-eval --limit: documents per task (or a fraction below 1)."}
    )
    num_fewshot: int | None = field(default=None, metadata={"help": "Few-shot examples (task default when unset)."})
    batch_size: int = field(default=4, metadata={"help": "lm-eval batch size."})
    device: str = field(default="cpu", metadata={"help": "Device for HFLM (cpu, cuda, cuda:0)."})
    include_path: str = field(
        default=str(TASKS_DIR), metadata={"help": "Extra lm-eval task folder (the offline tasks)."}
    )
    out: str = field(
        default="results/sweep", metadata={"help": "Output folder: cells/, results.json, results.md, results.png."}
    )


def expand_tasks(names: list[str]) -> list[str]:
    """Suite names replaced by their tasks, order kept, duplicates dropped."""
    out: list[str] = []
    for n in names:
        for t in SUITES.get(n, [n]):
            if t not in out:
                out.append(t)
    return out


def model_key(path: str) -> str:
    """A folder name that tells models apart: the last two path parts and a hash of the full path."""
    p = Path(path).resolve()
    tail = "-".join(p.parts[-2:])
    return re.sub(r"[^A-Za-z0-9._-]", "_", tail) + "-" + hashlib.sha1(str(p).encode()).hexdigest()[:8]


def cell_path(out: Path, model: str, task: str, seed: int) -> Path:
    return out / "cells" / model_key(model) / task / f"seed{seed}.json"


def write_json(path: Path, obj: Any) -> None:
    """Write through a temporary file and a rename, so a killed run never leaves half a file."""
    from lm_eval.utils import handle_non_serializable

    write_json_atomic(path, obj, default=handle_non_serializable)


def cell_settings(args: SweepArgs) -> dict:
    """What a cached cell must have been run with to be reused (stored in the cell under SETTINGS_KEY)."""
    return {"limit": args.limit, "num_fewshot": args.num_fewshot}


# One key added to lm-eval's results dict; lm-eval readers ignore it.
SETTINGS_KEY = "hybrid_mamba_sweep"


def load_cell(path: Path, args: SweepArgs) -> dict | None:
    """A finished cell's lm-eval results, or None when absent or run with other settings."""
    if not path.is_file():
        return None
    res = json.loads(path.read_text())
    if res.get(SETTINGS_KEY) != cell_settings(args):
        return None
    return res


def check_tasks(tasks: list[str], include_path: str) -> tuple[list[str], dict[str, str]]:
    """Build every task once (loads its data). Returns (runnable tasks, {task: why not})."""
    from lm_eval.tasks import TaskManager, get_task_dict

    tm = TaskManager(include_path=include_path)
    ok, skipped = [], {}
    for t in tasks:
        if t not in tm.all_tasks:
            skipped[t] = f"unknown task: lm-eval (with --include_path {include_path}) has no task or group named {t!r}"
            continue
        try:
            get_task_dict([t], tm)
        except Exception as e:
            skipped[t] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            continue
        ok.append(t)
    for t, why in skipped.items():
        logger.warning("task %s cannot run: %s", t, why)
    return ok, skipped


def run_cell(lm, task: str, seed: int, args: SweepArgs, task_manager) -> dict:
    """One lm-eval run; returns its results dict without per-sample logs."""
    from lm_eval import simple_evaluate

    res = simple_evaluate(
        model=lm,
        tasks=[task],
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        task_manager=task_manager,
        log_samples=False,
    )
    res.pop("samples", None)
    return res


def aggregate(cells: dict[tuple[str, str, int], dict]) -> dict[str, dict[str, dict[str, dict]]]:
    """{model: {task: {metric: summary + per-seed values}}} from {(model, task, seed): results}."""
    grouped: dict[str, dict[str, dict[str, dict[int, tuple[float, float | None]]]]] = {}
    for (model, _, seed), res in cells.items():
        for task, metrics in metric_values(res).items():
            for metric, v in metrics.items():
                grouped.setdefault(model, {}).setdefault(task, {}).setdefault(metric, {})[seed] = v
    out: dict = {}
    for model, tasks in grouped.items():
        for task, metrics in tasks.items():
            for metric, by_seed in metrics.items():
                seeds = sorted(by_seed)
                s = summarize([by_seed[k][0] for k in seeds])  # values: per seed, None where not finite
                s.update(seeds=seeds, lm_eval_stderr=[by_seed[k][1] for k in seeds])
                out.setdefault(model, {}).setdefault(task, {})[metric] = s
    return out


def markdown_table(agg: dict, skipped: dict[str, str], errors: list[dict], models: list[str] | None = None) -> str:
    """Rows (task, metric), one column per model: mean ± stderr [95% interval] (n seeds)."""
    models = models or list(agg)
    rows = sorted({(t, m) for mod in agg.values() for t, ms in mod.items() for m in ms})
    lines = ["| task | metric | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for task, metric in rows:
        cells = []
        for mod in models:
            cells.append(format_cell(agg.get(mod, {}).get(task, {}).get(metric)))
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n\nmean ± standard error across seeds [95% t-interval]\n"
    if skipped:
        text += "\nTasks not run:\n" + "".join(f"- {t}: {why}\n" for t, why in skipped.items())
    if errors:
        text += "\nFailed cells:\n" + "".join(
            f"- {e['model']} / {e['task']} / seed {e['seed']}: {e['error']}\n" for e in errors
        )
    return text


def plot(agg: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(t, m) for mod in agg.values() for t, ms in mod.items() for m in ms})
    if not panels:
        return
    models = list(agg)
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (task, metric) in zip(axes.flat, panels):
        means, errs = [], []
        for mod in models:
            s = agg[mod].get(task, {}).get(metric)
            means.append(s["mean"] if s and s["mean"] is not None else float("nan"))
            errs.append(s["ci95"][1] - s["mean"] if s and s["ci95"] else 0.0)
        ax.bar(range(len(models)), means, yerr=errs, capsize=4)
        ax.set_xticks(range(len(models)), ["/".join(Path(m).parts[-2:]) for m in models], rotation=20, fontsize=7)
        ax.set_title(f"{task}\n{metric}", fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)


def load_model(path: str, args: SweepArgs):
    """lm-eval's HFLM over a model folder, as `--model hf --model_args pretrained=...,trust_remote_code=True`."""
    from lm_eval.models.huggingface import HFLM

    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; pass a folder written by save_pretrained (e.g. RUN/final)")
    return HFLM(pretrained=path, trust_remote_code=True, batch_size=args.batch_size, device=args.device)


def sweep(args: SweepArgs) -> dict:
    """Run or reuse every cell, then write results.json, results.md and results.png into args.out."""
    if not args.models or not args.tasks or not args.seeds:
        raise ValueError("--models, --tasks and --seeds each need at least one value")
    if not Path(args.include_path).is_dir():
        raise FileNotFoundError(
            f"--include_path {args.include_path} is not a folder (lm-eval task YAMLs, default {TASKS_DIR})"
        )
    from lm_eval.tasks import TaskManager

    out = Path(args.out)
    tasks, skipped = check_tasks(expand_tasks(args.tasks), args.include_path)
    tm = TaskManager(include_path=args.include_path)
    cells: dict[tuple[str, str, int], dict] = {}
    errors: list[dict] = []
    for model in args.models:
        lm, load_error = None, None
        for task in tasks:
            for seed in args.seeds:
                path = cell_path(out, model, task, seed)
                cached = load_cell(path, args)
                if cached is not None:
                    logger.info("cached: %s / %s / seed %d", model, task, seed)
                    cells[(model, task, seed)] = cached
                    continue
                if lm is None and load_error is None:
                    try:
                        lm = load_model(model, args)
                    except Exception as e:
                        load_error = f"model does not load: {type(e).__name__}: {e}"
                if load_error is not None:
                    errors.append({"model": model, "task": task, "seed": seed, "error": load_error})
                    continue
                logger.info("running: %s / %s / seed %d", model, task, seed)
                try:
                    res = run_cell(lm, task, seed, args, tm)
                except Exception as e:
                    errors.append({"model": model, "task": task, "seed": seed, "error": f"{type(e).__name__}: {e}"})
                    logger.error("failed: %s / %s / seed %d: %s", model, task, seed, e)
                    continue
                res[SETTINGS_KEY] = cell_settings(args)
                write_json(path, res)
                cells[(model, task, seed)] = res
        del lm
    for e in errors:
        logger.error("cell %s / %s / seed %d: %s", e["model"], e["task"], e["seed"], e["error"])
    agg = aggregate(cells)
    summary = {
        "format": "hybrid_mamba.sweep/1",
        "models": args.models,
        "tasks": tasks,
        "seeds": {
            "values": args.seeds,
            "sets": ["random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed"],
        },
        "limit": args.limit,
        "num_fewshot": args.num_fewshot,
        "cells": {f"{m} | {t} | seed {s}": str(cell_path(out, m, t, s)) for (m, t, s) in cells},
        "skipped_tasks": skipped,
        "errors": errors,
        "results": agg,
    }
    write_json(out / "results.json", summary)
    table = markdown_table(agg, skipped, errors, args.models)
    write_text_atomic(out / "results.md", table)
    plot(agg, out / "results.png")
    logger.info("wrote %s, results.md, results.png", out / "results.json")
    return summary


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(SweepArgs, argv)
    summary = sweep(args)
    print(markdown_table(summary["results"], summary["skipped_tasks"], summary["errors"], summary["models"]))


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
