"""Build fingerprint and atomic output folders.

The fingerprint hashes everything the output depends on: the resolved recipe, the content of every
input file, this package's code and the versions of the libraries that shape the bytes. A finished
output holds it in ``fingerprint.json``; a rerun that computes the same one leaves the output as it is.
Hub sources enter by name, configuration, split and revision: pin ``revision`` for reproducible builds.

Outputs are written to a hidden sibling ``.NAME.tmp-PID`` and renamed into place only when complete,
so an interrupted run never leaves a half-written folder where a good one stood; leftovers of killed
runs are cleaned up by the next run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from importlib import metadata
from pathlib import Path

from .recipe import Recipe, SourceFiles

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "fingerprint.json"
REQUIRED = ("train", "validation", "tokenizer", "report.json", "report.md", "recipe.yaml", FINGERPRINT_FILE)
_LIBRARIES = ("datasets", "pyarrow", "tokenizers", "transformers", "datasketch", "lingua-language-detector", "phonenumberslite", "numpy")


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def code_digest() -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in sorted(Path(__file__).parent.glob("*.py")):
        if p.name == "bench.py":  # measures, writes nothing into builds
            continue
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def fingerprint(recipe: Recipe, files: list[SourceFiles | None]) -> dict:
    inputs = {}
    for s, f in zip(recipe.sources, files, strict=True):
        if f is None:
            inputs[s.name] = {"dataset": s.dataset, "config": s.config, "split": s.split, "revision": s.revision}
        else:
            inputs[s.name] = [[i, p.stat().st_size, _file_digest(p)] for i, p in zip(f.ids, f.paths, strict=True)]
    versions = {}
    for lib in _LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    state = {"recipe": recipe.to_dict(), "inputs": inputs, "code": code_digest(), "versions": versions}
    digest = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()
    return {"fingerprint": digest, "code": state["code"], "versions": versions}


def is_current(out: Path, fp: dict) -> bool:
    """True when ``out`` is a complete build with this fingerprint."""
    f = out / FINGERPRINT_FILE
    if not f.is_file() or not all((out / name).exists() for name in REQUIRED):
        return False
    try:
        return json.loads(f.read_text())["fingerprint"] == fp["fingerprint"]
    except (ValueError, KeyError):
        return False


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
def atomic_dir(target: Path):
    """Yield a temporary folder that replaces ``target`` only if the block finishes without error."""
    target = Path(os.path.abspath(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
