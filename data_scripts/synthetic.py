"""Synthetic tasks as DATA/ folders the trainer reads: associative recall, selective copying, induction, pass key.

    python -m hybrid_mamba.data_scripts.synthetic --task mqar --output data/mqar
    python -m hybrid_mamba.data_scripts.synthetic --task passkey --output data/passkey --spec passkey.yaml --seed 1
    python -m hybrid_mamba.data_scripts.synthetic --task mqar --output data/mqar16 --options "{num_pairs: 16}"

Every example is a sequence of whitespace-separated symbols, each one token of the folder's word-level
tokenizer, starting with ``<s>``; the loss and the scores are taken only on its answer tokens.

- ``mqar`` (multi-query associative recall, Zoology: Arora et al. 2023): ``num_pairs`` key-value pairs
  ``k3 v7 k1 v2 ...`` (keys distinct, values drawn with replacement), then blanks ``_`` with
  ``num_queries`` of the shown keys (by default all, as in Zoology) in random order at uniformly
  random positions (Zoology draws the gaps from a power law), each followed by its value: the
  answers are those values.
- ``selective_copy`` (Mamba paper, Gu and Dao 2023): ``num_tokens`` content tokens ``c0 ...`` at random
  positions among noise tokens ``_``, then the separator ``|`` and the content tokens in order: the
  answers are the copied tokens.
- ``induction`` (induction heads, as in the Mamba paper): random tokens ``t0 ...``, once among them the
  trigger ``@`` followed by a target token; at the end ``@`` again and the target, the answer.
- ``passkey`` (Mohtashami and Jaggi 2023): a repeated filler sentence of plain words, with
  ``the pass key is D D D D D . remember it .`` inserted at a uniformly random sentence boundary, then
  ``what is the pass key ? D D D D D``: the answers are the digits after the question.

Every example of length L has exactly L tokens, so test rows of one length batch without padding.

Output folder (written atomically; see data_scripts/README.md):

- ``train/``, ``validation/``: ``datasets`` folders of packed blocks of ``block_len`` tokens with
  ``input_ids``, ``position_ids`` (0 at each example's start) and ``labels`` (the token on answer
  positions, -100 elsewhere; the model shifts labels itself). Examples are packed greedily; the space
  left in a block is one pad-token example (labels -100, positions from 0).
- ``test/``: one unpacked row per example: ``input_ids``, ``labels``, ``length``; ``test_examples``
  rows for each of ``eval_lengths``.
- ``tokenizer/``: word-level ``PreTrainedTokenizerFast`` with ``<pad> <s> </s> <unk>`` and every symbol.
- ``spec.json`` (task and spec: the cache key), ``report.json`` and ``report.md``.

`build` returns an existing folder unchanged when its spec.json is the one asked for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hybrid_mamba.common.args import load_dataclass, read_yaml_mapping
from hybrid_mamba.common.files import atomic_dir

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # part of spec.json: a change to the generators invalidates cached folders
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
PAD, BOS = "<pad>", "<s>"
IGNORE = -100
SPLITS = ("train", "validation", "test")


class SpecError(ValueError):
    """A task spec that cannot be built; the message names the field and what to change."""


def _eval_lengths(*lengths: int):
    """The `eval_lengths` field with its default."""
    return field(
        default_factory=lambda: list(lengths),
        metadata={"help": "Example lengths of test/; those above max(train_lengths) measure extrapolation."},
    )


@dataclass
class TaskSpec(ABC):
    """Fields every task shares. Lengths count tokens, ``<s>`` included."""

    seed: int = field(default=0, metadata={"help": "Seed of every random draw; the same spec gives the same folder."})
    train_examples: int = field(default=20000, metadata={"help": "Examples in train/."})
    val_examples: int = field(default=500, metadata={"help": "Examples in validation/."})
    test_examples: int = field(default=200, metadata={"help": "Examples in test/ for each eval length."})
    train_lengths: list[int] = field(
        default_factory=lambda: [64, 128],
        metadata={"help": "Example lengths of train/ and validation/, each drawn uniformly (mixed lengths)."},
    )
    eval_lengths: list[int] = _eval_lengths(64, 128, 256)
    block_len: int = field(default=256, metadata={"help": "Packed block length of train/ and validation/."})

    def __post_init__(self):
        for name in ("train_examples", "val_examples", "test_examples"):
            if getattr(self, name) < 1:
                raise SpecError(f"{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("train_lengths", "eval_lengths"):
            lengths = getattr(self, name)
            if not lengths:
                raise SpecError(f"{name}: give at least one length")
            if len(set(lengths)) != len(lengths):
                raise SpecError(f"{name}: lengths must be distinct, got {lengths}")
            if (short := min(lengths)) < self.min_length():
                raise SpecError(
                    f"{name}: length {short} is too short for this spec; every length must be at least "
                    f"{self.min_length()} (or lower the number of pairs, tokens or digits)"
                )
        if self.block_len < max(self.train_lengths):
            raise SpecError(
                f"block_len: {self.block_len} is shorter than max(train_lengths) = {max(self.train_lengths)}; "
                "raise block_len to at least that"
            )

    @abstractmethod
    def min_length(self) -> int:
        """The shortest example this spec can generate."""

    @abstractmethod
    def symbols(self) -> list[str]:
        """The task's tokens besides the special ones, in vocabulary order."""

    @abstractmethod
    def example(self, rng: random.Random, length: int) -> tuple[list[str], list[bool]]:
        """One example of exactly `length` tokens and, per token, whether it is an answer."""


