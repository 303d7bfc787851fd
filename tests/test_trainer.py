"""The pretraining loop on CPU: arguments, resume after a SIGKILL from outside, 2 processes vs 1, failure handling."""

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState

from hybrid_mamba.common.args import parse_args
from hybrid_mamba.trainers.args import PretrainArgs
from hybrid_mamba.trainers.checkpoint import CheckpointError, CheckpointManager
from hybrid_mamba.trainers.data import collate_packed, load_packed
from hybrid_mamba.trainers.loop import make_accelerator, param_groups, train

REPO = Path(__file__).resolve().parents[1]
BASE = dict(
    model_preset="debug",
    model_overrides={"mamba_chunk_size": 16},
    micro_batch_size=4,
    max_steps=8,
    warmup_steps=2,
    learning_rate=3e-3,
    eval_every=4,
    checkpoint_every=4,
    log_every=1,
    sample_tokens=5,
)


def pretrain_command(tmp_path, data, name, launch="cpu", env=None, **overrides):
    """(command, environment) for `accelerate launch --config_file trainers/accelerate/<launch>.yaml -m hybrid_mamba.trainers.pretrain`."""
    cfg = {**BASE, "data_dir": str(data), "output_dir": str(tmp_path / name), **overrides}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "trainers" / "accelerate" / f"{launch}.yaml"),
    ]
    if launch != "cpu":
        cmd += ["--main_process_port", str(29500 + (os.getpid() + len(name)) % 1000)]
    cmd += ["-m", "hybrid_mamba.trainers.pretrain", "--config", str(path)]
    # cwd is tmp_path: the repository on PYTHONPATH makes the module importable without the editable install
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return cmd, {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath, **(env or {})}


def run_pretrain(tmp_path, data, name, launch="cpu", env=None, **overrides):
    """The pretraining run in a subprocess, to its end."""
    cmd, full_env = pretrain_command(tmp_path, data, name, launch, env, **overrides)
    return subprocess.run(cmd, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=600)


def logged_steps(run_dir) -> set[int]:
    path = Path(run_dir) / "metrics.jsonl"
    steps = set()
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a row being written
            continue
        if "loss" in row:
            steps.add(row["step"])
    return steps


def kill_after_step(tmp_path, data, name, step, launch="cpu", attempts=3, timeout=600, **overrides) -> int:
    """Start the run and SIGKILL its whole process group (launcher and every rank) from outside once
    metrics.jsonl has logged `step`; returns the launcher's exit status. A run that ends before the kill
    lands is deleted and started again, at most `attempts` times."""
    for _ in range(attempts):
        shutil.rmtree(tmp_path / name, ignore_errors=True)
        cmd, env = pretrain_command(tmp_path, data, name, launch, **overrides)
        log = tmp_path / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None and step not in logged_steps(tmp_path / name):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"step {step} not logged within {timeout} s:\n{log.read_text()[-3000:]}")
                time.sleep(0.05)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                return proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
        assert proc.returncode == 0, log.read_text()[-3000:]  # it failed on its own
    pytest.fail(f"the run ended before the kill after step {step}, {attempts} times")


