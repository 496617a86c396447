"""The key sandbox access tokens derive from, shared by the gateway (the client's envd token) and
the operator (the agent's own token): a file (a mounted Secret) or the environment."""

from __future__ import annotations

import os
from pathlib import Path

TOKEN_KEY_ENV = "SANDBOX_GATEWAY_TOKEN_KEY"
MIN_KEY_BYTES = 16


def read_token_key(path: str | None) -> bytes | None:
    """The key from ``path``, else from $SANDBOX_GATEWAY_TOKEN_KEY; None when neither is given."""
    if path:
        key = Path(path).read_bytes().strip()
        if len(key) < MIN_KEY_BYTES:
            raise SystemExit(f"{path}: the token key must be at least {MIN_KEY_BYTES} bytes")
        return key
    value = os.environ.get(TOKEN_KEY_ENV)
    return value.encode() if value else None
