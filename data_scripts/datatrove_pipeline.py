"""Run a data recipe as a datatrove pipeline: the same stages and the same DATA folder, many tasks at once.

    python -m hybrid_mamba.data_scripts.datatrove_pipeline --recipe data_scripts/recipes/demo.yaml --output data/demo_dt --tasks 4 --workers 2
    python -m hybrid_mamba.data_scripts.datatrove_pipeline --recipe data_scripts/recipes/production_slurm.yaml --output /shared/data/production

The build is a chain of datatrove executors (local, Slurm or Ray), one per stage; every stage writes
its shards under the work folder and datatrove's completion markers (``LOGS/NN_stage/completions/``),
so a rerun skips finished tasks and resumes where a run stopped.

| # | stage | tasks | what |
|---|---|---|---|
| 1 | curate | N | read the task's files; normalise, length, language, quality rules (the functions of ``pipeline.STAGES``); per-task sorted quality scores |
| 2 | quality_cuts | 1 | merge the score runs into the per-source percentile cut (exact, without loading the scores) |
| 3 | filter | N | percentile cut, PII scrubbing; MinhashDedupSignature |
| 4 | minhash_buckets | bands x per band | MinhashDedupBuckets |
| 5 | minhash_cluster | 1 | MinhashDedupCluster |
| 6 | dedup_filter | N | MinhashDedupFilter |
| 7 | tokenizer | 1 | train the BPE on the deduplicated text (``train_max_bytes`` by weight), or copy the given one |
| 8 | tokenize | N | tokenize every document (removed ones only to count them); per source, a run of documents sorted by a stable key; per-task report counts |
| 9 | pack | 1 | merge the report counts and token totals into budgets, mix the sorted runs and pack; write DATA atomically |

Task-count independence. Task r reads a contiguous slice of the files in reading order (balanced by
bytes) and every stage keeps its documents in that order, so (task, position) orders documents as
reading order does for any task count: MinHash clusters, and which member of a cluster datatrove
keeps, do not depend on it. Packing takes each source's documents in the order of a seeded hash of
their text, so DATA is byte-identical for any number of tasks and workers.

Differences from the in-memory mode (``data_scripts/README.md``, Scaling out: data): near-duplicates are
found by datatrove's MinHash (banding only, no verification of candidates, clusters are transitive,
exact duplicates fall out as near ones); documents are packed in hash order, not in a seeded
permutation, and the tokenizer trains on the text in reading order; ``max_epochs`` must be 1.
"""

from __future__ import annotations

import gzip
import hashlib
import heapq
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

try:
    from datatrove.data import Document
    from datatrove.pipeline.base import PipelineStep
    from datatrove.pipeline.writers.disk_base import DiskWriter
    from datatrove.utils.batching import batched
    from datatrove.utils.word_tokenizers import WordTokenizer
except ImportError as e:  # an optional extra
    raise ImportError(f"the datatrove pipeline needs datatrove ({e}): pip install 'hybrid-mamba[datatrove]'") from e

from hybrid_mamba.common.args import load_dataclass

from .docs import map_docs
from .recipe import DedupConfig, Recipe, RecipeError, SourceConfig, SourceFiles, parse_recipe, read_recipe_file

logger = logging.getLogger(__name__)

ExecutorKind = Literal["local", "slurm", "ray"]
EXECUTORS = ("local", "slurm", "ray")
STAGE_NAMES = (
    "curate",
    "quality_cuts",
    "filter",
    "minhash_buckets",
    "minhash_cluster",
    "dedup_filter",
    "tokenizer",
    "tokenize",
    "pack",
)
# Per-document stages of pipeline.STAGES that run as datatrove steps, by the datatrove stage that runs them.
CURATE_STAGES = ("normalize", "length", "language", "quality")
FILTER_STAGES = ("percentile", "pii")
# Columns the report reads (pipeline.REPORT_COLUMNS) with the value a row has when its stage did not run.
COUNTER_DEFAULTS = {
    "invalid_utf8": 0,
    "control_chars": 0,
    "normalized": False,
    "pii_email": 0,
    "pii_phone": 0,
    "pii_ip": 0,
    "pii_key": 0,
}
STATE_FILE = "state.json"


class DatatroveError(RuntimeError):
    """A datatrove build that cannot run as configured; the message says what to change."""


# configuration


