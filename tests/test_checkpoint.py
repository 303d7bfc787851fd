"""Checkpoint records: a damaged or unrecorded checkpoint is skipped with a warning, never loaded."""

import json
import logging

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

import hybrid_mamba.trainers.checkpoint  # noqa: F401  (trainers.checkpoint below)
from hybrid_mamba import trainers
from hybrid_mamba.common.args import parse_args
from hybrid_mamba.trainers.args import PretrainArgs
from hybrid_mamba.trainers.checkpoint import RECORD, CheckpointError, CheckpointManager


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def saved(tmp_path):
    """Checkpoints of steps 1, 2, 3 of a tiny model trained with a real CPU Accelerator."""
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(16, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    ckpt = CheckpointManager(tmp_path / "checkpoints", keep=5)
    for step in (1, 2, 3):
        model(torch.randn(4, 16)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ckpt.save(accelerator, step)
    return ckpt, accelerator


def _names(paths):
    return [p.name for p in paths]


def test_record_lists_every_file_with_size_and_hash(saved):
    ckpt, _ = saved
    assert _names(ckpt.folders()) == _names(ckpt.complete()) == ["step_00000001", "step_00000002", "step_00000003"]
    folder = ckpt.root / "step_00000003"
    record = json.loads((folder / RECORD).read_text())
    assert record["format"] == 1 and record["step"] == 3
    files = {f["path"]: f for f in record["files"]}
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {RECORD}
    assert set(files) == on_disk and {"model.safetensors", "optimizer.bin", "random_states_0.pkl"} <= on_disk
    assert files["model.safetensors"]["size"] == (folder / "model.safetensors").stat().st_size
    assert all(len(f["sha256"]) == 64 for f in files.values())
    assert not list(ckpt.root.glob(".*")) and not list(ckpt.root.rglob(RECORD + ".tmp"))


def test_truncated_newest_is_skipped_with_its_path(saved, caplog):
    ckpt, _ = saved
    damaged = ckpt.root / "step_00000003"
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="hybrid_mamba.trainers.checkpoint"):
        assert ckpt.latest() == ckpt.root / "step_00000002"
    size = next(
        f["size"] for f in json.loads((damaged / RECORD).read_text())["files"] if f["path"] == "model.safetensors"
    )
    assert [r.getMessage() for r in caplog.records] == [
        f"skipping checkpoint {damaged}: size mismatch of model.safetensors: 100 bytes, {size} recorded"
    ]


def test_flipped_byte_is_caught_by_the_hash(saved, caplog):
    ckpt, _ = saved
    weights = ckpt.root / "step_00000003" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # a weight byte, same size
    weights.write_bytes(bytes(data))
    fresh = CheckpointManager(ckpt.root, keep=5)  # as on resume: nothing hashed yet in this process
    with caplog.at_level(logging.WARNING, logger="hybrid_mamba.trainers.checkpoint"):
        assert fresh.latest() == ckpt.root / "step_00000002"
        assert ckpt.latest() == ckpt.root / "step_00000002"  # also the manager that wrote it
    assert f"{ckpt.root / 'step_00000003'}: hash mismatch of model.safetensors" in caplog.text
    assert not fresh.verify(ckpt.root / "step_00000003") and fresh.verify(ckpt.root / "step_00000002")


def test_folder_without_record_is_skipped(saved, caplog):
    ckpt, _ = saved
    (ckpt.root / "step_00000003" / RECORD).unlink()  # a save killed before its record, or an old run
    with caplog.at_level(logging.WARNING, logger="hybrid_mamba.trainers.checkpoint"):
        assert ckpt.latest() == ckpt.root / "step_00000002"
    assert f"skipping checkpoint {ckpt.root / 'step_00000003'}: no {RECORD} record" in caplog.text
    caplog.clear()
    with caplog.at_level(
        logging.WARNING, logger="hybrid_mamba.trainers.checkpoint"
    ):  # another rank: same answer, no output
        assert CheckpointManager(ckpt.root, keep=5, main_process=False).latest() == ckpt.root / "step_00000002"
    assert not caplog.records


def test_none_verifies_raises_one_error_naming_them(saved):
    ckpt, _ = saved
    (ckpt.root / "step_00000001" / RECORD).unlink()
    (ckpt.root / "step_00000002" / "optimizer.bin").unlink()
    (ckpt.root / "step_00000003" / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        ckpt.latest()
    message = str(err.value)
    for step, why in (
        (1, "no checkpoint.json record"),
        (2, "missing file optimizer.bin"),
        (3, "size mismatch of model.safetensors"),
    ):
        assert f"{ckpt.root / f'step_{step:08d}'} ({why}" in message
    assert "\n" not in message and "Delete these folders" in message
    assert "--resume false" in message and parse_args(PretrainArgs, ["--resume", "false"]).resume is False
    assert isinstance(err.value, RuntimeError)


def test_no_checkpoints_is_none(tmp_path):
    assert CheckpointManager(tmp_path / "missing", keep=2).latest() is None
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".step_00000004.tmp").mkdir()  # an interrupted save's leftover is no checkpoint
    assert CheckpointManager(tmp_path / "empty", keep=2).latest() is None


def test_pruning_counts_only_verified_and_keeps_damaged_folders(saved):
    ckpt, accelerator = saved
    (ckpt.root / "step_00000002" / "model.safetensors").write_bytes(b"x")
    (ckpt.root / "step_00000005").mkdir()  # no record, e.g. written by an older version
    ckpt.keep = 2
    ckpt.save(accelerator, 4)
    # verified: 4, 3 (kept), 1 (deleted); 2 and 5 do not verify and stay for inspection
    assert _names(ckpt.folders()) == ["step_00000002", "step_00000003", "step_00000004", "step_00000005"]
    assert _names(ckpt.complete()) == ["step_00000003", "step_00000004"]


def test_saving_a_step_again_replaces_a_damaged_folder(saved):
    ckpt, accelerator = saved
    (ckpt.root / "step_00000003" / "model.safetensors").write_bytes(b"x")
    assert ckpt.latest() == ckpt.root / "step_00000002"
    ckpt.save(accelerator, 3)  # what a run resumed from step 2 does when it reaches step 3
    assert CheckpointManager(ckpt.root, keep=5).latest() == ckpt.root / "step_00000003"


def test_failed_record_write_keeps_the_previous_checkpoint(saved, monkeypatch):
    ckpt, accelerator = saved

    def full_disk(folder, step):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainers.checkpoint, "write_record", full_disk)
    with pytest.raises(RuntimeError, match="step 4 failed.*No space left.*step_00000003 is intact"):
        ckpt.save(accelerator, 4)
    assert sorted(_names(ckpt.root.iterdir())) == ["step_00000001", "step_00000002", "step_00000003"]
