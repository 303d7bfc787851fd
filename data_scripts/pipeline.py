"""The stages run in order, in memory (Arrow datasets, ``num_proc`` workers) or as streams.

Both modes use the same batch functions; they differ in what needs the whole corpus:

- in memory: the percentile cut sees every score of a source; dedup decisions run in one pass after
  signatures are computed in parallel; the tokenizer trains on all curated text (up to
  ``train_max_bytes``); budgets without ``total_tokens`` come from what the sources hold.
- streaming (``IterableDataset``): the percentile cut and the tokenizer use the leading documents of
  each source (``quality.sample_docs``, ``tokenizer.train_max_bytes`` by weight); dedup decisions are
  made as documents go by, shared across sources; the budget is ``total_tokens``; the report counts the
  documents that were read.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, concatenate_datasets
from tqdm.auto import tqdm

from .dedup import Deduplicator, signature_batch
from .filters import (
    language_batch,
    length_batch,
    percentile_batch,
    percentile_cuts,
    quality_batch,
)
from .mixture import (
    ArrayDocSource,
    BudgetError,
    DocSource,
    IterDocSource,
    Mixer,
    split_budget,
)
from .normalize import normalize_batch
from .pack import Packer, block_features, save_blocks
from .pii import pii_batch
from .recipe import Recipe, SourceFiles
from .report import CurationReport
from .sources import load_source, stream_source
from .tokenizer import EOS, load_existing, tokenize_batch, train_tokenizer

logger = logging.getLogger(__name__)

REPORT_COLUMNS = [
    "id",
    "source",
    "reason",
    "note",
    "num_tokens",
    "num_chars",
    "invalid_utf8",
    "control_chars",
    "normalized",
    "pii_email",
    "pii_phone",
    "pii_ip",
    "pii_key",
]
# Batch sizes: documents can be whole books, so batches stay small enough to spread over workers.
BATCH = 64
LANGUAGE_BATCH = 256


@dataclass
class Build:
    recipe: Recipe
    files: list[SourceFiles | None]
    out: Path  # the temporary output folder
    fingerprint: str
    num_proc: int = 1

    @property
    def work(self) -> Path:
        return self.out / "_work"

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.recipe.sources]

    @property
    def filters(self) -> list:
        return [s.filters for s in self.recipe.sources]

    def stage_fp(self, stage: str) -> str:
        return hashlib.sha256(f"{self.fingerprint}:{stage}".encode()).hexdigest()[:32]


# --- in memory ----------------------------------------------------------------------------------


def _map(
    b: Build,
    ds: Dataset,
    fn,
    stage: str,
    fn_kwargs: dict | None = None,
    parallel: bool = True,
    batch_size: int = BATCH,
    with_indices: bool = False,
) -> Dataset:
    # Workers pay off even for a few hundred documents when they are books; below ~8 per worker, not.
    num_proc = b.num_proc if parallel and b.num_proc > 1 and len(ds) >= 8 * b.num_proc else None
    start = time.perf_counter()
    out = ds.map(
        fn,
        batched=True,
        with_indices=with_indices,
        batch_size=batch_size,
        fn_kwargs=fn_kwargs or {},
        num_proc=num_proc,
        new_fingerprint=b.stage_fp(stage),
        load_from_cache_file=False,
        desc=stage,
    )
    _drop_cache_files(ds, out)
    logger.info("%s: %d documents in %.2f s", stage, len(ds), time.perf_counter() - start)
    return out


def _drop_cache_files(old: Dataset, new: Dataset) -> None:
    """Each stage rewrites the table; the previous one is no longer needed (Linux keeps open maps)."""
    keep = {f["filename"] for f in new.cache_files}
    for f in old.cache_files:
        if f["filename"] not in keep and "cache-" in os.path.basename(f["filename"]):
            os.remove(f["filename"])


def curate_in_memory(b: Build) -> tuple[Dataset, np.ndarray, str, int]:
    """All stages up to tokenization; returns (dataset, its row order, tokenizer.json path, eos id)."""
    r = b.recipe
    parts = [
        load_source(s, i, b.files[i], cache_dir=str(b.work / "load" / s.name), fingerprint=b.stage_fp(f"load-{i}"))
        for i, s in enumerate(r.sources)
    ]
    ds = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    logger.info("loaded %d documents from %d sources", len(ds), len(parts))
    # Sources come in contiguous runs and workers get contiguous shards: a seeded shuffle spreads each
    # source's documents (whole books here, short files there) evenly over the workers. Row i of the
    # shuffled table is row perm[i] of the reading order, in which dedup decides and the report reads.
    perm = np.random.default_rng([r.seed, len(ds)]).permutation(len(ds))
    ds = ds.select(perm)
    fk = {"filters": b.filters}
    ds = _map(b, ds, normalize_batch, "normalize")
    ds = _map(b, ds, length_batch, "length", fk, parallel=False, batch_size=1000)
    ds = _map(b, ds, language_batch, "language", fk, parallel=False, batch_size=LANGUAGE_BATCH)
    ds = _map(b, ds, quality_batch, "quality", fk)
    cols = _columns(ds, ["source", "reason", "quality_score"])
    kept = cols["reason"] == ""
    cuts = percentile_cuts(cols["quality_score"][kept], cols["source"][kept], b.filters)
    if any(np.isfinite(c) for c in cuts):
        ds = _map(b, ds, percentile_batch, "percentile", {"cuts": cuts}, parallel=False, batch_size=1000)
    ds = _map(b, ds, pii_batch, "pii", fk)
    if r.dedup.exact or r.dedup.near:
        ds = _map(b, ds, signature_batch, "signature", {"cfg": r.dedup, "seed": r.seed})
        dd = Deduplicator(r.dedup, r.seed)
        in_order: list[str] = []
        sig = ds.select_columns(["reason", "exact_hash", "minhash"]).select(np.argsort(perm))
        for batch in tqdm(sig.iter(batch_size=1000), total=-(-len(ds) // 1000), desc="dedup"):
            in_order += dd.decide_batch(batch)["reason"]
        reasons = np.array(in_order, dtype=object)[perm].tolist()
        ds = _map(
            b,
            ds.remove_columns(["minhash"]),
            _set_reasons,
            "dedup",
            {"reasons": reasons},
            parallel=False,
            batch_size=1000,
            with_indices=True,
        )
    n_kept = int((_columns(ds, ["reason"])["reason"] == "").sum())
    tokenizer_file, eos_id = _tokenizer(b, _kept_texts(ds, r), length=n_kept)
    ds = _map(
        b,
        ds,
        tokenize_batch,
        "tokenize",
        {"tokenizer_file": tokenizer_file, "eos_id": eos_id},
        parallel=False,
        batch_size=256,
    )
    return ds, perm, tokenizer_file, eos_id


def _columns(ds: Dataset, names: list[str]) -> dict[str, np.ndarray]:
    """Whole columns as numpy arrays with their stored dtypes (the numpy format would cast floats to float32)."""
    table = ds.select_columns(names).with_format("arrow")[:]
    return {n: table.column(n).to_numpy(zero_copy_only=False) for n in names}


def _set_reasons(batch: dict, indices: list[int], reasons: list[str]) -> dict:
    return {"reason": [reasons[i] for i in indices]}


def _kept_texts(ds: Dataset, r: Recipe):
    """Curated text for the tokenizer, each source capped at its weight's share of ``train_max_bytes``."""
    caps = [int(share * r.tokenizer.train_max_bytes) for share in r.shares]
    used = [0] * len(caps)
    for batch in ds.select_columns(["text", "reason", "source"]).iter(batch_size=256):
        for text, reason, src in zip(batch["text"], batch["reason"], batch["source"], strict=True):
            if reason or used[src] >= caps[src]:
                continue
            used[src] += len(text.encode("utf-8"))
            yield text


