"""Clone a published git repo and load it in a fresh process that cannot import this repository.

    python -m hybrid_mamba.hub_cards.reload --repo runs/tiny-repo --clone runs/tiny-repo-clone [--prompt TEXT] [--tokens N]

The child process blocks this repo's packages (common, configuration, modeling, trainers, data_scripts,
eval_harness, hub_cards), runs outside it without PYTHONPATH, loads model and tokenizer with
trust_remote_code=True from the clone and prints a greedy sample: what a user of the repo gets. The
sample is generated with the cache and without it; if they differ, reload fails.
"""

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hybrid_mamba.common.args import parse_args

logger = logging.getLogger(__name__)

REPO_PACKAGES = (
    "hybrid_mamba",
    "common",
    "configuration",
    "modeling",
    "trainers",
    "data_scripts",
    "eval_harness",
    "hub_cards",
)
CHILD = """
import importlib.abc, sys
class BlockRepo(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in PACKAGES:
            raise ImportError(name + " is blocked: the published repo must load without this repository")
sys.meta_path.insert(0, BlockRepo())
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
clone, prompt, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(clone, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(clone, trust_remote_code=True)
ids = tok(prompt, return_tensors="pt")
with torch.no_grad():
    out = model.generate(**ids, max_new_tokens=tokens, do_sample=False)
    # the cached decode must be the uncached one: a cache the remote code ignores decodes without state, silently
    uncached = model.generate(**ids, max_new_tokens=tokens, do_sample=False, use_cache=False)
new = out[0, ids["input_ids"].shape[1]:]
print(type(model).__module__)
print(int(torch.equal(out, uncached)), len(new))
print(tok.decode(out[0], skip_special_tokens=True))
"""


class ReloadError(RuntimeError):
    """The repo could not be cloned, or its clone does not load in a fresh process."""


def _last_line(text: str) -> str:
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "no output")


def reload(repo: str, clone: Path, prompt: str, tokens: int) -> tuple[str, str, int]:
    """Clone `repo` into `clone` (replacing an earlier clone), load and generate in a fresh process;
    (module of the loaded classes, sample, number of generated tokens)."""
    if clone.exists():
        shutil.rmtree(clone)
    run = subprocess.run(["git", "clone", "-q", repo, str(clone)], capture_output=True, text=True)
    if run.returncode != 0:
        raise ReloadError(f"git clone {repo} failed: {_last_line(run.stderr)}")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as elsewhere:
        run = subprocess.run(
            [
                sys.executable,
                "-c",
                CHILD.replace("PACKAGES", repr(REPO_PACKAGES)),
                str(clone.resolve()),
                prompt,
                str(tokens),
            ],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
        )
    if run.returncode != 0:
        from hybrid_mamba.common.cli import debug_enabled

        if debug_enabled():  # --debug: the child's traceback too
            sys.stderr.write(run.stderr[-3000:])
        raise ReloadError(f"loading the clone {clone} in a fresh process failed: {_last_line(run.stderr)}")
    module, check, sample = run.stdout.split("\n", 2)
    same, n_new = map(int, check.split())
    if not same:
        raise ReloadError(
            f"the clone {clone} generates differently with its cache than without it: its remote code does not "
            "carry the decoding state on this transformers release"
        )
    return module, sample.strip(), n_new


@dataclass
class ReloadArgs:
    """Clone a published git repo and load it, with a greedy sample, in a fresh process that cannot import this repository."""

    repo: str = field(metadata={"help": "The published git repo (path or URL)."})
    clone: Path = field(metadata={"help": "Where to clone it (replaced if present)."})
    prompt: str = field(default="To be, or not to be", metadata={"help": "Prompt of the sample."})
    tokens: int = field(default=40, metadata={"help": "Greedy tokens to generate."})


def main(argv=None) -> None:
    args = parse_args(ReloadArgs, argv)
    module, sample, n_new = reload(args.repo, args.clone, args.prompt, args.tokens)
    print(f"cloned {args.repo} into {args.clone}; loaded in a fresh process without this repo (classes from {module})")
    print(f"sample ({n_new} new tokens, the same with and without the cache): {sample!r}")


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
