"""Loaders of the offline held-out tasks; data paths come from this file's location, so
`--include_path eval_harness/tasks` works from any directory. Uses only datasets."""

from pathlib import Path

import datasets

DATA = Path(__file__).resolve().parent / "data"


def _load(name: str) -> datasets.DatasetDict:
    path = DATA / f"{name}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: rebuild it with `python -m hybrid_mamba.eval_harness.build_tasks`")
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(path))})


def load_ppl(**kwargs) -> datasets.DatasetDict:
    """Held-out text pieces: {"text", "source"}. kwargs: lm-eval's metadata, unused."""
    return _load("heldout_ppl")


def load_mc(**kwargs) -> datasets.DatasetDict:
    """Four-way continuation items: {"context", "choices", "label", "source"}."""
    return _load("heldout_mc")
