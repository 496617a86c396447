"""Bounded input (docs/gateway.md "Threat model"): what an API-key holder or a sandbox's agent sends
is bounded in size, parsed without 5xx, and file bodies stream through the gateway unbuffered.

The pure parts are tested directly; the handlers through the real Gateway application over the
in-memory API (tests/fakeapi.py) and a fake agent the gateway's HTTP client is redirected to.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.payload import AsyncIterablePayload
from aiohttp.test_utils import TestClient, TestServer

from fakeapi import FakeApi, upstream_to
from sandbox_operator.agent.connect import ENVELOPE_HEADER, FLAG_END_STREAM, encode_envelope
from sandbox_operator.gateway import e2b, session_logic
from sandbox_operator.gateway.http import MAX_JSON_BYTES
from sandbox_operator.gateway.server import Gateway, GatewayConfig

JSON = dict[str, Any]
API_KEY = "e2b_" + "a" * 40
KEY = {"X-API-KEY": API_KEY}
NAMESPACE = "team-a"
SANDBOX_ID = "sbxlimits1"
SESSION = "/api/v1/session/chat-1/sandbox"
MiB = 1 << 20


# --- pure: request parsing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [b"[" * 100_000, b'{"a":' * 100_000, b"\xff\xfe{}", b"{", b"nul", b'{"t": ' + b"9" * 5000 + b"}"],
)
def test_bodies_that_are_not_json_are_bad_requests(raw: bytes) -> None:
    with pytest.raises(e2b.BadRequest, match="must be JSON"):
        e2b.parse_json_object(raw)


def test_a_body_must_be_an_object_and_may_be_empty() -> None:
    assert e2b.parse_json_object(b"") == {} and e2b.parse_json_object(b" \n") == {}
    assert e2b.parse_json_object(b'{"a": 1}') == {"a": 1}
    for raw in (b"[]", b"null", b"1", b'"x"'):
        with pytest.raises(e2b.BadRequest, match="JSON object"):
            e2b.parse_json_object(raw)


@pytest.mark.parametrize("value", [10**10, e2b.MAX_TIMEOUT_S + 1, -1, 1e10, float("nan"), True, "60"])
def test_timeouts_are_bounded_integers(value: Any) -> None:
    with pytest.raises(e2b.BadRequest, match=f"from 0 to {e2b.MAX_TIMEOUT_S}"):
        e2b.seconds(value, "timeout")
    assert e2b.seconds(e2b.MAX_TIMEOUT_S, "timeout") == e2b.MAX_TIMEOUT_S
    # The longest timeout still fits the CRD's duration grammar and Connect-Timeout-Ms.
    assert len(str(e2b.MAX_TIMEOUT_S)) <= 9 and len(str(e2b.MAX_TIMEOUT_S * 1000)) <= 10


@pytest.mark.parametrize(
    "request_body",
    [
        {"envVars": {"A": "x\x00y"}},
        {"metadata": {"a\x00": "b"}},
        {"network": {"allowOut": 5}},
        {"network": {"allowOut": [1]}},
        {"network": {"denyOut": "0.0.0.0/0"}},
    ],
)
def test_create_refuses_nul_bytes_and_malformed_lists(request_body: JSON) -> None:
    with pytest.raises(e2b.BadRequest):
        e2b.sandbox_from_request({"templateID": "base", **request_body}, namespace="n", template="base")


@pytest.mark.parametrize(
    "payload",
    [
        {"cmd": "ls\x00"},
        {"cmd": "ls", "cwd": "/tmp\x00"},
        {"cmd": "ls", "cwd": ["a"]},
        {"cmd": "ls", "cwd": "a" * 5000},
        {"cmd": "ls", "timeout": 10**10},
        {"cmd": "ls", "envs": {"A": "\x00"}},
    ],
)
def test_commands_refuse_what_the_sandbox_could_not_take(payload: JSON) -> None:
    with pytest.raises(e2b.BadRequest):
        session_logic.command_request(payload)


def test_file_paths_refuse_nul_bytes_and_overlong_paths() -> None:
    for path in ("a\x00b", "a" * (session_logic.MAX_PATH_BYTES + 1)):
        with pytest.raises(e2b.BadRequest, match="path"):
            session_logic.file_path({"path": path})
    with pytest.raises(e2b.BadRequest, match="language"):
        session_logic.execute_request({"code": "1", "language": ["python"]}, session_logic.SessionLimits())


@pytest.mark.parametrize(
    "sample", [[1], "x", {"ts": "soon"}, {"ts": 10**20}, {"cpu_count": [1]}, {"cpu_used_pct": float("nan")}]
)
def test_metrics_the_agent_garbles_are_value_errors(sample: Any) -> None:
    with pytest.raises(ValueError, match="metrics"):
        e2b.metric_from_agent(sample)


# --- pure: agent output ----------------------------------------------------------------------------


def line(kind: str, **fields: Any) -> bytes:
    return json.dumps({"type": kind, **fields}).encode() + b"\n"


def test_code_output_is_collected_in_linear_time_and_capped() -> None:
    folded = session_logic.CodeOutput()
    message = line("stdout", text="x" * 255)
    started = time.perf_counter()
    for _ in range(40_000):  # 10 MiB in small messages: a quadratic fold takes minutes
        folded.feed(message)
    result = folded.result()
    assert time.perf_counter() - started < 5
    marker = session_logic.TRUNCATED_MARKER.format(limit=session_logic.MAX_OUTPUT_BYTES)
    assert result["stdout"].endswith(marker) and len(result["stdout"]) == session_logic.MAX_OUTPUT_BYTES + len(marker)
    assert result["truncated"] == ["stdout"]


def test_code_output_takes_lines_split_anywhere_and_longer_than_any_read_buffer() -> None:
    stream = line("stdout", text="a" * (3 * MiB)) + line("result", text="2") + line("stdout", text="b")
    folded = session_logic.CodeOutput()
    for cut in range(0, len(stream), 65_536):
        folded.feed(stream[cut : cut + 65_536])
    result = folded.result()
    assert result["stdout"] == "a" * (3 * MiB) + "b" and result["results"] == [{"text": "2"}]
    assert "truncated" not in result


def test_an_overlong_line_is_dropped_and_said_so() -> None:
    folded = session_logic.CodeOutput()
    huge = line("stdout", text="z" * (session_logic.MAX_MESSAGE_BYTES + 1))
    for cut in range(0, len(huge), MiB):
        folded.feed(huge[cut : cut + MiB])
    folded.feed(line("stdout", text="after"))
    folded.feed(b'{"type": "stderr", "text": "no newline"}')
    result = folded.result()
    assert result["stdout"] == "after" and result["stderr"] == "no newline" and result["truncated"] == ["messages"]


@pytest.mark.parametrize("raw", [b"not json\n", b"[1]\n", b'{"type": "stdout", "text": 5}\n', b"[" * 100_000 + b"\n"])
def test_garbled_execute_lines_are_a_bad_gateway(raw: bytes) -> None:
    with pytest.raises(e2b.Refused, match="malformed") as refused:
        session_logic.CodeOutput().feed(raw)
    assert refused.value.status == 502


def envelope(message: Any, flags: int = 0) -> bytes:
    return encode_envelope(json.dumps(message).encode(), flags)


def test_command_output_over_the_cap_is_marked_truncated() -> None:
    folded = session_logic.CommandOutput()
    chunk = base64.b64encode(b"y" * MiB).decode()
    for _ in range(6):
        folded.feed(envelope({"event": {"data": {"stdout": chunk}}}))
    folded.feed(envelope({"event": {"end": {"exitCode": 0}}}))
    result = folded.result()
    assert result["truncated"] == ["stdout"] and result["stdout"].endswith("bytes]\n")


@pytest.mark.parametrize(
    "stream",
    [
        envelope([1]),
        envelope({"event": {"data": {"stdout": "!!notbase64"}}}),
        envelope({"event": "x"}),
        encode_envelope(b"{", 0),
        ENVELOPE_HEADER.pack(0, session_logic.MAX_MESSAGE_BYTES + 1) + b"x",  # announces a message too long
    ],
)
def test_garbled_command_streams_are_a_bad_gateway(stream: bytes) -> None:
    with pytest.raises(e2b.Refused, match="malformed") as refused:
        session_logic.CommandOutput().feed(stream)
    assert refused.value.status == 502


@pytest.mark.parametrize(
    ("code", "status"),
    [("invalid_argument", 400), ("not_found", 404), ("deadline_exceeded", 408), ("internal", 502), ("x", 502)],
)
def test_stream_errors_about_the_request_are_the_clients(code: str, status: int) -> None:
    end = envelope({"error": {"code": code, "message": "cwd '/nope' does not exist"}}, FLAG_END_STREAM)
    with pytest.raises(e2b.Refused, match=f"{code}: cwd '/nope' does not exist") as refused:
        session_logic.CommandOutput().feed(end)
    assert refused.value.status == status


# --- the handlers: the real application, a fake agent ----------------------------------------------


@dataclass
class FakeAgent:
    """The agent's endpoints the gateway calls, answering what a test sets."""

    start: bytes = b""  # the Process.Start stream
    execute: bytes = b""  # the /execute lines
    metrics: bytes = b"{}"
    download_size: int = 0
    uploaded: list[int] = field(default_factory=list)  # bytes received per upload
    calls: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/process.Process/Start", self._stream(lambda: self.start))
        app.router.add_post("/execute", self._stream(lambda: self.execute))
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        app.router.add_get("/files", self._download)
        app.router.add_post("/files", self._upload)
        return app

    def _stream(self, body: Callable[[], bytes]) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def serve(request: web.Request) -> web.StreamResponse:
            self.calls.append(request.path)
            await request.read()
            response = web.StreamResponse()
            await response.prepare(request)
            data = body()
            for cut in range(0, len(data), 256 << 10):
                await response.write(data[cut : cut + (256 << 10)])
            await response.write_eof()
            return response

        return serve

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self.metrics, content_type="application/json")

    async def _health(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=204)

    async def _download(self, request: web.Request) -> web.StreamResponse:
        self.calls.append("download")
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = self.download_size
        await response.prepare(request)
        chunk = b"d" * (64 << 10)
        for sent in range(0, self.download_size, len(chunk)):
            await response.write(chunk[: self.download_size - sent])
        await response.write_eof()
        return response

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        self.calls.append("upload")
        size = 0
        async for chunk in request.content.iter_chunked(64 << 10):
            size += len(chunk)
        self.uploaded.append(size)
        return web.json_response([{"name": "f", "type": "file", "path": request.query["path"]}])


