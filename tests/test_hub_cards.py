"""hub_cards: what a published repo holds, its card, credential refusal, git and Hub targets, adapters, and a fresh-clone load."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from huggingface_hub import ModelCard
from transformers import AutoTokenizer

from hybrid_mamba.common.lm_eval_results import read_results as read_lm_eval_results
from hybrid_mamba.hub_cards import publish as pub
from hybrid_mamba.hub_cards.secrets import CredentialError
from hybrid_mamba.modeling import HybridMambaForCausalLM

REPO = Path(__file__).resolve().parents[1]
BLOCKED = (
    "hybrid_mamba",
    "common",
    "configuration",
    "modeling",
    "trainers",
    "data_scripts",
    "eval_harness",
    "hub_cards",
)
BLOCKER = f"""
import importlib.abc, sys
class BlockRepo(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is blocked: the published repo must be self-contained")
sys.meta_path.insert(0, BlockRepo())
"""


def _lm_eval_results(path: Path) -> Path:
    path.write_text(
        json.dumps(
            {
                "results": {
                    "tiny_task": {
                        "alias": "tiny_task",
                        "acc,none": 0.25,
                        "acc_stderr,none": 0.0433,
                        "perplexity,none": 812.5,
                    }
                },
                "versions": {"tiny_task": 1.0},
                "n-shot": {"tiny_task": 0},
                "config": {"model": "hf"},
                "n-samples": {"tiny_task": {"original": 40, "effective": 16}},
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_data):
    """A RUN/ folder as trainers write it (final/ with tokenizer, summary.json, metrics.jsonl) and a DATA/ report."""
    root = tmp_path_factory.mktemp("run")
    tok = AutoTokenizer.from_pretrained(tiny_data / "tokenizer")
    torch.manual_seed(0)
    model = HybridMambaForCausalLM(
        tiny_config(
            "hybrid",
            vocab_size=len(tok),
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    ).eval()
    model.save_pretrained(root / "final")
    tok.save_pretrained(root / "final")
    (root / "summary.json").write_text(
        json.dumps(
            {
                "steps": 20,
                "tokens_seen": 2560,
                "global_batch_sequences": 4,
                "seq_len": 32,
                "wall_time_s": 12.5,
                "final_val_loss": 5.01,
                "best_val_loss": 4.99,
                "best_step": 10,
                "unigram_baseline_val_loss": 5.5,
                "hardware": {
                    "device": "x86_64",
                    "processes": 1,
                    "threads_per_process": 2,
                    "distributed_type": "NO",
                    "mixed_precision": "no",
                },
            }
        )
    )
    (root / "metrics.jsonl").write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"step": 10, "loss": 5.6},
                {"step": 10, "val_loss": 4.99},
                {"step": 20, "loss": 5.2},
                {"step": 20, "val_loss": 5.01},
            ]
        )
    )
    data = root / "DATA"
    data.mkdir()
    (data / "report.json").write_text(
        json.dumps(
            {
                "recipe": "tiny",
                "fingerprint": "abc123",
                "seq_len": 32,
                "vocab_size": len(tok),
                "sources": [
                    {
                        "name": "plays",
                        "target_share": 0.7,
                        "license": "CC-BY-2.5",
                        "attribution": "Open Shakespeare, OKF",
                        "dataset": None,
                    },
                    {
                        "name": "code",
                        "target_share": 0.3,
                        "license": "PSF-2.0",
                        "attribution": "Python Software Foundation",
                        "dataset": None,
                    },
                ],
                "splits": {
                    "train": {
                        "tokens": 1536,
                        "sources": {
                            "plays": {"tokens": 1075, "achieved_share": 0.7},
                            "code": {"tokens": 461, "achieved_share": 0.3},
                        },
                    }
                },
            }
        )
    )
    (root / "train.yaml").write_text("model_preset: debug\nlearning_rate: 3.0e-3\nmax_steps: 20\n")
    _lm_eval_results(root / "results_2026.json")
    return root


def _args(run_dir, to, **kw) -> pub.PublishArgs:
    base = dict(
        model=str(run_dir / "final"),
        to=str(to),
        data=str(run_dir / "DATA"),
        eval=str(run_dir / "results_2026.json"),
        bench=str(REPO / "docs/results/bench_speed.json"),
        train_config=str(run_dir / "train.yaml"),
        message="First release",
    )
    base.update(kw)
    return pub.PublishArgs(**base)


def _load_in_child(child: str, folder: Path, out: Path, cwd: Path, env: dict) -> dict:
    """Run a loading script `child FOLDER - OUT` in a fresh process that cannot import this repository."""
    run = subprocess.run(
        [sys.executable, "-c", child, str(folder), "-", str(out)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(out)


def _git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_publish_to_a_local_git_repo_writes_a_hub_model_repo_with_its_card(run_dir, tmp_path):
    target = tmp_path / "tiny-repo"
    result = pub.publish(_args(run_dir, target))
    files = set(result["files"])
    assert {
        "config.json",
        "configuration_hybrid_mamba.py",
        "modeling_hybrid_mamba.py",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        ".gitattributes",
        "assets/layers.png",
        "assets/loss.png",
    } <= files
    assert (
        json.loads((target / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
        == "modeling_hybrid_mamba.HybridMambaForCausalLM"
    )
    assert "*.safetensors filter=lfs diff=lfs merge=lfs -text" in (target / ".gitattributes").read_text().splitlines()
    # the repo is committed with the message and tagged; nothing is left untracked
    assert _git("log", "-1", "--format=%s", cwd=target) == "First release"
    assert _git("tag", "--list", cwd=target) == "v1" == result["tag"]
    assert _git("status", "--porcelain", cwd=target) == ""
    assert set(_git("ls-files", cwd=target).splitlines()) == files

    card = ModelCard.load(target / "README.md")
    meta = card.data.to_dict()
    assert (meta["license"], meta["library_name"], meta["pipeline_tag"]) == (
        "apache-2.0",
        "transformers",
        "text-generation",
    )
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert {(m["type"], m["value"]) for m in metrics} == {("acc", 0.25), ("perplexity", 812.5)}
    text = card.text
    for expected in (
        "CC-BY-2.5",
        "Open Shakespeare, OKF",
        "PSF-2.0",
        "1,075",
        "2,560",
        "12 s",
        "learning_rate",
        "0.0433",
        "trust_remote_code=True",
        "prefill 512 tokens",
        "## Limitations",
        "| tiny_task | 16 of 40 | acc | 0.2500 | 0.0433 |",
    ):
        assert expected in text, expected
    from hybrid_mamba.configuration import HybridMambaConfig
    from hybrid_mamba.configuration.param_counts import count_parameters

    assert f"{count_parameters(HybridMambaConfig.from_pretrained(target))['total']:,}" in text
    # the tested transformers range comes from the remote code the repo ships
    from hybrid_mamba.modeling.modeling_hybrid_mamba import TRANSFORMERS_FLOOR, TRANSFORMERS_TESTED

    assert f"`transformers>={TRANSFORMERS_FLOOR},<6`; tested with {TRANSFORMERS_FLOOR} to {TRANSFORMERS_TESTED}" in text

    # a second publish is a new commit with the next tag
    (run_dir / "final" / "finetune_config.json").write_text(json.dumps({"note": "second"}))
    try:
        second = pub.publish(_args(run_dir, target, message="Second"))
    finally:
        (run_dir / "final" / "finetune_config.json").unlink()
    assert second["tag"] == "v2" and _git("rev-list", "--count", "HEAD", cwd=target) == "2"


def test_sections_without_artefacts_say_so(run_dir, tmp_path):
    pub.publish(_args(run_dir, tmp_path / "bare", data=None, eval=None, bench=None, train_config=None, run=None))
    card = ModelCard.load(tmp_path / "bare" / "README.md")
    assert "model-index" not in card.data.to_dict()
    assert (
        "No data report was given" in card.text
        and "has not been evaluated" in card.text
        and "No benchmark was given" in card.text
    )
    assert "does not record its training config" in card.text  # summary.json found beside final/, no config


def test_shard_size_writes_shards_and_an_index_and_warns_without_git_lfs(run_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(pub, "git_lfs_available", lambda: False)
    result = pub.publish(_args(run_dir, tmp_path / "sharded", shard_size="200KB"))
    shards = [f for f in result["files"] if f.startswith("model-") and f.endswith(".safetensors")]
    assert (
        len(shards) > 1
        and "model.safetensors.index.json" in result["files"]
        and "model.safetensors" not in result["files"]
    )
    assert result["lfs"] is False and "git-lfs is not installed" in caplog.text


@pytest.mark.parametrize(
    "where,content",
    [
        ("final/.env", "X=1\n"),
        ("final/notes.txt", "token hf_" + "a1B2c3D4" * 5 + "\n"),
        ("train.yaml", "aws: AKIA" + "ABCDEFGHIJKLMNOP" + "\n"),
        ("final/key.pem", "-----BEGIN RSA " + "PRIVATE KEY-----\nabc\n"),
    ],
)
def test_refuses_credentials_and_names_the_file(run_dir, tmp_path, where, content):
    work = tmp_path / "run"
    shutil.copytree(run_dir, work)
    (work / where).write_text(content)
    target = tmp_path / "repo"
    with pytest.raises(CredentialError, match=str((work / where).name).replace(".", r"\.")):
        pub.publish(
            _args(
                work,
                target,
                data=str(work / "DATA"),
                eval=str(work / "results_2026.json"),
                train_config=str(work / "train.yaml"),
            )
        )
    assert not target.exists()


def test_hub_token_in_environment_is_never_written(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "not-token-shaped-but-secret-1234")
    work = tmp_path / "run"
    shutil.copytree(run_dir, work)
    (work / "train.yaml").write_text("note: not-token-shaped-but-secret-1234\n")
    with pytest.raises(CredentialError, match="HF_TOKEN"):
        pub.publish(
            _args(work, tmp_path / "repo", data=str(work / "DATA"), eval=None, train_config=str(work / "train.yaml"))
        )


class FakeApi:
    def __init__(self):
        self.calls, self.uploaded = [], None

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id))

    def list_repo_refs(self, repo_id):
        return type("Refs", (), {"tags": []})()

    def upload_folder(self, *, repo_id, folder_path, commit_message, delete_patterns):
        self.calls.append(("upload_folder", repo_id, commit_message))
        self.uploaded = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        self.card = (Path(folder_path) / "README.md").read_text()
        return type("Info", (), {"oid": "f" * 40, "commit_url": "https://hub/commit"})()

    def create_tag(self, repo_id, *, tag, revision, tag_message):
        self.calls.append(("create_tag", repo_id, tag, revision))


def test_hub_target_offline_fails_with_one_message_and_pushes_nothing(run_dir, tmp_path, monkeypatch):
    import huggingface_hub

    pushed = []
    for name in ("create_repo", "upload_folder", "create_commit"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, lambda *a, _n=name, **k: pushed.append(_n))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(pub.PublishError, match="HF_TOKEN is not set; nothing was pushed"):
        pub.publish(_args(run_dir, "hf://someone/tiny"))
    monkeypatch.setenv("HF_TOKEN", "fake")
    with pytest.raises(pub.PublishError, match="nothing was pushed"):  # HF_HUB_OFFLINE=1 in tests
        pub.publish(_args(run_dir, "hf://someone/tiny"))
    assert pushed == []
    with pytest.raises(pub.PublishError, match="hf://owner/name"):
        pub.publish(_args(run_dir, "hf://not a repo"))


def test_hub_target_uploads_the_staged_folder_and_tags_it(run_dir, monkeypatch):
    api = FakeApi()
    monkeypatch.setattr(pub, "check_hub_reachable", lambda repo_id: api)
    result = pub.publish(_args(run_dir, "hf://someone/tiny"))
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder", "create_tag"]
    assert api.calls[2] == ("create_tag", "someone/tiny", "v1", "f" * 40)
    assert "model.safetensors" in api.uploaded and "README.md" in api.uploaded and api.uploaded == result["files"]
    assert 'from_pretrained("someone/tiny", trust_remote_code=True)' in api.card


def test_publish_to_a_git_remote_pushes_commit_and_tag(run_dir, tmp_path):
    remote = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(remote)], check=True)
    result = pub.publish(_args(run_dir, f"file://{remote}", tag="release-1"))
    assert _git("rev-parse", "main", cwd=remote) == result["commit"]
    assert _git("tag", "--list", cwd=remote) == "release-1"
    assert "model.safetensors" in _git("ls-tree", "--name-only", "main", cwd=remote).splitlines()


@pytest.mark.skipif(not pub.git_lfs_available(), reason="git-lfs is not installed")
def test_weights_go_through_git_lfs_when_it_is_installed(run_dir, tmp_path):
    target = tmp_path / "lfs-repo"
    assert pub.publish(_args(run_dir, target, eval=None, bench=None))["lfs"]
    assert "model.safetensors" in _git("lfs", "ls-files", "--name-only", cwd=target).splitlines()
    assert _git("show", "HEAD:model.safetensors", cwd=target).startswith("version https://git-lfs.github.com/spec/v1")
    subprocess.run(["git", "clone", "-q", str(target), "clone"], cwd=tmp_path, check=True)
    assert (tmp_path / "clone" / "model.safetensors").read_bytes() == (target / "model.safetensors").read_bytes()


def test_bad_inputs_fail_before_work(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither config.json"):
        pub.publish(_args(run_dir, tmp_path / "r", model=str(tmp_path)))
    with pytest.raises(ValueError, match="--shard-size"):
        pub.publish(_args(run_dir, tmp_path / "r", shard_size="lots"))
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "x").write_text("x")
    with pytest.raises(pub.PublishError, match="not a git repository"):
        pub.publish(_args(run_dir, tmp_path / "occupied"))
    assert not (tmp_path / "r").exists()


def test_peft_adapter_publishes_with_base_model(run_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = HybridMambaForCausalLM.from_pretrained(run_dir / "final")
    adapter = tmp_path / "adapter"
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "in_proj"])).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(run_dir / "final").save_pretrained(adapter)
    result = pub.publish(_args(run_dir, tmp_path / "adapter-repo", model=str(adapter), run=None, bench=None))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json", ".gitattributes"} <= set(
        result["files"]
    )
    assert "model.safetensors" not in result["files"]
    card = ModelCard.load(tmp_path / "adapter-repo" / "README.md")
    assert card.data.base_model == str(run_dir / "final") and card.data.library_name == "peft"
    assert "PeftModel.from_pretrained" in card.text


LOAD_CHILD = (
    BLOCKER
    + r"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
clone, inputs, outputs = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(clone, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(clone, trust_remote_code=True)
leaked = sorted(k for k in sys.modules if k.split(".")[0] in BLOCKED)
assert not leaked, leaked
ids = tok(["the of and to in a is that"], return_tensors="pt")["input_ids"]
with torch.no_grad():
    torch.save({"ids": ids, "logits": model(ids).logits}, outputs)
""".replace("BLOCKED", repr(BLOCKED))
)

