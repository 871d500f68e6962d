"""Enrollment tokens: ``<id>.<secret>``, the secret stored only as a hash (pure)."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

_TOKEN = re.compile(r"([0-9a-f]{12})\.([0-9a-f]{32})")


def new_token() -> tuple[str, str]:
    """A fresh ``(id, secret)``: 48 bits of id for lookup, 128 random bits of secret."""
    return secrets.token_hex(6), secrets.token_hex(16)


def hash_secret(secret: str) -> str:
    # The secret is 128 random bits, so a fast hash is enough: there is nothing to
    # brute-force that a slow hash would protect.
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_token(text: str) -> tuple[str, str] | None:
    """``(id, secret)`` of a well-formed token, else None (answered like any bad token)."""
    match = _TOKEN.fullmatch(text.strip()) if isinstance(text, str) else None
    return (match[1], match[2]) if match else None


def secret_matches(stored_hash: str, secret: str) -> bool:
    """Constant-time comparison of a presented secret with the stored hash."""
    return hmac.compare_digest(stored_hash.encode(), hash_secret(secret).encode())
