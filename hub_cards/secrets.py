"""Refuse to publish anything that looks like a credential.

Every file about to be published (and every input file the card is built from) is checked: files
named like environment files (`.env`, `.env.local`, `prod.env`), and text files holding token-shaped
strings (the key shapes of common/credentials.py: Hugging Face, AWS, GitHub, OpenAI-style, Slack,
Google, Stripe keys, JWTs, private-key blocks) or the value of `HF_TOKEN` itself. Binary weight
files are skipped: their bytes are numbers, not text.
"""

import os
from pathlib import Path

from hybrid_mamba.common.credentials import find_key

BINARY_SUFFIXES = {
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".png",
    ".jpg",
    ".jpeg",
    ".gif",
    ".pkl",
    ".arrow",
    ".parquet",
    ".npy",
    ".npz",
}


class CredentialError(ValueError):
    """A file about to be published looks like it holds a credential."""


def _is_env_file(path: Path) -> bool:
    name = path.name.lower()
    return name == ".env" or name.startswith(".env.") or name.endswith(".env")


def find_credential(path: Path) -> str | None:
    """What in `path` looks like a credential (a short reason), or None. Never returns the secret itself."""
    if _is_env_file(path):
        return "an environment file (.env)"
    if path.suffix.lower() in BINARY_SUFFIXES:
        return None
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    text = data.decode("utf-8", errors="replace")
    if (what := find_key(text)) is not None:
        return f"a {what}-shaped string"
    token = os.environ.get("HF_TOKEN", "")
    if len(token) >= 8 and token in text:
        return "the value of HF_TOKEN"
    return None


def check_no_credentials(paths) -> None:
    """Raise CredentialError naming the first file (under any of `paths`, files or folders) that looks like a credential."""
    for root in paths:
        root = Path(root)
        files = (
            [root]
            if root.is_file()
            else sorted(p for p in root.rglob("*") if p.is_file() and ".git" not in p.relative_to(root).parts)
        )
        for file in files:
            reason = find_credential(file)
            if reason:
                raise CredentialError(
                    f"refusing to publish: {file} looks like it holds a credential ({reason}). "
                    "Remove it; credentials come from the environment (HF_TOKEN) only."
                )
