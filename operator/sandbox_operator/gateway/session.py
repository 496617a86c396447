"""The session REST API: plain HTTP/JSON for clients without an E2B SDK (curl, other languages).

A session is a name the client chooses (an agent conversation, a notebook, a CI job); it owns at
most one sandbox, the Sandbox `session-<id>` in the API key's namespace, so every call is
idempotent by name:

    PUT    /api/v1/session/{id}/sandbox             get or create (resume when paused) → 201 / 200
    GET    /api/v1/session/{id}/sandbox             its state                          → 200 / 404
    DELETE /api/v1/session/{id}/sandbox             end it                             → 204 / 404
    POST   /api/v1/session/{id}/sandbox/commands    {"cmd", "cwd"?, "envs"?, "timeout"?} → exit code, stdout, stderr
    POST   /api/v1/session/{id}/sandbox/code        {"code", "language"?}              → results, stdout, stderr, error
    GET    /api/v1/session/{id}/sandbox/files?path= the file's bytes
    PUT    /api/v1/session/{id}/sandbox/files?path= the request body becomes the file

Commands and code run through the sandbox's agent (envd Process.Start, the interpreter's /execute),
so they obey the sandbox's execution timeout and output cap like SDK calls do.

The handlers only translate: the decisions are session_logic's (pure), and what they need of the
gateway comes as SessionOps, built by the gateway.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from sandbox_operator.api.names import AGENT_TOKEN_HEADER, ENVD_PORT, INTERPRETER_PORT
from sandbox_operator.gateway import e2b
from sandbox_operator.gateway import session_logic as logic
from sandbox_operator.gateway.http import READ_CHUNK_BYTES, TooLarge, agent_text, json_response, read_payload, too_large
from sandbox_operator.kube import ApiError

JSON = dict[str, Any]
Key = tuple[str, str]  # (namespace, name) of a Sandbox
Route = tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]


class _Output(Protocol):
    """What collects an agent's streamed answer (logic.CommandOutput, logic.CodeOutput)."""

    def feed(self, chunk: bytes) -> None: ...

    def result(self) -> JSON: ...


class DeleteSandbox(Protocol):
    def __call__(self, namespace: str, name: str, *, wait: bool) -> Awaitable[bool]: ...


class UntilServing(Protocol):
    def __call__(self, key: Key, *, delete_on_failure: bool) -> Awaitable[JSON]: ...


@dataclass(frozen=True)
class SessionOps:
    """What the session API needs of the gateway, and nothing else (the gateway builds it)."""

    namespace_of: Callable[[web.Request], str]  # the API key's namespace; 401 without a known key
    sandbox: Callable[[Key], JSON | None]  # the Sandbox as the watch last saw it
    templates: Callable[[], Mapping[str, JSON]]  # SandboxTemplates by name
    token_of: Callable[[JSON], str]  # the sandbox's access token
    create_sandbox: Callable[[str, JSON], Awaitable[None]]
    set_suspended: Callable[[str, str, bool], Awaitable[None]]
    delete_sandbox: DeleteSandbox
    until_serving: UntilServing
    upstream: Callable[[], aiohttp.ClientSession]  # the HTTP client to sandbox agents
    # The headers every call to the sandbox's agent carries: its access token (none for a pod without one).
    agent_headers: Callable[[JSON], dict[str, str]]
    max_upload_bytes: int = 1 << 30  # one file upload (it streams: this is not held in memory)


def routes(ops: SessionOps) -> list[Route]:
    api = SessionApi(ops)
    base = "/api/v1/session/{session}/sandbox"
    return [
        ("PUT", base, api.ensure),
        ("GET", base, api.get),
        ("DELETE", base, api.delete),
        ("POST", base + "/commands", api.commands),
        ("POST", base + "/code", api.code),
        ("GET", base + "/files", api.read_file),
        ("PUT", base + "/files", api.write_file),
    ]


def _session_id(request: web.Request) -> str:
    return request.match_info["session"]


