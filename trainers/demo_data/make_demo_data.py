"""Writes the demo data in this folder (deterministic; rerun to regenerate, the files are committed).

    python -m hybrid_mamba.trainers.demo_data.make_demo_data

- chat_{train,validation}.jsonl: short instruction conversations (arithmetic, word reversal, case
  changes, counting, list sorting), some with a system message or two turns; instruction tuning.
- sentiment_{train,validation}.tsv: GLUE-style (`sentence<TAB>label`) binary sentiment of templated
  reviews where negation flips a clause and a "but" clause overrides the first: the label needs the
  words in order, not a bag of words. Classification and the rank allocation comparison.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

from hybrid_mamba.common.args import parse_args

HERE = Path(__file__).parent
POSITIVE = "good great fine lovely brilliant superb charming clever delightful moving".split()
NEGATIVE = "bad awful dull boring weak clumsy tedious bland messy poor".split()
SUBJECTS = (
    "the film|the plot|the acting|the music|the ending|the script|the cast|the story|the pacing|the dialogue".split("|")
)
VERBS = "was|is|felt|seemed|looked".split("|")
INTENSIFIERS = ["", "", "very ", "really ", "quite ", "rather "]
WORDS = "apple river stone cloud tiger lamp paper garden window silver orange candle".split()


def clause(rng):
    """(text, polarity): polarity 1 positive, 0 negative, after negation."""
    positive = rng.random() < 0.5
    negated = rng.random() < 0.3
    adj = rng.choice(POSITIVE if positive else NEGATIVE)
    text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {'not ' if negated else ''}{rng.choice(INTENSIFIERS)}{adj}"
    return text, int(positive != negated)


def sentiment(rng):
    first, label = clause(rng)
    if rng.random() < 0.2:
        second, label = clause(rng)
        return f"{first} , but {second} .", label
    return f"{first} .", label


def chat(rng):
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        q, ans = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    elif kind == 1:
        w = rng.choice(WORDS)
        q, ans = f"Reverse the word {w}.", f"{w[::-1]}"
    elif kind == 2:
        ws = rng.sample(WORDS, 3)
        q, ans = f"Write in capitals: {' '.join(ws)}", " ".join(ws).upper()
    elif kind == 3:
        w = rng.choice(WORDS)
        q, ans = f"How many letters are in {w}?", f"{w} has {len(w)} letters."
    else:
        ws = rng.sample(WORDS, 4)
        q, ans = f"Sort these words: {', '.join(ws)}", ", ".join(sorted(ws))
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": "You answer in one short line."})
    if rng.random() < 0.3:
        follow = chat(rng)["messages"]
        messages += [m for m in follow if m["role"] != "system"]
    return {"messages": messages}


@dataclass
class MakeDemoDataArgs:
    """Writes the demo data in this folder (deterministic; rerun to regenerate, the files are committed)."""


def main(argv=None):
    parse_args(MakeDemoDataArgs, argv)  # no fields: --help describes it, a stray flag is an error
    rng = random.Random(1234)
    for split, n in (("train", 600), ("validation", 80)):
        with open(HERE / f"chat_{split}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps(chat(rng)) + "\n")
    seen = set()
    for split, n in (("train", 1600), ("validation", 400)):
        rows = []
        while len(rows) < n:
            s, label = sentiment(rng)
            if s not in seen:  # no sentence in both splits
                seen.add(s)
                rows.append(f"{s}\t{label}")
        (HERE / f"sentiment_{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