def _need(name: str, value: int, least: int, what: str = "") -> None:
    if value < least:
        raise SpecError(f"{name}: must be at least {least}{what}, got {value}")


@dataclass
class MQARSpec(TaskSpec):
    """Multi-query associative recall: key-value pairs, then queried keys each followed by its value."""

    num_keys: int = field(default=16, metadata={"help": "Key vocabulary size (symbols k0, k1, ...)."})
    num_values: int = field(default=16, metadata={"help": "Value vocabulary size (symbols v0, v1, ...)."})
    num_pairs: int = field(default=8, metadata={"help": "Key-value pairs shown per example (keys distinct)."})
    num_queries: int = field(
        default=8, metadata={"help": "Shown keys queried per example (distinct; Zoology queries every key)."}
    )

    def __post_init__(self):
        _need("num_values", self.num_values, 2)
        _need("num_pairs", self.num_pairs, 1)
        _need("num_keys", self.num_keys, self.num_pairs, " (num_pairs distinct keys per example)")
        _need("num_queries", self.num_queries, 1)
        if self.num_queries > self.num_pairs:
            raise SpecError(f"num_queries: {self.num_queries} exceeds num_pairs {self.num_pairs}; lower it")
        super().__post_init__()

    def min_length(self) -> int:
        return 1 + 2 * self.num_pairs + 2 * self.num_queries

    def symbols(self) -> list[str]:
        return ["_"] + [f"k{i}" for i in range(self.num_keys)] + [f"v{i}" for i in range(self.num_values)]

    def example(self, rng, length):
        keys = rng.sample(range(self.num_keys), self.num_pairs)
        values = [rng.randrange(self.num_values) for _ in keys]
        tokens = [BOS]
        for k, v in zip(keys, values):
            tokens += [f"k{k}", f"v{v}"]
        answer = [False] * len(tokens)
        # the query region: blanks, with each query (key, value) in one of `slots` two-token slots
        region = length - len(tokens)
        # Q two-token queries in R cells without overlap: Q distinct cells of R - Q, the i-th moved right by i
        slots = sorted(rng.sample(range(region - self.num_queries), self.num_queries))
        starts = [s + i for i, s in enumerate(slots)]
        body = ["_"] * region
        mask = [False] * region
        for start, q in zip(starts, rng.sample(range(self.num_pairs), self.num_queries)):
            body[start], body[start + 1] = f"k{keys[q]}", f"v{values[q]}"
            mask[start + 1] = True
        return tokens + body, answer + mask


