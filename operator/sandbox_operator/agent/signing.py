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


def tokens_equal(given: str | None, expected: str) -> bool:
    if given is None:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


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
    expected = compute_signature(path, operation, username, access_token, expires)
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        return "invalid signature"
    return None
