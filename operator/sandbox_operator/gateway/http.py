"""JSON in and out for the gateway's handlers (E2B API and session API), and bounded reads.

Every body the gateway holds in memory is bounded (docs/gateway.md, "Bounded input"): a JSON
request is refused with 413 before it is read when it says it is too large, and while it is read
when it does not (chunked); what the gateway reads whole from an agent (metrics, error texts) is
bounded the same way. File bodies are never held: they stream.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from aiohttp import web

from sandbox_operator.gateway.e2b import Refused, parse_json_object

MAX_JSON_BYTES = 1 << 20  # a JSON request body: E2B's and the session API's requests are a few KiB
MAX_AGENT_JSON_BYTES = 1 << 20  # an agent's JSON answer or error text read whole
READ_CHUNK_BYTES = 64 << 10  # the most the gateway reads from a stream at once


class TooLarge(Exception):
    """A stream went past its limit."""


def json_response(status: int, body: Any) -> web.Response:
    # 429/502/503/504 would make the SDK retry on its own: a create is not safe to repeat blindly.
    headers = {"Should-Retry": "false"} if status in (429, 502, 503, 504) else None
    return web.json_response(body, status=status, headers=headers, dumps=json.dumps)


async def read_bounded(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """All of `stream`, in chunks; TooLarge as soon as it is past `limit` bytes (at most one chunk
    more than `limit` is ever held)."""
    parts: list[bytes] = []
    size = 0
    async for chunk in stream.iter_chunked(READ_CHUNK_BYTES):
        size += len(chunk)
        if size > limit:
            raise TooLarge
        parts.append(chunk)
    return b"".join(parts)


def too_large(limit: int, what: str = "a JSON request body") -> Refused:
    return Refused(413, f"{what} may be at most {limit} bytes")


async def read_payload(request: web.Request) -> dict[str, Any]:
    """The request's JSON object ({} without a body); 400 for anything else, 413 past MAX_JSON_BYTES."""
    if not request.can_read_body:
        return {}
    if request.content_length is not None and request.content_length > MAX_JSON_BYTES:
        raise too_large(MAX_JSON_BYTES)  # before reading a byte of it
    try:
        raw = await read_bounded(request.content, MAX_JSON_BYTES)
    except TooLarge:
        raise too_large(MAX_JSON_BYTES) from None
    return parse_json_object(raw)


async def agent_text(response: aiohttp.ClientResponse, limit: int = 4096) -> str:
    """The start of an agent's (error) answer, for a message: never more than `limit` bytes of it."""
    raw = bytearray()
    try:
        while len(raw) < limit:
            chunk = await response.content.read(limit - len(raw))
            if not chunk:
                break
            raw += chunk
    except (aiohttp.ClientError, OSError):
        pass  # what arrived is the message
    return raw.decode(errors="replace")


async def agent_json(response: aiohttp.ClientResponse) -> Any:
    """An agent's JSON answer, at most MAX_AGENT_JSON_BYTES; ValueError for anything else (the agent
    runs in the tenant's sandbox: what it sends is input, not trusted)."""
    try:
        raw = await read_bounded(response.content, MAX_AGENT_JSON_BYTES)
    except TooLarge:
        raise ValueError(f"the agent's answer is over {MAX_AGENT_JSON_BYTES} bytes") from None
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("the agent's answer is nested too deeply") from None
