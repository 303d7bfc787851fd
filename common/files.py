"""Writes that never leave half a file or half a folder where a good one stood.

A file is written to a hidden sibling `.NAME.<pid>.<random>.tmp`, flushed and fsynced, renamed over
`NAME` with os.replace, and the parent folder is fsynced: a reader (or the machine after a power
loss) sees the old file or the new one, never a mix. When the write fails the sibling is removed and
the old file is untouched.

A folder is built in a hidden sibling `.NAME.tmp-<pid>` (`atomic_dir`); when the block finishes
without error every file in it is fsynced, the old folder is renamed to `.NAME.old-<pid>`, the new
one into place, and only then is the old one deleted. Leftovers of a killed process (its pid no
longer alive) are removed by the next `atomic_dir` on the same target, and an `.old-<pid>` folder
whose swap was interrupted before the new one arrived is renamed back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in folder `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every folder (innermost first), then `root` itself."""
    root = Path(root)
    folders = []
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_dir():
            folders.append(path)
        elif path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(folder)
    fsync_dir(root)


@contextlib.contextmanager
def atomic_file(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block finishes, its file replaces `path`.

    The caller writes the temporary file by name (for writers that take a path, like savefig). It is
    created empty with the permissions a plain `open(path, "w")` would give (0666 minus the umask).
    On an error the temporary file is removed and `path` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text` (UTF-8) all at once and durably; parent folders are created."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json_atomic(path: Path, obj, *, indent: int | None = 2, **dumps_kwargs) -> None:
    """`json.dumps(obj, indent=indent, **dumps_kwargs)` and a newline, written with write_text_atomic.

    The object is serialised before anything is written, so a value JSON cannot hold leaves the old
    file in place.
    """
    write_text_atomic(path, json.dumps(obj, indent=indent, **dumps_kwargs) + "\n")


def save_figure(fig, path: Path, dpi: int = 100) -> None:
    """Save a matplotlib figure as PNG through a temporary file, and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_file(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_leftovers(target: Path) -> None:
    for p in target.parent.glob(f".{target.name}.*-*"):
        kind, _, pid = p.name[len(target.name) + 2 :].partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not target.exists():
            logger.warning("restoring %s from an interrupted swap", target)
            os.rename(p, target)
        else:
            logger.info("removing %s left by an interrupted run", p)
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces `target` only if the block finishes without error.

    On an error the temporary folder is removed and `target` is left as it was.
    """
    target = Path(os.path.abspath(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.rename(target, old)
    os.rename(tmp, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