class SessionApi:
    def __init__(self, ops: SessionOps) -> None:
        self.ops = ops

    def _key(self, request: web.Request) -> Key:
        namespace = self.ops.namespace_of(request)
        return namespace, logic.session_name(_session_id(request))

    def _describe(self, request: web.Request, body: JSON) -> JSON:
        template = self.ops.templates().get(body["spec"]["template"])
        return logic.describe(_session_id(request), body, template, self.ops.token_of(body))

    def _serving(self, request: web.Request) -> JSON:
        return logic.serving_sandbox(self.ops.sandbox(self._key(request)), _session_id(request))

    async def ensure(self, request: web.Request) -> web.StreamResponse:
        namespace, name = key = self._key(request)
        payload = await read_payload(request)
        step = logic.ensure_step(self.ops.sandbox(key))
        created = False
        if step in (logic.Ensure.CREATE, logic.Ensure.REPLACE):
            # Validated before anything changes: a bad request leaves an ended sandbox as it was.
            manifest = logic.session_manifest(
                payload, namespace=namespace, session_id=_session_id(request), templates=self.ops.templates()
            )
            if step is logic.Ensure.REPLACE:  # ended or failed: make room for a new one
                await self.ops.delete_sandbox(namespace, name, wait=True)
            created = await self._create(namespace, manifest)
        elif step is logic.Ensure.RESUME:
            await self.ops.set_suspended(namespace, name, False)
        body = await self.ops.until_serving(key, delete_on_failure=created)
        return json_response(201 if created else 200, self._describe(request, body))

    async def _create(self, namespace: str, manifest: JSON) -> bool:
        """Whether this call created the sandbox (False: a concurrent PUT of the session did)."""
        try:
            await self.ops.create_sandbox(namespace, manifest)
        except ApiError as exc:
            if exc.status != 409:
                raise
            return False  # 409: the other PUT's sandbox is served
        return True

    async def get(self, request: web.Request) -> web.StreamResponse:
        body = logic.session_sandbox(self.ops.sandbox(self._key(request)), _session_id(request))
        return json_response(200, self._describe(request, body))

    async def delete(self, request: web.Request) -> web.StreamResponse:
        namespace, name = self._key(request)
        if not await self.ops.delete_sandbox(namespace, name, wait=False):
            raise e2b.Refused(404, f"session {_session_id(request)} has no sandbox")
        return web.Response(status=204)

    async def commands(self, request: web.Request) -> web.StreamResponse:
        body = self._serving(request)
        data, headers = logic.command_request(await read_payload(request))
        output = logic.CommandOutput()
        url = f"http://{body['status']['podIP']}:{ENVD_PORT}/process.Process/Start"
        headers.update(self.ops.agent_headers(body))
        return await self._collect(url, output, logic.command_failure, data=data, headers=headers)

    async def code(self, request: web.Request) -> web.StreamResponse:
        body = self._serving(request)
        execute = logic.execute_request(await read_payload(request))
        output = logic.CodeOutput()
        url = f"http://{body['status']['podIP']}:{INTERPRETER_PORT}/execute"
        headers = {AGENT_TOKEN_HEADER: self.ops.token_of(body), **self.ops.agent_headers(body)}
        return await self._collect(url, output, logic.execute_failure, json=execute, headers=headers)

    async def _collect(
        self, url: str, output: _Output, failure: Callable[[int, str], Exception], **post: Any
    ) -> web.StreamResponse:
        """POST to the agent and feed its streamed answer to `output` in bounded chunks: the decoder,
        not a read buffer, decides how long a message may be (`async for line in content` would raise
        on a line past aiohttp's read limit)."""
        try:
            async with self.ops.upstream().post(url, **post) as response:
                if response.status != 200:
                    raise failure(response.status, await agent_text(response))
                async for chunk in response.content.iter_chunked(READ_CHUNK_BYTES):
                    output.feed(chunk)
        except (aiohttp.ClientError, OSError) as exc:
            raise _agent_unreachable(exc) from None
        return json_response(200, output.result())

    async def read_file(self, request: web.Request) -> web.StreamResponse:
        return await self._files(request, "GET")

    async def write_file(self, request: web.Request) -> web.StreamResponse:
        return await self._files(request, "POST")

    async def _files(self, request: web.Request, method: str) -> web.StreamResponse:
        """A download or an upload, streamed both ways as the data-plane proxy does: no file is held."""
        body = self._serving(request)
        path = logic.file_path(request.query)
        url = f"http://{body['status']['podIP']}:{ENVD_PORT}/files"
        limit = self.ops.max_upload_bytes
        data: AsyncIterator[bytes] | None = None
        if method == "POST":
            if request.content_length is not None and request.content_length > limit:
                raise too_large(limit, "an upload")  # before a byte of it is read
            data = _upload_chunks(request, limit)
        headers = logic.file_request_headers(method, request.headers.get("Accept-Encoding", "identity"))
        headers.update(self.ops.agent_headers(body))
        try:
            async with self.ops.upstream().request(
                method, url, params={"path": path}, data=data, headers=headers
            ) as upstream:
                if upstream.status >= 500:
                    raise logic.command_failure(upstream.status, await agent_text(upstream))
                return await _relay(request, upstream)
        except TooLarge:
            raise too_large(limit, "an upload") from None
        except (aiohttp.ClientError, OSError) as exc:
            if isinstance(exc.__cause__, TooLarge) or isinstance(exc.__context__, TooLarge):
                raise too_large(limit, "an upload") from None
            raise _agent_unreachable(exc) from None


def _agent_unreachable(exc: BaseException) -> e2b.Refused:
    return e2b.Refused(502, f"the sandbox's agent could not be reached: {type(exc).__name__}: {exc}")


async def _upload_chunks(request: web.Request, limit: int) -> AsyncIterator[bytes]:
    """The request body in bounded chunks; TooLarge past `limit` (a chunked body says its size late)."""
    size = 0
    async for chunk in request.content.iter_chunked(READ_CHUNK_BYTES):
        size += len(chunk)
        if size > limit:
            raise TooLarge
        yield chunk


async def _relay(request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    """The agent's answer to a file call, streamed to the client chunk by chunk."""
    response = web.StreamResponse(status=upstream.status, headers=logic.file_response_headers(upstream.headers))
    if upstream.content_length is not None:  # bodies pass undecoded: the agent's length is the length
        response.content_length = upstream.content_length
    await response.prepare(request)
    try:
        async for chunk in upstream.content.iter_chunked(READ_CHUNK_BYTES):
            await response.write(chunk)
        await response.write_eof()
    except (aiohttp.ClientError, ConnectionResetError):
        pass  # the client or the agent went away mid-file: nothing more can be said to either
    return response
