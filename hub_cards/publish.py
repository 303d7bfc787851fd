"""Publish a model (or a PEFT adapter) folder as a Hub-style model repo, with its card.

    python -m hybrid_mamba.hub_cards.publish --model RUN/final --to runs/tiny-repo [--eval RESULTS] [--bench bench.json]
        [--data DATA_DIR] [--run RUN] [--train-config CONFIG] [--message MSG] [--tag TAG] [--shard-size 2GB]
    python -m hybrid_mamba.hub_cards.publish --model RUN/final --to hf://owner/name ...   (needs HF_TOKEN and the network)
    python -m hybrid_mamba.hub_cards.publish --model RUN/final --to ... --format bamba

With `--format bamba` the repo holds transformers' own BambaForCausalLM, exported weight for weight by
`hybrid_mamba.modeling.convert.export` (same logits; no remote code, no trust_remote_code), with the same card.

Everything is first written into a staging folder (exactly what the repo will hold: config.json with
auto_map, the remote code, weights in safetensors, sharded past --shard-size with an index,
generation_config.json, tokenizer files, README.md, assets/*.png, .gitattributes), checked for
credentials, then committed and tagged in a git repository (a local path, created if missing, or any
git remote, cloned and pushed) or uploaded to the Hugging Face Hub with HfApi.
"""

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hybrid_mamba.common import lm_eval_results
from hybrid_mamba.common.args import parse_args

from .card import (
    CardInputs,
    build_card,
    read_bench,
    read_run_config,
    read_transformers_range,
)
from .secrets import check_no_credentials

logger = logging.getLogger(__name__)

# The .gitattributes a new model repo gets on the Hub: these patterns go through git-lfs.
HUB_LFS_PATTERNS = [
    "*.7z",
    "*.arrow",
    "*.bin",
    "*.bz2",
    "*.ckpt",
    "*.ftz",
    "*.gz",
    "*.h5",
    "*.joblib",
    "*.lfs.*",
    "*.mlmodel",
    "*.model",
    "*.msgpack",
    "*.npy",
    "*.npz",
    "*.onnx",
    "*.ot",
    "*.parquet",
    "*.pb",
    "*.pickle",
    "*.pkl",
    "*.pt",
    "*.pth",
    "*.rar",
    "*.safetensors",
    "saved_model/**/*",
    "*.tar.*",
    "*.tar",
    "*.tflite",
    "*.tgz",
    "*.wasm",
    "*.xz",
    "*.zip",
    "*.zst",
    "*tfevents*",
]
HUB_PREFIXES = ("hf://", "hub:")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
EXTRA_FILES = ("finetune_config.json",)


class PublishError(RuntimeError):
    """A target that cannot be published to; raised before anything is pushed."""


@dataclass
class PublishArgs:
    """Publish a model or PEFT adapter folder, with its card, to a local or remote git repository or the Hub."""

    model: str = field(metadata={"help": "A save_pretrained folder (RUN/final) or a PEFT adapter folder."})
    to: str = field(
        metadata={"help": "Target: a local path or git remote URL, or hf://owner/name for the Hugging Face Hub."}
    )
    eval: str | None = field(default=None, metadata={"help": "lm-eval native results JSON, or a folder of them."})
    bench: str | None = field(
        default=None, metadata={"help": "A bench_speed JSON (schema of docs/results/bench_speed.json)."}
    )
    data: str | None = field(
        default=None, metadata={"help": "DATA/ folder of data_scripts (its report.json fills the data section)."}
    )
    run: str | None = field(
        default=None,
        metadata={
            "help": "RUN/ folder (summary.json, metrics.jsonl); default: the model folder's parent when it has summary.json."
        },
    )
    train_config: str | None = field(
        default=None,
        metadata={"help": "The training config (YAML or JSON) the run used, for the hyperparameter table."},
    )
    message: str = field(default="Publish model", metadata={"help": "Commit message."})
    tag: str | None = field(
        default=None, metadata={"help": "Tag for the published revision; default v<N>, the next free number."}
    )
    shard_size: str = field(
        default="2GB", metadata={"help": "save_pretrained max_shard_size: weights past it are sharded with an index."}
    )
    name: str | None = field(
        default=None, metadata={"help": "Model name in the card; default: the target's last path component."}
    )
    license: str = field(default="apache-2.0", metadata={"help": "Licence of the published weights (card metadata)."})
    stage: str | None = field(
        default=None, metadata={"help": "Keep the staging folder here (must not exist); default: a temporary folder."}
    )
    format: Literal["hybrid_mamba", "bamba"] = field(
        default="hybrid_mamba",
        metadata={
            "help": "hybrid_mamba: the model with its remote code (trust_remote_code=True); bamba: exported as "
            "transformers' BambaForCausalLM, which loads without remote code (a model Bamba can express)."
        },
    )

    def __post_init__(self):
        if not re.fullmatch(r"\d+(\.\d+)?\s*[KMG]i?B", self.shard_size, flags=re.I):
            raise ValueError(f"--shard-size {self.shard_size!r}: expected a size such as 500MB or 2GB")
        if is_hub_target(self.to):
            hub_repo_id(self.to)


