"""The envd-compatible API (port 49983): process and filesystem RPCs plus the plain HTTP endpoints."""

from __future__ import annotations

import asyncio
import email.message
import errno
import json
import logging
import os
import stat
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from aiohttp import BodyPartReader, MultipartReader, hdrs, web
from aiohttp.web_protocol import RequestPayloadError

from sandbox_operator.api.names import AGENT_TOKEN_HEADER, SIGNED_PATH_HEADER

from .connect import ConnectError, JsonObject, loads_json, parse_keepalive_seconds
from .filesystem import FilesystemService, make_dirs_as, write_metadata
from .guard import (
    HEALTH_PATH,
    BodyTimeout,
    BodyTooLarge,
    body_timeout_response,
    canonical_path,
    canonical_redirect,
    is_open_route,
    limits_of,
    read_body,
    read_chunk,
    within,
)
from .interpreter_http import interpreter_token_ok, is_interpreter_path, refuse_unauthenticated
from .limits import ExecutionStats, exhaustion_message
from .process import SIGNALS_BY_NAME, ManagedProcess, ProcessManager, set_window_size
from .protojson import (
    UINT32_MAX,
    bool_field,
    decode_bytes,
    enum_field,
    field,
    message_field,
    selector,
    string_field,
    string_list_field,
    string_map_field,
    uint_field,
)
from .rpc import client_stream, server_stream, unary, unimplemented
from .signing import Operation, tokens_equal, verify_signature
from .sysmetrics import PROMETHEUS_CONTENT_TYPE, ResourceSampler, envd_metrics, prometheus_text
from .uploadfile import UploadFile, open_upload
from .users import PathError, SandboxState, UserContext, UserError, check_path_text, username_from_basic_auth

log = logging.getLogger(__name__)

DEFAULT_KEEPALIVE_SECONDS: Final = 90.0
FILE_CHUNK: Final = 256 * 1024
METADATA_HEADER_PREFIX: Final = "x-metadata-"
MAX_METADATA_BYTES: Final = 4096
MAX_METADATA_KEY_BYTES: Final = 246
FILES_PATH: Final = "/files"
# /files checks the token or a signature itself (signed URLs carry no token).
FILES_METHODS: Final = frozenset({"GET", "POST"})
# Monitoring requests are not user activity.
INACTIVE_PATHS: Final = frozenset({HEALTH_PATH, "/metrics", "/agent/metrics"})
TOKEN_REFUSAL: Final = f"missing or invalid access token ({AGENT_TOKEN_HEADER})"


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"code": status, "message": message}, status=status)


def env_var_refusal(env: Mapping[str, Any]) -> str | None:
    """Why `env` cannot be a process environment (execve takes no NUL, names no '='), or None."""
    for key, value in env.items():
        if not isinstance(key, str) or not isinstance(value, str):
            return "environment variables must be strings"
        if not key or "=" in key or "\x00" in key:
            return f"invalid environment variable name {key[:64]!r}"
        if "\x00" in value:
            return f"the value of {key[:64]!r} contains a NUL byte"
    return None


@dataclass(frozen=True)
class FileAccess:
    """Who a /files request acts as, the path it names, and whether it may touch that path only."""

    user: UserContext
    raw_path: str
    # Admitted by a signature (here, or at the gateway: SIGNED_PATH_HEADER): exactly `raw_path`, one file.
    signed: bool


def is_rpc_path(path: str) -> bool:
    return path.startswith(("/process.Process/", "/filesystem.Filesystem/"))


def keepalive_interval(request: web.Request) -> float:
    """Keepalive-Ping-Interval; rpc.check_headers has refused a malformed one before the stream began."""
    try:
        return parse_keepalive_seconds(request.headers.get("Keepalive-Ping-Interval"), DEFAULT_KEEPALIVE_SECONDS)
    except ConnectError:
        return DEFAULT_KEEPALIVE_SECONDS


