"""Mixture: token budgets per source and split, and the sampler that meets them.

Design. Each split gets a token budget (``total_tokens`` split by ``validation_fraction``, or, without
``total_tokens``, the most the sources allow at their weights). A source's budget is its share of the
split's budget, rounded so the shares add up exactly. The sampler interleaves documents, always
taking the next document of the source furthest behind its budget (relative progress), so shares
hold at every point of the stream; the document that would overshoot a budget is truncated to fit
and still ends with eos. Validation is drawn first, from the head of each source's document order;
train continues from where validation stopped, so a document belongs to one split only (a truncated
validation document's remainder is dropped, not moved to train). In-memory builds may repeat a
source's train documents (``max_epochs``), each pass in a new seeded order; streams are read once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


class BudgetError(RuntimeError):
    """The curated data cannot meet the requested budget; the message says which source and by how much."""


def split_budget(total: int, shares: list[float]) -> list[int]:
    """Integer budgets proportional to ``shares`` that add up to ``total`` (largest remainders)."""
    raw = [total * s for s in shares]
    out = [int(np.floor(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - out[i]), i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


class DocSource:
    """One source's documents in a fixed order: ``next()`` gives token arrays, ``None`` when exhausted."""

    def next(self) -> np.ndarray | None:
        raise NotImplementedError

    def start_train(self) -> None:
        """Called once validation has taken its documents."""

    def remaining_tokens(self) -> int | None:
        """Tokens left for train (one pass), or None when unknown (streams)."""
        return None


class ArrayDocSource(DocSource):
    """In-memory source: documents of an Arrow dataset in a seeded order, repeatable for train."""

    def __init__(self, docs, lengths: np.ndarray, seed: int, source: int, repeat: bool):
        self.docs = docs  # indexable: docs[i] -> 1-d int array (eos included)
        self.lengths = lengths
        self.seed, self.source, self.repeat = seed, source, repeat
        self.order = np.random.default_rng([seed, source, 0]).permutation(len(lengths))
        self.pos = 0
        self.train_start = 0
        self.epoch = 0

    def next(self) -> np.ndarray | None:
        if self.pos >= len(self.order):
            if not self.repeat or self.train_start >= len(self.order):
                return None
            self.epoch += 1
            rest = self.order[self.train_start :]
            rng = np.random.default_rng([self.seed, self.source, self.epoch])
            self.order = np.concatenate([self.order[: self.train_start], rng.permutation(rest)])
            self.pos = self.train_start
        i = self.order[self.pos]
        self.pos += 1
        return np.asarray(self.docs[int(i)], dtype=np.int32)

    def start_train(self) -> None:
        self.train_start = self.pos

    def remaining_tokens(self) -> int:
        return int(self.lengths[self.order[self.pos :]].sum())


class IterDocSource(DocSource):
    """Streaming source: documents as they come."""

    def __init__(self, it: Iterator[np.ndarray]):
        self.it = it

    def next(self) -> np.ndarray | None:
        return next(self.it, None)


@dataclass
class SourceUse:
    budget: int = 0
    tokens: int = 0
    docs: int = 0
    truncated: int = 0


class Mixer:
    """Iterate (source index, tokens) until every budget is met; ``uses`` says what each source gave."""

    def __init__(self, sources: list[DocSource], budgets: list[int], eos_id: int, names: list[str]):
        self.sources, self.eos_id, self.names = sources, eos_id, names
        self.uses = [SourceUse(budget=b) for b in budgets]
        self.exhausted: str | None = None

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        uses = self.uses
        active = [i for i, u in enumerate(uses) if u.budget > 0]
        while active:
            s = min(active, key=lambda i: (uses[i].tokens / uses[i].budget, i))
            doc = self.sources[s].next()
            if doc is None:
                self.exhausted = self.names[s]
                logger.warning(
                    "source '%s' ran out after %d of its %d tokens; the split stops here (the other "
                    "sources are within one document of their shares)",
                    self.names[s],
                    uses[s].tokens,
                    uses[s].budget,
                )
                return
            room = uses[s].budget - uses[s].tokens
            if len(doc) > room:
                eos = np.array([self.eos_id], dtype=np.int32)
                doc = np.concatenate([doc[: room - 1], eos]) if room > 1 else eos
                uses[s].truncated += 1
            uses[s].tokens += len(doc)
            uses[s].docs += 1
            if uses[s].tokens >= uses[s].budget:
                active.remove(s)
            yield s, doc