def _tokenizer(b: Build, texts, length: int | None) -> tuple[str, int]:
    out = b.out / "tokenizer"
    start = time.perf_counter()
    if b.recipe.tokenizer.path:
        tok = load_existing(b.recipe.tokenizer.path)
        tok.save_pretrained(out)
    else:
        tok = train_tokenizer(texts, b.recipe.tokenizer, out, length=length)
        logger.info("tokenizer: trained in %.2f s", time.perf_counter() - start)
    return str(out / "tokenizer.json"), int(tok.convert_tokens_to_ids(tok.eos_token))


class _Docs:
    """docs[i] -> the i-th document's token ids (a numpy view into the Arrow table)."""

    def __init__(self, ds: Dataset):
        self.ds = ds.with_format("numpy")

    def __getitem__(self, i: int) -> np.ndarray:
        return self.ds[i]["input_ids"]


def build_in_memory(b: Build) -> dict:
    r = b.recipe
    ds, perm, tokenizer_file, eos_id = curate_in_memory(b)
    report = CurationReport(b.names)
    in_order = np.argsort(perm)
    for batch in ds.select_columns(REPORT_COLUMNS).select(in_order).iter(batch_size=10_000):
        report.update(batch)
    rows = report.missing_example_rows()  # positions in reading order
    texts = ds.select(in_order[rows])["text"] if rows else []
    report.fill_example_texts(dict(zip(rows, texts, strict=True)))

    cols = _columns(ds, ["source", "reason", "num_tokens"])
    sources: list[DocSource] = []
    available = []
    for i in range(len(r.sources)):
        idx = np.nonzero((cols["reason"] == "") & (cols["source"] == i))[0]
        if idx.size == 0:
            raise BudgetError(f"source '{r.sources[i].name}': no document survived curation; see the report's removals")
        lengths = cols["num_tokens"][idx].astype(np.int64)
        available.append(int(lengths.sum()))
        docs = _Docs(ds.select(idx).select_columns(["input_ids"]))
        sources.append(ArrayDocSource(docs, lengths, r.seed, i, repeat=r.max_epochs > 1))

    if r.total_tokens is not None:
        total = r.total_tokens
    else:
        total = int(min(a * r.max_epochs / s for a, s in zip(available, r.shares, strict=True)))
    val_total = _whole_blocks(round(total * r.validation_fraction), r.seq_len)
    val_budgets = split_budget(val_total, r.shares)
    for i, (need, have) in enumerate(zip(val_budgets, available, strict=True)):
        if need > have:
            raise BudgetError(
                f"source '{r.sources[i].name}': validation needs {need:,} tokens but the source has {have:,}"
            )
    splits = {}
    splits["validation"] = _pack_split(b, "validation", sources, val_budgets, eos_id)
    for s in sources:
        s.start_train()
    remaining = [s.remaining_tokens() for s in sources]
    if r.total_tokens is not None:
        train_total = total - val_total
    else:
        train_total = min(
            total - val_total, int(min(a * r.max_epochs / s for a, s in zip(remaining, r.shares, strict=True)))
        )
    train_total = _whole_blocks(train_total, r.seq_len)
    train_budgets = split_budget(train_total, r.shares)
    for i, (need, have) in enumerate(zip(train_budgets, remaining, strict=True)):
        if need > have * r.max_epochs:
            raise BudgetError(
                f"source '{r.sources[i].name}': train needs {need:,} tokens (its share of total_tokens) but the "
                f"source has {have:,} after curation and validation, at most {r.max_epochs} epochs. "
                f"Lower total_tokens or the source's weight, or raise max_epochs."
            )
    splits["train"] = _pack_split(b, "train", sources, train_budgets, eos_id, available_train=remaining)
    splits = {"train": splits["train"], "validation": splits["validation"]}
    return _assemble(b, report, splits, tokenizer_file)