def is_hub_target(target: str) -> bool:
    return target.startswith(HUB_PREFIXES)


def hub_repo_id(target: str) -> str:
    repo_id = target.split("://", 1)[1] if target.startswith("hf://") else target.split(":", 1)[1]
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise PublishError(f"--to {target}: a Hub target is hf://owner/name")
    return repo_id


def is_remote_git(target: str) -> bool:
    return "://" in target or re.match(r"^[\w.-]+@[\w.-]+:", target) is not None


# checks before any work


def check_args(args: PublishArgs) -> dict:
    """Validate every input and return the resolved paths; one clear error per bad input, before any work."""
    model = Path(args.model)
    adapter = (model / "adapter_config.json").is_file()
    if not adapter and not (model / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {model}: neither config.json (a save_pretrained folder) nor adapter_config.json (a PEFT adapter)"
        )
    if adapter and not (model / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"--model {model}: adapter_config.json without adapter_model.safetensors")
    run = Path(args.run) if args.run else (model.parent if (model.parent / "summary.json").is_file() else None)
    if run is not None and not (run / "summary.json").is_file():
        raise FileNotFoundError(f"--run {run} has no summary.json")
    data = Path(args.data) if args.data else None
    if data is not None and not (data / "report.json").is_file():
        raise FileNotFoundError(
            f"--data {data} has no report.json (write it with python -m hybrid_mamba.data_scripts.prepare)"
        )
    for flag, value in (("--eval", args.eval), ("--bench", args.bench), ("--train-config", args.train_config)):
        if value and not Path(value).exists():
            raise FileNotFoundError(f"{flag} {value} does not exist")
    if args.format == "bamba":
        check_bamba_exportable(model, adapter)
    if args.stage and Path(args.stage).exists():
        raise FileExistsError(f"--stage {args.stage} already exists")
    if not is_hub_target(args.to) and not is_remote_git(args.to):  # a Hub target's name: PublishArgs.__post_init__
        target = Path(args.to)
        if target.exists() and any(target.iterdir()) and not (target / ".git").exists():
            raise PublishError(f"--to {target} exists, is not empty and is not a git repository")
    inputs = [model] + [Path(p) for p in (args.eval, args.bench, args.train_config) if p]
    inputs += [data / "report.json"] if data else []
    inputs += [p for p in (run / "summary.json", run / "finetune_config.json") if p.is_file()] if run else []
    check_no_credentials(inputs)
    return {"model": model, "adapter": adapter, "run": run, "data": data}


def check_bamba_exportable(model: Path, adapter: bool) -> None:
    """--format bamba: a full hybrid_mamba model whose config Bamba expresses (ExportError names the field)."""
    if adapter:
        raise PublishError(f"--format bamba exports a full model; {model} is a PEFT adapter (merge it first)")
    model_type = json.loads((model / "config.json").read_text()).get("model_type")
    if model_type != "hybrid_mamba":
        raise PublishError(f"--format bamba exports a hybrid_mamba model; {model} holds model_type {model_type!r}")
    from hybrid_mamba.configuration import HybridMambaConfig
    from hybrid_mamba.modeling.convert import check_exportable

    check_exportable(HybridMambaConfig.from_pretrained(model), "bamba")


def check_hub_reachable(repo_id: str):
    """The Hub needs HF_TOKEN and the network: fail with one message before staging or pushing anything."""
    from huggingface_hub import HfApi, constants

    # HTTPError: the base class of huggingface_hub's HTTP client errors (httpx2 in huggingface_hub 2.x, httpx in
    # 1.x): HfHubHTTPError (401, 404, 5xx) and the client's ConnectError and timeouts, which are not OSError.
    from huggingface_hub.errors import HfHubHTTPError, HTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    token = os.environ.get("HF_TOKEN")
    if not token:
        raise PublishError(f"cannot publish to the Hub ({repo_id}): HF_TOKEN is not set; nothing was pushed")
    if constants.HF_HUB_OFFLINE:
        raise PublishError(f"cannot publish to the Hub ({repo_id}): HF_HUB_OFFLINE is set; nothing was pushed")
    api = HfApi(token=token)
    try:
        api.whoami()
    except (HfHubHTTPError, HTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled, OSError) as err:
        reason = ": ".join([type(err).__name__, *str(err).strip().splitlines()[:1]])  # the first line names the cause
        raise PublishError(
            f"cannot publish to the Hub ({repo_id}): {constants.ENDPOINT} is not reachable with this token "
            f"({reason}); nothing was pushed"
        ) from None
    return api


