"""Throughput of each stage of the datatrove pipeline, and a model of the production build from it.

    python -m hybrid_mamba.data_scripts.bench_datatrove --out docs/results/bench_datatrove

The demo corpus is replicated (``--replicate`` copies; copy k swaps every eighth word with the one
three places on, so copies are not near-duplicates of each other and every stage sees all of them)
and built with the local executor, ``--tasks`` tasks, once per ``--workers`` value. Each stage is
timed as a whole (executor start, task processes and file I/O included) and its input counted from
the stage's own reader statistics: documents per second and MB of text per second. A synthetic
duplicate-pair file times MinhashDedupCluster, since the demo has no duplicates.

The markdown ends with a model of the production recipe (``--tokens``, default 100B) on N machines of
``--cores`` cores, built from these rates: the raw text needed (tokens x bytes per token / fraction of
raw bytes kept, both measured here), each parallel stage's time (its rate per task x tasks, scaled by
the measured two-worker efficiency), the one-task stages at their measured rates, and the storage of
the work folders and the output per raw byte as measured. The numbers are as good as the assumption
that production text behaves like the demo's; the markdown says which measured value each uses.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hybrid_mamba.common.files import write_json_atomic, write_text_atomic
from hybrid_mamba.common.machine import machine

from . import datatrove_pipeline as dtp
from .recipe import load_recipe, resolve_files

logger = logging.getLogger(__name__)
DEMO = Path(__file__).parent / "recipes" / "demo.yaml"
PRODUCTION = Path(__file__).parent / "recipes" / "production.yaml"
LIBRARIES = ("datatrove", "datasets", "tokenizers", "lingua-language-detector", "phonenumberslite")
PARALLEL = ("curate", "filter", "minhash_buckets", "dedup_filter", "tokenize")


@dataclass
class BenchArguments:
    out: str = field(default="docs/results/bench_datatrove", metadata={"help": "Folder for the JSON and markdown."})
    recipe: str = field(default=str(DEMO), metadata={"help": "Recipe whose local sources are replicated."})
    replicate: int = field(default=3, metadata={"help": "Copies of the corpus (each with words swapped)."})
    tasks: int = field(default=4, metadata={"help": "Tasks of the parallel stages."})
    workers: list[int] = field(default_factory=lambda: [1, 2], metadata={"help": "Worker counts to run with."})
    tokens: float = field(default=100e9, metadata={"help": "Production token budget for the model."})
    machines: list[int] = field(default_factory=lambda: [1, 8, 32, 128], metadata={"help": "Machine counts."})
    cores: int = field(default=64, metadata={"help": "Cores per machine in the model (one task per core)."})
    cluster_pairs: int = field(default=300_000, metadata={"help": "Duplicate pairs for the cluster timing."})
    model_only: bool = field(
        default=False, metadata={"help": "Recompute the model and markdown from OUT/bench_datatrove.json."}
    )

    def __post_init__(self):
        if self.replicate < 1 or self.tasks < 1 or min(self.workers) < 1 or self.cores < 1:
            raise ValueError("--replicate, --tasks, --workers and --cores must be at least 1")


_WORD = re.compile(r"\S+")


def swapped(text: str, k: int) -> str:
    """Copy k of a text: every eighth word (from word k % 8) swapped with the word three places on."""
    if k == 0:
        return text
    spans = [m.span() for m in _WORD.finditer(text)]
    words = [text[a:b] for a, b in spans]
    for i in range(k % 8, len(words) - 3, 8):
        words[i], words[i + 3] = words[i + 3], words[i]
    out, last = [], 0
    for (a, b), w in zip(spans, words, strict=True):
        out += [text[last:a], w]
        last = b
    out.append(text[last:])
    return "".join(out)


def replicated_recipe(recipe_path: str, copies: int, root: Path) -> Path:
    """The recipe with every local source's files copied ``copies`` times into ``root`` and the budget scaled."""
    data = yaml.safe_load(Path(recipe_path).read_text(encoding="utf-8"))
    recipe = load_recipe(recipe_path)
    for s, raw in zip(recipe.sources, data["sources"], strict=True):
        files = resolve_files(s)
        folder = root / s.name
        folder.mkdir(parents=True)
        for path, doc_id in zip(files.paths, files.ids, strict=True):
            text = path.read_bytes().decode("utf-8", errors="replace")
            for k in range(copies):
                (folder / f"{k}_{doc_id.replace('/', '_')}").write_text(swapped(text, k), encoding="utf-8")
        raw["files"] = [str(folder / "*")]
        raw.pop("exclude", None)
    if data.get("total_tokens"):
        data["total_tokens"] = int(data["total_tokens"]) * copies
    out = root / "recipe.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return out


