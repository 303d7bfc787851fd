"""Stages are written per document (datatrove's ``filter(doc)`` shape); ``map_docs`` applies one to a batch.

A stage function takes one row (``doc["text"]``, ``doc["source"]``, ...) and returns the columns it
changes. Rows that an earlier stage removed (non-empty ``reason``) are not passed to it: they keep
their ``text`` and ``reason`` and get the stage's ``removed`` values for the columns it adds.
"""

from __future__ import annotations

from collections.abc import Callable


class Row:
    """Row j of a batch (dict of columns), read lazily: documents can be whole books."""

    __slots__ = ("batch", "j")

    def __init__(self, batch: dict, j: int):
        self.batch = batch
        self.j = j

    def __getitem__(self, column: str):
        return self.batch[column][self.j]


def document_stage(
    columns: tuple[str, ...],
    removed: dict | None = None,
    every_row: bool = False,
    prepare: Callable | None = None,
):
    """Declares what a per-document function writes.

    columns: the columns it writes, in this order; those a call does not return keep the row's value.
      A new column must be returned by every call (or have a ``removed`` value).
    removed: values of the new columns for rows an earlier stage removed.
    every_row: it also runs on removed rows (tokenization counts their tokens for the report).
    prepare: ``prepare(docs, **params) -> [per-doc value]`` for work a library does faster on many
      documents at once (lingua's and tokenizers' threads); the function is then ``fn(doc, value, **params)``.
    """

    def mark(fn):
        fn.columns = columns
        fn.removed = removed or {}
        fn.every_row = every_row
        fn.prepare = prepare
        return fn

    return mark


def map_docs(batch: dict, stage_fn, **params) -> dict:
    """A per-document stage on a batch: the columns it writes, one value per row."""
    n = len(batch["reason"])
    removed = stage_fn.removed
    # Start from what removed rows get; the function's results then overwrite the rows it ran on.
    out = {
        c: [removed[c]] * n if c in removed else list(batch[c]) if c in batch else [None] * n for c in stage_fn.columns
    }
    rows = [Row(batch, j) for j, reason in enumerate(batch["reason"]) if stage_fn.every_row or not reason]
    values = stage_fn.prepare(rows, **params) if stage_fn.prepare and rows else None
    for k, row in enumerate(rows):
        result = stage_fn(row, **params) if values is None else stage_fn(row, values[k], **params)
        for c, v in result.items():
            out[c][row.j] = v
    return out