# staging


def _card_inputs(args: PublishArgs, paths: dict, stage: Path, repo_name: str) -> CardInputs:
    model, run = paths["model"], paths["run"]
    adapter_config = json.loads((model / "adapter_config.json").read_text()) if paths["adapter"] else None
    if adapter_config:
        base = Path(str(adapter_config.get("base_model_name_or_path")))
        config_dir = base if (base / "config.json").is_file() else None
    else:
        # an exported repo's card describes the model it was exported from (layout, parameter counts)
        config_dir = model if args.format == "bamba" else stage
    config = json.loads((config_dir / "config.json").read_text()) if config_dir else {}
    param_counts = None
    if config.get("model_type") == "hybrid_mamba":
        from hybrid_mamba.configuration import HybridMambaConfig
        from hybrid_mamba.configuration.param_counts import count_parameters

        param_counts = count_parameters(HybridMambaConfig.from_pretrained(config_dir))
    config_file = (
        Path(args.train_config)
        if args.train_config
        else next(
            (
                p
                for p in (model / "finetune_config.json", run / "finetune_config.json" if run else None)
                if p and p.is_file()
            ),
            None,
        )
    )
    inp = CardInputs(
        model_name=args.name or repo_name,
        config=config,
        repo_id=hub_repo_id(args.to) if is_hub_target(args.to) else repo_name,
        license=args.license,
        adapter_config=adapter_config,
        param_counts=param_counts,
        run_config=read_run_config(config_file) if config_file else None,
        run_config_source=str(config_file) if config_file else None,
        transformers_range=read_transformers_range(config_dir / "modeling_hybrid_mamba.py")
        if config_dir and args.format != "bamba"
        else None,
        native_config=json.loads((stage / "config.json").read_text()) if args.format == "bamba" else None,
    )
    if paths["data"]:
        inp.data_report = json.loads((paths["data"] / "report.json").read_text())
    if run:
        inp.summary = json.loads((run / "summary.json").read_text())
        inp.metrics_path = run / "metrics.jsonl" if (run / "metrics.jsonl").is_file() else None
    if args.eval:
        inp.eval_results, inp.eval_source = lm_eval_results.read_results(Path(args.eval)), args.eval
        inp.eval_documents = lm_eval_results.read_documents(Path(args.eval))
    if args.bench:
        inp.bench, inp.bench_source = read_bench(Path(args.bench)), args.bench
    return inp


