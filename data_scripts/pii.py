"""Stage 5, PII scrubbing: e-mail addresses, phone numbers, IP addresses and secrets shaped like API
keys or tokens are replaced with placeholders and counted by kind. Nothing is removed.

Keys are matched by the published shapes of common providers (AWS, GitHub, OpenAI-style ``sk-``,
Slack, Google, Stripe, Hugging Face, JWTs, PEM private keys) plus a generic rule: a quoted value of
16+ characters mixing letters and digits assigned to a name like ``api_key``, ``secret``, ``token`` or
``password``. IP candidates are checked with ``ipaddress``; by default only globally routable ones are
replaced, so ``127.0.0.1`` or ``192.168.0.1`` in code and docs stay.
"""

from __future__ import annotations

import ipaddress
import re

from .recipe import PIIConfig

PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP_ADDRESS>", "key": "<KEY>"}

# Patterns start with a plain character class, not a lookbehind, so that re's prefix scan stays fast;
# the neighbours of a match are checked in the callbacks instead.
_EMAIL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,24}\b")
_PHONE = re.compile(
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,4}){1,4}"  # international: +44 20 7946 0958
    r"|(?:\(\d{3}\)[ ]?|\d{3}[ .-])\d{3}[ .-]\d{4}"  # North American: (415) 555-0100, 415-555-0100
)
_IPV4 = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}")
_IPV6 = re.compile(r"[0-9A-Fa-f]{0,4}:[0-9A-Fa-f:]*:[0-9A-Fa-f]{0,4}")
# Each key shape starts with a literal prefix, searched alone (re scans for a literal prefix fast; an
# alternation or a leading \b would test every position). Word boundaries are checked in the callback.
_KEYS = [
    re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----.*?-----END (?:[A-Z]+ )?PRIVATE KEY-----", re.DOTALL),
    re.compile(r"AKIA[0-9A-Z]{16}(?![0-9A-Za-z])"),  # AWS access key id
    re.compile(r"ASIA[0-9A-Z]{16}(?![0-9A-Za-z])"),
    re.compile(r"gh[pousr]_[A-Za-z0-9]{36,255}"),  # GitHub tokens
    re.compile(r"github_pat_[A-Za-z0-9_]{22,255}"),
    re.compile(r"sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"),  # OpenAI / Anthropic style
    re.compile(r"xox[abposr]-[A-Za-z0-9-]{10,}"),  # Slack
    re.compile(r"AIza[0-9A-Za-z_-]{35}"),  # Google API key
    re.compile(r"sk_(?:live|test)_[0-9A-Za-z]{16,}"),  # Stripe
    re.compile(r"rk_(?:live|test)_[0-9A-Za-z]{16,}"),
    re.compile(r"hf_[A-Za-z]{30,40}(?![0-9A-Za-z])"),  # Hugging Face
    re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),  # JWT
]
# A quoted value of 16+ characters after ``=`` or ``:``; the name before it is checked in the callback.
_QUOTED_VALUE = re.compile(r"[:=]\s*[\"']([A-Za-z0-9_\-+/=.]{16,})[\"']")
_SECRET_NAME = re.compile(
    r"(?i)(?:api[_-]?key|apikey|secret(?:[_-]?key)?|access[_-]?key|auth[_-]?token|token|password|passwd)[\"']?\s*$"
)


def _isolated(m: re.Match, before: str, after: str) -> bool:
    """No character of ``before`` just before the match and none of ``after`` just after it."""
    s, i, j = m.string, m.start(), m.end()
    return (i == 0 or s[i - 1] not in before) and (j == len(s) or s[j] not in after)


_WORD = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"


def _is_secretish(value: str) -> bool:
    return any(c.isdigit() for c in value) and any(c.isalpha() for c in value)


def scrub(text: str, cfg: PIIConfig) -> tuple[str, dict[str, int]]:
    """(text with placeholders, count of replacements by kind)."""
    counts = dict.fromkeys(PLACEHOLDERS, 0)
    kinds = set(cfg.kinds)
    if "key" in kinds:
        # Keys first: a token like ``sk-...@...`` must not be half-eaten by the e-mail rule.

        def _key(m: re.Match) -> str:
            if not _isolated(m, _WORD, ""):
                return m.group(0)
            counts["key"] += 1
            return PLACEHOLDERS["key"]

        for rx in _KEYS:
            text = rx.sub(_key, text)

        def _assigned(m: re.Match) -> str:
            value = m.group(1)
            if not _is_secretish(value) or not _SECRET_NAME.search(m.string, max(0, m.start() - 40), m.start()):
                return m.group(0)
            counts["key"] += 1
            start, end = m.span(1)
            return m.group(0)[: start - m.start()] + PLACEHOLDERS["key"] + m.group(0)[end - m.start() :]

        text = _QUOTED_VALUE.sub(_assigned, text)
    if "email" in kinds and "@" in text:

        def _email(m: re.Match) -> str:
            if not _isolated(m, _WORD + ".+-", ""):
                return m.group(0)
            counts["email"] += 1
            return PLACEHOLDERS["email"]

        text = _EMAIL.sub(_email, text)
    if "ip" in kinds:

        def _ip(m: re.Match) -> str:
            s = m.group(0)
            if not _isolated(m, _WORD + ".:", _WORD + ":"):
                return s
            if m.end() + 1 < len(m.string) and m.string[m.end()] == "." and m.string[m.end() + 1].isdigit():
                return s  # a longer dotted number (a version like 1.2.3.4.5)
            try:
                addr = ipaddress.ip_address(s)
            except ValueError:
                return s
            if ":" in s and sum(1 for g in s.split(":") if g) < 3:
                return s  # slices like x[1::2] parse as IPv6; real addresses show more groups
            if cfg.keep_non_global_ips and (not addr.is_global or addr.is_multicast or addr.is_reserved):
                return s
            if addr.version == 4 and s.rsplit(".", 1)[1] in ("0", "255"):
                return s  # network and broadcast addresses name no host (and are often section numbers)
            counts["ip"] += 1
            return PLACEHOLDERS["ip"]

        text = _IPV4.sub(_ip, text)
        if "::" in text or text.count(":") >= 7:
            text = _IPV6.sub(_ip, text)
    if "phone" in kinds:

        def _phone(m: re.Match) -> str:
            digits = sum(c.isdigit() for c in m.group(0))
            if not 9 <= digits <= 15 or not _isolated(m, _WORD + "+.-", _WORD):
                return m.group(0)
            s, j = m.string, m.end()
            if j + 1 < len(s) and s[j] in ".-" and s[j + 1].isdigit():
                return m.group(0)
            counts["phone"] += 1
            return PLACEHOLDERS["phone"]

        text = _PHONE.sub(_phone, text)
    return text, counts


def pii_batch(batch: dict, filters: list) -> dict:
    out = {"text": []} | {f"pii_{k}": [] for k in PLACEHOLDERS}
    for text, reason, src in zip(batch["text"], batch["reason"], batch["source"], strict=True):
        cfg = filters[src].pii
        counts = dict.fromkeys(PLACEHOLDERS, 0)
        if not reason and cfg is not None:
            text, counts = scrub(text, cfg)
        out["text"].append(text)
        for k, v in counts.items():
            out[f"pii_{k}"].append(v)
    return out
