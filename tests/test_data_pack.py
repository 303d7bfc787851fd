"""Packing keeps document boundaries; the mixer meets its budgets exactly."""

import itertools

import numpy as np
import pytest
from datasets import load_from_disk

from hybrid_mamba.data_scripts.mixture import ArrayDocSource, IterDocSource, Mixer, split_budget
from hybrid_mamba.data_scripts.pack import Packer, block_features, save_blocks

EOS = 0


def _docs(rng, n, source, lo=3, hi=90):
    """Documents whose tokens encode (source, document): 1000 * (source + 1) + document, then eos."""
    out = []
    for d in range(n):
        length = int(rng.integers(lo, hi))
        out.append(np.array([1000 * (source + 1) + d] * length + [EOS], dtype=np.int32))
    return out


def _segments(ids, pos):
    """Split every block at positions that restart at 0."""
    segs = []
    for row_ids, row_pos in zip(ids, pos, strict=True):
        starts = list(np.nonzero(row_pos == 0)[0]) + [len(row_pos)]
        for a, b in itertools.pairwise(starts):
            segs.append(row_ids[a:b])
    return segs


def test_packing_keeps_boundaries(tmp_path):
    rng = np.random.default_rng(0)
    docs = _docs(rng, 60, 0) + _docs(rng, 40, 1)
    order = rng.permutation(len(docs))
    L = 32
    packer = Packer(tmp_path / "b.arrow", L, ["a", "b"], rows_per_batch=7)
    for i in order:
        packer.add(0 if i < 60 else 1, docs[i])
    stats = packer.close()
    features = block_features(L, ["a", "b"])
    save_blocks(tmp_path / "b.arrow", tmp_path / "out", features, "train", "f" * 32, "test")
    ds = load_from_disk(str(tmp_path / "out"))
    assert ds.features == features
    ids = np.array(ds["input_ids"])
    pos = np.array(ds["position_ids"])
    assert ids.shape == (stats["blocks"], L)
    total = sum(len(d) for d in docs)
    assert stats["blocks"] == total // L and stats["dropped_tail_tokens"] == total % L
    # Positions count up by one inside a segment and restart at 0 at documents and blocks.
    assert np.all(pos[:, 0] == 0)
    inside = pos[:, 1:] != 0
    assert np.all(pos[:, 1:][inside] == pos[:, :-1][inside] + 1)
    # Every segment holds tokens of one document only, and a restart inside a block follows eos.
    for seg in _segments(ids, pos):
        body = seg[seg != EOS]
        assert len(set(body.tolist())) <= 1
        assert np.all(seg[:-1] != EOS)  # eos only ever ends a segment
    assert np.all(ids[:, :-1][pos[:, 1:] == 0] == EOS)
    # The stream of tokens is the documents in order, cut into blocks.
    stream = np.concatenate([docs[i] for i in order])[: stats["blocks"] * L]
    assert np.array_equal(ids.ravel(), stream)
    # The source column is the source of each block's first token; per-source counts add up.
    stream_src = np.concatenate([np.full(len(docs[i]), 0 if i < 60 else 1) for i in order])[: stats["blocks"] * L]
    assert np.array_equal(np.array(ds["source"]), stream_src[::L])
    assert stats["tokens_per_source"] == np.bincount(stream_src, minlength=2).tolist()


def test_split_budget_adds_up():
    for total, shares in [(1000, [0.6, 0.4]), (1001, [1 / 3] * 3), (7, [0.5, 0.3, 0.2])]:
        b = split_budget(total, shares)
        assert sum(b) == total
        assert all(abs(x - total * s) < 1 for x, s in zip(b, shares, strict=True))


@pytest.mark.parametrize("shares", [[0.7, 0.3], [0.2, 0.5, 0.3]])
def test_mixer_meets_budgets_exactly_and_stays_balanced(shares):
    rng = np.random.default_rng(1)
    sources = []
    for s in range(len(shares)):
        docs = _docs(rng, 200, s, hi=300)
        lengths = np.array([len(d) for d in docs])
        sources.append(ArrayDocSource(docs, lengths, seed=3, source=s, repeat=False))
    budgets = split_budget(20_000, shares)
    mixer = Mixer(sources, budgets, EOS, [str(i) for i in range(len(shares))])
    got = np.zeros(len(shares))
    running = []
    for s, doc in mixer:
        assert doc[-1] == EOS
        got[s] += len(doc)
        running.append(got.copy())
    assert got.tolist() == budgets
    # At every point of the stream each source is within one document of its share.
    for g in running[len(running) // 10 :]:
        assert np.all(np.abs(g / g.sum() - np.array(shares)) < 300 / g.sum() + 1e-9)
    assert mixer.exhausted is None


def test_mixer_repeats_train_documents_in_new_orders_and_never_validation_ones():
    rng = np.random.default_rng(2)
    docs = _docs(rng, 20, 0, lo=10, hi=20)
    lengths = np.array([len(d) for d in docs])
    src = ArrayDocSource(docs, lengths, seed=0, source=0, repeat=True)
    val = [tuple(d) for _, d in Mixer([src], [40], EOS, ["a"])]
    src.start_train()
    remaining = src.remaining_tokens()
    train = [tuple(d) for _, d in Mixer([src], [int(remaining * 2.5)], EOS, ["a"])]
    val_docs = {d[0] for d in val}
    assert not val_docs & {d[0] for d in train}
    assert sum(len(d) for d in train) == int(remaining * 2.5)


def test_mixer_stops_when_a_stream_runs_out():
    rng = np.random.default_rng(4)
    short = IterDocSource(iter(_docs(rng, 5, 0)))
    long = IterDocSource(iter(_docs(rng, 500, 1)))
    mixer = Mixer([short, long], [10_000, 10_000], EOS, ["short", "long"])
    out = list(mixer)
    assert mixer.exhausted == "short"
    assert sum(len(d) for s, d in out if s == 1) <= sum(len(d) for s, d in out if s == 0) + 100
