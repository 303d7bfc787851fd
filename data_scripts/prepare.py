"""Build training data from a recipe.

    python -m hybrid_mamba.data_scripts.prepare --recipe data_scripts/recipes/demo.yaml --output data/demo
    python -m hybrid_mamba.data_scripts.prepare --recipe my.yaml --output data/my --streaming --num-proc 8

Everything that can be wrong with the inputs (recipe fields, files, the Hub) is checked before the
first document is read. The output folder is written atomically and reused when a rerun has the same
fingerprint; see ``data_scripts/README.md`` for the output format.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from hybrid_mamba.common.files import atomic_dir

from .cache import FINGERPRINT_FILE, fingerprint, is_current
from .pipeline import Build, build
from .recipe import (
    Recipe,
    SourceFiles,
    check_hub,
    check_streaming,
    load_recipe,
    resolve_files,
)
from .report import write_report

logger = logging.getLogger(__name__)


@dataclass
class PrepareArguments:
    recipe: str = field(metadata={"help": "Recipe YAML file (see data_scripts/recipes/)."})
    output: str = field(metadata={"help": "Output folder; replaced atomically when the build finishes."})
    streaming: bool = field(
        default=False,
        metadata={"help": "Read sources as streams (IterableDataset); the recipe's 'streaming: true' does the same."},
    )
    num_proc: int = field(
        default=os.cpu_count() or 1, metadata={"help": "Worker processes for the parallel stages (in-memory builds)."}
    )
    force: bool = field(default=False, metadata={"help": "Rebuild even when the output's fingerprint matches."})
    log_level: Literal["debug", "info", "warning", "error"] = field(default="info", metadata={"help": "Logging level."})


def check_inputs(recipe: Recipe) -> list[SourceFiles | None]:
    """Every check that needs files or the network, before any work: raises RecipeError."""
    from .sources import check_parquet_columns
    from .tokenizer import load_existing

    if recipe.streaming:
        check_streaming(recipe)
    files: list[SourceFiles | None] = []
    for s in recipe.sources:
        if s.loader == "hub":
            files.append(None)
            continue
        f = resolve_files(s)
        if s.loader == "parquet":
            check_parquet_columns(s, f)
        files.append(f)
    if recipe.tokenizer.path:
        load_existing(recipe.tokenizer.path)
    check_hub(recipe)
    return files


def prepare(args: PrepareArguments) -> Path:
    """Build (or reuse) the output folder; returns its path."""
    recipe = load_recipe(args.recipe)
    if args.streaming:
        recipe.streaming = True
    files = check_inputs(recipe)
    fp = fingerprint(recipe, files)
    out = Path(args.output)
    if not args.force and is_current(out, fp):
        logger.info("%s is up to date (fingerprint %s); nothing to do (--force rebuilds)", out, fp["fingerprint"][:12])
        return out
    start = time.perf_counter()
    with atomic_dir(out) as tmp:
        b = Build(recipe=recipe, files=files, out=tmp, fingerprint=fp["fingerprint"], num_proc=max(1, args.num_proc))
        report = build(b)
        shutil.rmtree(b.work, ignore_errors=True)
        write_report(tmp, report)
        (tmp / "recipe.yaml").write_text(
            f"# The recipe used for this build, every default filled in (from {Path(args.recipe).name}).\n"
            + yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True),
            encoding="utf-8",
        )
        (tmp / FINGERPRINT_FILE).write_text(json.dumps(fp, indent=2, sort_keys=True) + "\n")
    t = report["splits"]
    logger.info(
        "wrote %s in %.1f s: train %d blocks, validation %d blocks of %d tokens; shares %s",
        out,
        time.perf_counter() - start,
        t["train"]["blocks"],
        t["validation"]["blocks"],
        recipe.seq_len,
        ", ".join(f"{k} {v['achieved_share']:.3f}" for k, v in t["train"]["sources"].items()),
    )
    return out


def main(argv: list[str] | None = None) -> int:
    from hybrid_mamba.common.args import parse_args

    args = parse_args(PrepareArguments, argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prepare(args)  # a RecipeError, BudgetError or missing file ends in one line and exit status 2 (common.cli)
    return 0


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
