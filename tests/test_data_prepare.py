"""End to end on small corpora: the output format, split and boundaries, mixture shares, PII in the
output, bad JSONL lines, determinism, the cache, interrupted runs and streaming."""

import itertools
import logging
import random
import re

import numpy as np
import pytest
from data_corpus import (
    FRENCH,
    GERMAN,
    code_source,
    prose,
    prose_source,
    read_report,
    run,
    two_source_corpus,
    write_jsonl,
    write_recipe,
)
from datasets import load_from_disk
from transformers import AutoTokenizer

from hybrid_mamba.data_scripts import pipeline
from hybrid_mamba.data_scripts.prepare import PrepareArguments, prepare

MARKER = re.compile(r"z[pc]\d{4}q")


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _segments(ds):
    """Every run of tokens between position restarts, over all blocks."""
    x = ds.with_format("numpy")[:]
    out = []
    for ids, pos in zip(x["input_ids"], x["position_ids"], strict=True):
        starts = list(np.nonzero(pos == 0)[0]) + [len(pos)]
        out += [ids[a:b] for a, b in itertools.pairwise(starts)]
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One in-memory build of a two-source corpus with a mixture of 0.7 / 0.3."""
    root = tmp_path_factory.mktemp("built")
    prose_dir, code_dir = two_source_corpus(root / "corpus", n_prose=40, n_code=50)
    recipe = write_recipe(
        root / "r.yaml",
        [prose_source("prose", str(prose_dir / "*.txt"), 0.7), code_source("code", str(code_dir / "*.py"), 0.3)],
        total_tokens=24_000,
    )
    out = run(recipe, root / "out")
    return recipe, out


def test_output_format(built):
    _, out = built
    for name in ("train", "validation", "tokenizer", "report.json", "report.md", "recipe.yaml", "fingerprint.json"):
        assert (out / name).exists(), name
    report = read_report(out)
    for split in ("train", "validation"):
        ds = load_from_disk(str(out / split))
        assert ds.column_names == ["input_ids", "position_ids", "source"]
        assert ds.features["source"].names == ["prose", "code"]
        assert ds.features["input_ids"].length == 32 and ds.features["input_ids"].feature.dtype == "int32"
        assert ds.features["position_ids"].feature.dtype == "int32"
        assert len(ds) == report["splits"][split]["blocks"] > 0
    assert report["seq_len"] == 32 and report["vocab_size"] == 400
    assert not list(out.parent.glob(".out.*"))  # no temporary folders left


def test_tokenizer_loads_offline_with_special_tokens_and_chat_template(built):
    _, out = built
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert len(tok) == 400
    text = "The river runs past the village."
    assert tok.decode(tok(text)["input_ids"]) == text
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], tokenize=False
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"


def test_blocks_keep_documents_apart_and_splits_share_no_document(built):
    _, out = built
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    markers = {}
    for split in ("train", "validation"):
        ds = load_from_disk(str(out / split))
        x = ds.with_format("numpy")[:]
        pos, ids = x["position_ids"], x["input_ids"]
        assert np.all(pos[:, 0] == 0)
        inside = pos[:, 1:] != 0
        assert np.all(pos[:, 1:][inside] == pos[:, :-1][inside] + 1)
        assert np.all(ids[:, :-1][pos[:, 1:] == 0] == tok.eos_token_id)  # a document starts after eos
        found = set()
        for seg in _segments(ds):
            seg_markers = set(MARKER.findall(tok.decode(seg)))
            assert len(seg_markers) <= 1, seg_markers  # one document per segment
            found |= seg_markers
        markers[split] = found
    assert markers["train"] and markers["validation"]
    assert not markers["train"] & markers["validation"]


def test_mixture_shares_hold_in_both_splits(built):
    _, out = built
    report = read_report(out)
    for split, s in report["splits"].items():
        assert s["dropped_tail_tokens"] == 0
        for name, target in (("prose", 0.7), ("code", 0.3)):
            assert abs(s["sources"][name]["achieved_share"] - target) < 0.01, (split, name, s["sources"][name])
    # Cross-check the report with the blocks: tokens per split are whole blocks.
    assert report["splits"]["train"]["tokens"] + report["splits"]["validation"]["tokens"] <= 24_000


def test_report_covers_every_stage(built):
    _, out = built
    report = read_report(out)
    assert list(report["stages"]) == [
        "load",
        "normalize",
        "length",
        "language",
        "quality",
        "pii",
        "dedup",
        "mixture",
        "pack",
    ]
    for stage in report["stages"].values():
        for d in stage.values():
            assert {"docs_in", "docs_out", "tokens_in", "tokens_out", "removed"} <= set(d)
    load = report["stages"]["load"]["prose"]
    assert load["docs_in"] == 40 and load["tokens_in"] > 0
    md = (out / "report.md").read_text()
    assert "achieved share" in md and "| dedup | code |" in md


def test_filters_in_the_pipeline_and_bad_jsonl_lines(tmp_path, caplog):
    rng = random.Random(11)
    docs = [prose(rng, marker=f"zp{i:04d}q") for i in range(30)]
    docs.append(prose(rng, n_sentences=36, marker="zp9999q"))  # about 400 words
    near = docs[-1].split(" ")
    for i in (50, 150, 250):  # three words differ: word 5-gram Jaccard about 0.93
        near[i] = "altered"
    pii_doc = (
        prose(rng)
        + " Mail jane.roe@example.com or call +44 20 7946 0958; key ghp_abcdefghijklmnopqrstuvwxyz0123456789; host 93.184.216.34."
    )
    extra = [" ".join(near), docs[1].upper(), FRENCH, GERMAN, pii_doc]
    raw = {3: '{"text": "broken', 9: '{"id": "x"}', 12: "[1, 2]"}
    write_jsonl(tmp_path / "data" / "web.jsonl", docs + extra, raw_lines=raw)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        [prose_source("web", str(tmp_path / "data" / "*.jsonl"), 1.0, loader="jsonl")],
        total_tokens=6000,
    )
    with caplog.at_level(logging.WARNING):
        out = run(recipe, tmp_path / "out")
    assert "web.jsonl:3: line skipped, malformed_json" in caplog.text
    report = read_report(out)
    errors = {e["id"]: e["reason"] for e in report["load_errors"]}
    assert errors == {
        "web.jsonl:3": "load:malformed_json",
        "web.jsonl:9": "load:missing_text_field",
        "web.jsonl:12": "load:not_an_object",
    }
    md = (out / "report.md").read_text()
    assert "`web.jsonl:3`: malformed_json" in md
    st = report["stages"]
    assert st["language"]["web"]["removed"]["fr"]["docs"] == 1 and st["language"]["web"]["removed"]["de"]["docs"] == 1
    assert st["dedup"]["web"]["removed"]["near"]["docs"] == 1 and st["dedup"]["web"]["removed"]["exact"]["docs"] == 1
    assert st["language"]["web"]["removed"]["fr"]["examples"][0]["text"].startswith("Le matin")
    assert (
        st["pii"]["web"]["pii_email"],
        st["pii"]["web"]["pii_phone"],
        st["pii"]["web"]["pii_key"],
        st["pii"]["web"]["pii_ip"],
    ) == (1, 1, 1, 1)
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    text = "".join(
        tok.decode(s) for split in ("train", "validation") for s in _segments(load_from_disk(str(out / split)))
    )
    for secret in ("jane.roe@example.com", "7946 0958", "ghp_abcdef", "93.184.216.34", "Le matin", "Am Morgen"):
        assert secret not in text


def test_deterministic_byte_identical(tmp_path):
    prose_dir, code_dir = two_source_corpus(tmp_path / "corpus", n_prose=20, n_code=20, seed=5)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        [prose_source("prose", str(prose_dir / "*.txt"), 0.5), code_source("code", str(code_dir / "*.py"), 0.5)],
    )
    a = run(recipe, tmp_path / "a")
    b = prepare(PrepareArguments(recipe=str(recipe), output=str(tmp_path / "b"), num_proc=2))
    assert _files(a) == _files(b)


def test_cache_reuse_and_rebuild_on_change(tmp_path, monkeypatch):
    prose_dir, code_dir = two_source_corpus(tmp_path / "corpus", n_prose=12, n_code=12, seed=6)
    sources = [prose_source("prose", str(prose_dir / "*.txt"), 0.5), code_source("code", str(code_dir / "*.py"), 0.5)]
    recipe = write_recipe(tmp_path / "r.yaml", sources)
    out = run(recipe, tmp_path / "out")
    before = _files(out)
    mtime = (out / "report.json").stat().st_mtime_ns

    def no_build(b):
        raise AssertionError("rebuilt although nothing changed")

    monkeypatch.setattr("hybrid_mamba.data_scripts.prepare.build", no_build)
    run(recipe, tmp_path / "out")
    assert _files(out) == before and (out / "report.json").stat().st_mtime_ns == mtime
    monkeypatch.undo()
    # A changed input file changes the fingerprint and rebuilds.
    (prose_dir / "doc0000.txt").write_text(prose(random.Random(99)), encoding="utf-8")
    run(recipe, tmp_path / "out")
    assert read_report(out)["fingerprint"] != read_report_from(before)["fingerprint"]


def read_report_from(files: dict) -> dict:
    import json

    return json.loads(files["report.json"])


def test_interrupted_run_leaves_the_good_output(tmp_path, monkeypatch):
    prose_dir, code_dir = two_source_corpus(tmp_path / "corpus", n_prose=12, n_code=12, seed=8)
    sources = [prose_source("prose", str(prose_dir / "*.txt"), 0.5), code_source("code", str(code_dir / "*.py"), 0.5)]
    out = run(write_recipe(tmp_path / "r.yaml", sources), tmp_path / "out")
    before = _files(out)
    calls = {"n": 0}
    real_add = pipeline.Packer.add

    def add_then_die(self, source, doc):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        real_add(self, source, doc)

    monkeypatch.setattr(pipeline.Packer, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(write_recipe(tmp_path / "r.yaml", sources, seed=123), tmp_path / "out")
    assert _files(out) == before
    assert not list(tmp_path.glob(".out.*"))
    # Leftovers of a killed run (a dead pid) are cleaned up by the next run.
    (tmp_path / ".out.tmp-999999999").mkdir()
    (tmp_path / ".out.tmp-999999999" / "partial").write_text("x")
    monkeypatch.undo()
    run(write_recipe(tmp_path / "r.yaml", sources, seed=123), tmp_path / "out")
    assert not list(tmp_path.glob(".out.*"))
    assert read_report(out)["seed"] == 123


def test_streaming_builds_the_same_format_and_shares(tmp_path):
    prose_dir, code_dir = two_source_corpus(tmp_path / "corpus", n_prose=40, n_code=50, seed=9)
    sources = [
        prose_source("prose", str(prose_dir / "*.txt"), 0.6, quality={"rules": "prose", "percentile": 10}),
        code_source("code", str(code_dir / "*.py"), 0.4),
    ]
    recipe = write_recipe(tmp_path / "r.yaml", sources, total_tokens=20_000, shuffle_buffer=16)
    mem = run(recipe, tmp_path / "mem")
    stream = run(recipe, tmp_path / "stream", streaming=True)
    rep = read_report(stream)
    assert rep["mode"] == "streaming" and read_report(mem)["mode"] == "in-memory"
    for split in ("train", "validation"):
        a, b = load_from_disk(str(mem / split)), load_from_disk(str(stream / split))
        assert a.features == b.features
        assert len(a) == len(b)  # the same budget in whole blocks
        for name, target in (("prose", 0.6), ("code", 0.4)):
            assert abs(rep["splits"][split]["sources"][name]["achieved_share"] - target) < 0.01
    assert rep["stages"]["quality"]["prose"]["removed"]["percentile"]["docs"] >= 1
    tok = AutoTokenizer.from_pretrained(str(stream / "tokenizer"))
    found = {
        split: {m for s in _segments(load_from_disk(str(stream / split))) for m in MARKER.findall(tok.decode(s))}
        for split in ("train", "validation")
    }
    assert found["validation"] and not found["train"] & found["validation"]
    # Streaming twice gives the same bytes too.
    again = run(recipe, tmp_path / "stream2", streaming=True)
    assert _files(again) == _files(stream)


def test_budget_beyond_the_data_is_a_clear_error(tmp_path):
    prose_dir, code_dir = two_source_corpus(tmp_path / "corpus", n_prose=8, n_code=8, seed=10)
    sources = [prose_source("prose", str(prose_dir / "*.txt"), 0.5), code_source("code", str(code_dir / "*.py"), 0.5)]
    recipe = write_recipe(tmp_path / "r.yaml", sources, total_tokens=10_000_000)
    from hybrid_mamba.data_scripts.mixture import BudgetError

    with pytest.raises(BudgetError, match="needs .* tokens"):
        run(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_tokenizer_and_repetition(built, tmp_path):
    _, first = built
    prose_dir, code_dir = two_source_corpus(tmp_path / "corpus", n_prose=10, n_code=10, seed=12)
    sources = [prose_source("prose", str(prose_dir / "*.txt"), 0.5), code_source("code", str(code_dir / "*.py"), 0.5)]
    recipe = write_recipe(
        tmp_path / "r.yaml", sources, tokenizer={"path": str(first / "tokenizer")}, max_epochs=3.0, total_tokens=None
    )
    out = run(recipe, tmp_path / "out")
    report = read_report(out)
    assert report["tokenizer"]["trained"] is False
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == (first / "tokenizer" / "tokenizer.json").read_bytes()
    epochs = [s["epochs"] for s in report["splits"]["train"]["sources"].values()]
    assert max(epochs) > 2.5  # the smaller source is repeated to keep its share


def test_parquet_source_and_invalid_utf8(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hybrid_mamba.data_scripts.recipe import RecipeError

    rng = random.Random(13)
    pq.write_table(
        pa.table({"body": [prose(rng) for _ in range(20)], "key": [f"k{i}" for i in range(20)]}),
        tmp_path / "d.parquet",
    )
    (tmp_path / "t").mkdir()
    for i in range(20):
        raw = prose(rng).encode() + (b" broken \xff\xfe bytes \xc3\x28 end." if i == 0 else b"")
        (tmp_path / "t" / f"{i}.txt").write_bytes(raw)
    pq_source = prose_source("pq", str(tmp_path / "*.parquet"), 0.5, loader="parquet") | {
        "text_field": "body",
        "id_field": "key",
    }
    sources = [pq_source, prose_source("txt", str(tmp_path / "t" / "*.txt"), 0.5)]
    out = run(write_recipe(tmp_path / "r.yaml", sources), tmp_path / "out")
    report = read_report(out)
    assert report["stages"]["load"]["pq"]["docs_in"] == 20
    assert report["stages"]["normalize"]["txt"]["invalid_utf8"] == 3
    assert report["splits"]["train"]["blocks"] > 0
    bad = [pq_source | {"text_field": "content"}, sources[1]]
    with pytest.raises(RecipeError, match="has no column 'content'"):
        run(write_recipe(tmp_path / "r2.yaml", bad), tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