# --- packing, shared ----------------------------------------------------------------------------


def _whole_blocks(tokens: int, seq_len: int) -> int:
    """Split budgets are whole blocks, so the packer fills its last block exactly and drops nothing."""
    return int(tokens) // seq_len * seq_len


def _pack_split(
    b: Build,
    split: str,
    sources: list[DocSource],
    budgets: list[int],
    eos_id: int,
    available_train: list[int] | None = None,
) -> dict:
    r = b.recipe
    if sum(budgets) < r.seq_len:
        raise BudgetError(
            f"the {split} split would get {sum(budgets):,} tokens, less than one block of {r.seq_len}; raise total_tokens or validation_fraction"
        )
    b.work.mkdir(parents=True, exist_ok=True)
    arrow = b.work / f"{split}.arrow"
    packer = Packer(arrow, r.seq_len, b.names)
    mixer = Mixer(sources, budgets, eos_id, b.names)
    with tqdm(total=sum(budgets), unit="tok", unit_scale=True, desc=f"mix and pack {split}") as bar:
        for src, doc in mixer:
            packer.add(src, doc)
            bar.update(len(doc))
    stats = packer.close()
    save_blocks(
        arrow,
        b.out / split,
        block_features(r.seq_len, b.names),
        split,
        b.stage_fp(f"blocks-{split}"),
        description=f"{r.name}: {split} blocks of {r.seq_len} tokens packed by data_scripts.prepare",
    )
    arrow.unlink()
    total_tokens = stats["blocks"] * r.seq_len
    per_source = {}
    for i, name in enumerate(b.names):
        u = mixer.uses[i]
        tokens = stats["tokens_per_source"][i]
        # Passes over the source's train documents (>1: repeated); unknown for streams and validation.
        epochs = u.tokens / available_train[i] if available_train and available_train[i] else None
        per_source[name] = {
            "target_share": r.shares[i],
            "achieved_share": tokens / total_tokens if total_tokens else 0.0,
            "tokens": tokens,
            "budget": u.budget,
            "emitted_tokens": u.tokens,
            "documents": u.docs,
            "truncated_documents": u.truncated,
            "epochs": epochs,
        }
    return {
        "blocks": stats["blocks"],
        "tokens": total_tokens,
        "budget_tokens": sum(budgets),
        "dropped_tail_tokens": stats["dropped_tail_tokens"],
        "stopped_early_by": mixer.exhausted,
        "sources": per_source,
    }


