"""Stages 2-4: length filter, language identification (lingua) and quality rules with a percentile cut.

Every stage is a per-document function (``docs.document_stage``) given the per-source filter settings;
it writes its verdict into ``reason`` (empty: kept). The ``*_batch`` forms apply it to a batch.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .docs import document_stage, map_docs
from .quality import active_rules, evaluate
from .recipe import FilterConfig


@document_stage(("reason",))
def length_doc(doc, filters: list[FilterConfig]) -> dict:
    f = filters[doc["source"]]
    if len(doc["text"]) < f.min_chars:
        return {"reason": "length:too_short"}
    if len(doc["text"]) > f.max_chars:
        return {"reason": "length:too_long"}
    return {}


def length_batch(batch: dict, filters: list[FilterConfig]) -> dict:
    return map_docs(batch, length_doc, filters=filters)


@functools.lru_cache(maxsize=1)
def _detector():
    # All 75 languages, models loaded lazily on first use (about 1 s for Latin-script text), so that
    # confidence is relative to every language lingua knows, not to a short list.
    from lingua import LanguageDetectorBuilder

    return LanguageDetectorBuilder.from_all_languages().build()


def language_sample(text: str, max_chars: int) -> str:
    """The text itself, or three windows (start of the middle quarters) cut at spaces."""
    if len(text) <= max_chars:
        return text
    w = max_chars // 3
    parts = []
    for frac in (0.25, 0.5, 0.75):
        start = int(len(text) * frac)
        start = text.find(" ", start, start + 200) + 1 or start
        parts.append(text[start : start + w])
    return "\n".join(parts)


def _detect(docs: list, filters: list[FilterConfig]) -> list:
    """lingua's confidence values for each document whose source filters languages, else None."""
    todo = [i for i, d in enumerate(docs) if filters[d["source"]].language is not None]
    out = [None] * len(docs)
    if todo:
        samples = [language_sample(docs[i]["text"], filters[docs[i]["source"]].language.max_chars) for i in todo]
        # lingua spreads the batch over all cores itself (Rust threads).
        results = _detector().compute_language_confidence_values_in_parallel(samples)
        for i, values in zip(todo, results, strict=True):
            out[i] = values
    return out


@document_stage(
    ("language", "language_score", "reason"),
    removed={"language": "", "language_score": float("nan")},
    prepare=_detect,
)
def language_doc(doc, values, filters: list[FilterConfig]) -> dict:
    """Columns ``language`` (ISO 639-1 code or "") and ``language_score``; removes other languages."""
    cfg = filters[doc["source"]].language
    if cfg is None:
        return {"language": "", "language_score": float("nan")}
    if not values:
        return {"language": "", "language_score": float("nan"), "reason": "language:unknown"}
    top = values[0]
    code = top.language.iso_code_639_1.name.lower()
    reason = ""
    if code not in {c.lower() for c in cfg.keep}:
        reason = f"language:{code}"
    elif top.value < cfg.threshold:
        reason = "language:low_confidence"
    return {"language": code, "language_score": float(top.value), "reason": reason}


def language_batch(batch: dict, filters: list[FilterConfig]) -> dict:
    return map_docs(batch, language_doc, filters=filters)


def _rules(docs: list, filters: list[FilterConfig]) -> list:
    # Resolved once per batch rather than per document.
    rules = [active_rules(f.quality.rules, f.quality.thresholds) if f.quality else None for f in filters]
    return [rules[d["source"]] for d in docs]


@document_stage(("quality_score", "reason"), removed={"quality_score": float("nan")}, prepare=_rules)
def quality_doc(doc, rules, filters: list[FilterConfig]) -> dict:
    """Column ``quality_score``; removes documents failing a hard rule (reason ``quality:<rule>``)."""
    if rules is None:
        return {"quality_score": float("nan")}
    failed, score = evaluate(doc["text"], rules, filters[doc["source"]].quality.rules)
    return {"quality_score": score, "reason": f"quality:{failed}" if failed else ""}


def quality_batch(batch: dict, filters: list[FilterConfig]) -> dict:
    return map_docs(batch, quality_doc, filters=filters)


def percentile_cuts(scores: np.ndarray, sources: np.ndarray, filters: list[FilterConfig]) -> list[float]:
    """Per source, the score below which documents are cut (-inf where no cut applies).

    ``scores`` and ``sources`` hold only documents still kept after the hard quality rules.
    """
    cuts = []
    for i, f in enumerate(filters):
        s = scores[sources == i]
        if f.quality is None or f.quality.percentile <= 0 or s.size == 0:
            cuts.append(float("-inf"))
        else:
            # 'lower' picks an actual score, so a cut at p removes floor(p% of n) documents or fewer.
            cuts.append(float(np.percentile(s, f.quality.percentile, method="lower")))
    return cuts


@document_stage(("reason",))
def percentile_doc(doc, cuts: list[float]) -> dict:
    score = doc["quality_score"]
    if not math.isnan(score) and score < cuts[doc["source"]]:
        return {"reason": "quality:percentile"}
    return {}


def percentile_batch(batch: dict, cuts: list[float]) -> dict:
    return map_docs(batch, percentile_doc, cuts=cuts)
