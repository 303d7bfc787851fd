"""The stages run in order, in memory (Arrow datasets, ``num_proc`` workers) or as streams.

Both modes iterate the same table of stages (``STAGES``); they differ in what needs the whole corpus:

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, concatenate_datasets
from tqdm.auto import tqdm

from .dedup import Deduplicator, decide_doc, signature_doc
from .docs import map_docs
from .filters import language_doc, length_doc, percentile_cuts, percentile_doc, quality_doc
from .mixture import (
    ArrayDocSource,
    BudgetError,
    DocSource,
    IterDocSource,
    Mixer,
    split_budget,
)
from .normalize import normalize_doc
from .pack import Packer, block_features, save_blocks
from .pii import pii_doc
from .recipe import Recipe, SourceFiles
from .report import CurationReport
from .sources import load_source, stream_source
from .tokenizer import EOS, load_existing, tokenize_doc, train_tokenizer

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


@dataclass(frozen=True)
class Stage:
    name: str  # progress, logs and the datasets fingerprint of its output
    fn: Callable  # a per-document function (docs.document_stage)
    params: tuple[str, ...] = ("filters",)  # its keyword arguments, taken from the build's parameters
    report: str | None = None  # the report stage its removals count under (their reason prefix)
    batch_size: int = BATCH
    # In memory, cheap stages run in one process on bigger batches; streams keep ``batch_size`` because it
    # sets how far a source is read (and dedup decides, across sources) ahead of what the mixer takes.
    memory_batch_size: int | None = None
    parallel: bool = True  # in memory: worth ``num_proc`` workers
    in_order: bool = False  # each decision depends on the documents before it in reading order


# The order of the stages, for both modes and the report. A stage runs when the build has its
# parameters: ``cuts`` only when a source has a percentile cut, ``cfg`` and ``dedup`` only when dedup
# is on; ``cuts`` and the tokenizer are computed by each mode when it reaches the stage needing them.
STAGES = [
    Stage("normalize", normalize_doc, params=(), report="normalize"),
    Stage("length", length_doc, report="length", memory_batch_size=1000, parallel=False),
    Stage("language", language_doc, report="language", batch_size=LANGUAGE_BATCH, parallel=False),
    Stage("quality", quality_doc, report="quality"),
    Stage("percentile", percentile_doc, ("cuts",), report="quality", memory_batch_size=1000, parallel=False),
    Stage("pii", pii_doc, report="pii"),
    Stage("signature", signature_doc, ("cfg", "seed")),
    Stage("dedup", decide_doc, ("dedup",), report="dedup", memory_batch_size=1000, parallel=False, in_order=True),
    Stage("tokenize", tokenize_doc, ("tokenizer_file", "eos_id"), memory_batch_size=256, parallel=False),
]
# Reasons ``load:...`` come from reading the sources, before the first stage.
REPORT_STAGES = list(dict.fromkeys(["load"] + [s.report for s in STAGES if s.report]))


def _runs(stage: Stage, params: dict) -> bool:
    return all(p in params for p in stage.params)


def _kwargs(stage: Stage, params: dict) -> dict:
    return {"stage_fn": stage.fn} | {p: params[p] for p in stage.params}


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
    params: dict = {"filters": b.filters, "seed": r.seed}
    if r.dedup.exact or r.dedup.near:
        params |= {"cfg": r.dedup, "dedup": Deduplicator(r.dedup, r.seed)}
    for stage in STAGES:
        # The percentile cut sees every kept score of a source; the tokenizer trains on all curated text.
        if "cuts" in stage.params:
            cols = _columns(ds, ["source", "reason", "quality_score"])
            kept = cols["reason"] == ""
            cuts = percentile_cuts(cols["quality_score"][kept], cols["source"][kept], b.filters)
            if any(np.isfinite(c) for c in cuts):
                params["cuts"] = cuts
        if "tokenizer_file" in stage.params:
            n_kept = int((_columns(ds, ["reason"])["reason"] == "").sum())
            params["tokenizer_file"], params["eos_id"] = _tokenizer(b, _kept_texts(ds, r), length=n_kept)
        if not _runs(stage, params):
            continue
        if stage.in_order:
            ds = _dedup_in_reading_order(b, ds, perm, stage, params)
        else:
            batch_size = stage.memory_batch_size or stage.batch_size
            ds = _map(b, ds, map_docs, stage.name, _kwargs(stage, params), stage.parallel, batch_size)
    return ds, perm, params["tokenizer_file"], params["eos_id"]


def _dedup_in_reading_order(b: Build, ds: Dataset, perm: np.ndarray, stage: Stage, params: dict) -> Dataset:
    """Decisions in one pass over the signatures in reading order, in this process; then written back."""
    batch_size = stage.memory_batch_size or stage.batch_size
    in_order: list[str] = []
    sig = ds.select_columns(["reason", "exact_hash", "minhash"]).select(np.argsort(perm))
    for batch in tqdm(sig.iter(batch_size=batch_size), total=-(-len(ds) // batch_size), desc=stage.name):
        in_order += map_docs(batch, **_kwargs(stage, params))["reason"]
    reasons = np.array(in_order, dtype=object)[perm].tolist()
    return _map(
        b,
        ds.remove_columns(["minhash"]),
        _set_reasons,
        stage.name,
        {"reasons": reasons},
        parallel=False,
        batch_size=batch_size,
        with_indices=True,
    )


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
    report = CurationReport(b.names, REPORT_STAGES)
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

    splits = mix_and_pack(b, sources, available, eos_id)
    return _assemble(b, report, splits, tokenizer_file)


def mix_and_pack(b: Build, sources: list[DocSource], available: list[int], eos_id: int) -> dict:
    """Budgets of both splits from ``available`` kept tokens per source; validation is drawn first, then train."""
    r = b.recipe
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
    return splits


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
    for name in b.names:
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


def _stream_stages(b: Build, i: int, params: dict, stop_before: str | None = None):
    """Source i as a lazy stream through the stages that ``params`` allow, up to ``stop_before``."""
    r = b.recipe
    st = stream_source(r.sources[i], i, b.files[i])
    if r.shuffle_buffer > 1:
        st = st.shuffle(seed=r.seed + i, buffer_size=r.shuffle_buffer)
    for stage in STAGES:
        if stage.name == stop_before:
            break
        if _runs(stage, params):
            st = st.map(map_docs, batched=True, batch_size=stage.batch_size, fn_kwargs=_kwargs(stage, params))
    return st


def _stream_cuts(b: Build) -> list[float]:
    cuts = [float("-inf")] * len(b.names)
    for i, f in enumerate(b.filters):
        if f.quality is None or f.quality.percentile <= 0:
            continue
        scores = []
        for row in _stream_stages(b, i, {"filters": b.filters}, stop_before="percentile").take(f.quality.sample_docs):
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


def _stream_tokenizer_texts(b: Build, params: dict):
    """Leading curated text of each source, its weight's share of ``train_max_bytes`` (before dedup)."""
    r = b.recipe
    for i, share in enumerate(r.shares):
        cap, used = int(share * r.tokenizer.train_max_bytes), 0
        for row in _stream_stages(b, i, params, stop_before="signature"):
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
    params: dict = {"filters": b.filters, "seed": r.seed}
    cuts = _stream_cuts(b)
    if any(np.isfinite(c) for c in cuts):
        params["cuts"] = cuts
    params["tokenizer_file"], params["eos_id"] = _tokenizer(b, _stream_tokenizer_texts(b, dict(params)), length=None)
    if r.dedup.exact or r.dedup.near:
        params |= {"cfg": r.dedup, "dedup": Deduplicator(r.dedup, r.seed)}
    report = CurationReport(b.names, REPORT_STAGES)
    sources: list[DocSource] = [
        IterDocSource(_kept_docs(_stream_stages(b, i, params), report)) for i in range(len(b.names))
    ]
    val_total = _whole_blocks(round(r.total_tokens * r.validation_fraction), r.seq_len)
    train_total = _whole_blocks(r.total_tokens - val_total, r.seq_len)
    splits = {}
    splits["validation"] = _pack_split(b, "validation", sources, split_budget(val_total, r.shares), params["eos_id"])
    splits["train"] = _pack_split(b, "train", sources, split_budget(train_total, r.shares), params["eos_id"])
    splits = {"train": splits["train"], "validation": splits["validation"]}
    return _assemble(b, report, splits, params["tokenizer_file"])


def build(b: Build) -> dict:
    return build_streaming(b) if b.recipe.streaming else build_in_memory(b)
