"""The session REST API: one sandbox per chat session, for a front end (plain HTTP/JSON, no SDK).

A session is a name the client chooses; it owns at most one sandbox, the Sandbox `session-<id>` in
the API key's namespace, so every call is idempotent by name (base `/api/v1/session/{id}/sandbox`):

    POST /start    {"sandbox_type": "code_interpreter"|"custom", "template_id"?} → SandboxInfo
    POST /stop                                     → 204 (also when nothing runs)
    GET  /status                                   → SandboxInfo, or null without a sandbox
    POST /execute  {"code", "timeout"?}            → ExecutionResult (starts the sandbox if needed)
    POST /install  {"packages": [...]}             → ExecutionResult (pip, importable next execute)
    POST /upload?path=DIR   multipart field `file` → {"path": "DIR/<filename>"}
    GET  /download?path=P                          → the bytes, as an attachment
    GET  /files?path=DIR                           → [{"path", "size", "is_directory"}]
    POST /commands {"cmd", "cwd"?, "envs"?, "timeout"?} → ExecutionResult + exit_code (extension)

Errors are `{"detail": ...}` (400, 401, 403, 404, 408, 413, 500). Code runs in the sandbox's one
kernel, so variables persist between executes. The handlers only translate: the decisions are
session_logic's (pure), and what they need of the gateway comes as SessionOps, built by the gateway.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp
from aiohttp import BodyPartReader, web

from sandbox_operator.api.names import AGENT_TOKEN_HEADER, ENVD_PORT, INTERPRETER_PORT
from sandbox_operator.gateway import e2b
from sandbox_operator.gateway import session_logic as logic
from sandbox_operator.gateway.http import (
    READ_CHUNK_BYTES,
    TooLarge,
    agent_text,
    json_response,
    read_bounded,
    read_payload,
    too_large,
)
from sandbox_operator.kube import ApiError

JSON = dict[str, Any]
Key = tuple[str, str]  # (namespace, name) of a Sandbox
Route = tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]

SESSION_PATH_PREFIX = "/api/v1/session/"  # every route of this API (its errors are {"detail"})
BASE = SESSION_PATH_PREFIX + "{session}/sandbox"
MAX_LISTING_BYTES = 16 << 20  # one directory's ListDir answer (about 80,000 entries)
MAX_TRACKED_SESSIONS = 100_000  # last-call times kept (oldest forgotten first)
CONNECT_RETRY_S = 3.0  # a just-started sandbox's interpreter may take a moment to listen


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
    limits: logic.SessionLimits = field(default_factory=logic.SessionLimits)


def routes(ops: SessionOps) -> list[Route]:
    api = SessionApi(ops)
    return [
        ("POST", BASE + "/start", api.start),
        ("POST", BASE + "/stop", api.stop),
        ("GET", BASE + "/status", api.status),
        ("POST", BASE + "/execute", api.execute),
        ("POST", BASE + "/install", api.install),
        ("POST", BASE + "/upload", api.upload),
        ("GET", BASE + "/download", api.download),
        ("GET", BASE + "/files", api.files),
        ("POST", BASE + "/commands", api.commands),
    ]


def _session_id(request: web.Request) -> str:
    return request.match_info["session"]


class SessionApi:
    def __init__(self, ops: SessionOps) -> None:
        self.ops = ops
        self.limits = ops.limits
        self._last_call: OrderedDict[Key, datetime] = OrderedDict()

    # --- who and which sandbox -----------------------------------------------------------------

    def _namespace(self, request: web.Request) -> str:
        """The API key's namespace; without a key, the anonymous namespace when the gateway serves one."""
        if self.limits.anonymous_namespace and "X-API-KEY" not in request.headers:
            return self.limits.anonymous_namespace
        return self.ops.namespace_of(request)

    def _key(self, request: web.Request) -> Key:
        key = self._namespace(request), logic.session_name(_session_id(request))
        self._last_call[key] = datetime.now(UTC)
        self._last_call.move_to_end(key)
        while len(self._last_call) > MAX_TRACKED_SESSIONS:
            self._last_call.popitem(last=False)
        return key

    def _info(self, request: web.Request, key: Key, body: JSON) -> JSON:
        return logic.sandbox_info(_session_id(request), body, self._last_call.get(key))

    async def _ensure(self, request: web.Request, key: Key, start: Mapping[str, Any] | None = None) -> JSON:
        """The session's sandbox, Running and serving: started (as `start` asks, else the default
        code-interpreter sandbox), resumed or replaced as the session's state needs."""
        namespace, name = key
        step = logic.ensure_step(self.ops.sandbox(key))
        created = False
        if step in (logic.Ensure.CREATE, logic.Ensure.REPLACE):
            # Validated before anything changes: a bad request leaves an ended sandbox as it was.
            sandbox_type, wanted = logic.start_request(start or {}, self.limits)
            manifest = logic.session_manifest(
                namespace=namespace,
                session_id=_session_id(request),
                sandbox_type=sandbox_type,
                wanted=wanted,
                templates=self.ops.templates(),
                limits=self.limits,
            )
            if step is logic.Ensure.REPLACE:  # ended, failed or being deleted: make room for a new one
                await self.ops.delete_sandbox(namespace, name, wait=True)
            created = await self._create(namespace, manifest)
        elif step is logic.Ensure.RESUME:
            await self.ops.set_suspended(namespace, name, False)
        return await self.ops.until_serving(key, delete_on_failure=created)

    async def _create(self, namespace: str, manifest: JSON) -> bool:
        """Whether this call created the sandbox (False: a concurrent start of the session did)."""
        try:
            await self.ops.create_sandbox(namespace, manifest)
        except ApiError as exc:
            if exc.status != 409:
                raise
            return False  # 409: the other call's sandbox is served
        return True

    async def _existing(self, request: web.Request, key: Key) -> JSON:
        """The sandbox a download or a listing reads: 404 without one; a paused one is resumed."""
        logic.existing_sandbox(self.ops.sandbox(key), _session_id(request))
        return await self._ensure(request, key)

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self, request: web.Request) -> web.StreamResponse:
        key = self._key(request)
        payload = await read_payload(request)
        logic.start_request(payload, self.limits)  # a bad body is a 400 also when a sandbox runs
        body = await self._ensure(request, key, payload)
        return json_response(200, self._info(request, key, body))

    async def stop(self, request: web.Request) -> web.StreamResponse:
        namespace, name = self._key(request)
        await self.ops.delete_sandbox(namespace, name, wait=False)
        return web.Response(status=204)

    async def status(self, request: web.Request) -> web.StreamResponse:
        key = self._key(request)
        body = logic.live_sandbox(self.ops.sandbox(key))
        return json_response(200, None if body is None else self._info(request, key, body))

    # --- code ----------------------------------------------------------------------------------

    async def execute(self, request: web.Request) -> web.StreamResponse:
        key = self._key(request)
        execute, timeout = logic.execute_request(await read_payload(request), self.limits)
        return await self._run_code(request, key, execute, timeout)

    async def install(self, request: web.Request) -> web.StreamResponse:
        key = self._key(request)
        packages = logic.install_packages(await read_payload(request))
        execute = {"code": logic.install_code(packages), "timeout": self.limits.execution_s}
        return await self._run_code(request, key, execute, self.limits.execution_s)

    async def _run_code(self, request: web.Request, key: Key, execute: JSON, limit_s: int) -> web.StreamResponse:
        body = await self._ensure(request, key)
        url = f"http://{body['status']['podIP']}:{INTERPRETER_PORT}/execute"
        headers = {AGENT_TOKEN_HEADER: self.ops.token_of(body), **self.ops.agent_headers(body)}
        started = time.monotonic()
        cell = await self._collect(url, logic.CodeOutput(), logic.execute_failure, json=execute, headers=headers)
        return json_response(200, logic.execution_result(cell, time.monotonic() - started, limit_s))

    async def commands(self, request: web.Request) -> web.StreamResponse:
        key = self._key(request)
        data, headers = logic.command_request(await read_payload(request))
        body = await self._ensure(request, key)
        url = f"http://{body['status']['podIP']}:{ENVD_PORT}/process.Process/Start"
        headers.update(self.ops.agent_headers(body))
        started = time.monotonic()
        result = await self._collect(url, logic.CommandOutput(), logic.command_failure, data=data, headers=headers)
        return json_response(200, logic.command_result(result, time.monotonic() - started))

    async def _collect(self, url: str, output: _Output, failure: Callable[[int, str], Exception], **post: Any) -> JSON:
        """POST to the agent and feed its streamed answer to `output` in bounded chunks: the decoder,
        not a read buffer, decides how long a message may be (`async for line in content` would raise
        on a line past aiohttp's read limit)."""
        deadline = time.monotonic() + CONNECT_RETRY_S
        delay = 0.02
        while True:
            try:
                async with self.ops.upstream().post(url, **post) as response:
                    if response.status != 200:
                        raise failure(response.status, await agent_text(response))
                    async for chunk in response.content.iter_chunked(READ_CHUNK_BYTES):
                        output.feed(chunk)
                return output.result()
            except aiohttp.ClientConnectorError as exc:
                # Refused before a byte was sent: the agent of a just-started pod is still coming up.
                if time.monotonic() + delay > deadline:
                    raise _agent_unreachable(exc) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.25)
            except (aiohttp.ClientError, OSError) as exc:
                raise _agent_unreachable(exc) from None

    # --- files ---------------------------------------------------------------------------------

    async def upload(self, request: web.Request) -> web.StreamResponse:
        key = self._key(request)
        directory = logic.directory_query(request.query, logic.DEFAULT_UPLOAD_DIR)
        limit = self.ops.max_upload_bytes
        if not request.content_type.startswith("multipart/"):
            raise e2b.Refused(400, f"an upload is multipart/form-data with a '{logic.UPLOAD_FIELD}' field")
        if request.content_length is not None and request.content_length > limit:
            raise too_large(limit, "an upload")  # before a byte of it is read
        try:
            reader = await request.multipart()
        except (ValueError, AssertionError) as exc:
            raise e2b.Refused(400, f"the multipart body cannot be read: {exc}") from None
        part = await _file_part(reader)
        target = logic.upload_target(directory, part.filename)
        body = await self._ensure(request, key)
        url = f"http://{body['status']['podIP']}:{ENVD_PORT}/files"
        headers = {**logic.file_request_headers("POST", "identity"), **self.ops.agent_headers(body)}
        try:
            async with self.ops.upstream().post(
                url, params={"path": target}, data=_part_chunks(part, limit), headers=headers
            ) as upstream:
                if upstream.status != 200:
                    raise logic.agent_refusal(upstream.status, await agent_text(upstream), target)
        except TooLarge:
            raise too_large(limit, "an upload") from None
        except (aiohttp.ClientError, OSError) as exc:
            if isinstance(exc.__cause__, TooLarge) or isinstance(exc.__context__, TooLarge):
                raise too_large(limit, "an upload") from None
            raise _agent_unreachable(exc) from None
        return json_response(200, {"path": target})

    async def download(self, request: web.Request) -> web.StreamResponse:
        key = self._key(request)
        path = logic.file_path(request.query)
        body = await self._existing(request, key)
        url = f"http://{body['status']['podIP']}:{ENVD_PORT}/files"
        headers = {**logic.file_request_headers("GET", "identity"), **self.ops.agent_headers(body)}
        try:
            async with self.ops.upstream().get(url, params={"path": path}, headers=headers) as upstream:
                if upstream.status != 200:
                    raise logic.agent_refusal(upstream.status, await agent_text(upstream), path)
                return await _relay(request, upstream, logic.download_headers(path, upstream.headers))
        except (aiohttp.ClientError, OSError) as exc:
            raise _agent_unreachable(exc) from None

    async def files(self, request: web.Request) -> web.StreamResponse:
        key = self._key(request)
        path = logic.directory_query(request.query, logic.DEFAULT_LIST_DIR)
        body = await self._existing(request, key)
        url = f"http://{body['status']['podIP']}:{ENVD_PORT}/filesystem.Filesystem/ListDir"
        headers = {"Content-Type": "application/json", "Connect-Protocol-Version": "1", **self.ops.agent_headers(body)}
        try:
            async with self.ops.upstream().post(url, data=logic.list_request(path), headers=headers) as upstream:
                if upstream.status != 200:
                    raise logic.agent_refusal(upstream.status, await agent_text(upstream), path)
                raw = await read_bounded(upstream.content, MAX_LISTING_BYTES)
        except TooLarge:
            raise e2b.Refused(500, f"the listing of {path} is over {MAX_LISTING_BYTES} bytes") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _agent_unreachable(exc) from None
        return json_response(200, logic.listed_entries(logic.parse_agent_json(raw, "directory listing")))