def _stat(stats: list, step: str, key: str) -> float:
    for s in stats:
        if s["name"] == step and key in s["stats"]:
            v = s["stats"][key]
            return float(v["total"] if isinstance(v, dict) else v)
    return 0.0


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def run_once(recipe_path: Path, out: Path, tasks: int, workers: int) -> dict:
    recipe, cfg = dtp.load_run_config(recipe_path)
    cfg.tasks, cfg.workers = tasks, workers
    result = dtp.run_build(recipe, cfg, out, force=True, keep_work=True)
    work = Path(result["work"]) / "data"
    logs = Path(result["logging_dir"])
    stats = {
        p.name.split("_", 1)[1]: json.loads((p / "stats.json").read_text())
        for p in sorted(logs.iterdir())
        if p.is_dir()
    }
    report = json.loads((out / "report.json").read_text())
    raw = (
        _stat(stats["curate"], "hybrid_mamba: read sources", "docs_read"),
        _stat(stats["curate"], "hybrid_mamba: read sources", "bytes_read"),
    )
    filt = (
        _stat(stats["filter"], "hybrid_mamba: read shard", "docs_read"),
        _stat(stats["filter"], "hybrid_mamba: read shard", "bytes_read"),
    )
    signed = (
        _stat(stats["dedup_filter"], "hybrid_mamba: read shard", "docs_read"),
        _stat(stats["dedup_filter"], "hybrid_mamba: read shard", "bytes_read"),
    )
    tok = (
        _stat(stats["tokenize"], "hybrid_mamba: tokenize", "docs"),
        _stat(stats["tokenize"], "hybrid_mamba: tokenize", "bytes_in"),
    )
    deduped_bytes = sum(d["chars_out"] for d in report["stages"]["dedup"].values())  # chars, ~bytes
    kept_tokens = sum(d["tokens_out"] for d in report["stages"]["dedup"].values())
    kept_bytes = sum(
        len(d.text.encode("utf-8"))
        for r in dtp._shard_ranks(work / "deduped")
        for d in dtp.read_shard(work / "deduped", r)
    )
    packed = sum(s["tokens"] for s in report["splits"].values())
    inputs = {
        "curate": raw,
        "quality_cuts": (filt[0], None),
        "filter": filt,
        "minhash_buckets": (signed[0], None),
        "minhash_cluster": (signed[0], None),
        "dedup_filter": signed,
        "tokenizer": (signed[0], kept_bytes),
        "tokenize": tok,
        "pack": (
            sum(s["sources"][n]["documents"] for s in report["splits"].values() for n in s["sources"]),
            packed * 4,
        ),
    }
    stages = {}
    for name, t in result["stages"].items():
        docs, nbytes = inputs[name]
        sec = t["seconds"]
        stages[name] = {
            "tasks": t["tasks"],
            "seconds": sec,
            "docs_in": int(docs),
            "mb_in": None if nbytes is None else nbytes / 1e6,
            "docs_per_s": docs / sec,
            "mb_per_s": None if nbytes is None else nbytes / 1e6 / sec,
        }
    stages["pack"]["tokens_per_s"] = packed / stages["pack"]["seconds"]
    storage = {
        k: _folder_bytes(work / k)
        for k in ("scored", "scores", "curated", "sigs", "buckets", "remove", "deduped", "removed", "runs", "tokenizer")
    }
    storage["output"] = _folder_bytes(out)
    shutil.rmtree(Path(result["work"]), ignore_errors=True)
    return {
        "tasks": tasks,
        "workers": workers,
        "stages": stages,
        "total_seconds": sum(s["seconds"] for s in stages.values()),
        "raw_docs": int(raw[0]),
        "raw_bytes": int(raw[1]),
        "kept_bytes": kept_bytes,
        "kept_chars": deduped_bytes,
        "kept_tokens": kept_tokens,
        "packed_tokens": packed,
        "storage_bytes": storage,
    }


