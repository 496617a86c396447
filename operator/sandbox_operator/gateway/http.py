"""JSON in and out for the gateway's handlers (E2B API and session API)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from sandbox_operator.gateway.e2b import BadRequest


def json_response(status: int, body: Any) -> web.Response:
    # 429/502/503/504 would make the SDK retry on its own: a create is not safe to repeat blindly.
    headers = {"Should-Retry": "false"} if status in (429, 502, 503, 504) else None
    return web.json_response(body, status=status, headers=headers, dumps=json.dumps)


async def read_payload(request: web.Request) -> dict[str, Any]:
    """The request's JSON object ({} without a body); BadRequest for anything else."""
    if not request.can_read_body:
        return {}
    try:
        payload = await request.json()
    except ValueError:
        raise BadRequest("the request body must be JSON") from None
    if not isinstance(payload, dict):
        raise BadRequest("the request body must be a JSON object")
    return payload
