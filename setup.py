"""Packaging for hybrid-mamba.

torch is declared with an ordinary range here. On CPU-only machines install the pinned CPU build
first (the Makefile does: ``pip install torch==2.13.0`` with ``requirements/cpu.txt`` as a
constraint), otherwise pip resolves the newest torch with its CUDA wheels.

Ranges, not pins: `make` installs the tested versions from requirements/lock.txt. The floors of
torch, transformers, peft, accelerate, datasets and lm-eval are run by `make test-compat` (docs/compat.md,
which requirements/compat.py reads them from); the other packages' floors are not run there (that
environment resolves their current releases).
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
NAMESPACE = "hybrid_mamba"
FOLDERS = ("common", "configuration", "modeling", "trainers", "data_scripts", "eval_harness", "hub_cards")
PACKAGE_DATA = {
    "configuration": ["presets.yaml"],
    "data_scripts": ["recipes/*.yaml"],
    "trainers": [
        "configs/*.yaml",
        "accelerate/*.yaml",
        "slurm/*.sbatch",
        "demo_data/*.jsonl",
        "demo_data/*.tsv",
    ],
    "hub_cards": ["templates/*.md"],
    "eval_harness": ["tasks/**/*.yaml", "tasks/**/*.jsonl", "tasks/**/*.py"],
}

install_requires = [
    "torch>=2.9.1,<3",
    "transformers>=5.21,<6",
    "accelerate>=1.10",
    "datasets>=4.0",
    "peft>=0.18",
    "evaluate>=0.4",
    "lm-eval>=0.4.10",
    "safetensors>=0.4",
    "huggingface_hub>=1.0",
    "jinja2",  # hub_cards: the model card template (ModelCard.from_template)
    "tokenizers>=0.21",
    "pyyaml>=6",
    "numpy",
    "datasketch>=2.0",
    "lingua-language-detector>=2.0",
    # PII: phone numbers in data_scripts/pii.py are validated by libphonenumber's metadata (the "lite" build:
    # the same `phonenumbers` module without 40 MB of geocoding and carrier data)
    "phonenumberslite>=9.0",
    "scipy",  # fine-tuning metrics (Pearson, Spearman) and confidence intervals over seeds
    "scikit-learn",  # fine-tuning metrics (accuracy, F1, Matthews correlation)
]

extras_require = {
    # CUDA kernels: used when importable on a CUDA device, the pure-torch path is the fallback.
    # bitsandbytes: QLoRA (trainers/finetune.py adapter: qlora); on CPU `pip install bitsandbytes` alone.
    "cuda": ["mamba-ssm>=2.2", "causal-conv1d>=1.4", "flash-attn>=2.6", "bitsandbytes>=0.45"],
    # `transformers serve` (an OpenAI-compatible server) and the client that tests and benchmarks it
    "serving": ["transformers[serving]>=5.21,<6", "openai>=1.98"],
    # hub_cards/onnx_export.py: torch.onnx's dynamo exporter (onnx, onnxscript) and the CPU runtime
    "onnx": ["onnx>=1.18", "onnxscript>=0.5", "onnxruntime>=1.22"],
    # hub_cards/quantize.py: int8 weight-only quantization (torchao's quantize_, saved as safetensors).
    # torchao 0.18 imports torch 2.11 APIs without declaring it; transformers imports torchao whenever it is
    # installed, so with an older torch even `import transformers.modeling_utils` fails: the extra says so.
    "torchao": ["torchao>=0.18", "torch>=2.11"],
    # data_scripts/datatrove_pipeline.py: the recipe as datatrove stages (local, Slurm or Ray executors,
    # datatrove's multi-stage MinHash deduplication); "ray" adds the Ray executor's runtime
    "datatrove": ["datatrove>=0.10.1,<0.11"],
    "ray": ["datatrove[ray]>=0.10.1,<0.11"],
    # bitsandbytes runs 4-bit/8-bit on CPU too: in dev so the QLoRA guard tests run everywhere; serving so
    # tests/test_serve.py does, onnx so tests/test_onnx_export.py does,
    # datatrove with Ray so tests/test_datatrove.py does (a local Ray instance on 127.0.0.1).
    "dev": [
        "pytest>=8",
        # `make test` runs the suite on every core (pytest -n auto): the tests are mostly single-threaded
        "pytest-xdist>=3.5",
        "matplotlib>=3.8",
        "bitsandbytes>=0.45",
        "ruff>=0.15",
        "transformers[serving]>=5.21,<6",
        "openai>=1.98",
        "onnx>=1.18",
        "onnxscript>=0.5",
        "onnxruntime>=1.22",
        "datatrove[ray]>=0.10.1,<0.11",
    ],
}

setup(
    name="hybrid-mamba",
    version="0.1.0",
    description="A hybrid Mamba/attention causal language model for the Hugging Face ecosystem",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The folders install under one namespace (hybrid_mamba.configuration, hybrid_mamba.trainers, ...), so
    # they never shadow, and are never shadowed by, another project's `modeling` or `configuration`.
    package_dir={NAMESPACE: "."},
    packages=[f"{NAMESPACE}.{name}" for name in find_packages(include=[f"{folder}*" for folder in FOLDERS])],
    package_data={f"{NAMESPACE}.{folder}": files for folder, files in PACKAGE_DATA.items()},
    install_requires=install_requires,
    extras_require=extras_require,
)
