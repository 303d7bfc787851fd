"""Stage 5, PII scrubbing: e-mail addresses, phone numbers, IP addresses and secrets shaped like API
keys or tokens are replaced with placeholders and counted by kind. Nothing is removed.

Keys are matched by the published shapes of common providers (AWS, GitHub, OpenAI-style ``sk-``,
Slack, Google, Stripe, Hugging Face, JWTs, PEM private keys; ``common/credentials.py``, which
hub_cards checks published files against too) plus a generic rule: a quoted value of
16+ characters mixing letters and digits assigned to a name like ``api_key``, ``secret``, ``token`` or
``password``. IP candidates are checked with ``ipaddress``; by default only globally routable ones are
replaced, so ``127.0.0.1`` or ``192.168.0.1`` in code and docs stay.

Phone numbers: regexes find candidates and phonenumbers (libphonenumber's metadata) decides. A
number written with ``+`` and a country code counts in any country's layout, with or without
separators (``+44 7700 900461``, ``+49 30 25738190``, ``+447700900461``, ``+44 (0)20 7946 0958``,
``(+44) 20 7946 0958``), when its first group is the country code and its length is possible for that
country (possible, not valid: the ranges set aside for fiction, like the UK's 07700 900xxx, look like
any other number). A number without ``+`` counts when it is valid in one of the recipe's
``phone_regions`` (default US) and grouped the way that country writes it (phonenumbers'
``Leniency.STRICT_GROUPING``): ``(415) 555-0100``; with ``phone_regions: [US, DE]`` also
``030 25738190``. A national number needs a separator, so integers, timestamps and digit strings in
code stay; only candidates of 8-15 digits reach phonenumbers, dates and decimal numbers never do, and
dotted quads are left to the IP rule. A candidate that runs on into more digits after a space
(``+44 20 7946 0958 2024``) is shortened group by group from the right.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import re

import phonenumbers
from phonenumbers import Leniency, NumberParseException, PhoneNumberMatcher, ValidationResult

from hybrid_mamba.common.credentials import replace_keys

from .docs import document_stage, map_docs
from .recipe import PIIConfig

PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP_ADDRESS>", "key": "<KEY>"}

# Patterns start with a plain character class, not a lookbehind, so that re's prefix scan stays fast;
# the neighbours of a match are checked in the callbacks instead.
_EMAIL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,24}\b")
# Phone candidates only; phonenumbers decides in _phone_end. International: + and a country code (or
# "(+44)"), then groups, optionally separated, one of them optionally in parentheses:
# +44 (0)20 7946 0958, +447700900461. National: digit groups separated by one of " .-/", the first
# optionally in parentheses: (415) 555-0100, 030 25738190, 01 42 68 53 00. Four passes, each starting
# with a literal or \d, scan faster than one alternation (re finds no common prefix to skip to).
_INTL_GROUPS = r"(?:[ .\-/]?(?:\(\d{1,5}\)|\d{1,12})){1,7}"
_NATIONAL_GROUPS = r"\d{2,8}(?:[ .\-/]\d{2,8}){0,4}"
_PHONE_PASSES = [
    re.compile(r"\+\d{1,3}" + _INTL_GROUPS),
    re.compile(r"\(\+\d{1,3}\)" + _INTL_GROUPS),
    re.compile(r"\(\d{1,5}\)[ .\-/]?" + _NATIONAL_GROUPS),
    re.compile(r"\d{1,5}[ .\-/]" + _NATIONAL_GROUPS),
]
_PHONE_GROUP = re.compile(r"\d+")
_DOTTED_QUAD = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
# Dates with a 19xx or 20xx year: 2024-11-30, 30.11.2024, 11/30/2024 (a timestamp starts with one)
_DATE = re.compile(r"(?:19|20)\d\d([-./])[01]?\d\1[0-3]?\d(?!\d)|[0-3]?\d([-./])[0-3]?\d\2(?:19|20)\d\d(?!\d)")
_IPV4 = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}")
_IPV6 = re.compile(r"[0-9A-Fa-f]{0,4}:[0-9A-Fa-f:]*:[0-9A-Fa-f]{0,4}")
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


def _phone_end(candidate: str, regions: list[str]) -> int:
    """Length of the longest prefix of ``candidate``, cut after a digit group, that is a phone number;
    0 when none is. The module docstring gives the rules."""
    international = "+" in candidate[:2]
    if not international and _DATE.match(candidate):
        return 0  # a date, perhaps with a time
    groups = list(_PHONE_GROUP.finditer(candidate))
    digits = list(itertools.accumulate(g.end() - g.start() for g in groups))  # digits[k - 1]: in k groups
    if digits[-1] < 8:
        return 0
    # A separated number shows its country code as its first group; "+447700900461" is one group.
    for k in range(len(groups), 0 if international else 1, -1):
        end = groups[k - 1].end()
        if k < len(groups) and candidate[end] != " ":
            continue  # "415.555.0100.22" is one dotted number; "+44 20 7946 0958 2024" is two things
        if not 8 <= digits[k - 1] <= 15:
            continue
        text = candidate[:end]
        if international:
            if text[0] == "(":  # "(+44) 20 ...": phonenumbers reads "+44 20 ..."
                text = text[1:].replace(")", "", 1)
            try:
                number = phonenumbers.parse(text)
            except NumberParseException:
                continue
            country_code_alone = k == 1 or groups[0].group(0) == str(number.country_code)
            # not IS_POSSIBLE_LOCAL_ONLY: without an area code (+1 555 0100, +1.2.3.4.5.6.7.8) it is any 7 digits
            possible = phonenumbers.is_possible_number_with_reason(number) == ValidationResult.IS_POSSIBLE
            if country_code_alone and possible:
                return end
        elif "." in text and (k == 2 or " " in text):
            continue  # a decimal number, or several in a row: not worth a parse
        elif _DOTTED_QUAD.fullmatch(text):
            continue  # the IP rule's to judge
        else:
            for region in regions:
                if digits[k - 1] not in _national_lengths(region):
                    continue
                try:
                    number = phonenumbers.parse(text, region)
                except NumberParseException:
                    continue
                # is_valid_number first: the matcher costs several parses
                if phonenumbers.is_valid_number(number) and any(
                    m.start == 0 and m.end == end
                    for m in PhoneNumberMatcher(text, region, leniency=Leniency.STRICT_GROUPING)
                ):
                    return end
    return 0


@functools.cache
def _national_lengths(region: str) -> frozenset[int]:
    """Digit counts of the region's numbers written nationally, with or without the trunk prefix."""
    meta = phonenumbers.PhoneMetadata.metadata_for_region(region)
    if meta is None:
        raise ValueError(f"phone_regions: '{region}' is not a region phonenumbers knows; use codes like US, GB, DE")
    lengths = meta.general_desc.possible_length
    return frozenset(lengths) | {n + len(meta.national_prefix or "") for n in lengths}


