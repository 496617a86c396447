"""aiohttp adapters that serve handlers over the Connect protocol (unary, server- and client-streaming)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from .connect import (
    ENVELOPE_HEADER,
    FLAG_END_STREAM,
    STREAM_CONTENT_TYPE,
    UNARY_CONTENT_TYPE,
    ConnectError,
    JsonObject,
    decode_json_message,
    encode_end_stream,
    encode_json,
    encode_message_envelope,
    is_json_content_type,
    parse_envelope_header,
    parse_keepalive_seconds,
    parse_timeout_ms,
)
from .guard import BodyTooLarge, limits_of, read_body, read_exactly
from .limits import exhaustion_message

log = logging.getLogger(__name__)

UnaryHandler = Callable[[web.Request, JsonObject], Awaitable[JsonObject]]
ServerStreamHandler = Callable[[web.Request, JsonObject, float | None], AsyncIterator[JsonObject]]
ClientStreamHandler = Callable[[web.Request, AsyncIterator[JsonObject]], Awaitable[JsonObject]]

KEEPALIVE_HEADER = "Keepalive-Ping-Interval"
TIMEOUT_HEADER = "Connect-Timeout-Ms"


def resource_exhausted(error: BaseException) -> ConnectError | None:
    """resource_exhausted for an error that means the sandbox is out of processes/threads, memory or
    fds (e.g. a worker thread refused under the pids limit), else None."""
    message = exhaustion_message(error, "serve the request")
    return None if message is None else ConnectError("resource_exhausted", message)


def connect_error_response(error: ConnectError) -> web.Response:
    return web.Response(status=error.http_status, body=encode_json(error.to_json()), content_type=UNARY_CONTENT_TYPE)


def check_headers(request: web.Request) -> None:
    """invalid_argument for a malformed Connect-Timeout-Ms or Keepalive-Ping-Interval, before a
    handler runs (a stream's error would otherwise come after a 200)."""
    parse_timeout_ms(request.headers.get(TIMEOUT_HEADER))
    parse_keepalive_seconds(request.headers.get(KEEPALIVE_HEADER), 1.0)


def request_deadline(request: web.Request) -> float | None:
    """Monotonic deadline from Connect-Timeout-Ms, or None (check_headers has refused a bad one)."""
    timeout = parse_timeout_ms(request.headers.get(TIMEOUT_HEADER))
    return None if timeout is None else time.monotonic() + timeout


def unary(handler: UnaryHandler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def serve(request: web.Request) -> web.StreamResponse:
        try:
            check_headers(request)
            if not is_json_content_type(request.headers.get("Content-Type", ""), UNARY_CONTENT_TYPE):
                return web.Response(
                    status=415,
                    body=encode_json({"code": "unimplemented", "message": "only the JSON codec is supported"}),
                    content_type=UNARY_CONTENT_TYPE,
                    headers={"Accept-Post": "application/json"},
                )
            try:
                body = await read_body(request)
            except BodyTooLarge as error:
                raise ConnectError("resource_exhausted", "request body is too large") from error
            result = await handler(request, decode_json_message(body))
        except ConnectError as error:
            return connect_error_response(error)
        except (OSError, RuntimeError) as error:
            exhausted = resource_exhausted(error)
            if exhausted is None:
                raise
            return connect_error_response(exhausted)
        return web.Response(body=encode_json(result), content_type=UNARY_CONTENT_TYPE)

    return serve


async def read_envelopes(request: web.Request, *, wait_between: bool = False) -> AsyncIterator[JsonObject]:
    """Messages of a Connect streaming request body, until the client closes it. Each message is
    bounded by the body size cap and must arrive within the body timeout once begun; the wait for the
    next one is bounded too unless `wait_between` (a client stream: stdin typed by a person)."""
    limits = limits_of(request)
    while True:
        try:
            if wait_between:
                header = await request.content.readexactly(ENVELOPE_HEADER.size)
            else:
                header = await read_exactly(request.content, ENVELOPE_HEADER.size, limits.body_timeout)
        except asyncio.IncompleteReadError as error:
            if error.partial:
                raise ConnectError("invalid_argument", "truncated envelope") from error
            return
        flags, length = parse_envelope_header(header, limits.max_body_bytes)
        try:
            payload = await read_exactly(request.content, length, limits.body_timeout)
        except asyncio.IncompleteReadError as error:
            raise ConnectError("invalid_argument", "truncated envelope") from error
        if flags & FLAG_END_STREAM:
            return
        yield decode_json_message(payload)


def _check_stream_content_type(request: web.Request) -> None:
    if not is_json_content_type(request.headers.get("Content-Type", ""), STREAM_CONTENT_TYPE):
        raise ConnectError("unimplemented", "only the connect+json codec is supported for streams")


def server_stream(handler: ServerStreamHandler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def serve(request: web.Request) -> web.StreamResponse:
        try:
            check_headers(request)
            _check_stream_content_type(request)
            first: JsonObject | None = None
            async for message in read_envelopes(request):
                first = message
                break
            if first is None:
                raise ConnectError("invalid_argument", "missing request message")
        except ConnectError as error:
            return connect_error_response(error)

        response = web.StreamResponse(headers={"Content-Type": STREAM_CONTENT_TYPE})
        await response.prepare(request)
        end_error: ConnectError | None = None
        try:
            messages = handler(request, first, request_deadline(request))
            try:
                async for message in messages:
                    await response.write(encode_message_envelope(message))
            finally:
                # Runs the handler's cleanup (unsubscribe, close watches) even when the client left.
                aclose = getattr(messages, "aclose", None)
                if aclose is not None:
                    await aclose()
        except ConnectError as error:
            end_error = error
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as error:
            end_error = resource_exhausted(error)
            if end_error is None:
                log.exception("stream %s failed", request.path)
                end_error = ConnectError("internal", str(error) or type(error).__name__)
        try:
            await response.write(encode_end_stream(end_error))
            await response.write_eof()
        except ConnectionResetError:
            # The client left first (e.g. the SDK's own timeout ran out at the same deadline as the
            # stream's): nobody reads the end of the stream, and that is no agent error.
            log.debug("stream %s: the client left before the end of the stream", request.path)
        return response

    return serve


def client_stream(handler: ClientStreamHandler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def serve(request: web.Request) -> web.StreamResponse:
        try:
            check_headers(request)
            _check_stream_content_type(request)
        except ConnectError as error:
            return connect_error_response(error)
        end_error: ConnectError | None = None
        result: JsonObject = {}
        try:
            result = await handler(request, read_envelopes(request, wait_between=True))
        except ConnectError as error:
            end_error = error
        body = encode_end_stream(end_error)
        if end_error is None:
            body = encode_message_envelope(result) + body
        return web.Response(body=body, headers={"Content-Type": STREAM_CONTENT_TYPE})

    return serve


async def unimplemented(request: web.Request) -> web.StreamResponse:
    return connect_error_response(ConnectError("unimplemented", f"{request.path} is not implemented"))
