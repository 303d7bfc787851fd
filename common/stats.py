"""Mean, spread and 95% confidence interval of a metric over seeds (Student's t), and paired differences.

One convention for what cannot be computed, so that every result JSON stays strict JSON:
- a value that is not a finite number (None, NaN, +-inf: a metric a run could not compute, or one
  that overflowed) is *missing*: it is left out of n, the mean, the spread and the interval, counted
  in `missing`, and listed as None in `values`;
- a statistic that the remaining values do not define is None, never NaN: the mean of no value, the
  sample std, standard error and interval of fewer than two, the Wilcoxon p-value when every
  difference is zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def summarize(values: Sequence[float | None]) -> dict:
    """{'n', 'missing', 'mean', 'std' (n-1), 'stderr' (std / sqrt(n)), 'ci95': [low, high], 'values'}.

    ci95 is mean +- t_{0.975, n-1} * stderr. See the module docstring for missing values and None.
    """
    if len(values) == 0:
        raise ValueError("summarize needs at least one value.")
    kept = [float(v) for v in values if _finite(v)]
    n = len(kept)
    out = {
        "n": n,
        "missing": len(values) - n,
        "mean": None,
        "std": None,
        "stderr": None,
        "ci95": None,
        "values": [float(v) if _finite(v) else None for v in values],
    }
    if n == 0:
        return out
    mean = sum(kept) / n
    out["mean"] = mean
    if n < 2:
        return out
    from scipy.stats import t as student_t

    std = math.sqrt(sum((v - mean) ** 2 for v in kept) / (n - 1))
    stderr = std / math.sqrt(n)
    half = float(student_t.ppf(0.975, n - 1)) * stderr
    out.update(std=std, stderr=stderr, ci95=[mean - half, mean + half])
    return out


def paired(differences: Sequence[float | None]) -> dict:
    """Paired comparison: summarize() of the differences, how many of the present ones are above /
    below / at zero, and the two-sided Wilcoxon signed-rank p-value (None when every difference is zero
    or none is present)."""
    out = summarize(differences)
    kept = [v for v in out["values"] if v is not None]
    out.update(above=sum(d > 0 for d in kept), below=sum(d < 0 for d in kept), zero=sum(d == 0 for d in kept))
    out["wilcoxon_p"] = None
    if any(kept):
        from scipy.stats import wilcoxon

        out["wilcoxon_p"] = float(wilcoxon(kept).pvalue)
    return out


def format_number(x: float | None) -> str:
    """Four significant digits ('-' for None), in exponent form from 1e4 up."""
    if x is None:
        return "-"
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.4e}"


def format_cell(s: dict | None) -> str:
    """A summarize() result as a results-table cell: 'mean ± stderr [low, high] (n=N)' in `format_number`'s
    digits; 'mean (n=1)' without an interval, '-' without a mean."""
    if s is None or s["mean"] is None:
        return "-"
    if s["ci95"] is None:
        return f"{format_number(s['mean'])} (n={s['n']})"
    low, high = s["ci95"]
    return f"{format_number(s['mean'])} ± {format_number(s['stderr'])} [{format_number(low)}, {format_number(high)}] (n={s['n']})"


def format_summary(s: dict, spec: str = ".4f", spread: str = "std") -> str:
    """'mean ± spread [low, high]' of a summarize() result ('mean (n=1)' without an interval, '-' without a mean)."""
    if s["mean"] is None:
        return "-"
    if s["ci95"] is None:
        return f"{s['mean']:{spec}} (n={s['n']})"
    return f"{s['mean']:{spec}} ± {s[spread]:{spec}} [{s['ci95'][0]:{spec}}, {s['ci95'][1]:{spec}}]"
