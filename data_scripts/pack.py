"""Stage 8, packing: documents (tokens + eos) laid end to end and cut into blocks of ``seq_len``.

Each block row holds ``input_ids`` and ``position_ids`` (both int32, length ``seq_len``) and ``source``
(the source of the block's first token, a ``ClassLabel`` over the recipe's source names). Positions
count from 0 at every document start and at every block start, so a document continuing from the
previous block starts again at 0; the model starts a new segment wherever positions do not go up by
one, which keeps documents apart. The last, incomplete block of a split is dropped (and reported).
Blocks are written with datasets' ``ArrowWriter`` as they fill, so memory stays at one batch of rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import ClassLabel, Dataset, DatasetInfo, Features, List, Value
from datasets.arrow_writer import ArrowWriter
from datasets.table import MemoryMappedTable


def block_features(seq_len: int, source_names: list[str]) -> Features:
    return Features(
        {
            "input_ids": List(Value("int32"), length=seq_len),
            "position_ids": List(Value("int32"), length=seq_len),
            "source": ClassLabel(names=source_names),
        }
    )


class Packer:
    def __init__(self, path: Path, seq_len: int, source_names: list[str], rows_per_batch: int = 1024):
        self.seq_len = seq_len
        self.features = block_features(seq_len, source_names)
        self.writer = ArrowWriter(features=self.features, path=str(path))
        self.rows = rows_per_batch
        self.ids = np.zeros((rows_per_batch, seq_len), dtype=np.int32)  # (R, L)
        self.pos = np.zeros((rows_per_batch, seq_len), dtype=np.int32)  # (R, L)
        self.src = np.zeros(rows_per_batch, dtype=np.int64)  # (R,)
        self.r = 0  # row being filled
        self.f = 0  # tokens in that row
        self.row_tokens = np.zeros(len(source_names), dtype=np.int64)
        self.tokens = np.zeros(len(source_names), dtype=np.int64)  # per source, complete blocks only
        self.blocks = 0
        self.docs = 0

    def add(self, source: int, doc: np.ndarray) -> None:
        self.docs += 1
        off, n, L = 0, len(doc), self.seq_len
        while off < n:
            take = min(n - off, L - self.f)
            if self.f == 0:
                self.src[self.r] = source
            self.ids[self.r, self.f : self.f + take] = doc[off : off + take]
            self.pos[self.r, self.f : self.f + take] = np.arange(take, dtype=np.int32)
            self.row_tokens[source] += take
            self.f += take
            off += take
            if self.f == L:
                self.tokens += self.row_tokens
                self.row_tokens[:] = 0
                self.blocks += 1
                self.f = 0
                self.r += 1
                if self.r == self.rows:
                    self._flush()

    def _flush(self) -> None:
        if self.r == 0:
            return
        L, r = self.seq_len, self.r
        table = pa.table(
            {
                "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(self.ids[:r].ravel()), L),
                "position_ids": pa.FixedSizeListArray.from_arrays(pa.array(self.pos[:r].ravel()), L),
                "source": pa.array(self.src[:r]),
            },
            schema=self.features.arrow_schema,
        )
        self.writer.write_table(table)
        self.r = 0

    def close(self) -> dict:
        dropped = int(self.row_tokens.sum())
        self._flush()
        self.writer.finalize()
        self.writer.close()
        return {"blocks": self.blocks, "tokens_per_source": self.tokens.tolist(), "dropped_tail_tokens": dropped}


def save_blocks(
    arrow_path: Path, out_dir: Path, features: Features, split: str, fingerprint: str, description: str
) -> Dataset:
    """Turn the packer's Arrow file into a ``save_to_disk`` folder with a fixed fingerprint.

    The fingerprint is set, not derived from file paths or times, so reruns write identical bytes.
    """
    table = MemoryMappedTable.from_file(str(arrow_path))
    info = DatasetInfo(description=description, features=features)
    ds = Dataset(table, info=info, split=split, fingerprint=fingerprint)
    ds.save_to_disk(str(out_dir))
    return ds
