"""Mean, standard deviation and 95% confidence interval of a metric over seeds (Student's t)."""

import math

from scipy.stats import t as student_t


def summarize(values: list[float]) -> dict:
    """{'mean', 'std' (n-1), 'ci95': [low, high], 'n', 'values'}; a single value has no spread (nan)."""
    n = len(values)
    if n == 0:
        raise ValueError("summarize needs at least one value.")
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "std": math.nan, "ci95": [math.nan, math.nan], "n": n, "values": list(values)}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(student_t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "n": n, "values": list(values)}


def paired(differences: list[float]) -> dict:
    """Paired comparison: summarize() of the differences, how many are above / below / at zero, and
    the two-sided Wilcoxon signed-rank p-value (nan when every difference is zero)."""
    from scipy.stats import wilcoxon

    out = summarize(differences)
    out.update(above=sum(d > 0 for d in differences), below=sum(d < 0 for d in differences),
               zero=sum(d == 0 for d in differences))
    out["wilcoxon_p"] = float(wilcoxon(differences).pvalue) if any(differences) else math.nan
    return out