LM_EVAL_CHILD = (
    BLOCKER
    + r"""
from lm_eval.__main__ import cli_evaluate
sys.argv = ["lm_eval"] + sys.argv[1:]
cli_evaluate()
"""
)


@pytest.mark.slow
def test_fresh_clone_loads_without_this_repo_and_runs_lm_eval(run_dir, tmp_path):
    target = tmp_path / "tiny-repo"
    pub.publish(_args(run_dir, target))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        HF_HOME=str(tmp_path / "hf"),
    )
    subprocess.run(["git", "clone", "-q", str(target), "clone"], cwd=elsewhere, check=True)
    clone = elsewhere / "clone"
    out = _load_in_child(LOAD_CHILD, clone, tmp_path / "out.pt", cwd=elsewhere, env=env)
    source = HybridMambaForCausalLM.from_pretrained(run_dir / "final").eval()
    with torch.no_grad():
        assert torch.equal(out["logits"], source(out["ids"]).logits)

    # the offline held-out tasks of eval_harness (loaded by lm-eval from their files, not as this repo's package)
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            LM_EVAL_CHILD,
            "--model",
            "hf",
            "--model_args",
            f"pretrained={clone},trust_remote_code=True",
            "--tasks",
            "demo_heldout_mc",
            "--include_path",
            str(REPO / "eval_harness" / "tasks"),
            "--limit",
            "2",
            "--device",
            "cpu",
            "--batch_size",
            "1",
            "--output_path",
            str(tmp_path / "lm_eval_out"),
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = read_lm_eval_results(tmp_path / "lm_eval_out")  # the card reads lm-eval's own output
    assert set(results) == {"demo_heldout_mc"} and 0.0 <= results["demo_heldout_mc"]["acc"][0] <= 1.0