def _assemble(b: Build, report: CurationReport, splits: dict, tokenizer_file: str) -> dict:
    from tokenizers import Tokenizer

    r = b.recipe
    stages = report.stages()
    dedup = stages["dedup"]
    mixture, pack = {}, {}
    for i, name in enumerate(b.names):
        used_docs = sum(s["sources"][name]["documents"] for s in splits.values())
        emitted = sum(s["sources"][name]["emitted_tokens"] for s in splits.values())
        in_blocks = sum(s["sources"][name]["tokens"] for s in splits.values())
        mixture[name] = {
            "docs_in": dedup[name]["docs_out"],
            "docs_out": used_docs,
            "tokens_in": dedup[name]["tokens_out"],
            "tokens_out": emitted,
            "chars_in": dedup[name]["chars_out"],
            "chars_out": None,
            "removed": {},
            "truncated_documents": sum(s["sources"][name]["truncated_documents"] for s in splits.values()),
        }
        pack[name] = {
            "docs_in": used_docs,
            "docs_out": used_docs,
            "tokens_in": emitted,
            "tokens_out": in_blocks,
            "chars_in": None,
            "chars_out": None,
            "removed": {},
        }
    stages["mixture"] = mixture
    stages["pack"] = pack
    vocab_size = Tokenizer.from_file(tokenizer_file).get_vocab_size()
    return {
        "recipe": r.name,
        "fingerprint": b.fingerprint,
        "mode": "streaming" if r.streaming else "in-memory",
        "seed": r.seed,
        "seq_len": r.seq_len,
        "vocab_size": vocab_size,
        "tokenizer": {"trained": r.tokenizer.path is None, "path": r.tokenizer.path, "eos_token": EOS},
        "sources": [
            {
                "index": i,
                "name": s.name,
                "loader": s.loader,
                "weight": s.weight,
                "target_share": r.shares[i],
                "files": len(b.files[i].paths) if b.files[i] else None,
                "bytes": b.files[i].total_bytes if b.files[i] else None,
                "dataset": s.dataset,
                "license": s.license,
                "attribution": s.attribution,
            }
            for i, s in enumerate(r.sources)
        ],
        "splits": splits,
        "stages": stages,
        "load_errors": report.load_errors,
    }


# --- streaming ----------------------------------------------------------------------------------