@dataclass
class ExecutorConfig:
    """Where and how the stages run (the ``executor:`` section of a recipe; command-line flags override it)."""

    kind: ExecutorKind = "local"
    """``local`` (LocalPipelineExecutor), ``slurm`` (SlurmPipelineExecutor) or ``ray`` (RayPipelineExecutor)."""
    tasks: int = 4
    """Tasks of the parallel stages (curate, filter, dedup_filter, tokenize); each reads 1/tasks of the files."""
    workers: int = -1
    """Tasks running at once; -1: all (local: as many processes as tasks)."""
    logging_dir: str | None = None
    """datatrove's logs, stats and completion markers (one folder per stage); default WORK/logs."""
    work_dir: str | None = None
    """Shards between stages; default OUTPUT.datatrove beside the output. Slurm and Ray need a shared file system."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for every stage's executor (e.g. Slurm ``partition``, ``time``, ``cpus_per_task``;
    Ray ``cpus_per_task``, ``mem_per_cpu_gb``, ``address`` for ``ray.init``; local ``start_method``)."""
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-stage overrides of ``options``, by stage name (``minhash_cluster: {mem_per_cpu_gb: 64}``)."""
    minhash_workers_per_bucket: int = 1
    """Tasks per MinHash band in ``minhash_buckets`` (datatrove splits a band's hash range between them);
    that stage runs bands x this many tasks. Every task of ``filter`` must sign at least this many documents."""

    def __post_init__(self):
        if self.tasks < 1:
            raise RecipeError(f"tasks: must be at least 1, got {self.tasks}")
        if self.minhash_workers_per_bucket < 1:
            raise RecipeError(f"minhash_workers_per_bucket: must be at least 1, got {self.minhash_workers_per_bucket}")
        if self.workers == 0 or self.workers < -1:
            raise RecipeError(f"workers: must be -1 (all) or at least 1, got {self.workers}")
        for name in self.stages:
            if name not in STAGE_NAMES:
                raise RecipeError(f"stages: unknown stage '{name}'; stages are {', '.join(STAGE_NAMES)}")
        for reserved in ("pipeline", "tasks", "workers", "logging_dir", "depends", "job_name"):
            for where, opts in [("options", self.options)] + [(f"stages.{k}", v) for k, v in self.stages.items()]:
                if reserved in opts:
                    raise RecipeError(f"{where}: '{reserved}' is set by the build, not by options")


def load_run_config(path: str | os.PathLike) -> tuple[Recipe, ExecutorConfig]:
    """A recipe with an optional ``executor:`` section, or a file ``{recipe: other.yaml, executor: {...}}``.

    ``executor`` is read here only: the recipe itself (and its fingerprint) stays the one ``prepare`` reads.
    """
    path = Path(path)
    data = read_recipe_file(path)
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path}: expected a mapping at the top level")
    executor = data.pop("executor", None) or {}
    if "recipe" in data:
        extra = sorted(set(data) - {"recipe"})
        if extra:
            raise RecipeError(
                f"recipe {path}: a file naming another recipe takes only 'recipe' and 'executor', got {extra}"
            )
        base = Path(data["recipe"])
        base = base if base.is_absolute() else path.parent / base
        recipe, base_executor = load_run_config(base)
        executor = {**_asdict(base_executor), **executor} if executor else _asdict(base_executor)
    else:
        recipe = parse_recipe(data, where=f"recipe {path}")
    try:
        cfg = load_dataclass(ExecutorConfig, executor, where="executor", error=RecipeError)
    except RecipeError as e:
        raise RecipeError(f"recipe {path}: {e}") from None
    return recipe, cfg


def _asdict(cfg: ExecutorConfig) -> dict:
    return {f: getattr(cfg, f) for f in ExecutorConfig.__dataclass_fields__}


def minhash_config(cfg: DedupConfig, seed: int):
    """datatrove's MinhashConfig for the recipe's dedup section.

    Banding: the (bands, rows) that datasketch's MinHashLSH picks for ``threshold`` and ``num_perm`` (the
    in-memory mode's LSH), so a pair at Jaccard s becomes a candidate with the same probability
    1 - (1 - s^rows)^bands in both modes. 0.8 and 128 give 9 bands of 13 (a pair at 0.8: 0.40, at 0.9:
    0.93, at 0.7: 0.08). The in-memory mode then verifies each candidate (estimated Jaccard >= threshold)
    and datatrove does not, so here pairs below the threshold that share a band go too. Shingles are
    ``ngram`` words as ``dedup.py`` splits them (``\\w+`` on lower-cased text); hashes are 64-bit (sha1).
    An exact-only recipe (``near: false``) becomes one band of all ``num_perm`` hashes: identical
    shingle sets.
    """
    from datasketch import MinHashLSH
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.text import TextNormConfig

    if cfg.near:
        lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
        bands, rows = lsh.b, lsh.r
    else:
        bands, rows = 1, cfg.num_perm
    return MinhashConfig(
        n_grams=cfg.ngram,
        num_buckets=bands,
        hashes_per_bucket=rows,
        seed=seed,
        # dedup.py lower-cases and takes \w+ words; nothing else is normalised.
        norm_config=TextNormConfig(
            lowercase=True,
            norm_whitespace=True,
            remove_punctuation=False,
            norm_unicode_diacritics=False,
            norm_numbers=False,
        ),
        # sha1: datatrove calls xxhash with str, which xxhash>=4 refuses (its processing extra pins xxhash<4).
        hash_config=HashConfig(precision=64, hash_fc="sha1"),
    )


class DedupWords(WordTokenizer):
    """Words as ``dedup.py`` takes them, for datatrove's shingles."""

    def __init__(self):
        super().__init__("dedup")

    def word_tokenize(self, text: str) -> list[str]:
        from .dedup import _WORDS

        return _WORDS.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


# shards: one gzip JSON-lines file per task and folder


def shard_path(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"{rank:05d}.jsonl.gz"


def _doc_to_json(doc: Document) -> str:
    return json.dumps({"id": doc.id, "text": doc.text, "metadata": doc.metadata}, ensure_ascii=False)


def read_shard(folder: str | Path, rank: int) -> Iterator[Document]:
    """The task's documents in the folder, in the order written; a task that wrote nothing has no file."""
    path = shard_path(folder, rank)
    if not path.is_file():
        return
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            yield Document(text=d["text"], id=d["id"], metadata=d["metadata"])


def _shard_ranks(folder: str | Path) -> list[int]:
    return sorted(int(p.name.split(".")[0]) for p in Path(folder).glob("*.jsonl.gz"))


class _AtomicGzip:
    """A gzip JSON-lines file that appears under its name only when closed without error."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.raw = open(self.tmp, "wb")
        # mtime=0 and no file name: the same documents give the same bytes.
        self.f = gzip.GzipFile(filename="", mode="wb", fileobj=self.raw, mtime=0, compresslevel=1)

    def write(self, doc: Document) -> None:
        self.f.write((_doc_to_json(doc) + "\n").encode("utf-8"))

    def close(self, ok: bool = True) -> None:
        self.f.close()
        self.raw.close()
        if ok:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


# pipeline steps


class _Step(PipelineStep):
    type = "hybrid_mamba"


class ReadSources(_Step):
    """Task r reads a contiguous slice of the recipe's files in reading order (sources in recipe order).

    The slices are balanced by bytes. Rows come from ``sources.source_rows`` (the in-memory mode's
    readers); Hub sources are split by ``datasets``' shards instead (task r reads shard r).
    """

    name = "read sources"

    def __init__(self, recipe: Recipe, files: list[SourceFiles | None]):
        super().__init__()
        self.recipe = recipe
        self.files = files

    def plan(self, world_size: int) -> list[list[tuple[int, list[int]]]]:
        """Per task, [(source index, [file indices])] in reading order."""
        flat = [(i, j, p.stat().st_size) for i, f in enumerate(self.files) if f for j, p in enumerate(f.paths)]
        total = sum(s for _, _, s in flat) or 1
        out: list[list[tuple[int, list[int]]]] = [[] for _ in range(world_size)]
        before = 0
        for i, j, size in flat:
            r = min(world_size - 1, before * world_size // total)
            before += size
            if out[r] and out[r][-1][0] == i:
                out[r][-1][1].append(j)
            else:
                out[r].append((i, [j]))
        return out

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from .sources import source_rows

        for i, idx in self.plan(world_size)[rank]:
            f = self.files[i]
            part = SourceFiles(paths=[f.paths[j] for j in idx], ids=[f.ids[j] for j in idx], total_bytes=0)
            gen, kwargs = source_rows(self.recipe.sources[i], i, part)
            for row in gen(**kwargs):
                yield self._doc(row)
        for i, s in enumerate(self.recipe.sources):
            if self.files[i] is None:
                yield from (self._doc(row) for row in _hub_rows(s, i, rank, world_size))

    def _doc(self, row: dict) -> Document:
        self.stat_update("docs_read")
        self.stat_update("bytes_read", value=len(row["text"].encode("utf-8")))
        meta = {k: v for k, v in row.items() if k not in ("id", "text")}
        return Document(text=row["text"], id=row["id"], metadata=meta)


def _hub_rows(source: SourceConfig, index: int, rank: int, world_size: int):
    from datasets import load_dataset

    from .sources import _row

    stream = load_dataset(source.dataset, source.config, split=source.split, revision=source.revision, streaming=True)
    if stream.num_shards < world_size:
        raise DatatroveError(
            f"source '{source.name}': dataset '{source.dataset}' has {stream.num_shards} shards, fewer than "
            f"{world_size} tasks; lower tasks or download its files and read them with the parquet loader"
        )
    stream = stream.shard(num_shards=world_size, index=rank)
    for i, ex in enumerate(stream):
        text = ex.get(source.text_field)
        has_id = source.id_field and ex.get(source.id_field) is not None
        doc_id = str(ex[source.id_field]) if has_id else f"{source.dataset}:{rank}:{i}"
        if not isinstance(text, str):
            yield _row(doc_id, index, "", "load:text_not_a_string", f"'{source.text_field}' is {type(text).__name__}")
        else:
            yield _row(doc_id, index, text)


class ReadShard(_Step):
    """The task's documents from a shard folder written by an earlier stage."""

    name = "read shard"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        for doc in read_shard(self.folder, rank):
            self.stat_update("docs_read")
            self.stat_update("bytes_read", value=len(doc.text.encode("utf-8")))
            yield doc


class WriteShard(_Step):
    """Kept documents to ``kept`` (and on down the pipeline), removed ones to ``removed`` (for the report).

    Each file is written whole (a temporary name, renamed when the task's stream ends), even when empty,
    so a rerun of a failed task replaces what it left.
    """

    name = "write shard"

    def __init__(self, kept: str | None, removed: str | None):
        super().__init__()
        self.kept, self.removed = kept, removed

    def run(self, data, rank: int = 0, world_size: int = 1):
        files = {k: _AtomicGzip(shard_path(d, rank)) for k, d in (("kept", self.kept), ("removed", self.removed)) if d}
        ok = False
        try:
            for doc in data:
                kept = not doc.metadata["reason"]
                f = files.get("kept" if kept else "removed")
                if f is not None:
                    f.write(doc)
                self.stat_update("kept" if kept else "removed")
                if kept:
                    yield doc
            ok = True
        finally:
            for f in files.values():
                f.close(ok)


class DocStage(_Step):
    """One row of ``pipeline.STAGES``: its per-document function on batches of documents, via ``docs.map_docs``.

    The function and batch size are taken from the row when the step is built, so this runs exactly
    what the in-memory mode runs. Removed documents (non-empty ``reason``) pass through untouched.
    """

    def __init__(self, stage: str, **params):
        from .pipeline import STAGES

        self.name = stage  # before PipelineStep.__init__, which names the step's stats after it
        super().__init__()
        row = next(s for s in STAGES if s.name == stage)
        self.fn = row.fn
        self.batch_size = row.batch_size
        self.params = params

    def _params(self) -> dict:
        return self.params

    def run(self, data, rank: int = 0, world_size: int = 1):
        params = self._params()
        for docs in batched(data, self.batch_size):
            with self.track_time(unit="batch"):
                before = [d.metadata["reason"] for d in docs]
                out = map_docs(docs_to_batch(docs), self.fn, **params)
                set_columns(docs, out)
            for doc, was in zip(docs, before, strict=True):
                self.stat_update("docs")
                if doc.metadata["reason"] and not was:
                    self.stat_update("removed")
                yield doc


class PercentileCut(DocStage):
    """``percentile_doc`` with the cuts the ``quality_cuts`` stage wrote."""

    def __init__(self, cuts_file: str):
        super().__init__("percentile")
        self.cuts_file = cuts_file

    def _params(self) -> dict:
        return {"cuts": json.loads(Path(self.cuts_file).read_text())["cuts"]}


def docs_to_batch(docs: list[Document]) -> dict:
    """Documents as the batch of columns ``map_docs`` takes (``text``, ``id`` and every metadata field)."""
    keys = dict.fromkeys(k for d in docs for k in d.metadata)
    batch = {"text": [d.text for d in docs], "id": [d.id for d in docs]}
    for k in keys:
        batch[k] = [d.metadata.get(k, COUNTER_DEFAULTS.get(k)) for d in docs]
    return batch


def set_columns(docs: list[Document], out: dict) -> None:
    for c, values in out.items():
        for d, v in zip(docs, values, strict=True):
            if c == "text":
                d.text = v
            else:
                d.metadata[c] = v


class QualityScores(_Step):
    """Per task and source, the sorted quality scores of the documents still kept: the percentile's statistics."""

    name = "quality scores"

    def __init__(self, folder: str, num_sources: int):
        super().__init__()
        self.folder, self.num_sources = folder, num_sources

    def run(self, data, rank: int = 0, world_size: int = 1):
        scores: list[list[float]] = [[] for _ in range(self.num_sources)]
        for doc in data:
            m = doc.metadata
            if not m["reason"]:
                scores[m["source"]].append(m["quality_score"])
            yield doc
        out = Path(self.folder) / f"{rank:05d}"
        out.mkdir(parents=True, exist_ok=True)
        for i, s in enumerate(scores):
            _save_npy(out / f"source_{i}.npy", np.sort(np.asarray(s, dtype=np.float64)))


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def lower_percentile_index(n: int, percentile: float) -> int:
    """The index ``np.percentile(x, p, method="lower")`` takes in the sorted x of length n."""
    return int(np.floor((n - 1) * (np.float64(percentile) / 100)))


def _ordered(x: float) -> int:
    """A uint64 whose order is the order of the float64 x (so the integers between two floats are floats)."""
    b = int(np.float64(x).view(np.uint64))
    return b ^ 0xFFFFFFFFFFFFFFFF if b >> 63 else b | (1 << 63)


def _from_ordered(k: int) -> float:
    b = k & ~(1 << 63) if k >> 63 else k ^ 0xFFFFFFFFFFFFFFFF
    return float(np.uint64(b).view(np.float64))


def kth_smallest(runs: list[np.ndarray], k: int) -> float:
    """The k-th smallest value (0-based) of several sorted arrays, by bisection on the value.

    Each step counts, in every run, the values at or below a candidate (``searchsorted``), so the runs
    can be memory-mapped files: about 64 binary searches per run, nothing is loaded whole.
    """
    runs = [r for r in runs if len(r)]
    lo, hi = _ordered(min(float(r[0]) for r in runs)), _ordered(max(float(r[-1]) for r in runs))
    while lo < hi:
        mid = (lo + hi) // 2
        v = _from_ordered(mid)
        if sum(int(np.searchsorted(r, v, side="right")) for r in runs) >= k + 1:
            hi = mid
        else:
            lo = mid + 1
    return _from_ordered(lo)


class QualityCuts(_Step):
    """Merge the per-task score runs into ``percentile_cuts``' cuts, exactly, and write them as JSON."""

    name = "quality cuts"

    def __init__(self, scores_folder: str, cuts_file: str, recipe: Recipe):
        super().__init__()
        self.scores_folder, self.cuts_file, self.recipe = scores_folder, cuts_file, recipe

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        cuts = []
        for i, s in enumerate(self.recipe.sources):
            q = s.filters.quality
            runs = [np.load(p, mmap_mode="r") for p in sorted(Path(self.scores_folder).glob(f"*/source_{i}.npy"))]
            n = sum(len(r) for r in runs)
            if q is None or q.percentile <= 0 or n == 0:
                cuts.append(float("-inf"))
                continue
            cuts.append(kth_smallest(runs, lower_percentile_index(n, q.percentile)))
            logger.info("source '%s': percentile cut at quality score %.6f over %d documents", s.name, cuts[-1], n)
        _write_json(Path(self.cuts_file), {"cuts": cuts})
        if data:
            yield from data


def _write_json(path: Path, obj) -> None:
    from hybrid_mamba.common.files import write_json_atomic

    write_json_atomic(path, obj, sort_keys=True)


class DedupExclusions(DiskWriter):
    """MinhashDedupFilter's exclusion writer: removed duplicates, as shards the report reads."""

    default_output_filename = "${rank}.jsonl.gz"
    name = "dedup exclusions"

    def __init__(self, folder: str):
        super().__init__(folder, output_filename="${rank}.jsonl.gz", compression="gzip", mode="wb")

    def _default_adapter(self, document: Document) -> dict:
        return {"id": document.id, "text": document.text, "metadata": document.metadata | {"reason": "dedup:near"}}

    def _write(self, document: dict, file_handler, filename: str):
        file_handler.write((json.dumps(document, ensure_ascii=False) + "\n").encode("utf-8"))


class TrainTokenizer(_Step):
    """The tokenizer, trained on the curated text of every task in reading order (each source up to its
    weight's share of ``train_max_bytes``), or the recipe's existing one; saved as WORK/tokenizer."""

    name = "tokenizer"

    def __init__(self, recipe: Recipe, files, fingerprint: str, docs_folder: str, work: str):
        super().__init__()
        self.recipe, self.files, self.fingerprint = recipe, files, fingerprint
        self.docs_folder, self.work = docs_folder, work

    def texts(self):
        r = self.recipe
        caps = [int(share * r.tokenizer.train_max_bytes) for share in r.shares]
        used = [0] * len(caps)
        for rank in _shard_ranks(self.docs_folder):
            for doc in read_shard(self.docs_folder, rank):
                src = doc.metadata["source"]
                if used[src] < caps[src]:
                    used[src] += len(doc.text.encode("utf-8"))
                    yield doc.text

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from .pipeline import Build, _tokenizer

        b = Build(recipe=self.recipe, files=self.files, out=Path(self.work), fingerprint=self.fingerprint)
        with self.track_time(unit="tokenizer"):
            tokenizer_file, eos_id = _tokenizer(b, self.texts(), length=None)
        _write_json(Path(self.work) / "tokenizer_meta.json", {"eos_id": eos_id, "file": "tokenizer/tokenizer.json"})
        if data:
            yield from data


def sort_key(seed: int, source: int, text: str) -> tuple[int, int]:
    """A seeded 128-bit hash of the text: each source's documents are packed in this order."""
    h = hashlib.blake2b(f"{seed}\0{source}\0".encode() + text.encode("utf-8"), digest_size=16).digest()
    return int.from_bytes(h[:8], "big"), int.from_bytes(h[8:], "big")


RUN_INDEX = np.dtype([("k0", "<u8"), ("k1", "<u8"), ("offset", "<i8"), ("length", "<i8")])


class TokenizeShard(_Step):
    """Every document of the task with the final tokenizer (``tokenize_doc``), removed ones only to count them.

    Writes, per source, the kept documents' tokens sorted by ``sort_key`` (``source_i.tokens.npy``,
    ``source_i.index.npy``) and the task's share of the report (``report.json``).
    """

    name = "tokenize"

    def __init__(self, recipe: Recipe, kept: str, removed: list[str], work: str, out: str):
        super().__init__()
        self.recipe, self.kept, self.removed, self.work, self.out = recipe, kept, removed, work, out

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from .pipeline import REPORT_STAGES, STAGES
        from .report import CurationReport

        stage = next(s for s in STAGES if s.name == "tokenize")
        meta = json.loads((Path(self.work) / "tokenizer_meta.json").read_text())
        params = {"tokenizer_file": str(Path(self.work) / meta["file"]), "eos_id": meta["eos_id"]}
        names = [s.name for s in self.recipe.sources]
        report = CurationReport(names, REPORT_STAGES)
        kept: list[list[tuple[int, int, np.ndarray]]] = [[] for _ in names]
        # Removed documents first, stage by stage, then kept ones: each reason's examples stay in reading order.
        groups = [read_shard(folder, rank) for folder in self.removed] + [read_shard(self.kept, rank)]
        for group in groups:
            for docs in batched(group, stage.memory_batch_size or stage.batch_size):
                with self.track_time(unit="batch"):
                    batch = docs_to_batch(docs)
                    for col, default in COUNTER_DEFAULTS.items():
                        batch.setdefault(col, [default] * len(docs))
                    batch.update(map_docs(batch, stage.fn, **params))
                    report.update(batch)
                    for j, reason in enumerate(batch["reason"]):
                        if not reason:
                            src = batch["source"][j]
                            k0, k1 = sort_key(self.recipe.seed, src, batch["text"][j])
                            kept[src].append((k0, k1, np.asarray(batch["input_ids"][j], dtype=np.int32)))
                self.stat_update("docs", value=len(docs))
                self.stat_update("bytes_in", value=sum(len(d.text.encode("utf-8")) for d in docs))
        out = Path(self.out) / f"{rank:05d}"
        out.mkdir(parents=True, exist_ok=True)
        tokens_per_source = []
        for i, docs in enumerate(kept):
            docs.sort(key=lambda d: (d[0], d[1]))
            index = np.zeros(len(docs), dtype=RUN_INDEX)
            lengths = np.array([len(d[2]) for d in docs], dtype=np.int64)
            index["k0"] = [d[0] for d in docs]
            index["k1"] = [d[1] for d in docs]
            index["length"] = lengths
            index["offset"] = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(docs) else []
            tokens = np.concatenate([d[2] for d in docs]) if docs else np.zeros(0, dtype=np.int32)
            _save_npy(out / f"source_{i}.tokens.npy", tokens)
            _save_npy(out / f"source_{i}.index.npy", index)
            tokens_per_source.append(int(lengths.sum()))
        _write_json(out / "report.json", _report_state(report) | {"kept_tokens": tokens_per_source})
        if data:
            yield from data


def _report_state(report) -> dict:
    return {
        "totals": [[s, reason, *t] for (s, reason), t in sorted(report.totals.items())],
        "counters": [[s, col, v] for (s, col), v in sorted(report.counters.items())],
        "examples": [
            [s, reason, [{k: e[k] for k in ("id", "note", "text")} for e in ex]]
            for (s, reason), ex in sorted(report.examples.items())
        ],
        "load_errors": report.load_errors,
    }


def merge_reports(names: list[str], parts: list[dict]):
    """One CurationReport from the tasks' parts, taken in task order (= reading order)."""
    from .pipeline import REPORT_STAGES
    from .report import MAX_LOAD_ERRORS, CurationReport

    report = CurationReport(names, REPORT_STAGES)
    for part in parts:
        for s, reason, docs, tokens, chars in part["totals"]:
            t = report.totals[(s, reason)]
            t[0] += docs
            t[1] += tokens
            t[2] += chars
        for s, col, v in part["counters"]:
            report.counters[(s, col)] += v
        for s, reason, examples in part["examples"]:
            ex = report.examples[(s, reason)]
            ex.extend(examples[: report.k - len(ex)])
        report.load_errors.extend(part["load_errors"][: MAX_LOAD_ERRORS - len(report.load_errors)])
    return report


class SortedRuns:
    """A source's kept documents from every task's sorted run, merged by ``sort_key`` (a ``mixture.DocSource``).

    Memory: one index entry per task; tokens are read from memory-mapped files as the mixer takes them.
    """

    def __init__(self, run_dirs: list[Path], source: int):
        self.runs = []
        for d in run_dirs:
            index = np.load(d / f"source_{source}.index.npy", mmap_mode="r")
            if len(index):
                self.runs.append((index, np.load(d / f"source_{source}.tokens.npy", mmap_mode="r")))
        self.total = sum(int(index["length"].sum()) for index, _ in self.runs)
        self.used = 0
        self.it = heapq.merge(*(self._entries(r) for r in range(len(self.runs))))

    def _entries(self, r: int):
        index = self.runs[r][0]
        for j in range(len(index)):
            e = index[j]
            yield int(e["k0"]), int(e["k1"]), r, j

    def next(self) -> np.ndarray | None:
        entry = next(self.it, None)
        if entry is None:
            return None
        _, _, r, j = entry
        index, tokens = self.runs[r]
        off, n = int(index[j]["offset"]), int(index[j]["length"])
        self.used += n
        return np.array(tokens[off : off + n], dtype=np.int32)

    def start_train(self) -> None:
        pass

    def remaining_tokens(self) -> int:
        return self.total - self.used


class Pack(_Step):
    """Merge the tasks' report parts and token runs; budgets, mixing and packing as ``pipeline.mix_and_pack``;
    the DATA folder written atomically, with the report, the recipe and the fingerprint."""

    name = "pack"

    def __init__(self, recipe: Recipe, files, fp: dict, runs: str, work: str, output: str):
        super().__init__()
        self.recipe, self.files, self.fp = recipe, files, fp
        self.runs, self.work, self.output = runs, work, output

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from hybrid_mamba.common.files import atomic_dir

        from .cache import FINGERPRINT_FILE
        from .mixture import BudgetError
        from .pipeline import Build, _assemble, mix_and_pack
        from .report import write_report

        r = self.recipe
        names = [s.name for s in r.sources]
        run_dirs = sorted(p for p in Path(self.runs).iterdir() if p.is_dir())
        parts = [json.loads((d / "report.json").read_text()) for d in run_dirs]
        report = merge_reports(names, parts)
        available = [sum(p["kept_tokens"][i] for p in parts) for i in range(len(names))]
        for i, a in enumerate(available):
            if a == 0:
                raise BudgetError(f"source '{names[i]}': no document survived curation; see the report's removals")
        with self.track_time(unit="build"), atomic_dir(Path(self.output)) as tmp:
            b = Build(recipe=r, files=self.files, out=tmp, fingerprint=self.fp["fingerprint"])
            shutil.copytree(Path(self.work) / "tokenizer", tmp / "tokenizer")
            eos_id = json.loads((Path(self.work) / "tokenizer_meta.json").read_text())["eos_id"]
            sources = [SortedRuns(run_dirs, i) for i in range(len(names))]
            splits = mix_and_pack(b, sources, available, eos_id)
            out = _assemble(b, report, splits, str(tmp / "tokenizer" / "tokenizer.json"))
            out["mode"] = "datatrove"
            shutil.rmtree(b.work, ignore_errors=True)
            write_report(tmp, out)
            (tmp / "recipe.yaml").write_text(
                "# The recipe used for this build (datatrove pipeline), every default filled in.\n"
                + yaml.safe_dump(r.to_dict(), sort_keys=False, allow_unicode=True),
                encoding="utf-8",
            )
            (tmp / FINGERPRINT_FILE).write_text(json.dumps(self.fp, indent=2, sort_keys=True) + "\n")
        if data:
            yield from data


# building the stages


@dataclass
class Plan:
    """The stages of one build: (name, pipeline, tasks) in order, and the folders they use."""

    stages: list[tuple[str, list, int]]
    work: Path
    logs: Path

    def names(self) -> list[str]:
        return [name for name, _, _ in self.stages]


def build_plan(
    recipe: Recipe, files, fp: dict, output: Path, work: Path, logs: Path, tasks: int, per_bucket: int = 1
) -> Plan:
    if recipe.max_epochs != 1.0:
        raise DatatroveError("max_epochs: the datatrove pipeline reads each document once; set it to 1 or use prepare")
    if tasks > 1 and any(s.max_docs is not None for s in recipe.sources):
        raise DatatroveError("max_docs: counts per task, not per source, with several tasks; remove it or use tasks 1")
    w = {k: str(work / k) for k in ("scored", "scores", "curated", "deduped", "sigs", "buckets", "remove", "runs")}
    removed = {k: str(work / "removed" / k) for k in ("curate", "filter", "dedup")}
    cuts_file = str(work / "quality_cuts.json")
    filters = [s.filters for s in recipe.sources]
    dedup = recipe.dedup.exact or recipe.dedup.near
    stages: list[tuple[str, list, int]] = [
        (
            "curate",
            [ReadSources(recipe, files)]
            + [DocStage(name, filters=filters) if name != "normalize" else DocStage(name) for name in CURATE_STAGES]
            + [QualityScores(w["scores"], len(recipe.sources)), WriteShard(w["scored"], removed["curate"])],
            tasks,
        ),
        ("quality_cuts", [QualityCuts(w["scores"], cuts_file, recipe)], 1),
    ]
    filter_steps = [ReadShard(w["scored"]), PercentileCut(cuts_file), DocStage("pii", filters=filters)]
    filter_steps.append(WriteShard(w["curated"], removed["filter"]))
    if dedup:
        from datatrove.pipeline.dedup.minhash import (
            MinhashDedupBuckets,
            MinhashDedupCluster,
            MinhashDedupFilter,
            MinhashDedupSignature,
        )

        mh = minhash_config(recipe.dedup, recipe.seed)
        filter_steps.append(MinhashDedupSignature(output_folder=w["sigs"], config=mh, language=DedupWords()))
        stages.append(("filter", filter_steps, tasks))
        buckets = MinhashDedupBuckets(w["sigs"], w["buckets"], config=mh)
        stages.append(("minhash_buckets", [buckets], mh.num_buckets * per_bucket))
        stages.append(("minhash_cluster", [MinhashDedupCluster(w["buckets"], w["remove"], config=mh)], 1))
        stages.append(
            (
                "dedup_filter",
                [
                    ReadShard(w["curated"]),
                    MinhashDedupFilter(w["remove"], exclusion_writer=DedupExclusions(removed["dedup"])),
                    WriteShard(w["deduped"], None),
                ],
                tasks,
            )
        )
        docs = w["deduped"]
    else:
        stages.append(("filter", filter_steps, tasks))
        docs = w["curated"]
    stages += [
        ("tokenizer", [TrainTokenizer(recipe, files, fp["fingerprint"], docs, str(work))], 1),
        ("tokenize", [TokenizeShard(recipe, docs, list(removed.values()), str(work), w["runs"])], tasks),
        ("pack", [Pack(recipe, files, fp, w["runs"], str(work), str(output))], 1),
    ]
    return Plan(stages=stages, work=work, logs=logs)


def make_executors(plan: Plan, cfg: ExecutorConfig, job_name: str = "data") -> list:
    """One datatrove executor per stage, each depending on the one before (Slurm submits the chain)."""
    executors = []
    prev = None
    for k, (name, pipeline, tasks) in enumerate(plan.stages):
        opts = {**cfg.options, **cfg.stages.get(name, {})}
        workers = cfg.workers if tasks > 1 else 1
        if workers != -1:
            workers = min(workers, tasks)
        common = {
            "pipeline": pipeline,
            "tasks": tasks,
            "workers": workers,
            "logging_dir": str(plan.logs / f"{k + 1:02d}_{name}"),
            "depends": prev,
        }
        if cfg.kind == "local":
            from datatrove.executor import LocalPipelineExecutor

            ex = LocalPipelineExecutor(**common, **opts)
        elif cfg.kind == "slurm":
            from datatrove.executor import SlurmPipelineExecutor

            missing = [o for o in ("partition", "time") if o not in opts]
            if missing:
                raise DatatroveError(
                    f"executor.options: Slurm needs {', '.join(missing)} (e.g. partition: cpu, time: '12:00:00')"
                )
            ex = SlurmPipelineExecutor(**common, job_name=f"{job_name}_{name}", **opts)
        else:
            from datatrove.executor.ray import RayPipelineExecutor

            opts = {o: v for o, v in opts.items() if o != "address"}
            ex = RayPipelineExecutor(**common, **opts)
        executors.append(ex)
        prev = ex
    return executors


def _prepare_work(plan: Plan, state: dict) -> None:
    """Keep the work folder and completion markers of an unfinished run of the same build (to resume).

    Anything else is cleared first: a work folder of another build (recipe, inputs, code or tasks
    changed), and the stage log folders (with their completion markers) when the work folder is not
    the one they describe, so no finished-looking task is skipped over missing shards.
    """
    f = plan.work / STATE_FILE
    same = f.is_file() and json.loads(f.read_text()) == state
    if not same:
        if plan.work.exists():
            logger.info("%s holds another or no build; starting afresh", plan.work)
            shutil.rmtree(plan.work)
        if plan.logs.is_dir():
            for p in plan.logs.iterdir():
                if p.is_dir() and p.name[:2].isdigit() and p.name[3:] in STAGE_NAMES:
                    shutil.rmtree(p)
    plan.work.mkdir(parents=True, exist_ok=True)
    plan.logs.mkdir(parents=True, exist_ok=True)
    _write_json(f, state)


def fingerprint_for(recipe: Recipe, files) -> dict:
    """The build fingerprint of ``prepare``, salted with the mode and datatrove's version."""
    from importlib import metadata

    from .cache import fingerprint

    fp = fingerprint(recipe, files)
    fp["versions"]["datatrove"] = metadata.version("datatrove")
    fp["mode"] = "datatrove"
    # This file's own digest too, so the fingerprint holds whatever cache.code_digest leaves out.
    own = hashlib.blake2b(Path(__file__).read_bytes(), digest_size=16).hexdigest()
    salt = f"{fp['fingerprint']}:datatrove:{fp['versions']['datatrove']}:{own}"
    fp["fingerprint"] = hashlib.sha256(salt.encode()).hexdigest()
    return fp


def run_build(
    recipe: Recipe,
    cfg: ExecutorConfig,
    output: str | Path,
    force: bool = False,
    keep_work: bool = False,
    until: str | None = None,
) -> dict:
    """Check the inputs, build the stages and run them; returns timings per stage (local, Ray) or the job chain.

    ``until``: run the stages up to and including this one (local, Ray), keeping the work folder; a later
    run without it continues from there. Ray: connects with ``ray.init(address=options.address)`` unless
    Ray is already initialised (``address`` unset or ``auto``: ``RAY_ADDRESS``, else a running local
    instance, else a new one), and shuts Ray down again at the end if it connected here.
    """
    if until is not None and until not in STAGE_NAMES:
        raise DatatroveError(f"until: unknown stage '{until}'; stages are {', '.join(STAGE_NAMES)}")
    from .cache import is_current
    from .prepare import check_inputs

    output = Path(os.path.abspath(output))
    files = check_inputs(recipe)
    fp = fingerprint_for(recipe, files)
    if not force and is_current(output, fp):
        logger.info("%s is up to date (fingerprint %s); nothing to do", output, fp["fingerprint"][:12])
        return {"up_to_date": True, "stages": {}}
    work = Path(os.path.abspath(cfg.work_dir)) if cfg.work_dir else output.with_name(output.name + ".datatrove")
    logs = Path(os.path.abspath(cfg.logging_dir)) if cfg.logging_dir else work / "logs"
    plan = build_plan(recipe, files, fp, output, work / "data", logs, cfg.tasks, cfg.minhash_workers_per_bucket)
    _prepare_work(
        plan, {"fingerprint": fp["fingerprint"], "tasks": cfg.tasks, "stages": [[n, t] for n, _, t in plan.stages]}
    )
    executors = make_executors(plan, cfg, job_name=recipe.name)
    if cfg.kind == "slurm":
        executors[-1].run()  # submits the chain; each stage starts when the one before has finished
        logger.info("submitted %d stages; DATA appears at %s when the last one finishes", len(executors), output)
        return {"submitted": plan.names(), "logging_dir": str(logs)}
    connected = False
    if cfg.kind == "ray":
        import ray

        if not ray.is_initialized():
            ray.init(address=cfg.options.get("address"))
            connected = True
    try:
        timings = {}
        for (name, _, tasks), ex in zip(plan.stages, executors, strict=True):
            ex.depends = None  # run here one after the other, timing each stage
            start = time.perf_counter()
            ex.run()
            timings[name] = {"seconds": time.perf_counter() - start, "tasks": tasks}
            # Ray only logs the tasks that failed (and a stage depending on them would wait for ever).
            missing = ex.get_incomplete_ranks(range(tasks), skip_completed=True)
            if missing:
                raise DatatroveError(
                    f"stage {name}: tasks {missing} did not complete; see {ex.logging_dir.path}/logs "
                    "(a rerun of the same command resumes)"
                )
            logger.info("stage %s: %d tasks in %.2f s", name, tasks, timings[name]["seconds"])
            if name == until:
                return {"stages": timings, "work": str(work), "logging_dir": str(logs)}
    finally:
        if connected:
            ray.shutdown()
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return {"stages": timings, "work": str(work), "logging_dir": str(logs)}


# command line


@dataclass
class DatatroveArguments:
    recipe: str = field(
        metadata={"help": "Recipe YAML (may hold an executor: section, or name a recipe: and an executor:)."}
    )
    output: str = field(metadata={"help": "Output DATA folder; replaced atomically by the last stage."})
    executor: str | None = field(
        default=None, metadata={"help": "local, slurm or ray (default: the recipe's, else local)."}
    )
    tasks: int | None = field(
        default=None, metadata={"help": "Tasks of the parallel stages (default: the recipe's, else 4)."}
    )
    workers: int | None = field(
        default=None, metadata={"help": "Tasks at once; -1: all (default: the recipe's, else -1)."}
    )
    logging_dir: str | None = field(
        default=None, metadata={"help": "datatrove logs and completion markers (default WORK/logs)."}
    )
    work_dir: str | None = field(default=None, metadata={"help": "Shards between stages (default OUTPUT.datatrove)."})
    force: bool = field(default=False, metadata={"help": "Rebuild even when the output's fingerprint matches."})
    keep_work: bool = field(default=False, metadata={"help": "Keep the work folder after a local build."})
    until: str | None = field(
        default=None, metadata={"help": f"Stop after this stage ({', '.join(STAGE_NAMES)}); a rerun continues."}
    )
    log_level: Literal["debug", "info", "warning", "error"] = field(default="info", metadata={"help": "Logging level."})


def main(argv: list[str] | None = None) -> int:
    from hybrid_mamba.common.args import parse_args

    args = parse_args(DatatroveArguments, argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    recipe, cfg = load_run_config(args.recipe)
    if args.executor is not None:
        if args.executor not in EXECUTORS:
            raise RecipeError(f"--executor: '{args.executor}' is not one of {', '.join(EXECUTORS)}")
        cfg.kind = args.executor
    for name in ("tasks", "workers", "logging_dir", "work_dir"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    cfg.__post_init__()
    run_build(recipe, cfg, args.output, force=args.force, keep_work=args.keep_work, until=args.until)
    return 0


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
