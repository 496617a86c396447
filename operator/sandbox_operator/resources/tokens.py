"""The agent's access token: a per-pod secret the operator puts into the sandbox pod and the
gateway and the operator present to the agent (X-Access-Token) on every call but /health.

It derives from a key only the operator and the gateway hold and from the pod's token id (random per
pod, on the pod as an annotation and in the Sandbox's status.agentTokenId), so that neither needs to
store it, a resumed or recreated sandbox (a new pod) gets a new one, and a warm pod keeps its token
when a sandbox claims it. The id alone is worth nothing without the key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

__all__ = ["AgentToken", "agent_token", "issue_agent_token", "new_token_id"]

_DOMAIN = b"sandbox-agent-token/v1\x00"  # keeps these apart from anything else derived from the same key


def new_token_id() -> str:
    return secrets.token_hex(16)


def agent_token(key: bytes, token_id: str) -> str:
    digest = hmac.new(key, _DOMAIN + token_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class AgentToken:
    """A pod's agent token and the id it derives from."""

    id: str
    value: str


def issue_agent_token(key: bytes) -> AgentToken:
    """A fresh token for a new pod."""
    token_id = new_token_id()
    return AgentToken(token_id, agent_token(key, token_id))