def running(name: str, sandbox_id: str) -> JSON:
    return {
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "uid": f"uid-{name}",
            "creationTimestamp": "2026-12-01T10:00:00Z",
            "resourceVersion": "1",
            "generation": 1,
        },
        "spec": {"template": "base", "timeouts": {"maxLifetime": "300s", "idle": "0"}},
        "status": {"phase": "Running", "podIP": "10.255.0.9", "sandboxID": sandbox_id, "observedGeneration": 1},
    }


@dataclass
class Served:
    client: TestClient[web.Request, web.Application]
    api: FakeApi
    agent: FakeAgent


@contextlib.asynccontextmanager
async def serve(*, max_upload_bytes: int = 1 << 30) -> AsyncIterator[Served]:
    agent = FakeAgent()
    api = FakeApi()
    gateway = Gateway(api, GatewayConfig(token_key=b"k" * 32, create_timeout=0.5, max_body_bytes=max_upload_bytes))
    gateway.cache.api_keys[e2b.api_key_digest(API_KEY)] = NAMESPACE
    gateway.cache.templates["base"] = {"metadata": {"name": "base"}, "spec": {"image": "i"}}
    gateway.cache.observe(running("e2b-limits", SANDBOX_ID))
    gateway.cache.observe(running("session-chat-1", "sbxsession1"))
    app = gateway.app()
    app.on_startup.clear()  # no watches: the cache is filled above
    app.on_cleanup.clear()
    async with TestServer(agent.app()) as agent_server, TestClient(TestServer(app)) as client:
        gateway._upstream = upstream_to(agent_server.port)  # every pod is the fake
        try:
            yield Served(client, api, agent)
        finally:
            await gateway._upstream.close()