def _is_secretish(value: str) -> bool:
    return any(c.isdigit() for c in value) and any(c.isalpha() for c in value)


def scrub(text: str, cfg: PIIConfig) -> tuple[str, dict[str, int]]:
    """(text with placeholders, count of replacements by kind)."""
    counts = dict.fromkeys(PLACEHOLDERS, 0)
    kinds = set(cfg.kinds)
    if "key" in kinds:
        # Keys first: a token like ``sk-...@...`` must not be half-eaten by the e-mail rule.
        text, counts["key"] = replace_keys(text, PLACEHOLDERS["key"])

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
        regions = list(cfg.phone_regions)

        def _phone(m: re.Match) -> str:
            s, j = m.string, m.end()
            if not _isolated(m, _WORD + "+.-", _WORD):
                return m.group(0)
            if j + 1 < len(s) and s[j] in ".-" and s[j + 1].isdigit():
                return m.group(0)  # part of a longer dotted or dashed number (a version, a part number)
            end = _phone_end(m.group(0), regions)
            if not end:
                return m.group(0)
            counts["phone"] += 1
            return PLACEHOLDERS["phone"] + m.group(0)[end:]

        for rx in _PHONE_PASSES:
            text = rx.sub(_phone, text)
    return text, counts


@document_stage(("text", *(f"pii_{k}" for k in PLACEHOLDERS)), removed={f"pii_{k}": 0 for k in PLACEHOLDERS})
def pii_doc(doc, filters: list) -> dict:
    cfg = filters[doc["source"]].pii
    text, counts = (doc["text"], dict.fromkeys(PLACEHOLDERS, 0)) if cfg is None else scrub(doc["text"], cfg)
    return {"text": text} | {f"pii_{k}": v for k, v in counts.items()}


def pii_batch(batch: dict, filters: list) -> dict:
    return map_docs(batch, pii_doc, filters=filters)
