"""Speed of the pure-torch Mamba-2 operators alone: the SSD scan and the causal conv, reference vs fast.

    python -m hybrid_mamba.eval_harness.bench_scan [--out results/bench_scan] [--threads 2] [--quick]

For each shape (batch x tokens: 4 x 512, 1 x 2048, 1 x 8192) and chunk length, times
`ssd_scan_ref` (autograd through the readable reference) and `ssd_scan` (the model's path, a
hand-written backward) forward-only and forward + backward, and `causal_conv1d_ref` then SiLU against
`causal_conv1d(..., silu=True)` on a channels-last input, as the model calls them. Heads, head size and state are the speed benchmark's (16 x 64, state 128, one group;
conv width 4 over 1280 channels). Implementations take turns inside every repetition; medians.
Writes bench_scan.json and bench_scan.md into --out and prints the table. This is what
CPU_CHUNK_SIZE in the modeling file was chosen from. A full run takes about 3 minutes on 2 cores.
"""

import logging
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from hybrid_mamba.common.args import parse_args
from hybrid_mamba.common.files import write_json_atomic, write_text_atomic
from hybrid_mamba.common.machine import machine
from hybrid_mamba.modeling.modeling_hybrid_mamba import causal_conv1d, causal_conv1d_ref, ssd_scan, ssd_scan_ref

logger = logging.getLogger(__name__)

HEADS, HEAD_DIM, STATE, CONV_CHANNELS, CONV_WIDTH = 16, 64, 128, 1280, 4


@dataclass
class ScanBenchArgs:
    out: str = field(default="results/bench_scan", metadata={"help": "Folder for bench_scan.json and bench_scan.md."})
    threads: int = field(default=2, metadata={"help": "torch.set_num_threads."})
    quick: bool = field(default=False, metadata={"help": "Small shapes and one repetition (a smoke test)."})

    def __post_init__(self):
        if self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}.")


def _inputs(b, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, HEADS, HEAD_DIM, generator=g)
    dt = torch.rand(b, t, HEADS, generator=g) * 0.1 + 1e-3
    A = -torch.rand(HEADS, generator=g) * 4 - 0.1
    B = torch.randn(b, t, 1, STATE, generator=g)
    C = torch.randn(b, t, 1, STATE, generator=g)
    D = torch.randn(HEADS, generator=g)
    return [v.requires_grad_() for v in (x, dt, A, B, C, D)]


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(shapes, chunks, reps, backward_up_to) -> list[dict]:
    rows = []
    for b, t in shapes:
        x, dt, A, B, C, D = _inputs(b, t)
        gy = torch.randn(b, t, HEADS, HEAD_DIM)
        # as in the model: a channels-last view of in_proj's (B, T, E) output
        conv_x = torch.randn(b, t, CONV_CHANNELS).transpose(1, 2).requires_grad_()
        conv_w = torch.randn(CONV_CHANNELS, CONV_WIDTH, requires_grad=True)
        conv_b = torch.randn(CONV_CHANNELS, requires_grad=True)
        calls = {}
        for name, fn in (("ssd_scan_ref", ssd_scan_ref), ("ssd_scan", ssd_scan)):
            for chunk in chunks:

                def fwd(fn=fn, chunk=chunk):
                    with torch.no_grad():
                        fn(x, dt, A, B, C, chunk, D=D)

                def both(fn=fn, chunk=chunk):
                    y, _ = fn(x, dt, A, B, C, chunk, D=D)
                    torch.autograd.grad(y, (x, dt, A, B, C, D), gy)

                calls[(name, chunk, "forward")] = fwd
                if b * t <= backward_up_to:
                    calls[(name, chunk, "forward+backward")] = both
        ref_silu = lambda *a: F.silu(causal_conv1d_ref(*a))
        fast_silu = lambda *a: causal_conv1d(*a, silu=True)
        for name, fn in (("causal_conv1d_ref", ref_silu), ("causal_conv1d", fast_silu)):

            def cfwd(fn=fn):
                with torch.no_grad():
                    fn(conv_x, conv_w, conv_b)

            def cboth(fn=fn):
                out = fn(conv_x, conv_w, conv_b)
                torch.autograd.grad(out, (conv_x, conv_w, conv_b), torch.ones_like(out))

            calls[(name, None, "forward")] = cfwd
            if b * t <= backward_up_to:
                calls[(name, None, "forward+backward")] = cboth
        times = {key: [] for key in calls}
        for fn in calls.values():  # warmup
            fn()
        for _ in range(reps):
            for key, fn in calls.items():
                times[key].append(_time(fn))
        for (name, chunk, mode), ts in times.items():
            rows.append(
                dict(
                    batch=b,
                    tokens=t,
                    op=name,
                    chunk=chunk,
                    mode=mode,
                    median_ms=1e3 * statistics.median(ts),
                    times_ms=[1e3 * v for v in ts],
                )
            )
        logger.info("done %d x %d", b, t)
    return rows


def to_markdown(results) -> str:
    m = results["machine"]
    lines = [
        "# Pure-torch Mamba-2 operators: reference vs fast",
        "",
        f"`{results['command']}` on {m['cpu']}, {m['threads']} threads, torch {m['torch']}, {m['date']}, commit {m['git_commit']}.",
        f"fp32; SSD scan with {HEADS} heads of {HEAD_DIM}, state {STATE}, one group; conv over {CONV_CHANNELS} channels,"
        f" width {CONV_WIDTH}. Median of {results['reps']} (ms, lower is better); ratio = fast / reference at the same chunk.",
        "",
        "| shape | op | chunk | mode | reference | fast | fast/ref |",
        "|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["batch"], r["tokens"], r["op"], r["chunk"], r["mode"]): r["median_ms"] for r in results["rows"]}
    for (b, t, op, chunk, mode), ms in by_key.items():
        if op in ("ssd_scan_ref", "causal_conv1d_ref"):
            fast = by_key[(b, t, op.removesuffix("_ref"), chunk, mode)]
            lines.append(
                f"| {b} x {t} | {op.removesuffix('_ref')} | {chunk or '-'} | {mode} | {ms:.1f} | {fast:.1f} | {fast / ms:.2f} |"
            )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(ScanBenchArgs, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.quick:
        shapes, chunks, reps, backward_up_to = [(1, 128), (2, 96)], (32, 64), 1, 1024
    else:
        shapes, chunks, reps, backward_up_to = [(4, 512), (1, 2048), (1, 8192)], (32, 64, 128, 256), 3, 2048
    results = {
        "command": " ".join(
            ["python -m hybrid_mamba.eval_harness.bench_scan", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": machine(args.threads),
        "reps": reps,
        "rows": measure(shapes, chunks, reps, backward_up_to),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "bench_scan.json", results)
    write_text_atomic(out / "bench_scan.md", to_markdown(results) + "\n")
    print(to_markdown(results))


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