def parse_metadata_headers(request: web.Request) -> dict[str, str]:
    """X-Metadata-<key>: <value> → {key.lower(): value}; first value wins; printable ASCII only."""
    metadata: dict[str, str] = {}
    total = 0
    for name, value in request.headers.items():
        if not name.lower().startswith(METADATA_HEADER_PREFIX):
            continue
        key = name[len(METADATA_HEADER_PREFIX) :].lower()
        if key in metadata:
            continue
        if not key or not all(0x20 <= ord(char) <= 0x7E for char in key + value):
            raise web.HTTPBadRequest(reason="invalid metadata")
        if len(key) > MAX_METADATA_KEY_BYTES:
            raise web.HTTPBadRequest(reason="metadata key too long")
        total += len("user.e2b.") + len(key) + len(value)
        if total > MAX_METADATA_BYTES:
            raise web.HTTPBadRequest(reason="metadata too large")
        metadata[key] = value
    return metadata


def accepts_gzip(accept_encoding: str) -> bool:
    for item in accept_encoding.split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() != "gzip":
            continue
        quality = params.strip()
        if quality.startswith("q="):
            try:
                return float(quality[2:]) > 0
            except ValueError:
                return False
        return True
    return False


class EnvdServer:
    def __init__(
        self,
        state: SandboxState,
        stats: ExecutionStats,
        processes: ProcessManager,
        filesystem: FilesystemService,
        sampler: ResourceSampler,
    ) -> None:
        self.state = state
        self.stats = stats
        self.processes = processes
        self.filesystem = filesystem
        self.sampler = sampler

    # -- application ---------------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        router = app.router
        router.add_get("/health", self.health)
        router.add_get("/metrics", self.metrics)
        router.add_get("/agent/metrics", self.prometheus_metrics)
        router.add_get("/envs", self.envs)
        router.add_post("/init", self.init)
        router.add_get("/files", self.download)
        router.add_post("/files", self.upload)
        unary_methods: dict[str, Callable[[web.Request, JsonObject], Awaitable[JsonObject]]] = {
            "process.Process/List": self.list_processes,
            "process.Process/SendInput": self.send_input,
            "process.Process/SendSignal": self.send_signal,
            "process.Process/Update": self.update,
            "process.Process/CloseStdin": self.close_stdin,
            "filesystem.Filesystem/Stat": self.stat,
            "filesystem.Filesystem/MakeDir": self.make_dir,
            "filesystem.Filesystem/Move": self.move,
            "filesystem.Filesystem/ListDir": self.list_dir,
            "filesystem.Filesystem/Remove": self.remove,
            "filesystem.Filesystem/CreateWatcher": self.create_watcher,
            "filesystem.Filesystem/GetWatcherEvents": self.get_watcher_events,
            "filesystem.Filesystem/RemoveWatcher": self.remove_watcher,
        }
        for path, handler in unary_methods.items():
            router.add_post(f"/{path}", unary(handler))
        router.add_post("/process.Process/Start", server_stream(self.start))
        router.add_post("/process.Process/Connect", server_stream(self.connect))
        router.add_post("/filesystem.Filesystem/WatchDir", server_stream(self.watch_dir))
        router.add_post("/process.Process/StreamInput", client_stream(self.stream_input))
        router.add_post("/{service:[a-z]+\\.[A-Za-z]+}/{method}", unimplemented)

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        # Every decision below is taken on the canonical path: /./init and /a/../init are /init.
        path = canonical_path(request.path)
        refusal = self._refusal(request.method, path, request.headers)
        if refusal is not None:
            return refusal
        if path not in INACTIVE_PATHS:
            self.stats.touch()  # only an admitted request is activity
        if path != request.path:
            return canonical_redirect(request, path)
        try:
            return await handler(request)
        except BodyTimeout:
            return await body_timeout_response(request, "deadline_exceeded" if is_rpc_path(path) else 408)
        except BodyTooLarge:
            return json_error(413, f"request body exceeds {limits_of(request).max_body_bytes} bytes")
        except (OSError, RuntimeError) as error:
            # A worker thread for file I/O that cannot start under the pids limit: say so (429), not 500.
            exhausted = exhaustion_message(error, "serve the request")
            if exhausted is None:
                raise
            return json_error(429, exhausted)

    def _refusal(self, method: str, path: str, headers: Mapping[str, str]) -> web.Response | None:
        """401 for a request without the access token (when one is set), else None. Open: GET /health.
        /files (GET, POST) decides itself: a signed URL carries a signature instead of the token."""
        token = self.state.access_token
        if is_open_route(method, path):
            return None
        if is_interpreter_path(path):
            # With sandbox_url the code-interpreter requests arrive here too, with its headers.
            return None if interpreter_token_ok(headers, token) else refuse_unauthenticated()
        if path == FILES_PATH and method in FILES_METHODS:
            return None
        if not token or tokens_equal(headers.get(AGENT_TOKEN_HEADER), token):
            return None
        if is_rpc_path(path):
            return web.json_response({"code": "unauthenticated", "message": TOKEN_REFUSAL}, status=401)
        return json_error(401, TOKEN_REFUSAL)

    # -- plain HTTP ----------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def metrics(self, request: web.Request) -> web.Response:
        if request.query.get("format") == "prometheus":
            return await self.prometheus_metrics(request)
        sample = self.sampler.sample()
        body = envd_metrics(sample, self.sampler.cpu_used_percent(sample), self.stats)
        return web.json_response(body)

    async def prometheus_metrics(self, request: web.Request) -> web.Response:
        text = prometheus_text(self.sampler.sample(), self.stats, self.state.config.sandbox_id)
        return web.Response(body=text.encode(), headers={"Content-Type": PROMETHEUS_CONTENT_TYPE})

    async def envs(self, request: web.Request) -> web.Response:
        return web.json_response(self.state.env_vars)

    async def init(self, request: web.Request) -> web.Response:
        try:
            body = loads_json(await read_body(request))
        except ValueError as error:
            return json_error(400, f"request body must be JSON: {error}")
        if not isinstance(body, dict):
            return json_error(400, "request body must be a JSON object")
        refusal = _init_refusal(body)
        if refusal is not None:
            return json_error(400, refusal)
        user = body.get("defaultUser")
        if isinstance(user, str) and user:
            try:
                self.state.user(user)
            except UserError as error:
                return json_error(400, str(error))
            self.state.default_user = user
        env_vars = body.get("envVars")
        if env_vars:
            self.state.env_vars.update(env_vars)
        token = body.get("accessToken")
        if isinstance(token, str) and token:
            self.state.access_token = token
        workdir = body.get("defaultWorkdir")
        if isinstance(workdir, str) and workdir:
            self.state.default_workdir = Path(workdir)
        return web.Response(status=204)

    def _file_access(self, request: web.Request, operation: Operation) -> FileAccess:
        """Who the request acts as and what it may touch; 401 without the token or a valid signature.

        SIGNED_PATH_HEADER is the gateway's word that it admitted a signed URL for that path; it is
        taken only together with the agent's token (which only the gateway and the operator hold)."""
        path = request.query.get("path", "")
        username = request.query.get("username") or ""
        token = self.state.access_token
        has_token = bool(token) and tokens_equal(request.headers.get(AGENT_TOKEN_HEADER), token or "")
        signed_path = request.headers.get(SIGNED_PATH_HEADER)
        signed = False
        if signed_path is not None:
            if not has_token:
                raise _http_error(401, f"{SIGNED_PATH_HEADER} is only taken with the agent's access token")
            if path and path != signed_path:
                raise _http_error(400, "the 'path' query parameter is not the signed path")
            path, signed = signed_path, True
        elif token and not has_token:
            refusal = verify_signature(
                signature=request.query.get("signature"),
                expiration=request.query.get("signature_expiration"),
                path=path,
                operation=operation,
                username=username,
                access_token=token,
                now=time.time(),
            )
            if refusal is not None:
                raise _http_error(401, refusal)
            signed = True
        try:
            check_path_text(path)
            return FileAccess(self.state.user(username or None), path, signed)
        except PathError as error:
            raise _http_error(400, str(error)) from error
        except UserError as error:
            raise _http_error(400 if error.status == 400 else 401, str(error)) from error

    async def download(self, request: web.Request) -> web.StreamResponse:
        access = self._file_access(request, "read")
        if not access.raw_path:
            return json_error(400, "missing 'path' query parameter")
        path = access.user.resolve(access.raw_path)
        loop = asyncio.get_running_loop()
        try:
            handle: IO[bytes] = await loop.run_in_executor(None, _open_regular_file, path)
        except FileNotFoundError:
            return json_error(404, f"path '{path}' does not exist")
        except IsADirectoryError:
            return json_error(400, f"path '{path}' is a directory")
        except _NotRegularFile:
            return json_error(400, f"path '{path}' is not a regular file")
        except PermissionError:
            return json_error(401, f"permission denied: '{path}'")
        except OSError as error:
            if error.errno not in CLIENT_ERRNOS:
                raise
            return json_error(400, f"cannot read '{path}': {error.strerror}")
        try:
            size = os.fstat(handle.fileno()).st_size
            gzip_body = accepts_gzip(request.headers.get("Accept-Encoding", ""))
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            if gzip_body:
                response.headers["Content-Encoding"] = "gzip"
            else:
                response.content_length = size
            await response.prepare(request)
            compressor = zlib.compressobj(6, zlib.DEFLATED, 31) if gzip_body else None
            while True:
                chunk: bytes = await loop.run_in_executor(None, handle.read, FILE_CHUNK)
                if not chunk:
                    break
                await response.write(compressor.compress(chunk) if compressor else chunk)
            if compressor is not None:
                await response.write(compressor.flush())
            await response.write_eof()
            return response
        finally:
            await loop.run_in_executor(None, handle.close)

    async def upload(self, request: web.Request) -> web.StreamResponse:
        access = self._file_access(request, "write")
        metadata = parse_metadata_headers(request)
        user, raw_path = access.user, access.raw_path
        idle = limits_of(request).body_timeout
        try:
            if request.content_type == "multipart/form-data":
                reader = await request.multipart()
                if access.signed:
                    written = [await self._store_signed_part(user, raw_path, reader, metadata, idle)]
                else:
                    written = await self._store_parts(user, raw_path, reader, metadata, idle)
            elif not raw_path:
                return json_error(400, "the 'path' query parameter is required for octet-stream uploads")
            else:
                written = [await self._store(user, user.resolve(raw_path), _body_chunks(request, idle), metadata)]
        except BodyTimeout:
            return await body_timeout_response(request)
        except (_BadUpload, _UploadTooLarge, OSError, zlib.error, PathError, RequestPayloadError) as error:
            return upload_error(error, self.state.config.max_upload_bytes)
        return web.json_response(written)

    async def _store_signed_part(
        self, user: UserContext, raw_path: str, reader: MultipartReader, metadata: dict[str, str], idle: float
    ) -> JsonObject:
        """A signed upload: one `file` part, written to exactly the signed path (its filename is not
        looked at); any other part is refused (400)."""
        if not raw_path:
            raise _BadUpload("a signed upload needs the signed 'path'")
        part = await within(reader.next(), idle)
        if not isinstance(part, BodyPartReader) or part.name != "file":
            raise _BadUpload("a signed upload takes exactly one part, named 'file'")
        info = await self._store(user, user.resolve(raw_path), _part_chunks(part, idle), metadata)
        if await within(reader.next(), idle) is not None:
            raise _BadUpload(f"a signed upload takes exactly one file part (it wrote only {raw_path!r})")
        return info

    async def _store_parts(
        self, user: UserContext, raw_path: str, reader: MultipartReader, metadata: dict[str, str], idle: float
    ) -> list[JsonObject]:
        """Store each `file` part (other parts are skipped, as envd does): the one part at `raw_path`
        when given, else each at its filename, which must stay inside the user's home."""
        written: list[JsonObject] = []
        destinations: set[Path] = set()
        while True:
            part = await within(reader.next(), idle)
            if part is None:
                break
            if not isinstance(part, BodyPartReader) or part.name != "file":
                continue
            if raw_path and written:
                raise _BadUpload("with a 'path' query parameter an upload takes one file part")
            destination = user.resolve(raw_path) if raw_path else part_destination(user, part_filename(part))
            if destination in destinations:
                raise _BadUpload(f"two file parts name the same path '{destination}'")
            destinations.add(destination)
            written.append(await self._store(user, destination, _part_chunks(part, idle), metadata))
        if not written:
            raise _BadUpload("no 'file' part in the multipart body")
        return written

    async def _store(
        self, user: UserContext, path: Path, chunks: AsyncIterator[bytes], metadata: dict[str, str]
    ) -> JsonObject:
        loop = asyncio.get_running_loop()
        limit = self.state.config.max_upload_bytes
        # Written beside `path` and renamed over it when complete (uploadfile.py): an upload that
        # fails or is cut short leaves the file as it was.
        upload = await loop.run_in_executor(None, _open_for_write, path, user)
        try:
            size = 0
            async for chunk in chunks:
                size += len(chunk)
                if limit and size > limit:
                    raise _UploadTooLarge
                await loop.run_in_executor(None, upload.handle.write, chunk)
            await loop.run_in_executor(None, upload.handle.close)
            try:
                # Every upload replaces the file's metadata (none sent = cleared), as envd does.
                await loop.run_in_executor(None, write_metadata, upload.written, metadata)
            except OSError as error:
                if metadata:
                    raise OSError(error.errno, f"cannot store metadata: {error.strerror}") from error
            await loop.run_in_executor(None, upload.commit)
        except BaseException:
            upload.discard()  # here, not in a thread: it must run when the handler is cancelled too
            raise
        info: JsonObject = {"name": path.name, "type": "file", "path": str(path)}
        if metadata:
            info["metadata"] = metadata
        return info

    # -- RPC helpers ---------------------------------------------------------------------------

    def _user(self, request: web.Request) -> UserContext:
        try:
            return self.state.user(username_from_basic_auth(request.headers.get("Authorization")))
        except UserError as error:
            code = {400: "invalid_argument", 403: "permission_denied"}.get(error.status, "unauthenticated")
            raise ConnectError(code, str(error)) from error

    def _path(self, request: web.Request, message: JsonObject, name: str = "path") -> Path:
        raw = string_field(message, name)
        if not raw:
            raise ConnectError("invalid_argument", f"field {name!r} must not be empty")
        try:
            return self._user(request).resolve(raw)
        except PathError as error:
            raise ConnectError("invalid_argument", f"field {name!r}: {error}") from error

    def _process(self, message: JsonObject) -> ManagedProcess:
        kind, value = selector(message)
        return self.processes.find(kind, value)

    # -- process.Process ---------------------------------------------------------------------

    async def list_processes(self, request: web.Request, message: JsonObject) -> JsonObject:
        return {"processes": self.processes.running()}

    async def start(
        self, request: web.Request, message: JsonObject, deadline: float | None
    ) -> AsyncIterator[JsonObject]:
        config = message_field(message, "process")
        pty = field(message, "pty")
        pty_size: tuple[int, int] | None = None
        if isinstance(pty, dict):
            size = message_field(pty, "size")
            pty_size = (_window_field(size, "cols", 80), _window_field(size, "rows", 24))
        tag = field(message, "tag")
        stdin = field(message, "stdin")
        cwd = field(config, "cwd")
        envs = string_map_field(config, "envs")
        refusal = env_var_refusal(envs)
        if refusal is not None:
            raise ConnectError("invalid_argument", refusal)
        managed, queue = await self.processes.start(
            user=self._user(request),
            cmd=string_field(config, "cmd"),
            args=string_list_field(config, "args"),
            envs=envs,
            cwd=cwd if isinstance(cwd, str) and cwd else None,
            tag=tag if isinstance(tag, str) else None,
            pty_size=pty_size,
            # Absent means true for old SDKs (proto comment).
            stdin=True if stdin is None else bool(stdin),
        )
        # The stream's deadline (the SDK's `timeout`) bounds the command: when it passes, the command
        # is killed and counted as a timeout, like one stopped by SANDBOX_EXECUTION_TIMEOUT.
        killer: asyncio.TimerHandle | None = None
        if deadline is not None:
            budget = max(0.0, deadline - time.monotonic())
            killer = asyncio.get_running_loop().call_later(
                budget, managed.expire, f"the command's timeout ({budget:.3g}s, set by the client) expired"
            )
        try:
            yield {"event": {"start": {"pid": managed.pid}}}
            async for event in self._process_events(managed, queue, keepalive_interval(request), deadline):
                yield {"event": event}
        finally:
            managed.unsubscribe(queue)
            if killer is not None and managed.finished.is_set():
                killer.cancel()

    async def connect(
        self, request: web.Request, message: JsonObject, deadline: float | None
    ) -> AsyncIterator[JsonObject]:
        managed = self._process(message)
        queue = managed.subscribe()
        try:
            yield {"event": {"start": {"pid": managed.pid}}}
            async for event in self._process_events(managed, queue, keepalive_interval(request), deadline):
                yield {"event": event}
        finally:
            managed.unsubscribe(queue)

    async def _process_events(
        self,
        managed: ManagedProcess,
        queue: asyncio.Queue[JsonObject],
        keepalive: float,
        deadline: float | None,
    ) -> AsyncIterator[JsonObject]:
        while True:
            # Checked before every event, not only when the queue is empty: a command that writes
            # without pause must not outlive the stream's deadline either. Like E2B's envd (the
            # handler's context ends at Connect-Timeout-Ms), the stream then ends with
            # deadline_exceeded, which both SDKs raise as a timeout, never as a plain exit.
            if deadline is not None and time.monotonic() >= deadline:
                raise ConnectError("deadline_exceeded", "the command's timeout expired")
            try:
                event = queue.get_nowait()
            except asyncio.QueueEmpty:
                wait = keepalive
                if deadline is not None:
                    wait = min(wait, max(0.0, deadline - time.monotonic()))
                try:
                    event = await asyncio.wait_for(queue.get(), wait)
                except TimeoutError:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise ConnectError("deadline_exceeded", "the command's timeout expired") from None
                    yield {"keepalive": {}}
                    continue
            yield event
            if "end" in event:
                if managed.timed_out:
                    raise ConnectError("deadline_exceeded", event["end"].get("error", "execution timed out"))
                if deadline is not None and time.monotonic() >= deadline:
                    raise ConnectError("deadline_exceeded", "the command's timeout expired")
                return

    async def send_input(self, request: web.Request, message: JsonObject) -> JsonObject:
        managed = self._process(message)
        data = _input_bytes(message_field(message, "input"))
        if data is not None:
            await managed.write_input(data)
        return {}

    async def stream_input(self, request: web.Request, messages: AsyncIterator[JsonObject]) -> JsonObject:
        managed: ManagedProcess | None = None
        async for message in messages:
            if "start" in message:
                managed = self._process(message_field(message, "start"))
            elif "data" in message:
                if managed is None:
                    raise ConnectError("invalid_argument", "the first StreamInput message must be 'start'")
                data = _input_bytes(message_field(message_field(message, "data"), "input"))
                if data is not None:
                    await managed.write_input(data)
        if managed is None:
            raise ConnectError("invalid_argument", "StreamInput needs a 'start' message")
        return {}

    async def send_signal(self, request: web.Request, message: JsonObject) -> JsonObject:
        kind, value = selector(message)
        signum = enum_field(message, "signal", SIGNALS_BY_NAME)
        if signum not in (9, 15):
            raise ConnectError("invalid_argument", "signal must be SIGNAL_SIGKILL or SIGNAL_SIGTERM")
        # The whole process tree; a SIGKILL answers once nothing of it is left (commands.kill).
        await self.processes.send_signal(kind, value, signum)
        return {}

    async def update(self, request: web.Request, message: JsonObject) -> JsonObject:
        managed = self._process(message)
        pty = field(message, "pty")
        if isinstance(pty, dict):
            if managed.master_fd is None:
                raise ConnectError("invalid_argument", "the process has no PTY to resize")
            size = message_field(pty, "size")
            set_window_size(managed.master_fd, _window_field(size, "cols", 80), _window_field(size, "rows", 24))
        return {}

    async def close_stdin(self, request: web.Request, message: JsonObject) -> JsonObject:
        self._process(message).close_stdin()
        return {}

    # -- filesystem.Filesystem -----------------------------------------------------------------

    async def stat(self, request: web.Request, message: JsonObject) -> JsonObject:
        return await self.filesystem.stat(self._path(request, message))

    async def make_dir(self, request: web.Request, message: JsonObject) -> JsonObject:
        return await self.filesystem.make_dir(self._path(request, message), self._user(request))

    async def move(self, request: web.Request, message: JsonObject) -> JsonObject:
        source = self._path(request, message, "source")
        destination = self._path(request, message, "destination")
        return await self.filesystem.move(source, destination, self._user(request))

    async def list_dir(self, request: web.Request, message: JsonObject) -> JsonObject:
        depth = uint_field(message, "depth", 1, maximum=UINT32_MAX)
        return await self.filesystem.list_dir(self._path(request, message), depth)

    async def remove(self, request: web.Request, message: JsonObject) -> JsonObject:
        return await self.filesystem.remove(self._path(request, message))

    async def watch_dir(
        self, request: web.Request, message: JsonObject, deadline: float | None
    ) -> AsyncIterator[JsonObject]:
        events: asyncio.Queue[JsonObject] = asyncio.Queue()
        watch = self.filesystem.open_watch(
            self._path(request, message),
            bool_field(message, "recursive"),
            bool_field(message, "include_entry"),
            events.put_nowait,
        )
        keepalive = keepalive_interval(request)
        try:
            yield {"start": {}}
            while True:
                wait = keepalive
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        raise ConnectError("deadline_exceeded", "the watch's timeout expired")
                try:
                    yield {"filesystem": await asyncio.wait_for(events.get(), wait)}
                except TimeoutError:
                    yield {"keepalive": {}}
        finally:
            watch.close()

    async def create_watcher(self, request: web.Request, message: JsonObject) -> JsonObject:
        watcher_id = self.filesystem.create_watcher(
            self._path(request, message),
            bool_field(message, "recursive"),
            bool_field(message, "include_entry"),
        )
        return {"watcherId": watcher_id}

    async def get_watcher_events(self, request: web.Request, message: JsonObject) -> JsonObject:
        return {"events": self.filesystem.watcher_events(string_field(message, "watcher_id"))}

    async def remove_watcher(self, request: web.Request, message: JsonObject) -> JsonObject:
        self.filesystem.remove_watcher(string_field(message, "watcher_id"))
        return {}


