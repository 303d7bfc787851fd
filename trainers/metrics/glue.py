"""GLUE-style classification metrics as a local `evaluate` module (loads without the Hub).

    import evaluate
    metric = evaluate.load("trainers/metrics/glue.py", "mrpc")   # or trainers.metrics.load("mrpc")
    metric.compute(predictions=[0, 1], references=[0, 1])   # {'accuracy': 1.0, 'f1': 1.0}

Config names are the GLUE tasks (each with the metrics of the GLUE paper) plus two for local tasks:
`classification` (accuracy, macro F1, Matthews correlation) and `regression` (Pearson, Spearman).
The formulas are scikit-learn's and scipy's, as in the Hub's `glue` metric.
"""

import datasets
import evaluate
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

TASK_METRICS = {
    "cola": ("matthews_correlation",),
    "sst2": ("accuracy",),
    "mnli": ("accuracy",),
    "mnli_matched": ("accuracy",),
    "mnli_mismatched": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
    "hans": ("accuracy",),
    "ax": ("matthews_correlation",),
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
    "stsb": ("pearson", "spearmanr"),
    "classification": ("accuracy", "f1", "matthews_correlation"),
    "regression": ("pearson", "spearmanr"),
}
REGRESSION = {"stsb", "regression"}

_DESCRIPTION = "Accuracy, F1, Matthews correlation, Pearson and Spearman correlation for GLUE-style tasks."
_KWARGS = """
Args:
    predictions: predicted labels (class ids), or scores for `stsb`/`regression`.
    references: gold labels, or gold scores.
Returns: the task's metrics (see TASK_METRICS); F1 is binary for mrpc/qqp and macro for `classification`.
"""
_CITATION = """@inproceedings{wang2019glue, title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for
Natural Language Understanding}, author={Wang, Alex and others}, booktitle={ICLR}, year={2019}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Glue(evaluate.Metric):
    def _info(self):
        if self.config_name not in TASK_METRICS:
            raise KeyError(f"Unknown task {self.config_name!r}; choose one of {sorted(TASK_METRICS)}.")
        dtype = "float32" if self.config_name in REGRESSION else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}),
        )

    def _compute(self, predictions, references):
        out = {}
        for name in TASK_METRICS[self.config_name]:
            if name == "accuracy":
                out[name] = float(accuracy_score(references, predictions))
            elif name == "f1":
                average = "macro" if self.config_name == "classification" else "binary"
                out[name] = float(f1_score(references, predictions, average=average))
            elif name == "matthews_correlation":
                out[name] = float(matthews_corrcoef(references, predictions))
            elif name == "pearson":
                out[name] = float(pearsonr(predictions, references)[0])
            elif name == "spearmanr":
                out[name] = float(spearmanr(predictions, references)[0])
        return out
