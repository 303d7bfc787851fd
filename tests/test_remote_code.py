"""A saved folder loads with trust_remote_code in a fresh process that cannot import this repository."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config

from hybrid_mamba.modeling import HybridMambaForCausalLM

CHILD = r"""
import importlib.abc, sys

class BlockRepo(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("hybrid_mamba", "configuration", "modeling"):
            raise ImportError(f"{name} is blocked: the model folder must be self-contained")

sys.meta_path.insert(0, BlockRepo())
import torch
from transformers import AutoConfig, AutoModelForCausalLM

folder, inputs, outputs = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
assert type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__name__ == "HybridMambaConfig"
leaked = sorted(k for k in sys.modules if k.split(".")[0] in ("hybrid_mamba", "configuration", "modeling"))
assert not leaked, leaked
ids = torch.load(inputs)
with torch.no_grad():
    logits = model(ids).logits
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    # the cached decode is the uncached one: the folder's code passes its state under the installed name
    assert torch.equal(generated, model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False))
torch.save({"logits": logits, "generated": generated, "module": type(model).__module__}, outputs)
"""


def load_in_fresh_process(folder, ids, tmp_path) -> dict:
    """Load `folder` with AutoModelForCausalLM and trust_remote_code in a process that cannot import this
    repository; returns its logits on `ids`, its greedy generation (checked equal with and without the
    cache) and the module its class came from."""
    torch.save(ids, tmp_path / "in.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HOME=str(tmp_path / "hf"))
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


@pytest.mark.slow
def test_remote_code_loads_in_a_fresh_process(tmp_path):
    model = HybridMambaForCausalLM(tiny_config("hybrid")).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    assert (
        json.loads((folder / "config.json").read_text())["auto_map"]["AutoConfig"]
        == "configuration_hybrid_mamba.HybridMambaConfig"
    )
    ids = torch.randint(3, 512, (2, 13))
    out = load_in_fresh_process(folder, ids, tmp_path)
    assert out["module"].startswith("transformers_modules.")
    with torch.no_grad():
        assert torch.equal(out["logits"], model(ids).logits)
        assert torch.equal(out["generated"], model.generate(ids, max_new_tokens=5, do_sample=False))


def test_saving_a_remote_code_model_again_keeps_the_code(tmp_path):
    from transformers import AutoModelForCausalLM

    HybridMambaForCausalLM(tiny_config("hybrid")).save_pretrained(tmp_path / "a")
    # loaded through the remote-code path of this process: the classes come from the folder's files
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a", trust_remote_code=True)
    reloaded.save_pretrained(tmp_path / "b")
    for name in ("configuration_hybrid_mamba.py", "modeling_hybrid_mamba.py"):
        assert (tmp_path / "b" / name).read_text() == (tmp_path / "a" / name).read_text()


VERSION_CHILD = r"""
import logging, sys
import transformers
transformers.__version__ = sys.argv[2]  # stands in for an installed release
if len(sys.argv) > 3:  # a release that moved an internal the model code imports
    import transformers.cache_utils
    delattr(transformers.cache_utils, sys.argv[3])
from transformers import AutoModelForCausalLM
logging.basicConfig(level=logging.WARNING)
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
except ImportError as e:
    print("ImportError:", e)
    sys.exit(3)
# a second model from the same code: the warning is not repeated
AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
"""


def _load_with_version(tmp_path, version, *drop):
    folder = tmp_path / "model"
    if not folder.exists():
        HybridMambaForCausalLM(tiny_config("hybrid")).save_pretrained(folder)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / f"modules-{version}"), HF_HOME=str(tmp_path / "hf"))
    return subprocess.run(
        [sys.executable, "-c", VERSION_CHILD, str(folder), version, *drop],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_remote_code_names_the_supported_range_on_an_old_transformers(tmp_path):
    from hybrid_mamba.modeling.modeling_hybrid_mamba import TRANSFORMERS_FLOOR, TRANSFORMERS_TESTED

    old = _load_with_version(tmp_path, "5.20.2")
    assert old.returncode == 3, old.stderr[-3000:]
    assert (
        f"need transformers >={TRANSFORMERS_FLOOR},<6 (tested up to {TRANSFORMERS_TESTED}); found 5.20.2" in old.stdout
    )
    new = _load_with_version(tmp_path, "5.99.0")
    assert new.returncode == 0, new.stderr[-3000:]
    assert new.stderr.count("transformers 5.99.0 is newer than the newest release hybrid_mamba was tested with") == 1
    current = _load_with_version(tmp_path, TRANSFORMERS_TESTED)
    assert current.returncode == 0 and "newer than" not in current.stderr


@pytest.mark.slow
def test_remote_code_names_the_missing_internal_and_the_range(tmp_path):
    from hybrid_mamba.modeling.modeling_hybrid_mamba import TRANSFORMERS_FLOOR, TRANSFORMERS_TESTED

    run = _load_with_version(tmp_path, "5.99.0", "LinearAttentionLayer")
    assert run.returncode == 3, run.stderr[-3000:]
    assert "relies on a transformers internal that transformers 5.99.0 does not have" in run.stdout
    assert "LinearAttentionLayer" in run.stdout and f"<={TRANSFORMERS_TESTED}" in run.stdout
    assert f">={TRANSFORMERS_FLOOR}" in run.stdout


def test_an_import_failing_inside_another_package_is_named_as_such():
    """transformers imports optional packages when installed (torchao, ...); one built for a newer torch fails
    inside transformers' import: the error names that package, not a missing transformers internal."""
    from hybrid_mamba.modeling import modeling_hybrid_mamba as mhm

    def raised(code: str, filename: str) -> ImportError:
        try:
            exec(compile(code, filename, "exec"), {})
        except ImportError as e:
            return e
        raise AssertionError("no ImportError")

    broken = raised("from torch.nn.functional import NoSuchName", "/venv/lib/python3.11/site-packages/torchao/fp8.py")
    assert mhm._failing_package(broken) == "torchao"
    message = mhm._import_failure(broken)
    assert "inside the installed package 'torchao'" in message and "pip uninstall torchao" in message
    assert "transformers internal" not in message and torch.__version__ in message

    moved = raised("from transformers.cache_utils import NoSuchLayer", "/models/modeling_hybrid_mamba.py")
    assert "relies on a transformers internal" in mhm._import_failure(moved)
    # the model code installed under site-packages, a transformers name missing: still a transformers internal
    moved = raised("from transformers.cache_utils import NoSuchLayer", "/v/lib/site-packages/hybrid_mamba/m.py")
    assert "relies on a transformers internal" in mhm._import_failure(moved)
