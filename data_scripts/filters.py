"""Stages 2-4: length filter, language identification (lingua) and quality rules with a percentile cut.

Every stage function takes a batch (dict of lists) and the per-source filter settings, leaves rows that
an earlier stage removed untouched, and writes its verdict into ``reason`` (empty: kept).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .quality import active_rules, evaluate
from .recipe import FilterConfig


def length_batch(batch: dict, filters: list[FilterConfig]) -> dict:
    reasons = []
    for text, reason, src in zip(batch["text"], batch["reason"], batch["source"], strict=True):
        if not reason:
            f = filters[src]
            if len(text) < f.min_chars:
                reason = "length:too_short"
            elif len(text) > f.max_chars:
                reason = "length:too_long"
        reasons.append(reason)
    return {"reason": reasons}


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


def language_batch(batch: dict, filters: list[FilterConfig]) -> dict:
    """Columns ``language`` (ISO 639-1 code or "") and ``language_score``; removes other languages."""
    n = len(batch["text"])
    langs, scores, reasons = [""] * n, [float("nan")] * n, list(batch["reason"])
    todo = [i for i in range(n) if not reasons[i] and filters[batch["source"][i]].language is not None]
    if todo:
        samples = [language_sample(batch["text"][i], filters[batch["source"][i]].language.max_chars) for i in todo]
        # lingua spreads the batch over all cores itself (Rust threads).
        results = _detector().compute_language_confidence_values_in_parallel(samples)
        for i, values in zip(todo, results, strict=True):
            cfg = filters[batch["source"][i]].language
            if not values:
                reasons[i] = "language:unknown"
                continue
            top = values[0]
            code = top.language.iso_code_639_1.name.lower()
            langs[i], scores[i] = code, float(top.value)
            if code not in {c.lower() for c in cfg.keep}:
                reasons[i] = f"language:{code}"
            elif top.value < cfg.threshold:
                reasons[i] = "language:low_confidence"
    return {"language": langs, "language_score": scores, "reason": reasons}


def quality_batch(batch: dict, filters: list[FilterConfig]) -> dict:
    """Column ``quality_score``; removes documents failing a hard rule (reason ``quality:<rule>``)."""
    rules = [active_rules(f.quality.rules, f.quality.thresholds) if f.quality else None for f in filters]
    scores, reasons = [], []
    for text, reason, src in zip(batch["text"], batch["reason"], batch["source"], strict=True):
        score = float("nan")
        if not reason and rules[src] is not None:
            failed, score = evaluate(text, rules[src], filters[src].quality.rules)
            if failed:
                reason = f"quality:{failed}"
        scores.append(score)
        reasons.append(reason)
    return {"quality_score": scores, "reason": reasons}


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


def percentile_batch(batch: dict, cuts: list[float]) -> dict:
    reasons = []
    for score, reason, src in zip(batch["quality_score"], batch["reason"], batch["source"], strict=True):
        if not reason and not math.isnan(score) and score < cuts[src]:
            reason = "quality:percentile"
        reasons.append(reason)
    return {"reason": reasons}