def test_reload_generates_from_a_clone_in_a_process_without_this_repo(run_dir, tmp_path):
    from hybrid_mamba.hub_cards.reload import reload

    pub.publish(_args(run_dir, tmp_path / "tiny-repo", eval=None, bench=None))
    module, sample, n_new = reload(str(tmp_path / "tiny-repo"), tmp_path / "clone", "the of", 5)
    assert module.startswith("transformers_modules.") and sample.startswith("the of")
    assert 0 < n_new <= 5 and len(sample) > len("the of")
    assert (tmp_path / "clone" / "README.md").is_file()


@pytest.fixture(scope="module")
def bamba_run_dir(run_dir, tmp_path_factory):
    """run_dir with a final/ model Bamba can express (Mamba-2 and attention layers only)."""
    root = tmp_path_factory.mktemp("bamba_run") / "run"
    shutil.copytree(run_dir, root)
    shutil.rmtree(root / "final")
    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    torch.manual_seed(0)
    config = tiny_config(
        ["mamba2", "attention", "mamba2"],
        num_key_value_heads=2,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    HybridMambaForCausalLM(config).eval().save_pretrained(root / "final")
    tok.save_pretrained(root / "final")
    return root


NATIVE_LOAD_CHILD = LOAD_CHILD.replace(", trust_remote_code=True", "")


def test_format_bamba_publishes_a_native_bamba_repo_with_the_same_card(bamba_run_dir, tmp_path):
    from transformers import AutoModelForCausalLM, BambaForCausalLM

    target = tmp_path / "tiny-bamba"
    result = pub.publish(_args(bamba_run_dir, target, format="bamba"))
    files = set(result["files"])
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "README.md",
        ".gitattributes",
        "assets/layers.png",
    } <= files
    assert not [f for f in files if f.endswith(".py")]  # no remote code
    config = json.loads((target / "config.json").read_text())
    assert config["model_type"] == "bamba" and config["architectures"] == ["BambaForCausalLM"]
    assert "auto_map" not in config
    assert _git("tag", "--list", cwd=target) == "v1" and _git("status", "--porcelain", cwd=target) == ""

    card = ModelCard.load(target / "README.md")
    assert "custom_code" not in card.data.tags and "bamba" in card.data.tags
    text = card.text
    assert "`BambaForCausalLM` exported from a hybrid_mamba model" in text and "`model_type: bamba`" in text
    assert "trust_remote_code=True" not in text and "no `trust_remote_code`" in text
    for expected in ("CC-BY-2.5", "2,560", "learning_rate", "prefill 512 tokens", "## Limitations", "## Architecture"):
        assert expected in text, expected  # the sections of the remote-code card
    from hybrid_mamba.configuration import HybridMambaConfig
    from hybrid_mamba.configuration.param_counts import count_parameters

    ours_config = HybridMambaConfig.from_pretrained(bamba_run_dir / "final")
    assert f"{count_parameters(ours_config)['total']:,}" in text  # counted from the model it was exported from

    # transformers alone loads it, without trust_remote_code, and computes our logits
    ours = HybridMambaForCausalLM.from_pretrained(bamba_run_dir / "final").eval()
    loaded = AutoModelForCausalLM.from_pretrained(target).eval()
    assert type(loaded) is BambaForCausalLM
    ids = torch.randint(3, ours.config.vocab_size, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ours(ids).logits, atol=1e-4, rtol=0)

    # and so does a process in which this repository cannot be imported
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HOME=str(tmp_path / "hf"))
    out = _load_in_child(NATIVE_LOAD_CHILD, target, tmp_path / "out.pt", cwd=tmp_path, env=env)
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], ours(out["ids"]).logits, atol=1e-4, rtol=0)
    assert not (tmp_path / "modules").exists() or not any((tmp_path / "modules").rglob("*.py"))


