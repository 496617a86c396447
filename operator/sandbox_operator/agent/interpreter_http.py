"""HTTP endpoints of the code interpreter (port 49999): /execute, /contexts, /health."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from sandbox_operator.api.names import AGENT_TOKEN_HEADER

from .config import without_secrets
from .connect import loads_json
from .guard import (
    BodyTimeout,
    BodyTooLarge,
    body_timeout_response,
    canonical_path,
    canonical_redirect,
    is_open_route,
    read_body,
)
from .interpreter_errors import InterpreterError
from .lazy import Deferred, NotLoaded
from .limits import ExecutionStats
from .signing import tokens_equal
from .users import PathError, SandboxState

if TYPE_CHECKING:
    # Loaded after the agent listens (lazy.Deferred): this module is on the way to /health.
    from .interpreter import CodeInterpreter, KernelContext

log = logging.getLogger(__name__)

NDJSON_CONTENT_TYPE = "application/x-ndjson"
# The code-interpreter SDK sends X-Access-Token only on /execute, and E2B-Traffic-Access-Token on
# every 49999 request when the control plane returned `trafficAccessToken` (docs/e2b-protocol.md §5.1, §9).
# The control plane returns the sandbox's access token as both, so either header authenticates.
INTERPRETER_TOKEN_HEADERS: Final = (AGENT_TOKEN_HEADER, "E2B-Traffic-Access-Token")
INTERPRETER_TOKEN_REFUSAL: Final = (
    "missing or invalid access token (E2B-Traffic-Access-Token or X-Access-Token): "
    "the code interpreter needs the sandbox's access token"
)
# The most an /execute body's `timeout` may ask for (30 days): beyond it a number is a mistake.
# Names every kernel's language can set (bash's `export` takes no others).
ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_EXECUTE_TIMEOUT: Final = 30 * 24 * 3600.0
# How often a running /execute checks that its client is still connected. The SDK's `run_code(timeout=)`
# is a client-side deadline: when it runs out the SDK drops the connection (httpx.ReadTimeout →
# TimeoutException) and the kernel is interrupted within this, not at the next keepalive write.
DISCONNECT_POLL_INTERVAL: Final = 0.1


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"code": status, "message": message}, status=status)


def _failure(error: Exception) -> web.Response:
    """InterpreterError → its status (503: a kernel could not start for a resource limit); anything
    else → a JSON 500 rather than aiohttp's text/plain one (the SDK cannot parse that)."""
    if isinstance(error, InterpreterError):
        return _error(error.status, error.message)
    if isinstance(error, PathError):
        return _error(400, str(error))
    if isinstance(error, BodyTimeout):
        raise error  # the middleware answers it (408, and the connection is closed)
    log.error("code interpreter request failed", exc_info=error)
    return _error(500, f"internal error: {type(error).__name__}: {error}")


