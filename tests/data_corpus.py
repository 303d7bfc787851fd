"""Small corpora built inside the data tests, and a helper to run the pipeline on them (no tests here)."""

import json
import random
from pathlib import Path

import yaml

from hybrid_mamba.data_scripts.prepare import PrepareArguments, prepare

WORDS = [
    "time",
    "person",
    "year",
    "way",
    "day",
    "thing",
    "man",
    "world",
    "life",
    "hand",
    "part",
    "child",
    "eye",
    "woman",
    "place",
    "work",
    "week",
    "case",
    "point",
    "government",
    "company",
    "number",
    "group",
    "problem",
    "fact",
    "river",
    "garden",
    "window",
    "morning",
    "letter",
    "music",
    "market",
    "story",
    "teacher",
    "doctor",
    "village",
    "city",
    "mountain",
    "forest",
    "summer",
    "winter",
    "evening",
    "question",
    "answer",
    "reason",
    "idea",
    "voice",
    "small",
    "large",
    "early",
    "young",
    "important",
    "public",
    "different",
    "possible",
    "bright",
    "quiet",
    "ancient",
    "careful",
    "simple",
    "write",
    "read",
    "walk",
    "speak",
    "bring",
    "carry",
    "follow",
    "begin",
    "change",
    "build",
    "learn",
    "open",
    "remember",
    "watch",
    "listen",
    "travel",
    "always",
    "often",
    "never",
    "slowly",
    "quickly",
    "together",
    "because",
    "before",
    "after",
    "while",
    "during",
    "between",
    "against",
]
STOP = ["the", "be", "to", "of", "and", "that", "have", "with"]
FRENCH = (
    "Le matin, les habitants du village descendent vers la rivière pour chercher de l'eau fraîche. "
    "Les enfants courent entre les maisons pendant que leurs parents préparent le marché de la semaine. "
    "Dans l'après-midi, le vieux professeur raconte des histoires anciennes sur la forêt et la montagne, "
    "et chacun écoute en silence jusqu'au soir, quand les lumières s'allument une à une dans les rues."
)
GERMAN = (
    "Am Morgen gehen die Bewohner des Dorfes hinunter zum Fluss, um frisches Wasser zu holen. "
    "Die Kinder laufen zwischen den Häusern umher, während ihre Eltern den Markt der Woche vorbereiten. "
    "Am Nachmittag erzählt der alte Lehrer Geschichten über den Wald und die Berge, und alle hören "
    "schweigend zu, bis am Abend die Lichter in den Straßen eines nach dem anderen angehen."
)


def prose(rng: random.Random, n_sentences: int = 12, marker: str | None = None) -> str:
    """English-looking prose that passes the Gopher rules; ``marker`` is put in every sentence."""
    sentences = []
    for _ in range(n_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(7, 12))]
        for _ in range(2):
            words.insert(rng.randrange(len(words)), rng.choice(STOP))
        if marker:
            words.insert(rng.randrange(1, len(words)), marker)
        sentences.append(" ".join(words).capitalize() + ".")
    paragraphs = [" ".join(sentences[i : i + 4]) for i in range(0, len(sentences), 4)]
    return "\n\n".join(paragraphs)


def code(rng: random.Random, n_funcs: int = 4, marker: str | None = None) -> str:
    lines = [f'"""Module {marker or "m"}: helpers."""', "", "import math", ""]
    for i in range(n_funcs):
        a, b = rng.sample(WORDS, 2)
        lines += [
            "",
            f"def {a}_{b}_{i}(x, y={rng.randint(1, 9)}):",
            f'    """Return the {a} of x and y ({marker or "m"})."""',
            f"    total = x * {rng.randint(2, 50)} + y",
            f"    if total > {rng.randint(10, 99)}:",
            f"        return math.sqrt(total) + {rng.randint(1, 9)}",
            f"    return total - {rng.randint(1, 9)}",
        ]
    return "\n".join(lines) + "\n"


def write_text_files(folder: Path, docs: list[str], suffix: str = ".txt") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (folder / f"doc{i:04d}{suffix}").write_text(doc, encoding="utf-8")


def write_jsonl(path: Path, docs: list[str], raw_lines: dict[int, str] | None = None) -> None:
    """One {"text": ...} per line; ``raw_lines`` puts a given raw line at a 1-based line number."""
    lines = [json.dumps({"text": d, "id": f"j{i}"}) for i, d in enumerate(docs)]
    for lineno, raw in sorted((raw_lines or {}).items()):
        lines.insert(lineno - 1, raw)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def prose_source(name: str, files: str, weight: float, loader: str = "text", **filters) -> dict:
    f = {"min_chars": 100, "language": {"keep": ["en"], "threshold": 0.5}, "quality": {"rules": "prose"}, "pii": {}}
    f.update(filters)
    return {"name": name, "loader": loader, "files": [files], "weight": weight, "filters": f}


def code_source(name: str, files: str, weight: float, **filters) -> dict:
    f = {"min_chars": 100, "language": None, "quality": {"rules": "code"}, "pii": {}}
    f.update(filters)
    return {"name": name, "loader": "text", "files": [files], "weight": weight, "filters": f}


def write_recipe(path: Path, sources: list[dict], **fields) -> Path:
    recipe = {
        "name": "test",
        "seed": 7,
        "seq_len": 32,
        "validation_fraction": 0.2,
        "tokenizer": {"vocab_size": 400, "min_frequency": 2},
        "sources": sources,
    }
    recipe.update(fields)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def run(recipe: Path, out: Path, **args) -> Path:
    return prepare(PrepareArguments(recipe=str(recipe), output=str(out), num_proc=1, **args))


def read_report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def two_source_corpus(root: Path, n_prose: int = 40, n_code: int = 40, seed: int = 0) -> tuple[Path, Path]:
    """Prose documents (markers pNNNN) as text files and code files (markers cNNNN)."""
    rng = random.Random(seed)
    write_text_files(root / "prose", [prose(rng, marker=f"zp{i:04d}q") for i in range(n_prose)])
    write_text_files(root / "code", [code(rng, marker=f"zc{i:04d}q") for i in range(n_code)], suffix=".py")
    return root / "prose", root / "code"
