"""Shared tiny configs. Every test builds models from these (hidden 32-64, 2-4 layers)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under pytest-xdist (`make test` runs one worker per core): each worker, and the processes it starts,
# gets its share of the cores instead of every worker's torch using all of them.
if (_workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT")) is not None:
    _threads = max(1, (os.cpu_count() or 1) // int(_workers))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import hybrid_mamba.modeling  # noqa: F401  (registers the Auto classes)
from hybrid_mamba.configuration import HybridMambaConfig, get_preset

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


def pytest_configure(config):
    # `make test-fast` deselects these; `make test` (and CI) runs everything
    config.addinivalue_line("markers", "slow: starts a subprocess or `accelerate launch` (deselect with -m 'not slow')")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def write_tiny_data(root, seq_len=32, train_blocks=48, val_blocks=8, seed=0):
    """A DATA/ folder in data_scripts' format: packed blocks of real text tokens, a byte-level BPE tokenizer."""
    import random
    from pathlib import Path

    from datasets import Dataset
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = Path(root)
    rng = random.Random(seed)
    words = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) + "." for _ in range(300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.save_pretrained(root / "tokenizer")
    stream, positions = [], []
    for d in docs:
        ids = tokenizer(d)["input_ids"] + [tokenizer.eos_token_id]
        stream += ids
        positions += list(range(len(ids)))
    blocks = len(stream) // seq_len
    # a block cut mid-document keeps that document's positions; the next document restarts at 0
    rows = [
        {
            "input_ids": stream[i * seq_len : (i + 1) * seq_len],
            "position_ids": positions[i * seq_len : (i + 1) * seq_len],
        }
        for i in range(blocks)
    ]
    assert len(rows) >= train_blocks + val_blocks
    Dataset.from_list(rows[:train_blocks]).save_to_disk(str(root / "train"))
    Dataset.from_list(rows[train_blocks : train_blocks + val_blocks]).save_to_disk(str(root / "validation"))
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return write_tiny_data(tmp_path_factory.mktemp("data"))
