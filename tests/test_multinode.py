"""Training across machines: two `accelerate launch` processes as two machines (one process each, gloo
on CPU, sharing this disk as a cluster shares its filesystem) against one process, resuming their
checkpoint on one machine, and the Slurm script's command lines."""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from test_trainer import losses, pretrain_command, reference_run, run_pretrain  # noqa: F401  (reference_run: a fixture)

from hybrid_mamba.trainers.checkpoint import CheckpointManager

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = REPO / "trainers" / "accelerate"
SBATCH = REPO / "trainers" / "slurm" / "pretrain_multinode.sbatch"
# Two machines see the same 4 sequences per step as one process with micro-batch 4 (the trainer shards
# each global batch across processes without overlap), so the runs differ only in the order of float32
# sums (two 2-row means averaged by the all-reduce vs one 4-row mean): measured at most 5e-7 over 8 steps.
# Half the global batch (a machine whose gradients were not averaged in) moves the loss by 5e-3 at step 1
# and 0.1 by step 5; 2e-4 sits between the two.
TOL = 2e-4
MACHINE_TIMEOUT = 300  # s per run of both machines; about 25 s on 2 idle cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_machines(
    tmp_path, data, name, machines=2, timeout=MACHINE_TIMEOUT, machine_cwd=None, check=True, **overrides
) -> list:
    """Run the pretraining as `machines` machines of one process each, every one its own `accelerate
    launch` with --num_machines/--machine_rank/--main_process_ip/--main_process_port over cpu_ddp.yaml,
    run in `machine_cwd[rank]` (default tmp_path); returns each machine's output.
    With `check`, one machine failing fails the test; without, returns (exit status, output) per machine.
    When one fails (with `check`) or the time runs out, every machine is killed."""
    port = free_port()
    procs, logs = [], []
    base, env = pretrain_command(tmp_path, data, name, launch="cpu_ddp", **overrides)
    # after the config's settings (and pretrain_command's port), before the training module: these win
    at = base.index("hybrid_mamba.trainers.pretrain") - 1
    try:
        for rank in range(machines):
            cmd = base[:at] + [
                "--num_machines", str(machines), "--num_processes", str(machines), "--machine_rank", str(rank),
                "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            ] + base[at:]  # fmt: skip
            logs.append(tmp_path / f"{name}.machine{rank}.log")
            with open(logs[-1], "w") as out:
                procs.append(
                    subprocess.Popen(
                        cmd,
                        cwd=(machine_cwd or {}).get(rank, tmp_path),
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            failed = [rank for rank, p in enumerate(procs) if p.poll() not in (None, 0)] if check else []
            if failed or time.monotonic() > deadline:
                why = f"machine {failed[0]} failed" if failed else f"not done within {timeout} s"
                pytest.fail(
                    f"{why}:\n" + "\n".join(f"--- machine {r}\n{log.read_text()[-2000:]}" for r, log in enumerate(logs))
                )
            time.sleep(0.1)
        outputs = [log.read_text() for log in logs]
        if not check:
            return [(p.returncode, out) for p, out in zip(procs, outputs)]
        for rank, p in enumerate(procs):
            assert p.returncode == 0, f"machine {rank}:\n{outputs[rank][-3000:]}"
        return outputs
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=60)


@pytest.fixture(scope="module")
def two_machines(tmp_path_factory, tiny_data):
    """Two machines of one process each, micro-batch 2: the global batch of the reference run (4)."""
    root = tmp_path_factory.mktemp("multinode")
    outputs = launch_machines(root, tiny_data, "two", micro_batch_size=2)
    return root / "two", outputs


@pytest.mark.slow
def test_two_machines_match_one_process_at_the_same_global_batch(two_machines, reference_run):  # noqa: F811
    run, (machine0, machine1) = two_machines
    hardware = json.loads((run / "summary.json").read_text())["hardware"]
    assert hardware["processes"] == 2 and hardware["distributed_type"] == "DistributedType.MULTI_CPU"
    # rank 0 (the only one that prints the result) lives on machine 0
    assert "validation loss" in machine0 and "validation loss" not in machine1
    (train1, val1), (train2, val2) = losses(reference_run), losses(run)
    assert sorted(train1) == sorted(train2) == list(range(1, 9))
    for step in train1:
        assert train2[step] == pytest.approx(train1[step], abs=TOL), step
    assert val2[8] == pytest.approx(val1[8], abs=TOL)
    # each process wrote its own RNG state into the checkpoint, and the record (written by machine 0) lists both
    ckpt = CheckpointManager(run / "checkpoints", 2).latest()
    assert ckpt.name == "step_00000004"
    listed = {f["path"] for f in json.loads((ckpt / "checkpoint.json").read_text())["files"]}
    assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors", "optimizer.bin"} <= listed


@pytest.mark.slow
def test_two_machine_checkpoint_resumes_on_one_machine(tmp_path, tiny_data, two_machines, reference_run):  # noqa: F811
    run, _ = two_machines
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(run / "checkpoints", resumed / "checkpoints")  # only step_00000004 (none at the last step)
    shutil.copy(run / "metrics.jsonl", resumed / "metrics.jsonl")
    # one process with micro-batch 4: the same global batch, so the same data from step 5 on
    one = run_pretrain(tmp_path, tiny_data, "resumed")
    assert one.returncode == 0, one.stderr[-3000:]
    assert f"resumed from {resumed / 'checkpoints' / 'step_00000004'} at step 4" in one.stderr
    (train_two, _), (train_ref, val_ref), (train_res, val_res) = losses(run), losses(reference_run), losses(resumed)
    assert sorted(train_res) == list(range(1, 9))
    for step in range(1, 5):  # kept from the two-machine run, not recomputed
        assert train_res[step] == train_two[step], step
    for step in range(5, 9):
        assert train_res[step] == pytest.approx(train_two[step], abs=TOL), step
        assert train_res[step] == pytest.approx(train_ref[step], abs=TOL), step
    assert val_res[8] == pytest.approx(val_ref[8], abs=TOL)
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["tokens_seen"] == 8 * 4 * 32
    assert summary["hardware"]["processes"] == 1
    assert (resumed / "final" / "model.safetensors").exists()


@pytest.mark.slow
def test_machines_that_do_not_share_the_run_folder_stop_with_one_error(tmp_path, tiny_data, two_machines):
    """output_dir on each machine's own disk: the same relative path from a different working folder per
    machine; machine 0's holds the checkpoint, machine 1's nothing. Both stop before training with the
    error that says to share output_dir, instead of resuming at different steps and averaging mismatched
    gradients."""
    run, _ = two_machines
    disks = [tmp_path / "machine0", tmp_path / "machine1"]
    shutil.copytree(run / "checkpoints", disks[0] / "local" / "checkpoints")
    disks[1].mkdir()
    results = launch_machines(
        tmp_path,
        tiny_data,
        "split",
        micro_batch_size=2,
        check=False,
        output_dir="local",
        machine_cwd=dict(enumerate(disks)),
    )
    for rank, (status, output) in enumerate(results):
        assert status != 0, f"machine {rank} trained:\n{output[-2000:]}"
        assert "output_dir must be one folder that every machine sees" in output, output[-2000:]
    for disk in disks:
        assert not (disk / "local" / "metrics.jsonl").exists() and not (disk / "local" / "final").exists()


def test_multinode_fsdp_config_is_the_single_machine_one_plus_machines():
    multi = yaml.safe_load((ACCELERATE / "fsdp_multinode.yaml").read_text())
    single = yaml.safe_load((ACCELERATE / "fsdp.yaml").read_text())
    machine_fields = {
        "num_machines",
        "num_processes",
        "machine_rank",
        "main_process_ip",
        "main_process_port",
        "rdzv_backend",
    }
    assert {k: v for k, v in multi.items() if k not in machine_fields} == {
        k: v for k, v in single.items() if k not in machine_fields
    }
    assert multi["num_machines"] > 1 and multi["rdzv_backend"] == "static"
    assert multi["main_process_ip"] is None  # given on the command line; no address that would silently hang


SRUN = """#!/bin/bash
# records its arguments, then runs the command once per node with that node's SLURM_NODEID
printf '%s\\n' "$*" >> "$SHIM_LOG/srun.args"
nodes=1
while [[ "$1" == -* ]]; do
    case "$1" in --nodes=*) nodes=${1#--nodes=} ;; esac
    shift
done
for ((i = 0; i < nodes; i++)); do SLURM_NODEID=$i "$@" || exit $?; done
"""
SCONTROL = """#!/bin/bash
printf '%s\\n' "$*" >> "$SHIM_LOG/scontrol.args"
[[ "$1 $2" == "show hostnames" ]] && printf 'gpu-node-17\\ngpu-node-18\\n'
"""
PYTHON = """#!/bin/bash
# one NUL-separated argv per node
printf '%s\\0' "$@" > "$SHIM_LOG/launch.$SLURM_NODEID"
"""


def _shims(tmp_path) -> dict:
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("python", PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SHIM_LOG": str(log),
        "PYTHON": str(bin_dir / "python"),
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "gpu-node-[17-18]",
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_CPUS_ON_NODE": "64",
        "GPUS_PER_NODE": "8",
        "DATA_DIR": "/shared/DATA",
        "OUTPUT_DIR": "/shared/runs/x",
        "HOME": os.environ.get("HOME", str(tmp_path)),
    }


@pytest.mark.slow
def test_sbatch_script_builds_one_accelerate_launch_per_node(tmp_path):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    assert subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True, timeout=30).returncode == 0
    env = _shims(tmp_path)
    port = free_port()  # machine 0's launcher checks that the port is free on this host
    env["MAIN_PORT"] = str(port)
    done = subprocess.run(
        ["bash", str(SBATCH), "--max_steps", "5"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    log = tmp_path / "log"
    assert (log / "srun.args").read_text().split()[:4] == [
        "--nodes=2",
        "--ntasks-per-node=1",
        "--cpus-per-task=64",
        "--kill-on-bad-exit=1",
    ]
    assert (log / "scontrol.args").read_text() == "show hostnames gpu-node-[17-18]\n"
    for rank in range(2):
        argv = (log / f"launch.{rank}").read_text().split("\0")[:-1]
        assert argv[:2] == ["-m", "accelerate.commands.launch"]
        # what accelerate makes of the line, and what it tells torchrun on this node
        args = launch_command_parser().parse_args(argv[2:])
        assert (args.module, args.training_script) == (True, "hybrid_mamba.trainers.pretrain")
        assert args.training_script_args == [
            "--config", "trainers/configs/1.3b.yaml", "--data_dir", "/shared/DATA",
            "--output_dir", "/shared/runs/x", "--max_steps", "5",
        ]  # fmt: skip
        assert Path(args.config_file) == Path("trainers/accelerate/fsdp_multinode.yaml")
        args.config_file = str(REPO / args.config_file)
        args, _, _ = _validate_launch_command(args)
        assert (args.machine_rank, args.num_machines, args.num_processes) == (rank, 2, 16)
        assert (args.main_process_ip, args.main_process_port) == ("gpu-node-17", port)
        assert args.use_fsdp and args.fsdp_version == 2
        prepare_multi_gpu_env(args)
        assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", rank, "8")
        assert (args.rdzv_backend, args.rdzv_endpoint) == ("static", f"gpu-node-17:{port}")


@pytest.mark.slow
def test_sbatch_script_refuses_to_start_without_its_folders(tmp_path):
    env = _shims(tmp_path)
    del env["OUTPUT_DIR"]
    done = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "OUTPUT_DIR" in done.stderr
    assert not (tmp_path / "log" / "srun.args").exists()