class _UploadTooLarge(Exception):
    pass


class _NotRegularFile(OSError):
    """A download of a FIFO, socket or device: not a file (reading a FIFO would wait forever)."""


# OS errors that say the request named an impossible path (a file as a directory, a symlink loop):
# 400, not 500.
CLIENT_ERRNOS: Final = frozenset({errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EINVAL})
MAX_WINDOW_CELLS: Final = 0xFFFF  # TIOCSWINSZ takes unsigned shorts


def _window_field(size: JsonObject, name: str, default: int) -> int:
    return uint_field(size, name, default, maximum=MAX_WINDOW_CELLS)


def _http_error(status: int, message: str) -> web.HTTPException:
    """An HTTP error with the E2B body ({"code": int, "message"}) to raise from a /files helper."""
    body = json.dumps({"code": status, "message": message})
    if status == 400:
        return web.HTTPBadRequest(text=body, content_type="application/json")
    return web.HTTPUnauthorized(text=body, content_type="application/json")


def _init_refusal(body: JsonObject) -> str | None:
    """Why /init cannot take `body`, or None: nothing is applied unless all of it is valid."""
    env_vars = body.get("envVars")
    if env_vars is not None:
        if not isinstance(env_vars, dict):
            return "envVars must be a map of strings"
        refusal = env_var_refusal(env_vars)
        if refusal is not None:
            return f"envVars: {refusal}"
    for name in ("accessToken", "defaultUser", "defaultWorkdir"):
        value = body.get(name)
        if value is not None and not isinstance(value, str):
            return f"{name} must be a string"
    workdir = body.get("defaultWorkdir")
    if isinstance(workdir, str):
        try:
            check_path_text(workdir, "defaultWorkdir")
        except PathError as error:
            return str(error)
    return None