async def test_a_json_body_over_the_cap_is_refused_before_it_is_read() -> None:
    body = json.dumps({"templateID": "x" * (2 * MiB)}).encode()

    async def chunked() -> AsyncIterator[bytes]:
        for cut in range(0, len(body), 64 << 10):
            yield body[cut : cut + (64 << 10)]

    async with serve() as served:
        for data in (body, chunked()):  # with a Content-Length, and without one
            response = await served.client.post("/v2/sandboxes", data=data, headers=KEY)
            assert response.status == 413
            assert await response.json() == {
                "code": 413,
                "message": f"a JSON request body may be at most {MAX_JSON_BYTES} bytes",
            }
        assert served.api.log == []


# Every JSON route, and bodies that are bad for it: each must be a 4xx with a message, and write nothing.
GENERIC_BAD_BODIES = [
    b"[" * 100_000,
    b'{"a":' * 100_000,
    b'{"timeout": ' + b"[" * 50_000 + b"}",
    b"\xff\xfe\x00{",
    b"[]",
    b"null",
    b'"text"',
    b"{",
    b'{"timeout": ' + b"9" * 5000 + b"}",
    b'{"timeout": 10000000000}',
    b'{"timeout": 1e400}',
    b'{"timeout": NaN}',
    b'{"timeout": -1}',
    b'{"timeout": "60"}',
]
ROUTE_BAD_BODIES: dict[tuple[str, str], list[JSON]] = {
    ("POST", "/v2/sandboxes"): [
        {"templateID": "base", "timeout": 10**10},
        {"templateID": "base", "envVars": {"A": "\x00"}},
        {"templateID": "base", "metadata": {"k": "\x00"}},
        {"templateID": "base", "network": {"allowOut": 5}},
        {"templateID": "base", "network": {"denyOut": 5}},
        {"templateID": ["base"]},
        {"templateID": {"a": 1}},
    ],
    ("POST", "/sandboxes"): [{"templateID": "base", "timeout": 10**10}],
    ("POST", f"/sandboxes/{SANDBOX_ID}/timeout"): [{"timeout": 10**10}, {}],
    ("POST", f"/v2/sandboxes/{SANDBOX_ID}/connect"): [{"timeout": 10**10}],
    ("POST", f"/sandboxes/{SANDBOX_ID}/resume"): [{"timeout": [1]}],
    ("POST", "/api/v1/session/fuzz/sandbox/start"): [{"sandbox_type": 5}, {"template_id": 5}, {"sandbox_type": "x"}],
    ("POST", f"{SESSION}/commands"): [
        {"cmd": "ls\x00"},
        {"cmd": "ls", "cwd": "/tmp\x00"},
        {"cmd": "ls", "cwd": {"a": 1}},
        {"cmd": "ls", "timeout": 10**10},
        {"cmd": "ls", "envs": ["A=1"]},
        {"cmd": 5},
    ],
    ("POST", f"{SESSION}/execute"): [{"code": 5}, {"code": "1", "language": ["py"]}, {"code": "x", "timeout": "1"}],
    ("POST", f"{SESSION}/install"): [{"packages": "six"}, {"packages": ["-e", "."]}, {"packages": []}],
}


