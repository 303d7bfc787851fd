"""GLUE-style classification data: local TSV/JSONL files, or the Hub's GLUE when it is reachable.

A local file has a header naming its columns (TSV, tab-separated, no quoting, as GLUE ships them) or
one JSON object per line; the text column(s) and `label` are read. The GLUE tasks know their columns
and label count; a task of your own gives `text_columns` and `num_labels` (1 = regression).

A sequence is `text_a EOS [text_b EOS]`: the classifier reads the last non-pad token, the final EOS.
"""

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    text_columns: tuple[str, ...]
    num_labels: int  # 1: regression
    validation_split: str = "validation"


GLUE_TASKS = {
    "cola": Task(("sentence",), 2),
    "sst2": Task(("sentence",), 2),
    "mrpc": Task(("sentence1", "sentence2"), 2),
    "qqp": Task(("question1", "question2"), 2),
    "stsb": Task(("sentence1", "sentence2"), 1),
    "mnli": Task(("premise", "hypothesis"), 3, "validation_matched"),
    "qnli": Task(("question", "sentence"), 2),
    "rte": Task(("sentence1", "sentence2"), 2),
    "wnli": Task(("sentence1", "sentence2"), 2),
}
HUB_GLUE = "nyu-mll/glue"


def resolve_task(task: str, text_columns: list[str] | None, num_labels: int | None) -> Task:
    if task in GLUE_TASKS:
        glue = GLUE_TASKS[task]
        return Task(tuple(text_columns or glue.text_columns), num_labels or glue.num_labels, glue.validation_split)
    if not text_columns or not num_labels:
        raise ValueError(
            f"Task {task!r} is not a GLUE task ({', '.join(GLUE_TASKS)}): give text_columns and num_labels "
            "(1 for regression) in the config."
        )
    return Task(tuple(text_columns), num_labels)


def read_examples(path, task: Task) -> tuple[list[dict], list[str]]:
    """Examples {texts, label} of a .tsv or .jsonl file, and `file:line: reason` for each bad row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Classification data file {path} does not exist.")
    rows, problems = [], []
    if path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
        records = []
        for i, line in lines:
            try:
                records.append((i, json.loads(line)))
            except json.JSONDecodeError as err:
                problems.append(f"{path}:{i}: invalid JSON ({err.msg})")
    else:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path} is empty.")
            need = [*task.text_columns, "label"]
            if absent := [c for c in need if c not in header]:
                raise ValueError(f"{path} has no column(s) {absent}; its header is {header}.")
            records = []
            for i, cells in enumerate(reader, 2):
                if len(cells) != len(header):
                    problems.append(f"{path}:{i}: {len(cells)} fields, the header has {len(header)}")
                    continue
                records.append((i, dict(zip(header, cells))))
    for i, rec in records:
        try:
            texts = [rec[c] for c in task.text_columns]
            if any(not isinstance(t, str) or not t.strip() for t in texts):
                raise ValueError("empty text")
            label = float(rec["label"]) if task.num_labels == 1 else int(rec["label"])
            if task.num_labels > 1 and not 0 <= label < task.num_labels:
                raise ValueError(f"label {label} outside [0, {task.num_labels})")
        except (KeyError, ValueError, TypeError) as err:
            problems.append(f"{path}:{i}: {err.__class__.__name__}: {err}")
            continue
        rows.append({"texts": texts, "label": label})
    return rows, problems


def hub_glue(task_name: str, task: Task) -> tuple[list[dict], list[dict]] | None:
    """(train, validation) examples of GLUE from the Hub, or None when the Hub cannot be reached."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        logger.warning("GLUE from the Hub: not tried, HF_HUB_OFFLINE is set")
        return None
    from datasets import load_dataset

    try:
        ds = load_dataset(HUB_GLUE, task_name)
    except Exception as err:
        logger.warning("GLUE from the Hub (%s/%s) is not reachable: %s", HUB_GLUE, task_name, str(err).splitlines()[0])
        return None
    convert = lambda split: [{"texts": [r[c] for c in task.text_columns], "label": r["label"]} for r in split]
    return convert(ds["train"]), convert(ds[task.validation_split])


def load_examples(task_name: str, task: Task, train_file, validation_file, source: str):
    """(train, validation, problems). `source`: local, hub, or auto (the Hub for a GLUE task when reachable, else local files)."""
    if source not in ("auto", "local", "hub"):
        raise ValueError(f"data_source must be auto, local or hub, got {source!r}.")
    if source in ("auto", "hub") and task_name in GLUE_TASKS:
        got = hub_glue(task_name, task)
        if got is not None:
            logger.info("GLUE %s from the Hub: %d train, %d validation", task_name, len(got[0]), len(got[1]))
            return got[0], got[1], []
        if source == "hub":
            raise ConnectionError(
                f"GLUE {task_name} could not be loaded from the Hub ({HUB_GLUE}); this machine is offline or the Hub is "
                "unreachable. Set data_source: local with train_file/validation_file (GLUE-format TSV)."
            )
        if not (train_file and validation_file):
            raise FileNotFoundError(
                f"GLUE {task_name} is not reachable on the Hub and no local train_file/validation_file is given."
            )
        logger.warning("using local files instead: %s, %s", train_file, validation_file)
    elif source == "hub":
        raise ValueError(f"data_source: hub needs a GLUE task ({', '.join(GLUE_TASKS)}), got {task_name!r}.")
    if not (train_file and validation_file):
        raise ValueError("Classification needs train_file and validation_file (TSV with a header, or JSONL).")
    train, p1 = read_examples(train_file, task)
    val, p2 = read_examples(validation_file, task)
    problems = p1 + p2
    for p in problems[:20]:
        logger.warning("skipped %s", p)
    for name, rows in (("train_file", train), ("validation_file", val)):
        if not rows:
            raise ValueError(f"{name} has no usable example ({len(problems)} bad row(s); first: {problems[:1]}).")
    return train, val, problems


def tokenize_examples(examples: list[dict], tokenizer, max_seq_len: int, num_labels: int) -> Dataset:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("Classification needs a tokenizer with an EOS token (it ends every text).")
    rows = []
    per_text = max_seq_len // max(1, len(examples[0]["texts"]))
    for ex in examples:
        ids = []
        for text in ex["texts"]:
            ids += tokenizer(text, add_special_tokens=False)["input_ids"][: per_text - 1] + [eos]
        rows.append({"input_ids": ids, "labels": float(ex["label"]) if num_labels == 1 else int(ex["label"])})
    return Dataset.from_list(rows).with_format("torch")
