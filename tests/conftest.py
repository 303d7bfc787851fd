"""Shared tiny configs. Every test builds models from these (hidden 32-64, 2-4 layers)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import modeling  # noqa: E402,F401  (registers the Auto classes)
from configuration import HybridMambaConfig, get_preset  # noqa: E402

LAYOUTS = {
    "hybrid": ["mamba2", "attention", "mamba1", "mamba2"],
    "mamba2": ["mamba2", "mamba2"],
    "mamba1": ["mamba1", "mamba1"],
    "attention": ["attention", "attention"],
}


def tiny_config(layout="hybrid", **overrides) -> HybridMambaConfig:
    layer_types = LAYOUTS[layout] if isinstance(layout, str) else layout
    kwargs = dict(layer_types=layer_types, num_hidden_layers=len(layer_types), mamba_chunk_size=8)
    kwargs.update(overrides)
    return get_preset("debug", **kwargs)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
