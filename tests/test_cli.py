"""Every command-line entry point reports an expected error as one line, `error: ...`, with exit status 2
(common/cli.py); --debug or HYBRID_MAMBA_DEBUG=1 shows the traceback; bugs keep theirs.

Each subprocess fails on its input before any model or data loads: the cost is the imports.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_mamba.common import cli

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds per subprocess; importing torch and transformers on a busy 2-core machine is most of it

# (module, arguments with {tmp} for a fresh folder, what the error line says)
CASES = [
    ("configuration.param_counts", ["--readme", "{tmp}/missing/README.md"], "does not exist"),
    ("trainers.pretrain", ["--config", "{tmp}/missing.yaml"], "does not exist"),
    ("trainers.finetune", ["--base_model", "{tmp}/missing"], "has no config.json"),
    ("trainers.merge", ["--adapter_dir", "{tmp}/missing", "--out", "{tmp}/out"], "has no adapter_config.json"),
    ("trainers.demo_base", ["--preset", "nope", "--out", "{tmp}/out"], "Unknown preset 'nope'"),
    ("trainers.plan", ["--preset", "nope"], "Unknown preset 'nope'"),
    ("trainers.sweep", ["--config", "{tmp}/missing.yaml", "--out", "{tmp}/out"], "does not exist"),
    ("trainers.rank_allocation", ["--config", "{tmp}/missing.yaml", "--out", "{tmp}/out"], "does not exist"),
    ("data_scripts.prepare", ["--recipe", "{tmp}/missing.yaml", "--output", "{tmp}/out"], "does not exist"),
    ("data_scripts.datatrove_pipeline", ["--recipe", "{tmp}/missing.yaml", "--output", "{tmp}/out"], "does not exist"),
    ("data_scripts.bench_datatrove", ["--replicate", "0", "--out", "{tmp}/out"], "must be at least 1"),
    ("data_scripts.bench", ["--recipe", "{tmp}/missing.yaml", "--output", "{tmp}/bench.json"], "does not exist"),
    ("eval_harness.bench_speed", ["--model", "nope", "--out", "{tmp}/out"], "neither a folder nor a preset"),
    ("eval_harness.build_tasks", ["--data_dir", "{tmp}/missing", "--out", "{tmp}/out"], "not found"),
    ("eval_harness.bench_speed", ["--threads", "0", "--out", "{tmp}/out"], "--threads must be at least 1"),
    ("eval_harness.bench_scan", ["--threads", "0", "--out", "{tmp}/out"], "--threads must be at least 1"),
    (
        "eval_harness.sweep",
        ["--models", "{tmp}/m", "--tasks", "offline", "--include_path", "{tmp}/missing", "--out", "{tmp}/out"],
        "is not a folder",
    ),
    ("eval_harness.study", ["--spec", "{tmp}/missing.yaml", "--out", "{tmp}/out"], "does not exist"),
    ("modeling.convert", ["--src", "{tmp}/missing", "--out", "{tmp}/out"], "has no config.json"),
    ("modeling.csp", ["--model", "{tmp}/missing", "--out", "{tmp}/out"], "has no config.json"),
    ("eval_harness.bench_csp", ["--threads", "0", "--out", "{tmp}/out"], "--threads must be at least 1"),
    ("modeling.distill_init", ["--teacher", "{tmp}/missing", "--out", "{tmp}/out"], "has no config.json"),
    (
        "trainers.distill",
        ["--teacher", "{tmp}/missing", "--student", "{tmp}/missing", "--output_dir", "{tmp}/out"],
        "has no config.json",
    ),
    ("eval_harness.bench_distill", ["--threads", "0", "--out", "{tmp}/out"], "--threads must be at least 1"),
    ("trainers.prune", ["--model", "{tmp}/missing", "--out", "{tmp}/out"], "has no config.json"),
    ("eval_harness.bench_prune", ["--model", "{tmp}/missing", "--out", "{tmp}/out"], "has no config.json"),
    ("eval_harness.bench_codesign", ["--sparsity", "1.5", "--out", "{tmp}/out"], "--sparsity must be in (0, 1)"),
    ("hub_cards.publish", ["--model", "{tmp}/missing", "--to", "{tmp}/repo"], "neither config.json"),
    ("hub_cards.reload", ["--repo", "{tmp}/missing", "--clone", "{tmp}/clone"], "git clone"),
    ("hub_cards.serve", ["--model", "{tmp}/missing"], "no config.json there"),
    ("eval_harness.bench_serve", ["--model", "{tmp}/missing", "--out", "{tmp}/out"], "no config.json there"),
    ("hub_cards.gguf", ["--model", "{tmp}/missing", "--out", "{tmp}/out"], "does not exist"),
    ("hub_cards.onnx_export", ["--model", "{tmp}/missing", "--out", "{tmp}/out"], "no such folder"),
    ("hub_cards.quantize", ["--model", "{tmp}/missing", "--method", "int4"], "Unknown quantization method 'int4'"),
    (
        "eval_harness.bench_gguf",
        ["--model", "{tmp}/missing", "--gguf", "{tmp}/missing", "--out", "{tmp}/out"],
        "does not exist",
    ),
    (
        "data_scripts.synthetic",
        ["--task", "mqar", "--output", "{tmp}/out", "--options", "num_queries: 9"],
        "num_queries",
    ),
    ("eval_harness.synthetic_eval", ["--data", "{tmp}/missing", "--lm_eval_tasks", "{tmp}/out"], "not found"),
]
# Entry points without an input to get wrong (a stray flag is argparse's usage error).
NO_INPUT = {"trainers.demo_data.make_demo_data"}


def run_module(
    module: str, args: list[str], tmp_path: Path, env: dict | None = None, drop: tuple = ()
) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in (cli.DEBUG_ENV, *drop)}
    full_env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env or {}))
    args = [a.format(tmp=tmp_path) for a in args]
    # cwd outside the repository: nothing can be written into it by accident
    return subprocess.run(
        [sys.executable, "-m", f"hybrid_mamba.{module}", *args],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one-line error: exit status 2, no traceback, the last line of stderr starts with `error: `."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    return lines[-1]


@pytest.mark.slow
@pytest.mark.parametrize("module, args, says", CASES, ids=[c[0] for c in CASES])
def test_entry_point_reports_a_bad_input_in_one_line(module, args, says, tmp_path):
    assert says in error_line(run_module(module, args, tmp_path))


def test_every_entry_point_runs_through_the_wrapper_and_is_tested():
    mains = {}
    for package in cli.PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            if 'if __name__ == "__main__":' in text and path.resolve() != Path(cli.__file__).resolve():
                mains[".".join(path.relative_to(REPO).with_suffix("").parts)] = text
    assert sorted(m for m, text in mains.items() if "run_main(main)" not in text) == []
    assert sorted(mains) == sorted({c[0] for c in CASES} | NO_INPUT)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(how, tmp_path):
    args, env = (
        (["--preset", "nope", "--debug"], None) if how == "flag" else (["--preset", "nope"], {cli.DEBUG_ENV: "1"})
    )
    proc = run_module("trainers.plan", args, tmp_path, env)
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("ValueError: Unknown preset 'nope'")


@pytest.mark.slow
def test_accelerate_launch_shows_the_error_line_per_rank_not_a_traceback(tmp_path):
    """Two CPU ranks through torchrun (trainers/accelerate/cpu_ddp.yaml); the launcher then adds its own report."""
    cmd = [
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "trainers" / "accelerate" / "cpu_ddp.yaml"),
        "--main_process_port",
        str(29500 + (os.getpid() + 7) % 1000),
        "-m",
        "hybrid_mamba.trainers.pretrain",
        "--config",
        str(tmp_path / "missing.yaml"),
    ]
    env = {k: v for k, v in os.environ.items() if k != cli.DEBUG_ENV}
    proc = subprocess.run(
        [sys.executable, *cmd],
        cwd=tmp_path,
        env={**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode != 0
    ranks = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    # a rank may be stopped by the launcher before it prints: at least one line, at most one per rank
    assert 1 <= len(ranks) <= 2 and all("missing.yaml does not exist" in line for line in ranks), proc.stderr[-3000:]
    assert 'trainers/pretrain.py", line' not in proc.stderr, proc.stderr[-3000:]  # no rank's traceback


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on return: a connection to it is refused at once


@pytest.mark.slow
@pytest.mark.parametrize(
    "token, says",
    [(None, "HF_TOKEN is not set"), ("not-a-real-token", "is not reachable with this token")],
    ids=["no_token", "hub_unreachable"],
)
def test_publish_to_the_hub_fails_in_one_line_and_pushes_nothing(token, says, tmp_path):
    """Online mode (no HF_HUB_OFFLINE), with the Hub replaced by a closed port on localhost."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}\n")
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_HOME": str(tmp_path / "hf")}
    if token:
        env["HF_TOKEN"] = token
    proc = run_module(
        "hub_cards.publish",
        ["--model", str(model), "--to", "hf://someone/tiny", "--stage", "{tmp}/stage"],
        tmp_path,
        env,
        drop=("HF_HUB_OFFLINE", "HF_TOKEN", "HF_TOKEN_PATH"),
    )
    line = error_line(proc)
    assert says in line and "nothing was pushed" in line
    assert not (tmp_path / "stage").exists()  # it stopped before staging, so before any upload