def part_filename(part: BodyPartReader) -> str | None:
    """A file part's filename as the client sent it: the SDKs put the destination path there. (aiohttp's
    own parser drops a leading `/`, which turned `/tmp/a.txt` into `~/tmp/a.txt`; the standard
    library's MIME parser keeps it, and decodes `filename*` too.)"""
    header = part.headers.get(hdrs.CONTENT_DISPOSITION)
    if header is None:
        return None
    message = email.message.Message()
    message[hdrs.CONTENT_DISPOSITION] = header
    return message.get_filename()


def part_destination(user: UserContext, filename: str | None) -> Path:
    """Where a multipart file part without a 'path' goes: its filename, resolved as a `path` would be
    (relative to the user's home, absolute as it is): what the user may write there, it may write
    either way, so a part is held to nothing a `path` is not."""
    if not filename:
        raise _BadUpload("a file part has no destination path (filename or 'path')")
    return user.resolve(filename)


class _BadUpload(Exception):
    """A multipart body the upload cannot store (400); its message says why."""


def upload_error(error: Exception, limit: int) -> web.Response:
    """The envd response for an upload that failed with `error` (`limit`: the upload cap in bytes)."""
    if isinstance(error, _BadUpload | PathError):
        return json_error(400, str(error))
    if isinstance(error, _UploadTooLarge):
        return json_error(413, f"upload exceeds the limit of {limit} bytes")
    if isinstance(error, IsADirectoryError):
        return json_error(400, f"path '{error.filename}' is a directory")
    if isinstance(error, PermissionError):
        return json_error(401, f"permission denied: '{error.filename}'")
    if isinstance(error, OSError):
        if error.errno == errno.ENOSPC:
            return json_error(507, "not enough disk space available")
        if error.errno in CLIENT_ERRNOS:
            return json_error(400, f"cannot write '{error.filename}': {error.strerror}")
        return json_error(500, f"error writing file: {error}")
    if isinstance(error, zlib.error):
        return json_error(400, f"invalid gzip body: {error}")
    if isinstance(error, RequestPayloadError):
        # aiohttp could not undo the body's Content-Encoding (not gzip/deflate data, or corrupt).
        return json_error(400, "invalid request body: its Content-Encoding could not be undone")
    raise error


