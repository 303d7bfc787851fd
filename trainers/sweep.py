"""One fine-tuning config over several seeds: mean ± std and a 95% confidence interval per metric.

    python -m trainers.sweep --config trainers/configs/finetune_classification.yaml --seeds 0 1 2 [--field value ...]

Runs `python -m trainers.finetune` once per seed (a fresh process each, output in OUT/seed_<n>/), then writes
OUT/sweep.json and OUT/sweep.md with every final validation metric summarised over the seeds
(Student's t interval, trainers/stats.py). OUT defaults to the config's output_dir.
"""

import argparse
import json
import logging
import platform
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from .stats import summarize

logger = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A fine-tuning run started by a sweep failed; the message ends with the run's last error line."""


def check_config(config: str) -> None:
    if not Path(config).is_file():
        raise FileNotFoundError(f"--config {config} does not exist.")


def run_seed(config: str, seed: int, run_dir: Path, extra: list[str]) -> dict:
    """`python -m trainers.finetune` with `--seed seed --output_dir run_dir`, from scratch; returns its summary.
    The child imports trainers the way this process did (from the working directory, PYTHONPATH or the
    installed package), as it inherits both."""
    cmd = [sys.executable, "-m", "trainers.finetune", "--config", config, "--seed", str(seed),
           "--output_dir", str(run_dir), "--resume", "false", *extra]
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


def machine() -> dict:
    return {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__}


def main(argv=None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=None, help="folder for the runs and sweep.json (default: the config's output_dir)")
    args, extra = parser.parse_known_args(argv)  # other flags go to every run
    check_config(args.config)
    out = Path(args.out or yaml.safe_load(Path(args.config).read_text())["output_dir"])
    summaries = {seed: run_seed(args.config, seed, out / f"seed_{seed}", extra) for seed in args.seeds}
    names = float_metrics(summaries[args.seeds[0]]["final_eval"])
    result = {
        "command": "python -m trainers.sweep " + " ".join(sys.argv[1:] if argv is None else argv),
        "seeds": args.seeds,
        "machine": machine(),
        "metrics": {m: summarize([s["final_eval"][m] for s in summaries.values()]) for m in names},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Seeds {args.seeds}: mean ± std [95% CI]", "", "| metric | value |", "|---|---|"]
    lines += [f"| {m} | {s['mean']:.4f} ± {s['std']:.4f} [{s['ci95'][0]:.4f}, {s['ci95'][1]:.4f}] |" for m, s in result["metrics"].items()]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    from configuration.cli import run_main

    run_main(main)