@dataclass
class SelectiveCopySpec(TaskSpec):
    """Selective copying: content tokens among noise, then a separator and the content tokens in order."""

    vocab_size: int = field(default=16, metadata={"help": "Content vocabulary size (symbols c0, c1, ...)."})
    num_tokens: int = field(default=8, metadata={"help": "Content tokens to copy per example."})

    def __post_init__(self):
        _need("vocab_size", self.vocab_size, 2)
        _need("num_tokens", self.num_tokens, 1)
        super().__post_init__()

    def min_length(self) -> int:
        return 1 + 2 * self.num_tokens + 1

    def symbols(self) -> list[str]:
        return ["_", "|"] + [f"c{i}" for i in range(self.vocab_size)]

    def example(self, rng, length):
        region = length - 2 - self.num_tokens
        content = [f"c{rng.randrange(self.vocab_size)}" for _ in range(self.num_tokens)]
        body = ["_"] * region
        for pos, tok in zip(sorted(rng.sample(range(region), self.num_tokens)), content):
            body[pos] = tok
        tokens = [BOS] + body + ["|"] + content
        return tokens, [False] * (length - self.num_tokens) + [True] * self.num_tokens


@dataclass
class InductionSpec(TaskSpec):
    """Induction heads: the token after a trigger's first occurrence, recalled at its second."""

    vocab_size: int = field(default=16, metadata={"help": "Random token vocabulary size (symbols t0, t1, ...)."})
    eval_lengths: list[int] = _eval_lengths(64, 128, 256, 512)  # recall far past training

    def __post_init__(self):
        _need("vocab_size", self.vocab_size, 2)
        super().__post_init__()

    def min_length(self) -> int:
        return 5  # <s> @ target @ target

    def symbols(self) -> list[str]:
        return ["@"] + [f"t{i}" for i in range(self.vocab_size)]

    def example(self, rng, length):
        body = [f"t{rng.randrange(self.vocab_size)}" for _ in range(length - 3)]
        target = f"t{rng.randrange(self.vocab_size)}"
        at = rng.randrange(len(body) - 1)  # the trigger and its target both inside the body
        body[at], body[at + 1] = "@", target
        tokens = [BOS] + body + ["@", target]
        return tokens, [False] * (length - 1) + [True]


FILLER = "the grass is green . the sky is blue . the sun is yellow . here we go . there and back again .".split()


@dataclass
class PasskeySpec(TaskSpec):
    """Pass key retrieval: a digit key hidden at a random depth of filler text, asked for at the end."""

    num_digits: int = field(default=5, metadata={"help": "Digits of the pass key, one token each."})
    eval_lengths: list[int] = _eval_lengths(64, 128, 256, 512)  # recall far past training

    def __post_init__(self):
        _need("num_digits", self.num_digits, 1)
        super().__post_init__()

    def _key_sentence(self, digits: list[str]) -> list[str]:
        return ["the", "pass", "key", "is", *digits, ".", "remember", "it", "."]

    def _question(self) -> list[str]:
        return ["what", "is", "the", "pass", "key", "?"]

    def min_length(self) -> int:
        return 1 + len(self._key_sentence([])) + 2 * self.num_digits + len(self._question())

    def symbols(self) -> list[str]:
        words = FILLER + self._key_sentence([]) + self._question()
        return list(dict.fromkeys(words)) + [str(d) for d in range(10)]

    def example(self, rng, length):
        digits = [str(rng.randrange(10)) for _ in range(self.num_digits)]
        n_filler = length - self.min_length()
        filler = [FILLER[i % len(FILLER)] for i in range(n_filler)]
        # the key goes between two filler sentences (or at either end of the filler), at a uniform one of those
        depth = rng.choice([0] + [i + 1 for i, w in enumerate(filler) if w == "."] + [n_filler])
        tokens = [BOS] + filler[:depth] + self._key_sentence(digits) + filler[depth:] + self._question() + digits
        return tokens, [False] * (length - self.num_digits) + [True] * self.num_digits


TASKS: dict[str, type[TaskSpec]] = {
    "mqar": MQARSpec,
    "selective_copy": SelectiveCopySpec,
    "induction": InductionSpec,
    "passkey": PasskeySpec,
}