def stage_repo(args: PublishArgs, paths: dict, stage: Path, repo_name: str) -> None:
    """Write into `stage` exactly what the published repo holds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = paths["model"]
    stage.mkdir(parents=True)
    if paths["adapter"]:
        for name in ADAPTER_FILES:
            shutil.copy2(model_dir / name, stage / name)
    elif args.format == "bamba":
        from hybrid_mamba.modeling.convert import export

        export(model_dir, "bamba").save_pretrained(stage, max_shard_size=args.shard_size)
        for name in ("config.json", "generation_config.json"):
            if not (stage / name).is_file():
                raise PublishError(f"save_pretrained of the Bamba export of {model_dir} wrote no {name}")
    else:
        # the folder's own remote code is loaded and written again, so the repo carries the code it was trained with
        model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype="auto")
        model.save_pretrained(stage, max_shard_size=args.shard_size)
        for name in ("configuration_hybrid_mamba.py", "modeling_hybrid_mamba.py", "generation_config.json"):
            if not (stage / name).is_file():
                raise PublishError(f"save_pretrained of {model_dir} wrote no {name}; the repo would not load")
    for name in EXTRA_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, stage / name)
    if any((model_dir / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True).save_pretrained(stage)
    else:
        logger.warning("%s holds no tokenizer files: the repo will have none", model_dir)
    card = build_card(_card_inputs(args, paths, stage, repo_name), stage / "assets")
    card.save(stage / "README.md")
    (stage / ".gitattributes").write_text(
        "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in HUB_LFS_PATTERNS)
    )


# targets


def _git(*args, cwd: Path) -> str:
    run = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if run.returncode != 0:
        raise PublishError(f"git {' '.join(args)} failed in {cwd}: {run.stderr.strip()[-2000:]}")
    return run.stdout.strip()


def git_lfs_available() -> bool:
    return (
        shutil.which("git") is not None
        and subprocess.run(["git", "lfs", "version"], capture_output=True).returncode == 0
    )


def _next_tag(tags: list) -> str:
    numbers = [int(t[1:]) for t in tags if re.fullmatch(r"v\d+", t)]
    return f"v{max(numbers, default=0) + 1}"


def publish_git(stage: Path, target: str, message: str, tag: str | None) -> dict:
    """Commit `stage` as the whole content of a git repo (a local path, created when missing, or a remote) and tag it."""
    remote = is_remote_git(target)
    tmp = Path(tempfile.mkdtemp(prefix="hub_cards_clone_")) if remote else None
    try:
        if remote:
            work = tmp / "repo"
            _git("clone", target, str(work), cwd=tmp)
        else:
            work = Path(target)
            work.mkdir(parents=True, exist_ok=True)
            if not (work / ".git").exists():
                _git("init", "-q", "-b", "main", cwd=work)
            elif _git("status", "--porcelain", cwd=work):
                raise PublishError(f"{work} has uncommitted changes; commit or discard them before publishing")
        tags = _git("tag", "--list", cwd=work).split()
        tag = tag or _next_tag(tags)
        if tag in tags:
            raise PublishError(f"tag {tag} already exists in {target}")
        if git_lfs_available():
            _git("lfs", "install", "--local", cwd=work)
        else:
            logger.warning(
                "git-lfs is not installed: large files are committed as ordinary git objects "
                "(the Hub needs LFS for files over 10 MB; install git-lfs before pushing there)"
            )
        for entry in work.iterdir():
            if entry.name != ".git":
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        shutil.copytree(stage, work, dirs_exist_ok=True)
        _git("add", "--all", ".", cwd=work)
        identity = (
            []
            if subprocess.run(["git", "config", "user.email"], cwd=work, capture_output=True).returncode == 0
            else ["-c", "user.name=hybrid-mamba hub_cards", "-c", "user.email=hub_cards@localhost"]
        )
        _git(*identity, "commit", "-q", "--allow-empty", "-m", message, cwd=work)
        _git(*identity, "tag", "-a", tag, "-m", message, cwd=work)
        commit = _git("rev-parse", "HEAD", cwd=work)
        if remote:
            branch = _git("rev-parse", "--abbrev-ref", "HEAD", cwd=work)
            _git("push", "origin", f"HEAD:refs/heads/{branch}", f"refs/tags/{tag}", cwd=work)
        return {"target": target, "commit": commit, "tag": tag, "lfs": git_lfs_available()}
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def publish_hub(api, stage: Path, repo_id: str, message: str, tag: str | None) -> dict:
    """create_repo, upload_folder (files not in the stage are deleted, so the repo equals it), then tag the commit."""
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    tags = [t.name for t in api.list_repo_refs(repo_id).tags]
    tag = tag or _next_tag(tags)
    if tag in tags:
        raise PublishError(f"tag {tag} already exists on the Hub repo {repo_id}")
    info = api.upload_folder(repo_id=repo_id, folder_path=stage, commit_message=message, delete_patterns="*")
    api.create_tag(repo_id, tag=tag, revision=info.oid, tag_message=message)
    return {"target": f"hf://{repo_id}", "commit": info.oid, "tag": tag, "url": info.commit_url}


def publish(args: PublishArgs) -> dict:
    paths = check_args(args)
    api = check_hub_reachable(hub_repo_id(args.to)) if is_hub_target(args.to) else None
    repo_name = (
        hub_repo_id(args.to).split("/")[1] if api else re.split(r"[/:]", args.to.rstrip("/"))[-1].removesuffix(".git")
    )
    with tempfile.TemporaryDirectory(prefix="hub_cards_stage_") as tmp:
        stage = Path(tmp) / "repo"
        stage_repo(args, paths, stage, repo_name)
        check_no_credentials([stage])
        result = (
            publish_hub(api, stage, hub_repo_id(args.to), args.message, args.tag)
            if api
            else publish_git(stage, args.to, args.message, args.tag)
        )
        result["files"] = sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file())
        if args.stage:
            shutil.move(str(stage), args.stage)
            result["stage"] = args.stage
    logger.info(
        "published %s to %s (commit %s, tag %s)", args.model, result["target"], result["commit"][:12], result["tag"]
    )
    return result


def main(argv=None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    result = publish(parse_args(PublishArgs, argv))
    print(json.dumps({k: v for k, v in result.items() if k != "files"}, indent=2))
    print("files: " + ", ".join(result["files"]))
    return result


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
