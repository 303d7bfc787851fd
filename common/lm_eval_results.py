"""Reading lm-eval's own results JSON (what `lm_eval --output_path` and `simple_evaluate` write).

lm-eval keys a metric as `NAME,FILTER` (`acc,none`) and its within-run standard error as
`NAME_stderr,FILTER`, which it sets to "N/A" when it has none. A metric here is labelled `NAME` for
the filter `none` and `NAME (FILTER)` otherwise; only numeric values are metrics (bools are not).
"""

from __future__ import annotations

import json
from pathlib import Path


def metric_values(res: dict) -> dict[str, dict[str, tuple[float, float | None]]]:
    """{task: {metric: (value, lm-eval stderr or None)}} from one results dict; tasks without a
    numeric metric are left out."""
    out: dict[str, dict[str, tuple[float, float | None]]] = {}
    results = res.get("results") if isinstance(res, dict) else None
    for task, metrics in (results or {}).items():
        if not isinstance(metrics, dict):
            continue
        for key, val in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(val, (int, float)) or isinstance(val, bool):
                continue
            name, filt = key.split(",", 1)
            se = metrics.get(f"{name}_stderr,{filt}")
            label = name if filt == "none" else f"{name} ({filt})"
            numeric = isinstance(se, (int, float)) and not isinstance(se, bool)
            out.setdefault(task, {})[label] = (float(val), float(se) if numeric else None)
    return out


def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(path.rglob("*.json"))


def read_results(path: Path) -> dict[str, dict[str, tuple[float, float | None]]]:
    """metric_values() of a results file, or of every results file in a folder (its subfolders too).

    Later files (by name, which lm-eval stamps with the time) replace earlier ones task by task.
    Raises FileNotFoundError for a missing path, ValueError for a file that is not lm-eval results or
    a folder holding none.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (lm-eval results: a results JSON or a folder of them)")
    tasks: dict = {}
    for file in _files(path):
        data = json.loads(file.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
            if path.is_file():
                raise ValueError(f"{file} is not an lm-eval results file (no 'results' mapping)")
            continue
        tasks.update(metric_values(data))
    if not tasks:
        raise ValueError(f"no lm-eval results found in {path}")
    return tasks


def read_documents(path: Path) -> dict[str, tuple[int, int | None]]:
    """{task: (documents evaluated, documents in the task)} from lm-eval's `n-samples` (fewer
    evaluated when run with --limit), over a results file or a folder of them."""
    docs = {}
    for file in _files(Path(path)):
        data = json.loads(file.read_text())
        for task, n in (data.get("n-samples") or {}).items() if isinstance(data, dict) else ():
            if isinstance(n, dict) and "effective" in n:
                docs[task] = (n["effective"], n.get("original"))
    return docs
