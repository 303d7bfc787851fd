"""Build fingerprint of an output folder.

The fingerprint hashes everything the output depends on: the resolved recipe, the content of every
input file, this package's code and the versions of the libraries that shape the bytes. A finished
output holds it in ``fingerprint.json``; a rerun that computes the same one leaves the output as it is.
Hub sources enter by name, configuration, split and revision: pin ``revision`` for reproducible builds.

Outputs are written atomically by ``common.files.atomic_dir``: a hidden sibling ``.NAME.tmp-PID``
renamed into place only when complete, so an interrupted run never leaves a half-written folder where
a good one stood; leftovers of killed runs are cleaned up by the next run.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

from .recipe import Recipe, SourceFiles

FINGERPRINT_FILE = "fingerprint.json"
REQUIRED = ("train", "validation", "tokenizer", "report.json", "report.md", "recipe.yaml", FINGERPRINT_FILE)
_LIBRARIES = (
    "datasets",
    "pyarrow",
    "tokenizers",
    "transformers",
    "datasketch",
    "lingua-language-detector",
    "phonenumberslite",
    "numpy",
)


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def code_digest() -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in sorted(Path(__file__).parent.glob("*.py")):
        if p.name == "bench.py" or p.name.startswith("bench_"):  # measure, write nothing into builds
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
