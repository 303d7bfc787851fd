"""Scores on the synthetic tasks of data_scripts.synthetic, and their export as lm-eval tasks.

    python -m hybrid_mamba.eval_harness.synthetic_eval --model RUN/final --data DATA --out results/mqar.json
    python -m hybrid_mamba.eval_harness.synthetic_eval --data DATA --lm_eval_tasks tasks/synthetic_mqar
    lm_eval --model hf --model_args pretrained=RUN/final,trust_remote_code=True \
        --include_path tasks/synthetic_mqar --tasks synthetic_mqar

`score` reads DATA/test (one row per example, all rows of a length equally long) and checks, teacher
forced, the greedy prediction at every answer position: the argmax of the logits at t-1 against the
label at t. Per test length it reports token accuracy (over answer tokens), example accuracy (every
answer token of the example right), the counts, and whether the length is beyond the training
lengths (`extrapolation`).

`write_lm_eval_tasks` writes one lm-eval task per test length and a group over them. An item is one
maximal run of consecutive answer tokens of a test example (MQAR: one item per query, the value after
the queried key; selective copying: the copied sequence; induction: the target; pass key: the
digits). Its context is the example's text up to that run, earlier answers included (teacher
forcing, as in `score`), and its target is the run's text. The output type is `loglikelihood`:
its `acc` is 1 when the target is the greedy continuation of the context token by token, the same
teacher-forced check as `score` without generation, so no stop strings or generation lengths to get
wrong; `perplexity` is reported too. A task's `acc` is thus `score`'s token accuracy for MQAR and
induction, and its example accuracy for selective copying and the pass key.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hybrid_mamba.common.files import atomic_dir, write_json_atomic

logger = logging.getLogger(__name__)

IGNORE = -100


class SyntheticEvalError(ValueError):
    """A DATA folder or argument the synthetic evaluation cannot use."""


def _load_test(data_dir: Path):
    from datasets import load_from_disk

    for sub in ("test", "tokenizer", "spec.json"):
        if not (data_dir / sub).exists():
            raise FileNotFoundError(
                f"{data_dir / sub} not found: pass a folder written by `python -m hybrid_mamba.data_scripts.synthetic`"
            )
    spec = json.loads((data_dir / "spec.json").read_text())
    return load_from_disk(str(data_dir / "test")), spec


def _load_model(model, device: str):
    if isinstance(model, (str, Path)):
        from transformers import AutoModelForCausalLM

        import hybrid_mamba.modeling  # noqa: F401  (registers hybrid_mamba with the Auto classes)

        path = Path(model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: pass a save_pretrained model folder (RUN/final)")
        model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True)
    return model.to(device).eval()


def _counts(correct: torch.Tensor, mask: torch.Tensor) -> dict:
    """Sums over a batch: correct (B, T-1) bool, mask (B, T-1) bool (answer positions)."""
    per_example_wrong = (~correct & mask).sum(-1)
    return {
        "n_examples": int(mask.shape[0]),
        "n_answer_tokens": int(mask.sum()),
        "correct_tokens": int((correct & mask).sum()),
        "correct_examples": int((per_example_wrong == 0).sum()),
    }


def _rates(c: dict) -> dict:
    return {
        "token_accuracy": c["correct_tokens"] / max(c["n_answer_tokens"], 1),
        "example_accuracy": c["correct_examples"] / max(c["n_examples"], 1),
        "n_examples": c["n_examples"],
        "n_answer_tokens": c["n_answer_tokens"],
    }


@torch.no_grad()
def score(model, data_dir, batch_size: int = 32, lengths: list[int] | None = None, device: str = "cpu") -> dict:
    """Teacher-forced greedy accuracy on DATA/test, per length and overall.

    `model`: a causal LM (called as ``model(input_ids=..., use_cache=False).logits``, shape (B, T, V))
    or a save_pretrained folder. `lengths`: the test lengths to score (default: all).
    Returns ``{"task", "data", "train_lengths", "lengths": {str(L): {token_accuracy, example_accuracy,
    n_examples, n_answer_tokens, extrapolation}}, "overall": {...}}``.
    """
    data_dir = Path(data_dir)
    test, record = _load_test(data_dir)
    spec = record["spec"]
    all_lengths = list(test["length"])
    available = sorted(set(all_lengths))
    chosen = available if lengths is None else sorted(set(lengths))
    if missing := [n for n in chosen if n not in available]:
        raise SyntheticEvalError(f"{data_dir}/test has no examples of length {missing}; its lengths are {available}")
    if batch_size < 1:
        raise SyntheticEvalError(f"batch_size must be at least 1, got {batch_size}")
    model = _load_model(model, device)
    test = test.with_format("torch", columns=["input_ids", "labels"])
    per_length, total = {}, None
    for length in chosen:
        rows = [i for i, n in enumerate(all_lengths) if n == length]
        sums = None
        for start in range(0, len(rows), batch_size):
            batch = test[rows[start : start + batch_size]]  # a dict of (B, L) tensors
            input_ids = batch["input_ids"].to(device)  # (B, L): equal lengths, no padding
            labels = batch["labels"].to(device)[:, 1:]  # the token at t, predicted from the logits at t-1
            logits = model(input_ids=input_ids, use_cache=False).logits  # (B, L, V)
            pred = logits[:, :-1].argmax(-1)  # (B, L-1)
            mask = labels != IGNORE
            c = _counts(pred == labels, mask)
            sums = c if sums is None else {k: sums[k] + c[k] for k in sums}
        total = sums if total is None else {k: total[k] + sums[k] for k in total}
        per_length[str(length)] = {**_rates(sums), "extrapolation": length > max(spec["train_lengths"])}
    return {
        "task": record["task"],
        "data": str(data_dir),
        "train_lengths": spec["train_lengths"],
        "lengths": per_length,
        "overall": _rates(total),
    }


def format_table(result: dict) -> str:
    lines = [f"{result['task']} ({result['data']}); trained on lengths {result['train_lengths']}"]
    lines.append(f"{'length':>8} {'token acc':>10} {'example acc':>12} {'examples':>9}  ")
    for length, r in result["lengths"].items():
        note = "extrapolation" if r["extrapolation"] else ""
        lines.append(
            f"{length:>8} {r['token_accuracy']:>10.4f} {r['example_accuracy']:>12.4f} {r['n_examples']:>9}  {note}"
        )
    o = result["overall"]
    lines.append(f"{'all':>8} {o['token_accuracy']:>10.4f} {o['example_accuracy']:>12.4f} {o['n_examples']:>9}")
    return "\n".join(lines)


# lm-eval export


def answer_spans(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of every maximal run of answer positions (labels != -100)."""
    spans, start = [], None
    for i, label in enumerate([*labels, IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            spans.append((start, i))
            start = None
    return spans


def lm_eval_items(data_dir: str | Path) -> dict[int, list[dict]]:
    """Per test length, the lm-eval items {"context", "target", "example", "length"} (see the module docstring)."""
    from transformers import AutoTokenizer

    data_dir = Path(data_dir)
    test, _ = _load_test(data_dir)
    tok = AutoTokenizer.from_pretrained(str(data_dir / "tokenizer"))
    items: dict[int, list[dict]] = {}
    for index, row in enumerate(test):
        ids, length = row["input_ids"], row["length"]
        for a, b in answer_spans(row["labels"]):
            items.setdefault(length, []).append(
                {
                    "context": tok.decode(ids[:a]),
                    "target": " " + tok.decode(ids[a:b]),  # the word-level tokenizer splits on spaces
                    "example": index,
                    "length": length,
                }
            )
    return items


LOADER = '''"""Loader of the exported synthetic tasks: the JSONL files beside this file (any working directory)."""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load(jsonl: str, **kwargs) -> datasets.DatasetDict:
    """The items of HERE/jsonl as the test split; kwargs: the rest of lm-eval's metadata, unused."""
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(HERE / jsonl))})
'''


def _task_yaml(name: str, jsonl: str, task: str, length: int) -> str:
    return f"""# {task} test examples of length {length} (written by hybrid_mamba.eval_harness.synthetic_eval).
task: {name}
custom_dataset: !function utils.load
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
metadata:
  version: 1.0
  jsonl: {jsonl}
"""


def write_lm_eval_tasks(data_dir: str | Path, out_dir: str | Path, name: str | None = None) -> list[str]:
    """Write DATA/test as lm-eval tasks into `out_dir` (replaced atomically); returns the task names.

    `name` (default ``synthetic_<task>``) is the group; its subtasks are ``<name>_len<L>``, one per test
    length. The folder holds one YAML per task, the group's YAML, the JSONL items and utils.py.
    """
    data_dir = Path(data_dir)
    _, record = _load_test(data_dir)
    task = record["task"]
    group = name or f"synthetic_{task}"
    items = lm_eval_items(data_dir)
    names = []
    with atomic_dir(Path(out_dir)) as tmp:
        (tmp / "utils.py").write_text(LOADER)
        for length in sorted(items):
            sub = f"{group}_len{length}"
            (tmp / f"{sub}.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items[length]))
            (tmp / f"{sub}.yaml").write_text(_task_yaml(sub, f"{sub}.jsonl", task, length))
            names.append(sub)
        (tmp / f"{group}.yaml").write_text(
            f"# All test lengths of {data_dir.name}: --tasks {group}\n"
            f"group: {group}\ntask:\n"
            + "".join(f"  - {n}\n" for n in names)
            + "aggregate_metric_list:\n  - metric: acc\n    aggregation: mean\n    weight_by_size: true\n"
            + "metadata:\n  version: 1.0\n"
        )
    logger.info("wrote lm-eval tasks %s (group %s) into %s", names, group, out_dir)
    return [group, *names]


# the command line


@dataclass
class SyntheticEvalArgs:
    """Score a model on a synthetic DATA folder's test split, and/or export that split as lm-eval tasks."""

    data: str = field(metadata={"help": "DATA folder written by data_scripts.synthetic."})
    model: str | None = field(default=None, metadata={"help": "save_pretrained model folder (RUN/final) to score."})
    out: str | None = field(default=None, metadata={"help": "JSON file for the scores (with --model)."})
    batch_size: int = field(default=32, metadata={"help": "Test examples per forward pass."})
    lengths: list[int] | None = field(default=None, metadata={"help": "Test lengths to score (default: all)."})
    device: str = field(default="cpu", metadata={"help": "torch device of the model."})
    lm_eval_tasks: str | None = field(
        default=None, metadata={"help": "Folder to write the test split into as lm-eval tasks (--include_path)."}
    )
    lm_eval_name: str | None = field(
        default=None, metadata={"help": "Group name of the lm-eval tasks (default synthetic_<task>)."}
    )


def main(argv: list[str] | None = None) -> int:
    from hybrid_mamba.common.args import parse_args

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(SyntheticEvalArgs, argv)
    if args.model is None and args.lm_eval_tasks is None:
        raise SyntheticEvalError("nothing to do: pass --model (to score) and/or --lm_eval_tasks (to export)")
    if args.model is not None and args.out is None:
        raise SyntheticEvalError("--model needs --out, the JSON file for the scores")
    data = Path(args.data)
    _load_test(data)  # a wrong folder fails before the model loads
    if args.lm_eval_tasks is not None:
        names = write_lm_eval_tasks(data, args.lm_eval_tasks, args.lm_eval_name)
        print(f"lm-eval tasks in {args.lm_eval_tasks}: {', '.join(names)}")
    if args.model is not None:
        result = score(args.model, data, args.batch_size, args.lengths, args.device)
        result["model"] = args.model
        write_json_atomic(Path(args.out), result)
        print(format_table(result))
    return 0


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