async def test_bad_bodies_on_every_json_route_are_4xx_and_write_nothing() -> None:
    failures = []
    async with serve() as served:
        # Should a bad command reach the agent, it refuses it as a server error would.
        served.agent.start = envelope({"error": {"code": "internal", "message": "boom"}}, FLAG_END_STREAM)
        for (method, path), bodies in ROUTE_BAD_BODIES.items():
            for raw in [*GENERIC_BAD_BODIES, *(json.dumps(body).encode() for body in bodies)]:
                response = await served.client.request(method, path, data=raw, headers=KEY)
                answer = await response.json() if response.content_type == "application/json" else None
                # Each API's error shape: E2B's {"code", "message"}, the session API's {"detail"}.
                reason = (answer or {}).get("detail" if path.startswith("/api/v1/session/") else "message")
                if not 400 <= response.status < 500 or not reason:
                    failures.append(f"{method} {path} {raw[:60]!r}: {response.status} {answer}")
        assert failures == [], "\n".join(failures)
        assert served.api.log == []  # nothing half-created
        assert served.agent.calls == []  # refused before any agent call


async def test_a_bad_cwd_is_the_agents_reason_with_a_4xx() -> None:
    async with serve() as served:
        reason = "cwd '/nope' does not exist or is not a directory"
        served.agent.start = envelope({"error": {"code": "invalid_argument", "message": reason}}, FLAG_END_STREAM)
        response = await served.client.post(f"{SESSION}/commands", json={"cmd": "ls", "cwd": "/nope"}, headers=KEY)
        assert response.status == 400 and (await response.json())["detail"] == f"invalid_argument: {reason}"


