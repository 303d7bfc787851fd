"""The build report: per stage and per source, documents / tokens / characters in and out, removals by
reason with a few examples, stage counters (invalid UTF-8, PII by kind, ...), and per split the blocks,
tokens and achieved share of each source. Written as ``report.json`` and a readable ``report.md``.

Token counts of the curation stages are exact: every document, kept or removed, is tokenized once with
the final tokenizer, as its text stood when it left the pipeline (after normalisation and scrubbing,
or when it was removed).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

COUNTERS = {
    "normalize": ["invalid_utf8", "control_chars", "normalized"],
    "pii": ["pii_email", "pii_phone", "pii_ip", "pii_key"],
}
EXAMPLE_CHARS = 300
MAX_LOAD_ERRORS = 1000


class CurationReport:
    """Accumulates rows (batches of columns) in reading order; works the same for streams.

    ``stages`` in pipeline order (``pipeline.REPORT_STAGES``); a reason ``stage:what`` counts as removed there.
    """

    def __init__(self, source_names: list[str], stages: list[str], examples_per_reason: int = 3):
        self.names = source_names
        self.stage_names = stages
        self.k = examples_per_reason
        # (source, reason) -> [docs, tokens, chars]
        self.totals: dict[tuple[int, str], list[int]] = defaultdict(lambda: [0, 0, 0])
        self.counters: dict[tuple[int, str], int] = defaultdict(int)
        self.examples: dict[tuple[int, str], list[dict]] = defaultdict(list)
        self.load_errors: list[dict] = []
        self.rows_seen = 0

    def update(self, batch: dict) -> None:
        n = len(batch["reason"])
        texts = batch.get("text")
        for j in range(n):
            src, reason = int(batch["source"][j]), batch["reason"][j]
            t = self.totals[(src, reason)]
            t[0] += 1
            t[1] += int(batch["num_tokens"][j])
            t[2] += int(batch["num_chars"][j])
            if reason:
                ex = self.examples[(src, reason)]
                if len(ex) < self.k:
                    entry = {"id": batch["id"][j], "note": batch["note"][j]}
                    entry["text"] = texts[j][:EXAMPLE_CHARS] if texts is not None else None
                    entry["_row"] = self.rows_seen + j
                    ex.append(entry)
                if reason.startswith("load:") and len(self.load_errors) < MAX_LOAD_ERRORS:
                    self.load_errors.append(
                        {"source": self.names[src], "id": batch["id"][j], "reason": reason, "note": batch["note"][j]}
                    )
        for cols in COUNTERS.values():
            for col in cols:
                if col in batch:
                    for src, v in zip(batch["source"], batch[col], strict=True):
                        self.counters[(int(src), col)] += int(v)
        self.rows_seen += n

    def missing_example_rows(self) -> list[int]:
        return sorted(e["_row"] for ex in self.examples.values() for e in ex if e["text"] is None)

    def fill_example_texts(self, texts: dict[int, str]) -> None:
        for ex in self.examples.values():
            for e in ex:
                if e["text"] is None:
                    e["text"] = texts[e["_row"]][:EXAMPLE_CHARS]

    def _stage_of(self, reason: str) -> int:
        return self.stage_names.index(reason.split(":", 1)[0]) if reason else len(self.stage_names)

    def stages(self) -> dict:
        """{stage: {source: {docs_in, docs_out, tokens_in, ..., removed: {reason: {...}}, counters}}}."""
        out = {}
        for k, stage in enumerate(self.stage_names):
            per_source = {}
            for src, name in enumerate(self.names):
                d = {"docs_in": 0, "docs_out": 0, "tokens_in": 0, "tokens_out": 0, "chars_in": 0, "chars_out": 0}
                removed = {}
                for (s, reason), (docs, tokens, chars) in sorted(self.totals.items()):
                    if s != src:
                        continue
                    at = self._stage_of(reason)
                    if at >= k:
                        d["docs_in"] += docs
                        d["tokens_in"] += tokens
                        d["chars_in"] += chars
                    if at > k:
                        d["docs_out"] += docs
                        d["tokens_out"] += tokens
                        d["chars_out"] += chars
                    if at == k:
                        examples = [{key: e[key] for key in ("id", "note", "text")} for e in self.examples[(s, reason)]]
                        removed[reason.split(":", 1)[1]] = {"docs": docs, "tokens": tokens, "examples": examples}
                d["removed"] = removed
                for col in COUNTERS.get(stage, []):
                    d[col] = self.counters[(src, col)]
                per_source[name] = d
            out[stage] = per_source
        return out


def write_report(out_dir: Path, report: dict) -> None:
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(render_markdown(report), encoding="utf-8")


def _fmt(n) -> str:
    return f"{n:,}" if isinstance(n, int) else f"{n}"


def _snippet(text: str, n: int = 120) -> str:
    s = " ".join((text or "").split())
    s = s.replace("|", "\\|").replace("`", "'")
    return s[:n] + ("..." if len(s) > n else "")


def render_markdown(r: dict) -> str:
    lines = [f"# Data report: {r['recipe']}", ""]
    lines += [
        (
            f"- mode: {r['mode']}; seed {r['seed']}; seq_len {r['seq_len']}; vocab_size {r['vocab_size']} "
            f"({'trained here' if r['tokenizer']['trained'] else 'given: ' + str(r['tokenizer']['path'])})"
        ),
        f"- fingerprint: `{r['fingerprint']}`",
        "",
        "## Splits",
        "",
        "| split | blocks | tokens | dropped tail tokens |",
        "|---|---:|---:|---:|",
    ]
    for split, s in r["splits"].items():
        lines.append(f"| {split} | {_fmt(s['blocks'])} | {_fmt(s['tokens'])} | {_fmt(s['dropped_tail_tokens'])} |")
    lines += [
        "",
        "| split | source | target share | achieved share | tokens | documents | truncated | epochs |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for split, s in r["splits"].items():
        for name, p in s["sources"].items():
            lines.append(
                f"| {split} | {name} | {p['target_share']:.4f} | {p['achieved_share']:.4f} | {_fmt(p['tokens'])} | "
                f"{_fmt(p['documents'])} | {_fmt(p['truncated_documents'])} | {'-' if p['epochs'] is None else format(p['epochs'], '.2f')} |"
            )
    lines += [
        "",
        "## Stages",
        "",
        "| stage | source | docs in | docs out | tokens in | tokens out | removed (docs) | counters |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for stage, per_source in r["stages"].items():
        for name, d in per_source.items():
            removed = ", ".join(f"{k}: {_fmt(v['docs'])}" for k, v in d["removed"].items()) or "-"
            counters = ", ".join(f"{k}: {_fmt(d[k])}" for k in COUNTERS.get(stage, [])) or "-"
            lines.append(
                f"| {stage} | {name} | {_fmt(d['docs_in'])} | {_fmt(d['docs_out'])} | {_fmt(d['tokens_in'])} | "
                f"{_fmt(d['tokens_out'])} | {removed} | {counters} |"
            )
    lines += ["", "## Removed examples", ""]
    any_examples = False
    for stage, per_source in r["stages"].items():
        for name, d in per_source.items():
            for reason, v in d["removed"].items():
                any_examples = True
                lines.append(f"- **{stage}:{reason}** ({name}, {_fmt(v['docs'])} docs, {_fmt(v['tokens'])} tokens)")
                for e in v["examples"]:
                    note = f" ({e['note']})" if e["note"] else ""
                    lines.append(f"  - `{e['id']}`{note}: {_snippet(e['text'])}")
    if not any_examples:
        lines.append("Nothing was removed.")
    if r["load_errors"]:
        lines += ["", "## Lines skipped while loading", ""]
        for e in r["load_errors"]:
            lines.append(f"- {e['source']} `{e['id']}`: {e['reason'].split(':', 1)[1]} ({e['note']})")
    return "\n".join(lines) + "\n"