def _stream_curated(b: Build, i: int, cuts: list[float] | None):
    """Source i as a lazy stream through the stages up to PII (and the percentile cut when given)."""
    r = b.recipe
    s = r.sources[i]
    st = stream_source(s, i, b.files[i])
    if r.shuffle_buffer > 1:
        st = st.shuffle(seed=r.seed + i, buffer_size=r.shuffle_buffer)
    fk = {"filters": b.filters}
    st = st.map(normalize_batch, batched=True, batch_size=BATCH)
    st = st.map(length_batch, batched=True, batch_size=BATCH, fn_kwargs=fk)
    st = st.map(language_batch, batched=True, batch_size=LANGUAGE_BATCH, fn_kwargs=fk)
    st = st.map(quality_batch, batched=True, batch_size=BATCH, fn_kwargs=fk)
    if cuts is not None:
        st = st.map(percentile_batch, batched=True, batch_size=BATCH, fn_kwargs={"cuts": cuts})
    return st


def _stream_cuts(b: Build) -> list[float]:
    cuts = [float("-inf")] * len(b.names)
    for i, f in enumerate(b.filters):
        if f.quality is None or f.quality.percentile <= 0:
            continue
        scores = []
        for row in _stream_curated(b, i, None).take(f.quality.sample_docs):
            if not row["reason"]:
                scores.append(row["quality_score"])
        cut = percentile_cuts(np.array(scores), np.full(len(scores), i), b.filters)[i]
        logger.info(
            "source '%s': percentile cut at quality score %.4f (from %d leading documents)",
            b.names[i],
            cut,
            len(scores),
        )
        cuts[i] = cut
    return cuts


def _stream_tokenizer_texts(b: Build, cuts: list[float]):
    r = b.recipe
    for i, share in enumerate(r.shares):
        cap, used = int(share * r.tokenizer.train_max_bytes), 0
        st = _stream_curated(b, i, cuts).map(
            pii_batch, batched=True, batch_size=BATCH, fn_kwargs={"filters": b.filters}
        )
        for row in st:
            if used >= cap:
                break
            if not row["reason"]:
                used += len(row["text"].encode("utf-8"))
                yield row["text"]


def _kept_docs(stream, report: CurationReport):
    for batch in stream.iter(batch_size=BATCH):
        report.update(batch)
        for reason, ids in zip(batch["reason"], batch["input_ids"], strict=True):
            if not reason:
                yield np.asarray(ids, dtype=np.int32)


def build_streaming(b: Build) -> dict:
    r = b.recipe
    cuts = _stream_cuts(b)
    tokenizer_file, eos_id = _tokenizer(b, _stream_tokenizer_texts(b, cuts), length=None)
    dd = Deduplicator(r.dedup, r.seed) if (r.dedup.exact or r.dedup.near) else None
    report = CurationReport(b.names)
    sources: list[DocSource] = []
    for i in range(len(r.sources)):
        st = _stream_curated(b, i, cuts)
        st = st.map(pii_batch, batched=True, batch_size=BATCH, fn_kwargs={"filters": b.filters})
        if dd is not None:
            st = st.map(signature_batch, batched=True, batch_size=BATCH, fn_kwargs={"cfg": r.dedup, "seed": r.seed})
            st = st.map(dd.decide_batch, batched=True, batch_size=BATCH)
        st = st.map(
            tokenize_batch,
            batched=True,
            batch_size=BATCH,
            fn_kwargs={"tokenizer_file": tokenizer_file, "eos_id": eos_id},
        )
        sources.append(IterDocSource(_kept_docs(st, report)))
    val_total = _whole_blocks(round(r.total_tokens * r.validation_fraction), r.seq_len)
    train_total = _whole_blocks(r.total_tokens - val_total, r.seq_len)
    splits = {}
    splits["validation"] = _pack_split(b, "validation", sources, split_budget(val_total, r.shares), eos_id)
    splits["train"] = _pack_split(b, "train", sources, split_budget(train_total, r.shares), eos_id)
    splits = {"train": splits["train"], "validation": splits["validation"]}
    return _assemble(b, report, splits, tokenizer_file)


def build(b: Build) -> dict:
    return build_streaming(b) if b.recipe.streaming else build_in_memory(b)
