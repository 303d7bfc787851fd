"""The published shapes of API keys and tokens, kept once: data_scripts scrubs them out of training
text, hub_cards refuses to publish a file that holds one.

Each pattern starts with its literal prefix, searched alone (re scans for a literal prefix fast; an
alternation or a leading \\b would test every position); that no word character comes just before a
match is checked in `key_matches`. Where a shape has a fixed or bounded length, a lookahead or the
greedy class keeps it from matching inside a longer word.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")

# Order matters for replacement: a private-key block first, so its body is replaced whole.
KEY_PATTERNS: dict[str, re.Pattern] = {
    # the whole block when its END line is there, the BEGIN line alone otherwise (a truncated key)
    "private key": re.compile(
        r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----(?:.*?-----END (?:[A-Z]+ )?PRIVATE KEY-----)?", re.DOTALL
    ),
    "AWS access key id": re.compile(r"AKIA[0-9A-Z]{16}(?![0-9A-Za-z])"),
    "AWS temporary access key id": re.compile(r"ASIA[0-9A-Z]{16}(?![0-9A-Za-z])"),
    "GitHub token": re.compile(r"gh[pousr]_[A-Za-z0-9]{36,255}"),
    "GitHub fine-grained token": re.compile(r"github_pat_[A-Za-z0-9_]{22,255}"),
    "API secret key": re.compile(r"sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"),  # OpenAI / Anthropic style
    "Slack token": re.compile(r"xox[abposr]-[A-Za-z0-9-]{10,}"),
    "Google API key": re.compile(r"AIza[0-9A-Za-z_-]{35}"),
    "Stripe secret key": re.compile(r"sk_(?:live|test)_[0-9A-Za-z]{16,}"),
    "Stripe restricted key": re.compile(r"rk_(?:live|test)_[0-9A-Za-z]{16,}"),
    "Hugging Face token": re.compile(r"hf_[A-Za-z0-9]{30,}(?![0-9A-Za-z])"),
    "JSON web token": re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
}


def _starts_a_word(m: re.Match) -> bool:
    return m.start() == 0 or m.string[m.start() - 1] not in _WORD


def key_matches(text: str) -> Iterator[tuple[str, re.Match]]:
    """(kind, match) of every key-shaped string in `text`, pattern by pattern in KEY_PATTERNS order."""
    for kind, pattern in KEY_PATTERNS.items():
        for m in pattern.finditer(text):
            if _starts_a_word(m):
                yield kind, m


def find_key(text: str) -> str | None:
    """The kind of the first key-shaped string found in `text` (never the key itself), or None."""
    return next((kind for kind, _ in key_matches(text)), None)


def replace_keys(text: str, placeholder: str) -> tuple[str, int]:
    """`text` with every key-shaped string replaced by `placeholder`, and how many were replaced."""
    count = 0

    def _key(m: re.Match) -> str:
        nonlocal count
        if not _starts_a_word(m):
            return m.group(0)
        count += 1
        return placeholder

    for pattern in KEY_PATTERNS.values():
        text = pattern.sub(_key, text)
    return text, count
