"""Build the offline lm-eval tasks' data files from the held-out split of a DATA/ folder.

    python -m hybrid_mamba.eval_harness.build_tasks [--data_dir data/demo] [--out eval_harness/tasks/hybrid_mamba/data]

Reads DATA/validation (packed blocks; a document starts where position_ids restart at 0) and
DATA/tokenizer, decodes every document piece of every block back to text, and writes two JSONL files:

- heldout_ppl.jsonl: `ppl_docs` pieces of held-out text (at least `min_chars` characters each), one
  per line as {"text", "source"}, taken at evenly spaced indices so both sources appear. Scored
  with loglikelihood_rolling (word perplexity, byte perplexity, bits per byte).
- heldout_mc.jsonl: `mc_docs` four-way multiple-choice items {"context", "choices", "label",
  "source"}. From a held-out piece disjoint from the perplexity pieces, the context is its first
  whole lines up to at least `context_chars` characters; the correct choice is the following whole
  lines up to at least `continuation_chars` characters (capped at twice that); the three wrong
  choices are the correct continuations of three other items of the same source, drawn with
  `seed`. The correct choice's position is drawn with `seed` too. Chance accuracy is 25%.

The same DATA/ folder and arguments give byte-identical files (data_scripts' build is deterministic
for a recipe and seed, so `make demo`'s data reproduces the shipped files).
"""

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoTokenizer

from hybrid_mamba.common.args import parse_args
from hybrid_mamba.common.files import write_text_atomic

logger = logging.getLogger(__name__)

TASK_DATA = Path(__file__).resolve().parent / "tasks" / "hybrid_mamba" / "data"


@dataclass
class BuildArgs:
    data_dir: str = field(default="data/demo", metadata={"help": "DATA/ folder written by data_scripts.prepare."})
    out: str = field(default=str(TASK_DATA), metadata={"help": "Folder for heldout_ppl.jsonl and heldout_mc.jsonl."})
    ppl_docs: int = field(default=40, metadata={"help": "Pieces of held-out text in the perplexity task."})
    mc_docs: int = field(default=40, metadata={"help": "Items of the multiple-choice task."})
    min_chars: int = field(default=400, metadata={"help": "Shortest document piece used, in characters."})
    context_chars: int = field(default=300, metadata={"help": "Least characters of a multiple-choice context."})
    continuation_chars: int = field(
        default=80, metadata={"help": "Least characters of a continuation (at most twice this)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for distractors and answer positions."})


def heldout_pieces(data_dir: Path) -> list[dict]:
    """Decoded document pieces of DATA/validation, in block order: [{"text", "source"}]."""
    from datasets import load_from_disk

    for sub in ("validation", "tokenizer"):
        if not (data_dir / sub).is_dir():
            raise FileNotFoundError(
                f"{data_dir / sub} not found: pass --data_dir a folder written by data_scripts.prepare"
            )
    val = load_from_disk(str(data_dir / "validation"))
    tok = AutoTokenizer.from_pretrained(str(data_dir / "tokenizer"))
    names = {}
    report = data_dir / "report.json"
    if report.is_file():
        names = {i: s["name"] for i, s in enumerate(json.loads(report.read_text())["sources"])}
    pieces = []
    for row in val:
        ids, pos = row["input_ids"], row["position_ids"]
        starts = [i for i, p in enumerate(pos) if p == 0 and i > 0]
        source = names.get(row.get("source"), str(row.get("source", "")))
        for a, b in zip([0] + starts, starts + [len(ids)]):
            text = tok.decode(ids[a:b], skip_special_tokens=True).strip()
            if text:
                pieces.append({"text": text, "source": source})
    return pieces


def _take_lines(lines: list[str], start: int, least: int, most: int | None = None) -> tuple[str, int]:
    """Whole lines from `start` until at least `least` characters; returns (text, next index)."""
    out, i = "", start
    while i < len(lines) and len(out) < least:
        candidate = out + ("\n" if out else "") + lines[i]
        if most is not None and len(candidate) > most and out:
            break
        out, i = candidate, i + 1
    return out, i


def build(args: BuildArgs) -> dict[str, int]:
    """Write both JSONL files (temp file, then rename); returns the item counts."""
    pieces = [p for p in heldout_pieces(Path(args.data_dir)) if len(p["text"]) >= args.min_chars]
    if len(pieces) < args.ppl_docs + args.mc_docs:
        raise ValueError(
            f"{args.data_dir}: {len(pieces)} held-out pieces of >= {args.min_chars} characters, need {args.ppl_docs + args.mc_docs}"
        )
    # even indices for perplexity, odd ones for multiple choice: the two tasks never share text
    step = len(pieces) // (args.ppl_docs + args.mc_docs)
    chosen = pieces[:: max(step, 1)][: args.ppl_docs + args.mc_docs]
    ppl = chosen[0::2][: args.ppl_docs]
    mc_src = [c for i, c in enumerate(chosen) if i % 2 or i // 2 >= args.ppl_docs]

    items = []
    for p in mc_src:
        lines = [ln for ln in p["text"].split("\n") if ln.strip()]
        context, nxt = _take_lines(lines, 0, args.context_chars)
        cont, _ = _take_lines(lines, nxt, args.continuation_chars, 2 * args.continuation_chars)
        if len(cont) >= args.continuation_chars // 2:
            items.append({"context": context, "continuation": "\n" + cont, "source": p["source"]})
    items = items[: args.mc_docs]
    if len(items) < args.mc_docs:
        logger.warning(
            "only %d multiple-choice items (asked for %d): pieces without enough lines were skipped",
            len(items),
            args.mc_docs,
        )
    rng = random.Random(args.seed)
    mc = []
    for i, it in enumerate(items):
        others = [j for j, o in enumerate(items) if j != i and o["source"] == it["source"]]
        if len(others) < 3:
            others = [j for j in range(len(items)) if j != i]
        wrong = [items[j]["continuation"] for j in rng.sample(others, 3)]
        label = rng.randrange(4)
        choices = wrong[:label] + [it["continuation"]] + wrong[label:]
        mc.append({"context": it["context"], "choices": choices, "label": label, "source": it["source"]})

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("heldout_ppl.jsonl", ppl), ("heldout_mc.jsonl", mc)):
        write_text_atomic(out / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    counts = {"heldout_ppl": len(ppl), "heldout_mc": len(mc)}
    logger.info("wrote %s into %s", counts, out)
    return counts


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(BuildArgs, argv)
    build(args)


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