async def test_code_output_with_a_message_longer_than_the_read_buffer() -> None:
    async with serve() as served:
        served.agent.execute = line("stdout", text="o" * (3 * MiB)) + line("result", text="42")
        response = await served.client.post(f"{SESSION}/execute", json={"code": "print('o' * 3 << 20)"}, headers=KEY)
        assert response.status == 200
        result = await response.json()
        assert result["output"] == "o" * (3 * MiB) and result["success"] is True


async def test_code_output_over_the_cap_is_truncated_with_a_marker() -> None:
    async with serve() as served:
        served.agent.execute = line("stderr", text="e" * (3 * MiB)) * 2
        response = await served.client.post(f"{SESSION}/execute", json={"code": "x"}, headers=KEY)
        result = await response.json()
        assert response.status == 200 and result["truncated"] == ["stderr"]
        assert result["output"].endswith(session_logic.TRUNCATED_MARKER.format(limit=session_logic.MAX_OUTPUT_BYTES))


@pytest.mark.parametrize("metrics", [b"[1]", b'{"ts": "soon"}', b"[" * 100_000, b'{"a": "' + b"x" * (2 * MiB) + b'"}'])
async def test_metrics_the_agent_garbles_are_no_sample(metrics: bytes) -> None:
    async with serve() as served:
        served.agent.metrics = metrics
        response = await served.client.get(f"/sandboxes/{SANDBOX_ID}/metrics", headers=KEY)
        assert response.status == 200 and await response.json() == []


async def traced_peak(call: Callable[[], Awaitable[None]]) -> int:
    """The peak of Python allocations while `call` runs (the gateway, the fake agent and the client
    share this process: all of them stream, so a whole-file buffer anywhere shows)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        baseline = tracemalloc.get_traced_memory()[0]
        await call()
        return tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()


def form(content: bytes | AsyncIterator[bytes]) -> aiohttp.MultipartWriter:
    """A multipart/form-data body with the file as its `file` field (an async iterator goes chunked)."""
    writer = aiohttp.MultipartWriter("form-data")
    payload = aiohttp.get_payload(content) if isinstance(content, bytes) else AsyncIterablePayload(content)
    payload.set_content_disposition("form-data", name="file", filename="big")
    writer.append_payload(payload)
    return writer


async def test_session_files_stream_both_ways() -> None:
    size = 32 * MiB
    async with serve() as served:
        served.agent.download_size = size

        async def download() -> None:
            response = await served.client.get(f"{SESSION}/download", params={"path": "/big"}, headers=KEY)
            assert response.status == 200 and response.content_length == size
            assert response.headers["Content-Disposition"] == 'attachment; filename="big"'
            received = 0
            async for chunk in response.content.iter_chunked(64 << 10):
                received += len(chunk)
            assert received == size

        async def upload() -> None:
            async def body() -> AsyncIterator[bytes]:
                chunk = b"u" * (64 << 10)
                for _ in range(size // len(chunk)):
                    yield chunk

            response = await served.client.post(f"{SESSION}/upload", data=form(body()), headers=KEY)
            assert response.status == 200 and await response.json() == {"path": "/home/user/upload/big"}

        assert await traced_peak(download) < 8 * MiB
        assert await traced_peak(upload) < 8 * MiB
        assert served.agent.uploaded == [size]


async def test_an_upload_over_the_limit_is_413() -> None:
    async with serve(max_upload_bytes=MiB) as served:
        url = f"{SESSION}/upload"
        response = await served.client.post(url, data=form(b"x" * (MiB + 1)), headers=KEY)
        assert response.status == 413 and "an upload may be at most" in (await response.json())["detail"]
        assert served.agent.calls == []  # refused on its Content-Length, before the agent is called

        async def chunked() -> AsyncIterator[bytes]:
            for _ in range(32):
                yield b"x" * (64 << 10)

        response = await served.client.post(url, data=form(chunked()), headers=KEY)
        assert response.status == 413


async def test_session_file_paths_with_nul_bytes_are_400() -> None:
    async with serve() as served:
        response = await served.client.get(f"{SESSION}/download", params={"path": "a\x00b"}, headers=KEY)
        assert response.status == 400 and "NUL" in (await response.json())["detail"]
        assert served.agent.calls == []