def bench_cluster(pairs: int, root: Path) -> dict:
    """MinhashDedupCluster on a synthetic .dups file: ``pairs`` random pairs among 2 x pairs documents."""
    import numpy as np
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupCluster

    rng = np.random.default_rng(0)
    folder = root / "dups"
    folder.mkdir(parents=True)
    docs = rng.integers(0, 2 * pairs, size=(pairs, 2))
    with open(folder / "00000_00.dups", "wb") as f:
        for a, b in docs:
            f.write(struct.pack("<4I", a // 100_000, a % 100_000, b // 100_000, b % 100_000))
    step = MinhashDedupCluster(str(folder), str(root / "remove"), config=MinhashConfig(num_buckets=1))
    start = time.perf_counter()
    step.run(None, 0, 1)
    sec = time.perf_counter() - start
    return {"pairs": pairs, "seconds": sec, "pairs_per_s": pairs / sec}


def production_model(runs: list[dict], cluster: dict, args: BenchArguments, machine_info: dict) -> dict:
    """Wall time and storage of the production recipe on each machine count, from the measured rates."""
    prod = load_recipe(PRODUCTION)
    base = runs[0]  # one worker: rates per task
    best = max(runs, key=lambda r: r["workers"])
    # Several workers only say how tasks scale when the cores were free for them; on a machine that
    # other work already kept busy, they compete for the same cores and the model assumes linear scaling
    # (tasks share nothing but the file system).
    load = machine_info["load_average_1min"]["start"]
    scaling_measured = load + best["workers"] <= machine_info["cores_available"] + 0.5
    bytes_per_token = base["kept_bytes"] / base["kept_tokens"]
    keep = base["kept_bytes"] / base["raw_bytes"]
    raw_bytes = args.tokens * bytes_per_token / keep
    scale = raw_bytes / base["raw_bytes"]  # production input / bench input
    # Two workers against one, per parallel stage: how far task processes scale on these cores.
    eff = {}
    for name in PARALLEL:
        one, many = base["stages"][name]["seconds"], best["stages"][name]["seconds"]
        measured = min(1.0, one / many / min(best["workers"], best["stages"][name]["tasks"]))
        eff[name] = measured if best is not base and scaling_measured else 1.0
    mh = dtp.minhash_config(prod.dedup, prod.seed)
    # A stage that does next to nothing (quality_cuts) measures the fixed cost of starting a stage's
    # executor and tasks here; it is taken off every stage before scaling to the production input.
    overhead = base["stages"]["quality_cuts"]["seconds"]

    def net(name: str) -> float:
        sec = base["stages"][name]["seconds"]
        return max(sec - overhead, 0.05 * sec)

    tok = base["stages"]["tokenizer"]
    single = {
        "quality_cuts": overhead,  # about 64 binary searches per task's run: no growth modelled
        "minhash_cluster": None,
        "tokenizer": prod.tokenizer.train_max_bytes / 1e6 / (tok["mb_in"] / net("tokenizer")),
        "pack": args.tokens / (base["packed_tokens"] / net("pack")),
    }
    docs = base["stages"]["dedup_filter"]["docs_in"] * scale
    dup_pairs = docs * 0.3  # assumed: 30% of documents in a duplicate pair (web crawls); the demo has none
    single["minhash_cluster"] = dup_pairs / cluster["pairs_per_s"]
    rows = []
    for n in args.machines:
        cores = n * args.cores
        parallel = {}
        for name in PARALLEL:
            # One process's seconds for the whole production input (base tasks ran min(workers, tasks) at once).
            one_process = net(name) * min(base["workers"], base["stages"][name]["tasks"]) * scale
            slots = cores if name != "minhash_buckets" else min(cores, mh.num_buckets * max(1, cores // mh.num_buckets))
            parallel[name] = one_process / (slots * eff[name])
        total = sum(parallel.values()) + sum(single.values())
        rows.append({"machines": n, "cores": cores, "parallel_s": parallel, "single_s": single, "total_s": total})
    st = base["storage_bytes"]
    per_raw = {k: v / base["raw_bytes"] for k, v in st.items() if k not in ("output", "tokenizer")}
    storage = {k: v * raw_bytes for k, v in per_raw.items()}
    storage["output"] = st["output"] / base["packed_tokens"] * args.tokens
    return {
        "tokens": args.tokens,
        "stage_overhead_s": overhead,
        "bytes_per_token": bytes_per_token,
        "keep_fraction": keep,
        "raw_bytes": raw_bytes,
        "efficiency": eff,
        "scaling_measured": scaling_measured,
        "minhash_bands": [mh.num_buckets, mh.hashes_per_bucket],
        "assumed_dup_pair_fraction": 0.3,
        "rows": rows,
        "storage_bytes": storage,
        "peak_storage_bytes": sum(storage.values()),
    }


def _h(sec: float) -> str:
    if sec < 120:
        return f"{sec:.0f} s"
    if sec < 7200:
        return f"{sec / 60:.0f} min"
    return f"{sec / 3600:.1f} h"


def _b(n: float) -> str:
    for unit, d in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= d:
            return f"{n / d:.1f} {unit}"
    return f"{n / 1e3:.0f} kB"


def markdown(result: dict) -> str:
    m, runs, model = result["machine"], result["runs"], result["model"]
    lines = [
        "# datatrove pipeline: stage throughput and a production model",
        "",
        f"`python -m hybrid_mamba.data_scripts.bench_datatrove --out {result['args']['out']}` on {m['cpu']}, "
        f"{m['cores_available']} cores available (1-min load average {m['load_average_1min']['start']:.1f} at the start, "
        f"{m['load_average_1min']['end']:.1f} at the end: other work shared the cores), datatrove {m['datatrove']}, {m['date']}.",
        "",
        f"Input: the demo corpus x {result['args']['replicate']} (copies with words swapped so they are not duplicates): "
        f"{runs[0]['raw_docs']:,} documents, {runs[0]['raw_bytes'] / 1e6:.1f} MB; {runs[0]['tasks']} tasks, local executor.",
        "",
        "| stage | tasks | workers | docs in | MB in | seconds | docs/s | MB/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        for name, s in run["stages"].items():
            mb = "-" if s["mb_in"] is None else f"{s['mb_in']:.1f}"
            mbs = "-" if s["mb_per_s"] is None else f"{s['mb_per_s']:.2f}"
            lines.append(
                f"| {name} | {s['tasks']} | {run['workers']} | {s['docs_in']:,} | {mb} | {s['seconds']:.2f} | {s['docs_per_s']:.1f} | {mbs} |"
            )
        lines.append(f"| **all** | | {run['workers']} | | | {run['total_seconds']:.1f} | | |")
    c = result["cluster"]
    lines += [
        "",
        f"Seconds include starting each stage's executor and its task processes, which dominates the small "
        f"stages at this size. pack: {runs[0]['stages']['pack']['tokens_per_s'] / 1e6:.2f} M tokens/s. "
        f"MinhashDedupCluster on {c['pairs']:,} synthetic duplicate pairs: {c['seconds']:.2f} s "
        f"({c['pairs_per_s'] / 1e3:.0f} k pairs/s).",
        "",
        f"## Model: the production recipe, {model['tokens'] / 1e9:.0f}B tokens",
        "",
        "Measured here and carried over (production text will differ; each number below scales with them):",
        "",
        f"- {model['bytes_per_token']:.2f} bytes of curated text per token (demo tokenizer, vocab "
        f"{result['vocab_size']}; a 50k vocabulary on web text packs more bytes per token, which lowers every time below)",
        f"- {model['keep_fraction']:.3f} of raw bytes survive curation and dedup (web crawls keep less: the time and "
        "storage of the stages before tokenization grow as 1 / this)",
        f"- raw text needed: {_b(model['raw_bytes'])}",
        f"- parallel stages: the one-worker stage time less {model['stage_overhead_s']:.2f} s of stage start-up "
        "(the time of quality_cuts, which does next to nothing here), scaled to the production input and spread "
        "over one task per core, "
        + (
            "divided by the measured two-worker efficiency "
            f"({', '.join(f'{k} {v:.2f}' for k, v in model['efficiency'].items())})"
            if model["scaling_measured"]
            else "assuming tasks scale linearly: the two-worker run competed with other work for the cores "
            "(see the load average), so it measures the machine, not datatrove's scaling"
        ),
        f"- minhash_buckets runs {model['minhash_bands'][0]} bands x minhash_workers_per_bucket tasks "
        f"(bands of {model['minhash_bands'][1]} hashes), modelled with enough workers per band to use every core",
        f"- minhash_cluster: one task; assumed {model['assumed_dup_pair_fraction']:.0%} of documents in a duplicate pair "
        "(not measured: the demo has none) at the synthetic pair rate above",
        "- tokenizer: one task on train_max_bytes (2 GB) at the measured MB/s; pack: one task at the measured "
        "tokens/s (both less the stage start-up)",
        "",
        "| machines | cores | curate | filter | buckets | dedup_filter | tokenize | one-task stages | total |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in model["rows"]:
        p = row["parallel_s"]
        one = sum(row["single_s"].values())
        lines.append(
            f"| {row['machines']} | {row['cores']:,} | {_h(p['curate'])} | {_h(p['filter'])} | {_h(p['minhash_buckets'])} | "
            f"{_h(p['dedup_filter'])} | {_h(p['tokenize'])} | {_h(one)} | {_h(row['total_s'])} |"
        )
    s = model["rows"][0]["single_s"]
    lines += [
        "",
        f"One-task stages (the same on any number of machines): quality_cuts {_h(s['quality_cuts'])}, "
        f"minhash_cluster {_h(s['minhash_cluster'])}, tokenizer {_h(s['tokenizer'])}, pack {_h(s['pack'])}. "
        "pack is one process writing every block; at this scale it is the floor of the wall time.",
        "",
        "Storage (work folders at the measured bytes per raw byte; output at the measured bytes per token):",
        "",
        "| folder | size |",
        "|---|---:|",
    ]
    for k, v in model["storage_bytes"].items():
        lines.append(f"| {k} | {_b(v)} |")
    lines += [
        f"| **all, kept until the end** | {_b(model['peak_storage_bytes'])} |",
        "",
        "Each shard folder can go once the stage after it has finished (scored after filter, curated after "
        "dedup_filter, sigs after minhash_buckets), which lowers the peak.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from hybrid_mamba.common.args import parse_args

    args = parse_args(BenchArguments, argv)
    logging.basicConfig(level="WARNING")
    out = Path(args.out)
    if args.model_only:
        result = json.loads((out / "bench_datatrove.json").read_text())
        result["args"] |= {k: v for k, v in vars(args).items() if k in ("tokens", "machines", "cores")}
    else:
        load_before = os.getloadavg()[0]
        result = {"args": vars(args).copy(), "machine": machine(libraries=LIBRARIES)}
        with tempfile.TemporaryDirectory(prefix="bench_datatrove_") as tmp:
            root = Path(tmp)
            recipe = replicated_recipe(args.recipe, args.replicate, root / "corpus")
            result["vocab_size"] = load_recipe(recipe).tokenizer.vocab_size
            result["runs"] = [run_once(recipe, root / f"out_w{w}", args.tasks, w) for w in args.workers]
            result["cluster"] = bench_cluster(args.cluster_pairs, root / "cluster")
        result["machine"]["load_average_1min"] = {"start": load_before, "end": os.getloadavg()[0]}
    result["model"] = production_model(result["runs"], result["cluster"], args, result["machine"])
    write_json_atomic(out / "bench_datatrove.json", result)
    write_text_atomic(out / "README.md", markdown(result))
    for run in result["runs"]:
        for name, s in run["stages"].items():
            mbs = "" if s["mb_per_s"] is None else f"{s['mb_per_s']:8.2f} MB/s"
            print(f"workers {run['workers']} {name:16s} {s['seconds']:7.2f} s {s['docs_per_s']:9.1f} docs/s {mbs}")
    for row in result["model"]["rows"]:
        print(f"model: {row['machines']:4d} machines: {_h(row['total_s'])}")
    print(f"model: peak storage {_b(result['model']['peak_storage_bytes'])}")
    return 0


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
