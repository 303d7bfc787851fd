"""Local `evaluate` metric modules: they load from files in this folder, never from the Hub."""

from pathlib import Path

METRICS_DIR = Path(__file__).parent


def load(task: str, **kwargs):
    """`evaluate.load` of trainers/metrics/glue.py with config `task` (a GLUE task, `classification` or `regression`)."""
    import evaluate

    return evaluate.load(str(METRICS_DIR / "glue.py"), task, **kwargs)
