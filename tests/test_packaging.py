"""Installing hybrid-mamba is safe beside other projects: everything lives under the `hybrid_mamba` namespace."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("common", "configuration", "modeling", "trainers", "data_scripts", "eval_harness", "hub_cards")


@pytest.mark.slow
def test_the_wheel_installs_one_namespace_with_its_data_files(tmp_path):
    # built from a copy: setuptools writes build/ and *.egg-info beside the sources
    source = tmp_path / "src"
    skip = shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "runs", "data", "results", "__pycache__", "*.egg-info"
    )
    shutil.copytree(REPO, source, ignore=skip)
    pip_wheel = ["pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."]
    proc = subprocess.run([sys.executable, "-m", *pip_wheel], cwd=source, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("hybrid_mamba-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"hybrid_mamba"}, tops
    assert {n.split("/")[1] for n in names if n.startswith("hybrid_mamba/")} == set(FOLDERS)
    for data_file in (
        "hybrid_mamba/configuration/presets.yaml",
        "hybrid_mamba/data_scripts/recipes/demo.yaml",
        "hybrid_mamba/trainers/configs/tiny.yaml",
        "hybrid_mamba/trainers/accelerate/cpu.yaml",
        "hybrid_mamba/hub_cards/templates/model_card.md",
        "hybrid_mamba/eval_harness/tasks/hybrid_mamba/demo_heldout.yaml",
        "hybrid_mamba/modeling/modeling_hybrid_mamba.py",
    ):
        assert data_file in names, data_file
    assert not [n for n in names if n.startswith("hybrid_mamba/tests/") or "__pycache__" in n]


# Another project's top-level `modeling` and `configuration` packages first on the path: ours must not
# import them, and theirs must stay what they are.
OTHER_PROJECT = """
import sys
import modeling, configuration
assert modeling.OTHER and configuration.OTHER
import torch
import hybrid_mamba.modeling
from hybrid_mamba.configuration import get_preset
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_config(get_preset("debug", vocab_size=64))
assert type(model).__module__ == "hybrid_mamba.modeling.modeling_hybrid_mamba", type(model).__module__
assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)
assert sys.modules["modeling"].__file__.startswith(sys.argv[1]), sys.modules["modeling"].__file__
print("ok")
"""


@pytest.mark.slow
def test_another_projects_modeling_package_does_not_collide(tmp_path):
    other = tmp_path / "other"
    for name in ("modeling", "configuration"):
        (other / name).mkdir(parents=True)
        (other / name / "__init__.py").write_text("OTHER = True\n")
    proc = subprocess.run(
        [sys.executable, "-c", OTHER_PROJECT, str(other)],
        cwd=other,
        env={"PYTHONPATH": str(other), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