def _line(payload: dict[str, Any]) -> bytes:
    return (json.dumps(payload, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


def _exception_line(error: Exception) -> dict[str, Any]:
    """The error line for an execution that failed in the agent itself, after the stream began."""
    return {"type": "error", "name": type(error).__name__, "value": str(error), "traceback": ""}


@dataclass(frozen=True)
class ExecuteRequest:
    code: str
    context_id: str | None
    language: str | None
    env_vars: dict[str, str] | None
    timeout: float | None = None


def execute_timeout(value: object) -> float | None:
    """The body's optional `timeout` (seconds, our extension: the E2B SDKs never send it);
    InterpreterError(400) unless it is a finite number > 0 and at most MAX_EXECUTE_TIMEOUT."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InterpreterError(400, f"'timeout' must be a number of seconds, not {type(value).__name__}")
    # Compared before float(): an integer too large for a float would overflow there.
    if not (isinstance(value, int) or math.isfinite(value)) or value <= 0:
        raise InterpreterError(400, f"'timeout' must be a finite number of seconds > 0, not {value!r}")
    if value > MAX_EXECUTE_TIMEOUT:
        raise InterpreterError(400, f"'timeout' must be at most {MAX_EXECUTE_TIMEOUT:.0f} seconds (30 days)")
    return float(value)


def execute_request(body: Mapping[str, Any]) -> ExecuteRequest:
    """The /execute body, checked; InterpreterError(400) says what is wrong with it."""
    code = body.get("code")
    if not isinstance(code, str):
        raise InterpreterError(400, "'code' must be a string")
    context_id = body.get("context_id")
    language = body.get("language")
    env_vars = body.get("env_vars")
    if context_id is not None and language is not None:
        raise InterpreterError(400, "provide either 'context_id' or 'language', not both")
    if language is not None and not isinstance(language, str):
        raise InterpreterError(400, "'language' must be a string")
    if env_vars is not None and (
        not isinstance(env_vars, dict) or not all(isinstance(v, str) for v in env_vars.values())
    ):
        raise InterpreterError(400, "'env_vars' must be a map of strings")
    bad_name = next((name for name in env_vars or () if not ENV_NAME.fullmatch(name)), None)
    if bad_name is not None:
        raise InterpreterError(400, f"invalid environment variable name {bad_name[:64]!r}: letters, digits and _")
    if context_id is not None and not isinstance(context_id, str):
        raise InterpreterError(400, "'context_id' must be a string")
    timeout = execute_timeout(body.get("timeout"))
    # The kernel's os.environ gets these: never the agent's token, whatever the caller sends.
    return ExecuteRequest(code, context_id, language, None if env_vars is None else without_secrets(env_vars), timeout)


def client_gone(request: web.Request) -> bool:
    """The request's connection is closed (aiohttp drops the transport when the peer goes)."""
    transport = request.transport
    return transport is None or transport.is_closing()


async def watch_disconnect(request: web.Request, gone: asyncio.Event) -> None:
    """Set `gone` once the client has closed the connection (aiohttp tells a handler only when it
    writes, and an execution may be silent for a long time)."""
    while not gone.is_set():
        if client_gone(request):
            gone.set()
            return
        await asyncio.sleep(DISCONNECT_POLL_INTERVAL)


def is_interpreter_path(path: str) -> bool:
    return path in ("/execute", "/contexts") or path.startswith("/contexts/")


def interpreter_token_ok(headers: Mapping[str, str], token: str | None) -> bool:
    """True when no token is set, or when one of the accepted headers carries it."""
    if not token:
        return True
    return any(tokens_equal(headers.get(name), token) for name in INTERPRETER_TOKEN_HEADERS)


def refuse_unauthenticated() -> web.Response:
    return _error(401, INTERPRETER_TOKEN_REFUSAL)


class InterpreterServer:
    def __init__(self, interpreter: Deferred[CodeInterpreter], state: SandboxState, stats: ExecutionStats) -> None:
        self.interpreter = interpreter
        self.state = state
        self.stats = stats

    async def _interpreter(self) -> CodeInterpreter:
        """The interpreter, waiting while it loads (the agent's first moments); 503 if it takes too long."""
        try:
            return await self.interpreter.get()
        except NotLoaded as error:
            raise InterpreterError(503, str(error)) from error

    def routes(self, app: web.Application, *, with_health: bool) -> None:
        if with_health:
            app.router.add_get("/health", self.health)
        app.router.add_post("/execute", self.execute)
        app.router.add_get("/contexts", self.list_contexts)
        app.router.add_post("/contexts", self.create_context)
        app.router.add_post("/contexts/{context_id}/restart", self.restart_context)
        app.router.add_delete("/contexts/{context_id}", self.remove_context)

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Every route needs the token but GET /health, decided on the canonical path."""
        path = canonical_path(request.path)
        if not is_open_route(request.method, path):
            if not interpreter_token_ok(request.headers, self.state.access_token):
                return refuse_unauthenticated()
            self.stats.touch()  # only an admitted request is activity
        if path != request.path:
            return canonical_redirect(request, path)
        try:
            return await handler(request)
        except BodyTimeout:
            return await body_timeout_response(request)

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response("OK")

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        """The JSON object of the body: read within the body timeout, capped, depth checked before
        parsing; InterpreterError (400, 413) when it is none, BodyTimeout when it did not arrive."""
        try:
            raw = await read_body(request) if request.can_read_body else b""
            body = loads_json(raw) if raw else {}
        except ValueError as error:
            raise InterpreterError(400, f"request body is not valid JSON: {error}") from error
        except BodyTooLarge as error:
            raise InterpreterError(413, "request body is too large") from error
        if not isinstance(body, dict):
            raise InterpreterError(400, "request body must be a JSON object")
        return body

    async def execute(self, request: web.Request) -> web.StreamResponse:
        # Authenticated by the middleware of whichever listener serves the route.
        try:
            execution = execute_request(await self._json_body(request))
            interpreter = await self._interpreter()
            context: KernelContext
            if execution.context_id is not None:
                context = interpreter.get(execution.context_id)
            else:
                context = await interpreter.default_context(execution.language)
            # Set when the client is gone: the execution is interrupted then (see CodeInterpreter.execute).
            gone = asyncio.Event()
            lines = interpreter.execute(context, execution.code, execution.env_vars, execution.timeout, gone)
            # The first line comes before the status is sent, so a refused execution gets a real error status.
            first = await anext(lines)
        except Exception as error:
            return _failure(error)

        # Like E2B's server (which notices at its next keepalive write), a client that leaves
        # mid-execution has the kernel interrupted, so the context is free at once; here the
        # connection is watched, so that happens within DISCONNECT_POLL_INTERVAL.
        watcher = asyncio.ensure_future(watch_disconnect(request, gone))
        try:
            response = web.StreamResponse(headers={"Content-Type": NDJSON_CONTENT_TYPE})
            await response.prepare(request)
            client_connected = await self._send(response, first, gone)
            try:
                async for line in lines:
                    if client_connected:
                        client_connected = await self._send(response, line, gone)
            except Exception as error:
                log.exception("execution in context %s failed", context.id)
                if client_connected:
                    await response.write(_line(_exception_line(error)) + _line({"type": "end_of_execution"}))
            if client_connected:
                await response.write_eof()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        return response

    async def _send(self, response: web.StreamResponse, line: dict[str, Any], gone: asyncio.Event) -> bool:
        """Write one line; False once the client is gone (`gone` is set: the execution is interrupted)."""
        if gone.is_set():
            return False
        try:
            await response.write(_line(line))
        except ConnectionResetError:
            # Nobody reads the result any more: stop the work instead of letting it hold the context.
            gone.set()
            return False
        return True

    async def list_contexts(self, request: web.Request) -> web.Response:
        try:
            interpreter = await self._interpreter()
        except Exception as error:
            return _failure(error)
        return web.json_response(await interpreter.listing())

    async def create_context(self, request: web.Request) -> web.Response:
        try:
            body = await self._json_body(request)
            language = body.get("language")
            cwd = body.get("cwd")
            if language is not None and not isinstance(language, str):
                raise InterpreterError(400, "'language' must be a string")
            if cwd is not None and not isinstance(cwd, str):
                raise InterpreterError(400, "'cwd' must be a string")
            context = await (await self._interpreter()).create_context(language, cwd)
        except Exception as error:
            return _failure(error)
        return web.json_response(context.describe())

    async def restart_context(self, request: web.Request) -> web.Response:
        try:
            await (await self._interpreter()).restart(request.match_info["context_id"])
        except Exception as error:
            return _failure(error)
        return web.json_response({})

    async def remove_context(self, request: web.Request) -> web.Response:
        try:
            await (await self._interpreter()).remove(request.match_info["context_id"])
        except Exception as error:
            return _failure(error)
        return web.Response(status=204)