# the wrapper in process


def _exit(main, argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        cli.run_main(main, argv)
    return exit_.value.code, capsys.readouterr().err


def test_wrapper_exit_status_and_message(capsys, monkeypatch):
    monkeypatch.setenv(cli.DEBUG_ENV, "0")  # off; restored after the test
    assert _exit(lambda argv: {"result": 1}, [], capsys) == (0, "")
    assert _exit(lambda argv: 3, [], capsys) == (3, "")

    def missing(argv):
        raise FileNotFoundError("no such\nfile")

    assert _exit(missing, [], capsys) == (2, "error: no such file\n")


def test_wrapper_strips_debug_and_passes_it_on(monkeypatch):
    monkeypatch.setenv(cli.DEBUG_ENV, "0")  # off; restored after the test
    seen = []

    def main(argv):
        seen.append(argv)
        raise FileNotFoundError("shown with its traceback")

    with pytest.raises(FileNotFoundError):
        cli.run_main(main, ["--x", "1", "--debug"])
    assert seen == [["--x", "1"]] and os.environ[cli.DEBUG_ENV] == "1"  # child processes show theirs too


def test_wrapper_leaves_bugs_and_library_value_errors_alone(monkeypatch):
    monkeypatch.setenv(cli.DEBUG_ENV, "0")  # off; restored after the test

    def bug(argv):
        return {}["missing"]

    def library_value_error(argv):  # raised outside configuration/, modeling/, trainers/, ... (here: tests/)
        raise ValueError("from a library")

    with pytest.raises(KeyError):
        cli.run_main(bug, [])
    with pytest.raises(ValueError, match="from a library"):
        cli.run_main(library_value_error, [])