def _input_bytes(process_input: JsonObject) -> bytes | None:
    for name in ("stdin", "pty"):
        if name in process_input:
            return decode_bytes(process_input[name], name)
    return None


def _open_regular_file(path: Path) -> IO[bytes]:
    """The file for reading; IsADirectoryError for a directory, _NotRegularFile for a FIFO, socket or
    device (opened non-blocking, so a FIFO without a writer cannot hold the thread)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(21, "is a directory", str(path))
        if not stat.S_ISREG(mode):
            raise _NotRegularFile(22, "not a regular file", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _open_for_write(path: Path, user: UserContext) -> UploadFile:
    if path.is_dir():
        raise IsADirectoryError(21, "is a directory", str(path))
    make_dirs_as(path.parent, user)
    return open_upload(path, user)


async def _part_chunks(part: BodyPartReader, idle: float) -> AsyncIterator[bytes]:
    """A part's bytes; BodyTimeout when the client pauses longer than `idle` s."""
    while True:
        chunk = await within(part.read_chunk(FILE_CHUNK), idle)
        if not chunk:
            return
        yield chunk


async def _body_chunks(request: web.Request, idle: float) -> AsyncIterator[bytes]:
    """The body's bytes; BodyTimeout when the client pauses longer than `idle` s. aiohttp already
    undoes Content-Encoding: gzip on request bodies (multipart ones too), in bounded steps under flow
    control, so a zip bomb grows no buffer: `_store` counts the decoded bytes against the upload cap
    (413). Data that is not gzip surfaces as RequestPayloadError (400, `upload_error`)."""
    while True:
        chunk = await read_chunk(request.content, idle, FILE_CHUNK)
        if not chunk:
            return
        yield chunk