def _agent_unreachable(exc: BaseException) -> e2b.Refused:
    return e2b.Refused(502, f"the sandbox's agent could not be reached: {type(exc).__name__}: {exc}")


async def _file_part(reader: aiohttp.MultipartReader) -> BodyPartReader:
    """The form's `file` part; parts before it are skipped (each read in bounded chunks, not held)."""
    while True:
        try:
            part = await reader.next()
        except (ValueError, AssertionError, aiohttp.ClientError) as exc:
            raise e2b.Refused(400, f"the multipart body cannot be read: {exc}") from None
        if part is None:
            raise e2b.Refused(400, f"the form has no '{logic.UPLOAD_FIELD}' field")
        if not isinstance(part, BodyPartReader):
            raise e2b.Refused(400, "nested multipart bodies are not supported")
        if part.name == logic.UPLOAD_FIELD:
            return part
        while await part.read_chunk(READ_CHUNK_BYTES):
            pass


async def _part_chunks(part: BodyPartReader, limit: int) -> AsyncIterator[bytes]:
    """The file part's bytes in bounded chunks; TooLarge past `limit`."""
    size = 0
    while chunk := await part.read_chunk(READ_CHUNK_BYTES):
        size += len(chunk)
        if size > limit:
            raise TooLarge
        yield chunk


async def _relay(
    request: web.Request, upstream: aiohttp.ClientResponse, headers: Mapping[str, str]
) -> web.StreamResponse:
    """The agent's file, streamed to the client chunk by chunk."""
    response = web.StreamResponse(status=200, headers=headers)
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
