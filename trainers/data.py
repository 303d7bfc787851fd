"""Reading the packed token blocks written by data_scripts (DATA/train, DATA/validation, DATA/tokenizer)."""

import math
from pathlib import Path

import numpy as np
import torch
from datasets import load_from_disk
from torch.utils.data import Sampler
from transformers import AutoTokenizer

COLUMNS = ("input_ids", "position_ids")
# Optional: per-token targets with -100 where no loss is taken (a task's answer tokens only, as the
# synthetic tasks of data_scripts.synthetic write them); without it every token is a target.
LABELS = "labels"


def load_packed(data_dir: str):
    """(train, validation, tokenizer), checked before any training work starts."""
    root = Path(data_dir)
    missing = [name for name in ("train", "validation", "tokenizer") if not (root / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"{root} lacks {missing}: it must be a DATA/ folder written by "
            "`python -m hybrid_mamba.data_scripts.prepare --recipe ... --output DATA`."
        )
    splits = []
    for name in ("train", "validation"):
        ds = load_from_disk(str(root / name))
        if absent := [c for c in COLUMNS if c not in ds.column_names]:
            raise ValueError(f"{root / name} has no column(s) {absent}; columns are {ds.column_names}.")
        if len(ds) == 0:
            raise ValueError(f"{root / name} is empty.")
        columns = list(COLUMNS) + ([LABELS] if LABELS in ds.column_names else [])
        splits.append(ds.with_format("torch", columns=columns))
    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    return splits[0], splits[1], tokenizer


def collate_packed(rows: list[dict]) -> dict:
    input_ids = torch.stack([r["input_ids"] for r in rows]).long()
    position_ids = torch.stack([r["position_ids"] for r in rows]).long()
    labels = torch.stack([r[LABELS] for r in rows]).long() if LABELS in rows[0] else input_ids
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


class EpochSampler(Sampler):
    """A seeded permutation per epoch: the data order is a function of (seed, epoch) alone, so a
    resumed run replays it exactly."""

    def __init__(self, length: int, seed: int, shuffle: bool = True):
        self.length, self.seed, self.shuffle, self.epoch = length, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.length))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=g).tolist())

    def __len__(self) -> int:
        return self.length


def unigram_baseline(train, validation, vocab_size: int, max_tokens: int = 20_000_000) -> float:
    """Cross-entropy (nats/token) on validation of the train split's unigram distribution (add-one),
    over the target tokens (those of a `labels` column where there is one)."""

    def targets(batch, column):
        ids = np.asarray(batch[column])[:, 1:]  # the positions the model is scored on
        return ids[ids != -100]

    column = LABELS if LABELS in train.column_names else "input_ids"
    counts = np.zeros(vocab_size, dtype=np.float64)
    seen = 0
    for batch in train.with_format("numpy").iter(batch_size=1024):
        ids = targets(batch, column)
        counts += np.bincount(ids, minlength=vocab_size)[:vocab_size]
        seen += ids.size
        if seen >= max_tokens:
            break
    logp = np.log((counts + 1) / (counts.sum() + vocab_size))
    total, n = 0.0, 0
    for batch in validation.with_format("numpy").iter(batch_size=1024):
        ids = targets(batch, LABELS if LABELS in validation.column_names else "input_ids")
        total -= logp[ids].sum()
        n += ids.size
    return total / max(n, 1) if n else math.nan