def spec_from_dict(task: str, data: dict) -> TaskSpec:
    """The task's spec from a mapping of its fields (missing ones take their defaults); SpecError names a bad field."""
    if task not in TASKS:
        raise SpecError(f"Unknown task {task!r}: choose one of {', '.join(TASKS)}")
    try:
        return load_dataclass(TASKS[task], dict(data), error=SpecError)
    except SpecError as e:
        raise SpecError(f"{task} spec: {e}") from None


# tokenizer and splits


def make_tokenizer(spec: TaskSpec):
    """A word-level PreTrainedTokenizerFast whose vocabulary is the special tokens, then the task's symbols."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *spec.symbols()])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with single spaces (no ## symbols)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _rng(task: str, spec: TaskSpec, split: str, length: int | None = None) -> random.Random:
    # a string seed is hashed with SHA-512: the same on every machine and Python run
    return random.Random(f"{task}:{spec.seed}:{split}:{length}")


def _encode(vocab: dict, tokens: list[str], answer: list[bool]) -> tuple[list[int], list[int]]:
    ids = [vocab[t] for t in tokens]
    return ids, [i if a else IGNORE for i, a in zip(ids, answer)]


def pack(examples, block_len: int, pad_id: int) -> list[dict]:
    """Greedy packing of (input_ids, labels) examples into blocks of `block_len` tokens.

    An example goes into the current block when it fits, else the block is closed by a pad example
    filling its rest (labels -100, positions from 0) and a new block starts; the last block is closed
    the same way. position_ids restart at 0 at every example.
    """
    blocks, cur = [], {"input_ids": [], "position_ids": [], "labels": []}

    def add(ids, labels):
        cur["input_ids"] += ids
        cur["labels"] += labels
        cur["position_ids"] += list(range(len(ids)))

    def close():
        nonlocal cur
        rest = block_len - len(cur["input_ids"])
        if rest:
            add([pad_id] * rest, [IGNORE] * rest)
        blocks.append(cur)
        cur = {"input_ids": [], "position_ids": [], "labels": []}

    for ids, labels in examples:
        if len(cur["input_ids"]) + len(ids) > block_len:
            close()
        add(ids, labels)
    if cur["input_ids"]:
        close()
    return blocks


def generate(task: str, spec: TaskSpec, vocab: dict) -> dict[str, list[dict]]:
    """The rows of train/, validation/ (packed) and test/ (one per example)."""
    out = {}
    for split, n in (("train", spec.train_examples), ("validation", spec.val_examples)):
        rng = _rng(task, spec, split)
        examples = (_encode(vocab, *spec.example(rng, rng.choice(spec.train_lengths))) for _ in range(n))
        out[split] = pack(examples, spec.block_len, vocab[PAD])
    test = []
    for length in spec.eval_lengths:
        rng = _rng(task, spec, "test", length)
        for _ in range(spec.test_examples):
            ids, labels = _encode(vocab, *spec.example(rng, length))
            test.append({"input_ids": ids, "labels": labels, "length": length})
    out["test"] = test
    return out


def rows_sha256(rows: list[dict]) -> str:
    """SHA-256 of the rows' values (canonical JSON, one line per row)."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    return h.hexdigest()


def make_report(task: str, spec: TaskSpec, rows: dict[str, list[dict]], vocab_size: int) -> dict:
    splits = {}
    for split, split_rows in rows.items():
        tokens = sum(len(r["input_ids"]) for r in split_rows)
        answers = sum(sum(label != IGNORE for label in r["labels"]) for r in split_rows)
        examples = {"train": spec.train_examples, "validation": spec.val_examples}.get(split, len(split_rows))
        splits[split] = {
            "rows": len(split_rows),
            "examples": examples,
            "tokens": tokens,
            "answer_tokens": answers,
            "answer_fraction": answers / max(tokens, 1),
            "sha256": rows_sha256(split_rows),
        }
    return {
        "task": task,
        "format_version": FORMAT_VERSION,
        "spec": dataclasses.asdict(spec),
        "vocab_size": vocab_size,
        "splits": splits,
    }


