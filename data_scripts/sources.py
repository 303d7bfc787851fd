"""Reading sources into rows: ``id``, ``source`` (index in the recipe), ``text``, ``reason``, ``note``,
``invalid_utf8``.

The same generators feed ``Dataset.from_generator`` (written to Arrow in the work folder) and
``IterableDataset.from_generator`` (streaming). Local files are read as bytes and decoded as UTF-8 with
invalid sequences replaced and counted. A JSONL line that is not valid JSON, not an object, or lacks
the text field never stops the run: it becomes a row removed at the ``load`` stage whose ``id`` is
``file:line`` and whose ``note`` holds the parser's message, and it is logged.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

from datasets import Dataset, Features, IterableDataset, Value

from .recipe import RecipeError, SourceConfig, SourceFiles

logger = logging.getLogger(__name__)

FEATURES = Features(
    {
        "id": Value("string"),
        "source": Value("int32"),
        "text": Value("string"),
        "reason": Value("string"),
        "note": Value("string"),
        "invalid_utf8": Value("int32"),
    }
)
_REPLACEMENT_BYTES = "\ufffd".encode("utf-8")
_LOGGED_PER_FILE = 20


def decode(raw: bytes) -> tuple[str, int]:
    """UTF-8 text with invalid sequences replaced by U+FFFD, and how many were replaced."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - raw.count(_REPLACEMENT_BYTES)


def _row(doc_id: str, source: int, text: str, reason: str = "", note: str = "", invalid: int = 0) -> dict:
    return {"id": doc_id, "source": source, "text": text, "reason": reason, "note": note, "invalid_utf8": invalid}


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _text_rows(paths: list[str], ids: list[str], source: int, max_docs: int | None):
    for n, (path, doc_id) in enumerate(zip(paths, ids, strict=True)):
        if max_docs is not None and n >= max_docs:
            return
        with _open(Path(path)) as f:
            text, invalid = decode(f.read())
        yield _row(doc_id, source, text, invalid=invalid)


def _jsonl_rows(
    paths: list[str], ids: list[str], source: int, text_field: str, id_field: str | None, max_docs: int | None
):
    n = 0
    for path, rel in zip(paths, ids, strict=True):
        logged = 0
        with _open(Path(path)) as f:
            for lineno, raw in enumerate(f, start=1):
                if max_docs is not None and n >= max_docs:
                    return
                line, invalid = decode(raw)
                if not line.strip():
                    continue
                n += 1
                where = f"{rel}:{lineno}"
                reason, note, text, doc_id = "", "", "", where
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    reason, note, text = "load:malformed_json", f"{e.msg} at column {e.colno}", line.strip()[:1000]
                else:
                    if not isinstance(obj, dict):
                        reason, note = "load:not_an_object", f"a JSON {type(obj).__name__}, not an object"
                    elif text_field not in obj:
                        reason, note = (
                            "load:missing_text_field",
                            f"no field '{text_field}' (fields: {', '.join(list(obj)[:10])})",
                        )
                    elif not isinstance(obj[text_field], str):
                        reason, note = "load:text_not_a_string", f"'{text_field}' is a {type(obj[text_field]).__name__}"
                    else:
                        text = obj[text_field]
                        if id_field and obj.get(id_field) is not None:
                            doc_id = str(obj[id_field])
                if reason:
                    if logged < _LOGGED_PER_FILE:
                        logger.warning("%s: line skipped, %s (%s)", where, reason.split(":", 1)[1], note)
                    elif logged == _LOGGED_PER_FILE:
                        logger.warning("%s: more bad lines in this file; all are listed in the report", rel)
                    logged += 1
                yield _row(doc_id, source, text, reason, note, invalid)


def _parquet_rows(
    paths: list[str], ids: list[str], source: int, text_field: str, id_field: str | None, max_docs: int | None
):
    import pyarrow.parquet as pq

    n = 0
    for path, rel in zip(paths, ids, strict=True):
        pf = pq.ParquetFile(path)
        columns = [text_field] + ([id_field] if id_field else [])
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=columns):
            texts = batch.column(text_field).to_pylist()
            doc_ids = batch.column(id_field).to_pylist() if id_field else [None] * len(texts)
            for text, doc_id in zip(texts, doc_ids, strict=True):
                if max_docs is not None and n >= max_docs:
                    return
                n += 1
                where = f"{rel}:{row}"
                row += 1
                if not isinstance(text, str):
                    yield _row(where, source, "", "load:text_not_a_string", f"'{text_field}' is {text!r}"[:200])
                else:
                    yield _row(str(doc_id) if doc_id is not None else where, source, text)


def _hub_rows(
    dataset: str,
    config: str | None,
    split: str,
    revision: str | None,
    source: int,
    text_field: str,
    id_field: str | None,
    max_docs: int | None,
):
    from datasets import load_dataset

    stream = load_dataset(dataset, config, split=split, revision=revision, streaming=True)
    if stream.features is not None and text_field not in stream.features:
        raise RecipeError(f"dataset '{dataset}' has no column '{text_field}' (columns: {', '.join(stream.features)})")
    for i, ex in enumerate(stream):
        if max_docs is not None and i >= max_docs:
            return
        text = ex.get(text_field)
        doc_id = str(ex[id_field]) if id_field and ex.get(id_field) is not None else f"{dataset}:{i}"
        if not isinstance(text, str):
            yield _row(doc_id, source, "", "load:text_not_a_string", f"'{text_field}' is {type(text).__name__}")
        else:
            yield _row(doc_id, source, text)


def source_rows(source: SourceConfig, index: int, files: SourceFiles | None):
    """(generator function, its keyword arguments) for one source."""
    if source.loader == "hub":
        kw = {"dataset": source.dataset, "config": source.config, "split": source.split, "revision": source.revision}
        return _hub_rows, kw | {
            "source": index,
            "text_field": source.text_field,
            "id_field": source.id_field,
            "max_docs": source.max_docs,
        }
    kw = {"paths": [str(p) for p in files.paths], "ids": files.ids, "source": index, "max_docs": source.max_docs}
    if source.loader == "text":
        return _text_rows, kw
    fields = {"text_field": source.text_field, "id_field": source.id_field}
    if source.loader == "jsonl":
        return _jsonl_rows, kw | fields
    if source.loader == "parquet":
        return _parquet_rows, kw | fields
    raise ValueError(source.loader)


def check_parquet_columns(source: SourceConfig, files: SourceFiles) -> None:
    """Parquet schemas are cheap to read: a missing text column fails before any work."""
    import pyarrow.parquet as pq

    for path in files.paths:
        names = pq.read_schema(path).names
        for col in [source.text_field] + ([source.id_field] if source.id_field else []):
            if col not in names:
                raise RecipeError(f"source '{source.name}': {path} has no column '{col}' (columns: {', '.join(names)})")


def load_source(
    source: SourceConfig, index: int, files: SourceFiles | None, cache_dir: str, fingerprint: str
) -> Dataset:
    """The source as an Arrow-backed Dataset written under ``cache_dir``."""
    gen, kwargs = source_rows(source, index, files)
    return Dataset.from_generator(
        gen, features=FEATURES, gen_kwargs=kwargs, cache_dir=cache_dir, fingerprint=fingerprint
    )


def stream_source(source: SourceConfig, index: int, files: SourceFiles | None) -> IterableDataset:
    gen, kwargs = source_rows(source, index, files)
    return IterableDataset.from_generator(gen, features=FEATURES, gen_kwargs=kwargs)
