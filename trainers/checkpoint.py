"""Checkpoints that survive being killed: written under a temporary name, renamed when complete.

Layout: RUN/checkpoints/step_00000400/ (an `accelerator.save_state` folder). A folder with the final
name is complete by construction; `.step_*.tmp` folders are leftovers of an interrupted save and
are removed. The newest `keep` complete checkpoints are kept.
"""

import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)


class CheckpointManager:
    def __init__(self, root: Path, keep: int):
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be at least 1, got {keep}.")
        self.root = Path(root)
        self.keep = keep

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("step_"))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, accelerator, step: int) -> Path:
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".step_{step:08d}.tmp"
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".step_*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(tmp))
        except (OSError, RuntimeError) as err:
            shutil.rmtree(tmp, ignore_errors=True)
            previous = self.latest()
            raise RuntimeError(
                f"Writing checkpoint step {step} failed ({err}). The previous checkpoint "
                f"{previous or '(none)'} is intact; free disk space and rerun to resume from it."
            ) from err
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if final.exists():  # the same step saved again after a resume
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            logger.info("saved checkpoint %s", final)
        accelerator.wait_for_everyone()
        return final


def atomic_save_pretrained(model, tokenizer, folder: Path, **kwargs) -> None:
    """`save_pretrained` of model (and tokenizer) into `folder`, replacing it only once complete."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    _fsync_dir(folder.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