def report_markdown(report: dict) -> str:
    spec, s = report["spec"], report["splits"]
    lines = [
        f"# Synthetic task `{report['task']}`",
        "",
        f"Vocabulary {report['vocab_size']} tokens; train lengths {spec['train_lengths']} packed into blocks of "
        f"{spec['block_len']}; eval lengths {spec['eval_lengths']}; seed {spec['seed']}.",
        "",
        "| split | rows | examples | tokens | answer tokens | answer fraction |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in SPLITS:
        r = s[name]
        lines.append(
            f"| {name} | {r['rows']} | {r['examples']} | {r['tokens']} | {r['answer_tokens']} | {r['answer_fraction']:.4f} |"
        )
    lines += ["", "Spec:", "", "```json", json.dumps(spec, indent=2), "```", ""]
    return "\n".join(lines)


def _spec_record(task: str, spec: TaskSpec) -> dict:
    return {"task": task, "format_version": FORMAT_VERSION, "spec": dataclasses.asdict(spec)}


def build(task: str, spec: dict, output: str | Path, overwrite: bool = False) -> Path:
    """Validate `spec` (a mapping of the task's spec fields), write the DATA folder `output`, return its path.

    An existing `output` whose spec.json is the one asked for is returned as it is. One with another
    spec (or none) raises SpecError unless `overwrite`, which rebuilds it.
    """
    from datasets import Dataset

    parsed = spec if isinstance(spec, TaskSpec) else spec_from_dict(task, spec)
    if task not in TASKS or not isinstance(parsed, TASKS[task]):
        raise SpecError(f"the spec is a {type(parsed).__name__}: task {task!r} is not its task ({', '.join(TASKS)})")
    record = _spec_record(task, parsed)
    out = Path(output)
    if out.exists():
        spec_file = out / "spec.json"
        old = json.loads(spec_file.read_text()) if spec_file.is_file() else None
        if old == record:
            logger.info("%s already holds this %s spec; nothing to do", out, task)
            return out
        if not overwrite:
            what = "a different spec" if old is not None else "no spec.json (not a synthetic DATA folder)"
            raise SpecError(f"{out} exists with {what}; choose another output or rebuild it with --overwrite")
    tokenizer = make_tokenizer(parsed)
    vocab = tokenizer.get_vocab()
    rows = generate(task, parsed, vocab)
    report = make_report(task, parsed, rows, len(tokenizer))
    with atomic_dir(out) as tmp:
        for split in SPLITS:
            Dataset.from_list(rows[split]).save_to_disk(str(tmp / split))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        (tmp / "spec.json").write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "report.md").write_text(report_markdown(report))
    s = report["splits"]
    logger.info(
        "wrote %s: %s, train %d blocks of %d, validation %d blocks, test %d examples; answer fraction %.3f",
        out,
        task,
        s["train"]["rows"],
        parsed.block_len,
        s["validation"]["rows"],
        s["test"]["rows"],
        s["train"]["answer_fraction"],
    )
    return out


# the command line


@dataclass
class SyntheticArgs:
    """Build a synthetic task's DATA/ folder (train, validation, test, tokenizer, report)."""

    task: Literal[tuple(TASKS)] = field(metadata={"help": "The task."})
    output: str = field(metadata={"help": "Output DATA folder; reused when its spec.json matches."})
    spec: str | None = field(default=None, metadata={"help": "YAML file of the task's spec fields."})
    options: dict = field(
        default_factory=dict, metadata={"help": "Spec fields overriding the --spec file, e.g. '{num_pairs: 16}'."}
    )
    seed: int | None = field(default=None, metadata={"help": "Seed, overriding the spec's."})
    overwrite: bool = field(default=False, metadata={"help": "Rebuild an output folder that holds another spec."})


def main(argv: list[str] | None = None) -> int:
    from hybrid_mamba.common.args import parse_args

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(SyntheticArgs, argv)
    values = read_yaml_mapping(args.spec) if args.spec else {}
    values.update(args.options)
    if args.seed is not None:
        values["seed"] = args.seed
    print(build(args.task, values, args.output, overwrite=args.overwrite))
    return 0


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
