"""One fine-tuning config over several seeds: mean ± std and a 95% confidence interval per metric.

    python -m hybrid_mamba.trainers.sweep --config trainers/configs/finetune_classification.yaml --seeds 0 1 2 [--field value ...]

Runs `python -m hybrid_mamba.trainers.finetune` once per seed (a fresh process each, output in OUT/seed_<n>/), then writes
OUT/sweep.json and OUT/sweep.md with every final validation metric summarised over the seeds
(Student's t interval, common/stats.py). OUT defaults to the config's output_dir.
"""

import json
import logging
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from hybrid_mamba.common.args import parse_args, parse_known_args
from hybrid_mamba.common.machine import machine
from hybrid_mamba.common.stats import format_summary, summarize

from .args import FinetuneArgs

logger = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A fine-tuning run started by a sweep failed; the message ends with the run's last error line."""


@dataclass
class SweepArgs:
    """One fine-tuning config over several seeds; any other --field value flag goes to every run."""

    config: str = field(metadata={"help": "A finetune YAML (trainers/configs/finetune_*.yaml)."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds, one run each."})
    out: str | None = field(
        default=None, metadata={"help": "Folder for the runs and sweep.json (default: the config's output_dir)."}
    )


def check_config(config: str, extra: list[str] = ()) -> None:
    """The config exists and parses with the flags passed to every run: a typo fails here, not in each run."""
    if not Path(config).is_file():
        raise FileNotFoundError(f"--config {config} does not exist.")
    parse_args(FinetuneArgs, ["--config", config, *extra])


def run_seed(config: str, seed: int, run_dir: Path, extra: list[str]) -> dict:
    """`python -m hybrid_mamba.trainers.finetune` with `--seed seed --output_dir run_dir`, from scratch; returns its summary.
    The child imports trainers the way this process did (from the working directory, PYTHONPATH or the
    installed package), as it inherits both."""
    cmd = [
        sys.executable,
        "-m",
        "hybrid_mamba.trainers.finetune",
        "--config",
        config,
        "--seed",
        str(seed),
        "--output_dir",
        str(run_dir),
        "--resume",
        "false",
        *extra,
    ]
    logger.info("%s", " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        if done.returncode != 2:  # not one of finetune's one-line errors: its traceback is what to read
            sys.stderr.write(done.stderr[-3000:])
        last = next((line.strip() for line in reversed(done.stderr.splitlines()) if line.strip()), "no output")
        raise RunError(f"seed {seed} failed (exit status {done.returncode}; {' '.join(cmd)}): {last}")
    return json.loads((run_dir / "summary.json").read_text())


def float_metrics(final_eval: dict) -> list[str]:
    return [k for k, v in final_eval.items() if isinstance(v, float)]


def main(argv=None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args, extra = parse_known_args(SweepArgs, argv)  # other flags go to every run
    check_config(args.config, extra)
    out = Path(args.out or yaml.safe_load(Path(args.config).read_text())["output_dir"])
    summaries = {seed: run_seed(args.config, seed, out / f"seed_{seed}", extra) for seed in args.seeds}
    names = float_metrics(summaries[args.seeds[0]]["final_eval"])
    result = {
        "command": "python -m hybrid_mamba.trainers.sweep " + " ".join(sys.argv[1:] if argv is None else argv),
        "seeds": args.seeds,
        "machine": machine(threads=torch.get_num_threads()),
        "metrics": {m: summarize([s["final_eval"][m] for s in summaries.values()]) for m in names},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Seeds {args.seeds}: mean ± std [95% CI]", "", "| metric | value |", "|---|---|"]
    lines += [f"| {m} | {format_summary(s)} |" for m, s in result["metrics"].items()]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
