"""Signed file URLs (E2B v1 signatures) and constant-time token checks."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Literal

Operation = Literal["read", "write"]


def compute_signature(path: str, operation: Operation, username: str, access_token: str, expiration: int | None) -> str:
    """v1_ + unpadded base64(sha256("{path}:{operation}:{username}:{token}[:{expiration}]"))."""
    raw = f"{path}:{operation}:{username}:{access_token}"
    if expiration is not None:
        raw += f":{expiration}"
    digest = hashlib.sha256(raw.encode()).digest()
    return "v1_" + base64.b64encode(digest).rstrip(b"=").decode("ascii")


def _bytes(text: str) -> bytes | None:
    """UTF-8 of a header value; None for text that has none (a lone surrogate): it matches nothing."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeError:
        return None


def tokens_equal(given: str | None, expected: str) -> bool:
    """Constant-time comparison (in the length of `expected`); False for a missing header."""
    if given is None:
        return False
    given_bytes, expected_bytes = _bytes(given), _bytes(expected)
    if given_bytes is None or expected_bytes is None:
        return False
    return hmac.compare_digest(given_bytes, expected_bytes)


def verify_signature(
    *,
    signature: str | None,
    expiration: str | None,
    path: str,
    operation: Operation,
    username: str,
    access_token: str,
    now: float,
) -> str | None:
    """Return None when the signature is valid, else the reason it is refused."""
    if not signature:
        return "missing access token or signature"
    expires: int | None = None
    if expiration:
        try:
            expires = int(expiration)
        except ValueError:
            return "invalid signature expiration"
        if expires < now:
            return "signature has expired"
    try:
        expected = compute_signature(path, operation, username, access_token, expires)
    except UnicodeError:
        return "invalid signature"
    if not tokens_equal(signature, expected):
        return "invalid signature"
    return None
