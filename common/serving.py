"""`transformers serve` (the OpenAI-compatible server of transformers) as a process: started on a free
localhost port, waited for, stopped whatever happens; what a served folder must be.

`serve()` is the one place that starts and stops the server (eval_harness.bench_serve, hub_cards.serve
and the tests use it).
"""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

ERROR_LINE = re.compile(r"^\w+(\.\w+)*(Error|Exception): ")


class ServeError(RuntimeError):
    """The server did not start, or died."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def last_server_error(log_path: str | Path, wait_s: float = 10.0) -> str | None:
    """The last `SomeError: message` line of a server log: what a bare HTTP 500 was about. The server logs
    the traceback after it answered, so this waits up to `wait_s` for one to appear."""
    deadline = time.monotonic() + wait_s
    while True:
        lines = _log_tail(Path(log_path), 200_000).splitlines()
        found = next((line.strip() for line in reversed(lines) if ERROR_LINE.match(line)), None)
        if found is not None or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


@contextmanager
def serve(
    model: str,
    log_path: str | Path,
    extra_args: list[str] | None = None,
    device: str = "auto",
    host: str = "127.0.0.1",
    port: int | None = None,
    startup_timeout: float = 180.0,
    env: dict | None = None,
) -> Iterator[str]:
    """Run `transformers serve MODEL` (pinned to that model) until the block ends; yields the base URL
    (``http://HOST:PORT/v1``). See `serve_process`."""
    port = port or free_port(host)
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", model]
    cmd += ["--host", host, "--port", str(port), "--device", device, *(extra_args or [])]
    with serve_process(cmd, "`transformers serve`", host, port, log_path, startup_timeout, env) as url:
        yield url


@contextmanager
def serve_process(
    cmd: list[str],
    name: str,
    host: str,
    port: int,
    log_path: str | Path,
    startup_timeout: float = 180.0,
    env: dict | None = None,
) -> Iterator[str]:
    """Run an OpenAI-compatible server command listening on HOST:PORT until the block ends; yields the
    base URL once /health answers. The server is its own process group, stopped with SIGTERM then SIGKILL
    whatever happens in the block; its output goes to `log_path`, whose error line (or last lines) a
    failure to start quotes."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("starting: %s", " ".join(cmd))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})}
        )

    def why() -> str:
        error = last_server_error(log_path, wait_s=0)
        if error:
            return error
        tail = [line.strip() for line in _log_tail(log_path, 2000).splitlines() if line.strip()][-4:]
        return " | ".join(tail) or "no output"

    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise ServeError(
                    f"{name} exited with status {proc.returncode} before answering: {why()} (log: {log_path})"
                )
            try:
                with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ServeError(
                    f"{name} did not answer /health within {startup_timeout:.0f} s: {why()} (log: {log_path})"
                )
            time.sleep(0.5)
        yield f"http://{host}:{port}/v1"
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def local_architecture(model: str) -> tuple[bool, str | None]:
    """(is a local folder, its config's first architecture). A name that is not a path is a Hub id, left to
    the server: (False, None). A local path without config.json is an error."""
    folder = Path(model).expanduser()
    if not (folder.exists() or model.startswith((".", "/", "~"))):
        return False, None
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"--model {model}: no config.json there; give a folder written by save_pretrained.")
    return True, (json.loads(config.read_text(encoding="utf-8")).get("architectures") or [None])[0]


def check_servable(model: str) -> None:
    """Fail before starting a server when a local folder is not one `transformers serve` can load.

    The server builds `getattr(transformers, config.architectures[0])`: a class of transformers itself, so a
    hybrid_mamba folder (remote code) is served through its Bamba export. Hub ids are left to the server.
    """
    local, architecture = local_architecture(model)
    if not local:
        return
    import transformers

    if architecture is None or not hasattr(transformers, architecture):
        raise ValueError(
            f"--model {model}: its architecture {architecture} is not a class of transformers, which is all "
            "`transformers serve` loads; export it first: "
            f"python -m hybrid_mamba.modeling.convert --to bamba --src {model} --out {model}-bamba"
        )
