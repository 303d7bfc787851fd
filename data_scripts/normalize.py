"""Stage 1, normalise: Unicode NFC, control characters, whitespace.

Invalid UTF-8 was already replaced with U+FFFD when the file was read (``sources.decode``); its count
travels in the ``invalid_utf8`` column and is reported here. Whitespace handling is safe for code:
indentation and single blank lines are kept; line endings become ``\\n``, Unicode space separators
become a plain space, trailing spaces go, runs of three or more blank lines become two (the
most PEP 8 asks for).
"""

from __future__ import annotations

import re
import unicodedata

from .docs import document_stage, map_docs

# C0 and C1 controls except tab and newline (carriage returns are turned into newlines first).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_ZERO_WIDTH = re.compile(r"[\u200b\u2060\ufeff]")
_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_LINE_SEPARATORS = re.compile(r"\r\n?|[\u2028\u2029\x85]")
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUN = re.compile(r"\n{4,}")
_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")


def normalize_text(text: str) -> tuple[str, int]:
    """(normalised text, number of control characters removed)."""
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    text = _LINE_SEPARATORS.sub("\n", text)
    text, n_control = _CONTROL.subn("", text)
    text = _ZERO_WIDTH.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _TRAILING.sub("", text)
    text = _BLANK_RUN.sub("\n\n\n", text)
    text = _LEADING_BLANK_LINES.sub("", text).rstrip()
    return text, n_control


@document_stage(("text", "reason", "control_chars", "normalized"), removed={"control_chars": 0, "normalized": False})
def normalize_doc(doc) -> dict:
    new, n_control = normalize_text(doc["text"])
    return {
        "text": new,
        "reason": "" if new else "normalize:empty",
        "control_chars": n_control,
        "normalized": new != doc["text"].rstrip(),  # a file's final newline is not worth counting
    }


def normalize_batch(batch: dict) -> dict:
    return map_docs(batch, normalize_doc)