def losses(run_dir):
    rows = [json.loads(r) for r in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, {
        r["step"]: r["val_loss"] for r in rows if "val_loss" in r
    }


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_data):
    """One process, micro-batch 4: the run every other layout must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    run = run_pretrain(root, tiny_data, "one")
    assert run.returncode == 0, run.stderr[-3000:]
    return root / "one"


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, tiny_data):
    """Two CPU processes through accelerate's FSDP2 path (trainers/accelerate/fsdp_cpu.yaml), micro-batch 2."""
    root = tmp_path_factory.mktemp("fsdp")
    run = run_pretrain(root, tiny_data, "fsdp", launch="fsdp_cpu", micro_batch_size=2)
    assert run.returncode == 0, run.stderr[-3000:]
    return root / "fsdp"


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_args_yaml_cli_and_typos(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 0.01\nmodel_overrides: {hidden_size: 32}\n")
    args = parse_args(PretrainArgs, ["--config", str(cfg), "--max_steps", "7"])
    assert (args.learning_rate, args.max_steps, args.model_overrides) == (0.01, 7, {"hidden_size": 32})
    with pytest.raises(
        ValueError, match=r"'learning_rat' \(did you mean 'learning_rate'\?\).*Valid fields: .*max_steps"
    ):
        parse_args(PretrainArgs, ["--config", str(cfg), "--learning_rat", "1"])
    cfg.write_text("max_step: 3\n")
    with pytest.raises(ValueError, match=r"'max_step' .* in .*c.yaml"):
        parse_args(PretrainArgs, ["--config", str(cfg)])
    for name in ("debug", "tiny", "130m", "370m", "1.3b"):  # shipped configs parse
        parse_args(PretrainArgs, ["--config", str(REPO / "trainers" / "configs" / f"{name}.yaml")])


def test_bad_data_dir_fails_before_work(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_scripts.prepare"):
        load_packed(str(tmp_path / "nowhere"))


def test_param_groups_exclude_norms_biases_embeddings_ssm():
    from conftest import tiny_config

    from hybrid_mamba.modeling import HybridMambaForCausalLM

    model = HybridMambaForCausalLM(tiny_config("hybrid", mamba_proj_bias=True))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert all(n.endswith(".weight") and "norm" not in n and "embed" not in n for n in decay_names)
    for suffix in (
        "A_log",
        "D",
        "dt_bias",
        "embed_tokens.weight",
        "input_layernorm.weight",
        "in_proj.bias",
        "mamba.norm.weight",
    ):
        assert any(n.endswith(suffix) for n in no_decay_names), suffix
    assert len(decay_names) + len(no_decay_names) == len(names)


@pytest.mark.slow
def test_resume_after_sigkill_reaches_the_same_loss(tmp_path, tiny_data, reference_run):
    assert kill_after_step(tmp_path, tiny_data, "killed", 6) == -signal.SIGKILL
    ckpts = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert ckpts == ["step_00000004"]
    resumed = run_pretrain(tmp_path, tiny_data, "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    train_full, val_full = losses(reference_run)
    train_resumed, val_resumed = losses(tmp_path / "killed")
    assert sorted(train_resumed) == list(range(1, 9))  # rows after the checkpoint were rewritten once
    assert train_resumed[8] == pytest.approx(train_full[8], abs=1e-6)
    assert val_resumed[8] == pytest.approx(val_full[8], abs=1e-6)
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["tokens_seen"] == 8 * 4 * 32
    assert "unigram_baseline_val_loss" in summary and summary["sample"]
    assert {
        "model.safetensors",
        "config.json",
        "modeling_hybrid_mamba.py",
        "tokenizer.json",
        "generation_config.json",
    } <= {p.name for p in (tmp_path / "killed" / "final").iterdir()}


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tiny_data, reference_run):
    two = run_pretrain(tmp_path, tiny_data, "two", launch="cpu_ddp", micro_batch_size=2)
    assert two.returncode == 0, two.stderr[-3000:]
    (train1, val1), (train2, val2) = losses(reference_run), losses(tmp_path / "two")
    assert sorted(train1) == sorted(train2) == list(range(1, 9))
    for step in train1:
        assert train2[step] == pytest.approx(train1[step], abs=2e-4), step
    assert val2[8] == pytest.approx(val1[8], abs=2e-4)
    hardware = json.loads((tmp_path / "two" / "summary.json").read_text())["hardware"]
    assert hardware["processes"] == 2 and hardware["distributed_type"] == "DistributedType.MULTI_CPU"
    assert hardware["parameters_per_process"] == hardware["parameters_total"]  # DDP replicates


@pytest.mark.slow
def test_fsdp_shards_parameters_and_matches_one_process(fsdp_run, reference_run):
    hardware = json.loads((fsdp_run / "summary.json").read_text())["hardware"]
    assert hardware["distributed_type"] == "DistributedType.FSDP" and hardware["processes"] == 2
    assert hardware["parameters_per_process"] <= 0.55 * hardware["parameters_total"]  # each rank holds about half
    (train1, val1), (train2, val2) = losses(reference_run), losses(fsdp_run)
    for step in train1:
        assert train2[step] == pytest.approx(train1[step], abs=2e-4), step
    assert val2[8] == pytest.approx(val1[8], abs=2e-4)
    shards = sorted(p.name for p in (fsdp_run / "checkpoints" / "step_00000004" / "pytorch_model_fsdp_0").iterdir())
    assert sum(name.endswith(".distcp") for name in shards) == 2  # one shard file per rank
    assert (fsdp_run / "final" / "model.safetensors").exists()  # the gathered full model


@pytest.mark.slow
def test_fsdp_resume_from_sharded_checkpoint(tmp_path, tiny_data, fsdp_run):
    assert kill_after_step(tmp_path, tiny_data, "fsdp", 6, launch="fsdp_cpu", micro_batch_size=2) == -signal.SIGKILL
    assert sorted(p.name for p in (tmp_path / "fsdp" / "checkpoints").iterdir()) == ["step_00000004"]
    resumed = run_pretrain(tmp_path, tiny_data, "fsdp", launch="fsdp_cpu", micro_batch_size=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(tmp_path / "fsdp")[0][8] == pytest.approx(losses(fsdp_run)[0][8], abs=1e-6)


def _in_process_args(tmp_path, data, **kw):
    return PretrainArgs(**{**BASE, "data_dir": str(data), "output_dir": str(tmp_path / "run"), **kw})


def _model(tok):
    from hybrid_mamba.configuration import get_preset
    from hybrid_mamba.modeling import HybridMambaForCausalLM

    torch.manual_seed(0)
    return HybridMambaForCausalLM(get_preset("debug", vocab_size=len(tok), mamba_chunk_size=16))


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, tiny_data):
    args = _in_process_args(tmp_path, tiny_data, checkpoint_every=2)
    train_ds, val_ds, tok = load_packed(args.data_dir)
    model = _model(tok)
    calls = {"n": 0}
    real_forward = model.forward

    def poisoned(*a, **k):
        out = real_forward(*a, **k)
        calls["n"] += 1
        if calls["n"] == 3 and out.loss is not None:
            out.loss = out.loss * float("nan")
        return out

    model.forward = poisoned
    with pytest.raises(FloatingPointError, match="step 3.*step_00000002"):
        train(args, make_accelerator(args), model, train_ds, val_ds, collate_packed, tok)
    ckpt = CheckpointManager(tmp_path / "run" / "checkpoints", 2)
    assert [p.name for p in ckpt.complete()] == ["step_00000002"]
    assert not list((tmp_path / "run" / "checkpoints").glob(".*tmp"))


def test_full_disk_during_checkpoint_keeps_the_previous_one(tmp_path, tiny_data, monkeypatch):
    args = _in_process_args(tmp_path, tiny_data, checkpoint_every=2, max_steps=6)
    train_ds, val_ds, tok = load_packed(args.data_dir)
    accelerator = make_accelerator(args)
    real_save = accelerator.save_state

    def save_state(output_dir, **kw):
        if output_dir.endswith("step_00000004.tmp"):
            Path(output_dir).mkdir(parents=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(output_dir, **kw)

    monkeypatch.setattr(accelerator, "save_state", save_state)
    with pytest.raises(RuntimeError, match="No space left.*step_00000002 is intact"):
        train(args, accelerator, _model(tok), train_ds, val_ds, collate_packed, tok)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]
    assert (root / "step_00000002" / "model.safetensors").stat().st_size > 1000


def test_resume_skips_a_truncated_checkpoint_and_continues_from_the_previous_one(tmp_path, tiny_data, caplog):
    args = _in_process_args(tmp_path, tiny_data, checkpoint_every=1, max_steps=3, eval_every=3, eval_batches=1)
    train_ds, val_ds, tok = load_packed(args.data_dir)
    first = train(args, make_accelerator(args), _model(tok), train_ds, val_ds, collate_packed, tok)
    train_first, _ = losses(tmp_path / "run")
    root = tmp_path / "run" / "checkpoints"
    damaged = root / "step_00000002"
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # what a full disk or a kill leaves

    AcceleratorState._reset_state(reset_partial_state=True)
    with caplog.at_level(logging.INFO, logger="hybrid_mamba.trainers"):
        resumed = train(args, make_accelerator(args), _model(tok), train_ds, val_ds, collate_packed, tok)
    assert f"skipping checkpoint {damaged}: size mismatch of model.safetensors" in caplog.text
    assert f"resumed from {root / 'step_00000001'} at step 1" in caplog.text
    train_resumed, _ = losses(tmp_path / "run")
    assert sorted(train_resumed) == [1, 2, 3]
    assert train_resumed[3] == pytest.approx(train_first[3], abs=1e-6)
    assert resumed["final_val_loss"] == pytest.approx(first["final_val_loss"], abs=1e-6)
    assert CheckpointManager(root, 2).latest() == damaged  # saved again at step 2, and it verifies


def test_resume_when_no_checkpoint_verifies_names_them(tmp_path, tiny_data):
    args = _in_process_args(tmp_path, tiny_data)
    root = tmp_path / "run" / "checkpoints"
    (root / "step_00000004").mkdir(parents=True)  # a checkpoint without a record
    (root / "step_00000004" / "model.safetensors").write_bytes(b"partial")
    train_ds, val_ds, tok = load_packed(args.data_dir)
    with pytest.raises(CheckpointError, match=r"step_00000004 \(no checkpoint.json record.*--resume false"):
        train(args, make_accelerator(args), _model(tok), train_ds, val_ds, collate_packed, tok)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # failed before any training


def test_summary_json_has_one_writer_and_takes_the_callers_keys(tmp_path, tiny_data):
    args = _in_process_args(tmp_path, tiny_data, max_steps=2, eval_every=2, eval_batches=1)
    train_ds, val_ds, tok = load_packed(args.data_dir)
    run = tmp_path / "run"

    def extras(summary):
        assert (run / "final" / "model.safetensors").exists() and not (run / "summary.json").exists()
        return {"unigram_baseline_val_loss": 1.0}

    summary = train(
        args, make_accelerator(args), _model(tok), train_ds, val_ds, collate_packed, tok, summary_extras=extras
    )
    written = json.loads((run / "summary.json").read_text())
    assert written == summary and list(written)[-1] == "unigram_baseline_val_loss"
    assert written["steps"] == 2 and written["best_step"] == 2
    assert not list(run.glob("*.tmp"))


def test_packed_data_with_a_labels_column_takes_the_loss_only_there(tmp_path):
    """A DATA split may carry `labels` (-100 where no loss is taken, as the synthetic tasks write them):
    the batches and the unigram baseline use them; without the column every token is a target."""
    from conftest import write_tiny_data
    from datasets import load_from_disk

    from hybrid_mamba.trainers.data import unigram_baseline

    data = write_tiny_data(tmp_path / "data")
    plain_train, plain_val, tok = load_packed(str(data))
    plain = collate_packed([plain_train[0], plain_train[1]])
    assert torch.equal(plain["labels"], plain["input_ids"])
    for split in ("train", "validation"):
        ds = load_from_disk(str(data / split))
        # targets: every third position only
        labels = [[t if i % 3 == 0 else -100 for i, t in enumerate(row)] for row in ds["input_ids"]]
        ds.add_column("labels", labels).save_to_disk(str(tmp_path / "labelled" / split))
    shutil.copytree(data / "tokenizer", tmp_path / "labelled" / "tokenizer")
    train_ds, val_ds, _ = load_packed(str(tmp_path / "labelled"))
    batch = collate_packed([train_ds[0], train_ds[1]])
    assert torch.equal(batch["input_ids"], plain["input_ids"])
    keep = torch.arange(batch["labels"].shape[1]) % 3 == 0
    assert torch.equal(batch["labels"][:, keep], batch["input_ids"][:, keep])
    assert (batch["labels"][:, ~keep] == -100).all()
    # the baseline is scored on the target positions only: different from the all-token one, and finite
    full = unigram_baseline(plain_train, plain_val, len(tok))
    targets = unigram_baseline(train_ds, val_ds, len(tok))
    assert math.isfinite(targets) and targets != full


def test_torch_compile_trains_the_same_and_keeps_checkpoints_portable(tmp_path, tiny_data):
    """Regional compilation (`torch_compile`): the same losses as eager, two graphs per grad mode whatever the
    depth, checkpoints and final/ under the uncompiled names (a compiled run resumes uncompiled), layers eager
    again after training. Traced with the eager backend: the same graphs as inductor without C++ compilation."""
    from safetensors import safe_open
    from torch._dynamo.utils import counters

    from hybrid_mamba.trainers.loop import compile_layers

    kw = dict(max_steps=4, checkpoint_every=2, eval_every=4, eval_batches=1)
    train_ds, val_ds, tok = load_packed(str(tiny_data))
    eager_args = _in_process_args(tmp_path / "eager", tiny_data, **kw)
    train(eager_args, make_accelerator(eager_args), _model(tok), train_ds, val_ds, collate_packed, tok)
    AcceleratorState._reset_state(reset_partial_state=True)

    torch._dynamo.reset()
    counters.clear()
    args = _in_process_args(tmp_path / "compiled", tiny_data, torch_compile=True, torch_compile_backend="eager", **kw)
    model = _model(tok)
    assert {"attention", "mamba"} <= set(model.config.layer_types) and len(model.config.layer_types) > 2
    summary = train(args, make_accelerator(args), model, train_ds, val_ds, collate_packed, tok)
    graphs = counters["stats"]["unique_graphs"]
    assert 2 <= graphs <= 6, graphs  # (Mamba, attention) x (training, no_grad evaluation), not one per layer
    assert summary["hardware"]["torch_compile"] == "eager"
    assert all(layer._compiled_call_impl is None for layer in model.model.layers)

    eager_loss, eager_val = losses(tmp_path / "eager" / "run")
    compiled_loss, compiled_val = losses(tmp_path / "compiled" / "run")
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5) and compiled_val == pytest.approx(eager_val, rel=1e-5)
    names = []
    for run in ("eager", "compiled"):
        with safe_open(tmp_path / run / "run" / "final" / "model.safetensors", "pt") as f:
            names.append(sorted(f.keys()))
    assert names[0] == names[1] and not any("_orig_mod" in n for n in names[1])

    # the compiled run's step-2 checkpoint resumes in an uncompiled run and reaches the same losses
    AcceleratorState._reset_state(reset_partial_state=True)
    shutil.rmtree(tmp_path / "compiled" / "run" / "final")
    (tmp_path / "compiled" / "run" / "metrics.jsonl").unlink()
    resumed_args = _in_process_args(tmp_path / "compiled", tiny_data, **kw)
    train(resumed_args, make_accelerator(resumed_args), _model(tok), train_ds, val_ds, collate_packed, tok)
    resumed_loss, _ = losses(tmp_path / "compiled" / "run")
    assert min(resumed_loss) == 3 and resumed_loss == pytest.approx({s: eager_loss[s] for s in (3, 4)}, rel=1e-5)

    with pytest.raises(ValueError, match="no repeated layers"):
        compile_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_torch_compile_bad_backend_and_fsdp_fail_before_work(tmp_path, tiny_data, monkeypatch):
    with pytest.raises(ValueError, match="not a torch.compile backend.*inductor"):
        _in_process_args(tmp_path, tiny_data, torch_compile=True, torch_compile_backend="inductr")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "inductor")
    args = _in_process_args(tmp_path, tiny_data, torch_compile=True)
    with pytest.raises(ValueError, match="both on: keep one"):
        make_accelerator(args)
