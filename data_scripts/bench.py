"""Throughput of each stage on the demo corpus, and the time to build the demo data.

    python -m hybrid_mamba.data_scripts.bench --output data_scripts/results/bench_demo.json

Stages are timed one after the other in this process, on the documents that reach them, with the
same batch functions and batch sizes as the pipeline (one process; lingua and tokenizers use their
own threads). Throughput is MB of text entering the stage per second, and, for comparison across
stages, MB of raw corpus per second (raw corpus size / stage time). The end-to-end times run the
real command (``python -m hybrid_mamba.data_scripts.prepare``, interpreter start included) in-memory with
``--num-proc`` workers and streaming, into a temporary folder. Last, a batch of blocks is read the way
the trainer reads them, to compare with a training step.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hybrid_mamba.common.machine import machine

from .dedup import Deduplicator, signature_batch
from .filters import language_batch, length_batch, percentile_batch, percentile_cuts, quality_batch
from .mixture import ArrayDocSource, Mixer, split_budget
from .normalize import normalize_batch
from .pack import Packer
from .pii import pii_batch
from .pipeline import BATCH, LANGUAGE_BATCH
from .recipe import load_recipe, resolve_files
from .sources import source_rows
from .tokenizer import tokenize_batch, train_tokenizer

logger = logging.getLogger(__name__)
DEMO = Path(__file__).parent / "recipes" / "demo.yaml"


@dataclass
class BenchArguments:
    output: str = field(default="data_scripts/results/bench_demo.json", metadata={"help": "Where to write the JSON."})
    recipe: str = field(default=str(DEMO), metadata={"help": "Recipe to measure (local sources)."})
    num_proc: int = field(default=2, metadata={"help": "Workers for the end-to-end in-memory build."})
    skip_end_to_end: bool = field(default=False, metadata={"help": "Only time the stages."})


def _mb(texts) -> float:
    return sum(len(t.encode("utf-8")) for t in texts) / 1e6


def _run_batched(fn, rows: dict, batch_size: int, **kwargs) -> dict:
    n = len(rows["text"])
    out = {k: list(v) for k, v in rows.items()}
    for i in range(0, n, batch_size):
        part = {k: v[i : i + batch_size] for k, v in out.items()}
        for k, v in fn(part, **kwargs).items():
            out.setdefault(k, [None] * n)[i : i + batch_size] = v
    return out


def _kept(rows: dict) -> dict:
    keep = [i for i, r in enumerate(rows["reason"]) if not r]
    return {k: [v[i] for i in keep] for k, v in rows.items()}


def bench_stages(recipe_path: str) -> dict:
    r = load_recipe(recipe_path)
    filters = [s.filters for s in r.sources]
    rows: dict = {"id": [], "source": [], "text": [], "reason": [], "note": [], "invalid_utf8": []}
    t0 = time.perf_counter()
    for i, s in enumerate(r.sources):
        gen, kwargs = source_rows(s, i, resolve_files(s) if s.loader != "hub" else None)
        for row in gen(**kwargs):
            for k, column in rows.items():
                column.append(row[k])
    load_s = time.perf_counter() - t0
    raw_mb = _mb(rows["text"])
    raw_docs = len(rows["text"])
    results = {"load": {"mb_in": raw_mb, "seconds": load_s}}

    def timed(name, fn, data, batch_size, **kw):
        mb = _mb(data["text"])
        start = time.perf_counter()
        out = _run_batched(fn, data, batch_size, **kw)
        results[name] = {"mb_in": mb, "seconds": time.perf_counter() - start}
        return _kept(out)

    rows = timed("normalize", normalize_batch, rows, BATCH)
    rows = timed("length", length_batch, rows, 1000, filters=filters)
    rows = timed("language", language_batch, rows, LANGUAGE_BATCH, filters=filters)
    start = time.perf_counter()
    rows_q = _run_batched(quality_batch, rows, BATCH, filters=filters)
    kept = [not x for x in rows_q["reason"]]
    cuts = percentile_cuts(np.array(rows_q["quality_score"])[kept], np.array(rows_q["source"])[kept], filters)
    rows_q = _kept(_run_batched(percentile_batch, _kept(rows_q), 1000, cuts=cuts))
    results["quality"] = {"mb_in": _mb(rows["text"]), "seconds": time.perf_counter() - start}
    rows = timed("pii", pii_batch, rows_q, BATCH, filters=filters)
    start = time.perf_counter()
    sig = _run_batched(signature_batch, rows, BATCH, cfg=r.dedup, seed=r.seed)
    dd = Deduplicator(r.dedup, r.seed)
    sig = _run_batched(dd.decide_batch, sig, 1000)
    results["dedup"] = {"mb_in": _mb(rows["text"]), "seconds": time.perf_counter() - start}
    rows = _kept(sig)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        tok = train_tokenizer(iter(rows["text"]), r.tokenizer, Path(tmp) / "tok", length=len(rows["text"]))
        results["tokenizer_training"] = {"mb_in": _mb(rows["text"]), "seconds": time.perf_counter() - start}
        eos = tok.eos_token_id
        tokenized = timed(
            "tokenize", tokenize_batch, rows, 256, tokenizer_file=str(Path(tmp) / "tok" / "tokenizer.json"), eos_id=eos
        )
        start = time.perf_counter()
        sources = []
        for i in range(len(r.sources)):
            docs = [
                np.asarray(x, dtype=np.int32)
                for x, s in zip(tokenized["input_ids"], tokenized["source"], strict=True)
                if s == i
            ]
            sources.append(ArrayDocSource(docs, np.array([len(d) for d in docs]), r.seed, i, repeat=False))
        budget = min(sum(len(d) for d in s.docs) / sh for s, sh in zip(sources, r.shares, strict=True))
        budget = int(budget) // r.seq_len * r.seq_len
        packer = Packer(Path(tmp) / "blocks.arrow", r.seq_len, [s.name for s in r.sources])
        for src, doc in Mixer(sources, split_budget(budget, r.shares), eos, [s.name for s in r.sources]):
            packer.add(src, doc)
        packer.close()
        results["mix_and_pack"] = {"mb_in": _mb(rows["text"]), "seconds": time.perf_counter() - start, "tokens": budget}
    for v in results.values():
        v["mb_per_s"] = v["mb_in"] / v["seconds"] if v["seconds"] else None
        v["raw_mb_per_s"] = raw_mb / v["seconds"] if v["seconds"] else None
    return {"raw_mb": raw_mb, "documents": raw_docs, "documents_curated": len(rows["text"]), "stages": results}


def _time_command(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def bench_end_to_end(recipe_path: str, num_proc: int) -> dict:
    import torch
    from datasets import load_from_disk

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = [
            sys.executable,
            "-m",
            "hybrid_mamba.data_scripts.prepare",
            "--recipe",
            recipe_path,
            "--log-level",
            "warning",
        ]
        out["in_memory_seconds"] = _time_command(base + ["--output", f"{tmp}/mem", "--num-proc", str(num_proc)])
        out["cached_rerun_seconds"] = _time_command(base + ["--output", f"{tmp}/mem"])
        out["streaming_seconds"] = _time_command(base + ["--output", f"{tmp}/stream", "--streaming"])
        report = json.loads(Path(f"{tmp}/mem/report.json").read_text())
        out["train_blocks"] = report["splits"]["train"]["blocks"]
        out["validation_blocks"] = report["splits"]["validation"]["blocks"]
        out["seq_len"] = report["seq_len"]
        # The trainer's reading: torch format, a shuffled batch of 16 blocks, stacked.
        ds = load_from_disk(f"{tmp}/mem/train").with_format("torch", columns=["input_ids", "position_ids"])
        rng = np.random.default_rng(0)
        times = []
        for _ in range(50):
            idx = rng.integers(0, len(ds), 16)
            start = time.perf_counter()
            rows = [ds[int(i)] for i in idx]
            torch.stack([x["input_ids"] for x in rows])
            torch.stack([x["position_ids"] for x in rows])
            times.append(time.perf_counter() - start)
        out["read_batch_16_ms_median"] = float(np.median(times) * 1e3)
    return out


# The libraries whose speed the numbers depend on, recorded with the machine.
LIBRARIES = ("datasets", "tokenizers", "datasketch", "lingua-language-detector", "phonenumberslite")


def main(argv: list[str] | None = None) -> int:
    from hybrid_mamba.common.args import parse_args

    args = parse_args(BenchArguments, argv)
    logging.basicConfig(level="WARNING")
    result = {"recipe": Path(args.recipe).name, "machine": machine(libraries=LIBRARIES)}
    # Other work on the machine slows every number here; the load average says how much there was.
    load_before = os.getloadavg()[0]
    result |= bench_stages(args.recipe)
    if not args.skip_end_to_end:
        result["end_to_end"] = bench_end_to_end(args.recipe, args.num_proc)
    result["machine"]["load_average_1min"] = {"start": load_before, "end": os.getloadavg()[0]}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    for name, v in result["stages"].items():
        print(f"{name:20s} {v['mb_in']:7.2f} MB in {v['seconds']:6.2f} s  {v['mb_per_s']:7.2f} MB/s")
    if "end_to_end" in result:
        print(json.dumps(result["end_to_end"], indent=2))
    return 0


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