def test_format_bamba_refuses_what_bamba_cannot_express_before_work(run_dir, tmp_path):
    from hybrid_mamba.modeling.convert import ExportError

    # run_dir's model has a Mamba-1 layer
    with pytest.raises(ExportError, match="layer_types"):
        pub.publish(_args(run_dir, tmp_path / "r", format="bamba"))
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit):  # argparse: invalid choice
        pub.main(["--model", str(run_dir / "final"), "--to", str(tmp_path / "r"), "--format", "gguf"])


def test_serving_refuses_a_remote_code_folder_and_names_the_export(run_dir):
    from hybrid_mamba.common.serving import check_servable

    with pytest.raises(ValueError, match=r"HybridMambaForCausalLM is not a class of transformers.*--to bamba"):
        check_servable(str(run_dir / "final"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        check_servable(str(run_dir / "missing"))
    check_servable("someone/some-model")  # a Hub id is left to the server


def test_a_pruned_models_card_gives_its_per_layer_widths(tmp_path):
    from hybrid_mamba.configuration import get_preset
    from hybrid_mamba.hub_cards.card import CardInputs, _architecture

    cfg = get_preset("debug", intermediate_size_per_layer=[128, 0, 48, 96], mamba_d_inner_per_layer=[64, 128, 0, 32])
    text = _architecture(CardInputs("m", cfg.to_dict(), "org/m"), tmp_path)
    assert "| `intermediate_size_per_layer` | [128, 0, 48, 96] |" in text
    assert "| `mamba_d_inner_per_layer` | [64, 128, 0, 32] |" in text and "Widths differ by layer" in text
    dense = _architecture(CardInputs("m", get_preset("debug").to_dict(), "org/m"), tmp_path)
    assert "per_layer" not in dense and "Widths differ" not in dense
