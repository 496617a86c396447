"""The session API: its pure decisions (session_logic) and its handlers over fake SessionOps."""

from __future__ import annotations

import ast
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sandbox_operator.agent.connect import FLAG_END_STREAM, EnvelopeDecoder, encode_envelope
from sandbox_operator.api.names import SESSION_LABEL
from sandbox_operator.gateway import e2b, session_logic
from sandbox_operator.gateway.session import Key, SessionOps, routes
from sandbox_operator.kube import ApiError

JSON = dict[str, Any]
GATEWAY = Path(e2b.__file__).resolve().parent
UID = "0b5a9d1e-3f3c-4b0e-9d8e-1f2a3b4c5d6e"


def sandbox(phase: str | None = "Running", **status: Any) -> JSON:
    return {
        "metadata": {"name": "session-chat-1", "namespace": "team-a", "uid": UID},
        "spec": {"template": "base"},
        "status": {"phase": phase, **status} if phase else {},
    }


# --- names and states ------------------------------------------------------------------------------


@pytest.mark.parametrize("session_id", ["a", "chat-1", "x" * 40, "0-0"])
def test_session_ids_name_the_sandbox(session_id: str) -> None:
    assert session_logic.session_name(session_id) == f"session-{session_id}"


@pytest.mark.parametrize("session_id", ["", "-a", "a-", "A", "a_b", "x" * 41, "a.b"])
def test_bad_session_ids_are_refused(session_id: str) -> None:
    with pytest.raises(e2b.Refused, match="a session id is") as refused:
        session_logic.session_name(session_id)
    assert refused.value.status == 400


@pytest.mark.parametrize(
    ("existing", "step"),
    [
        (None, session_logic.Ensure.CREATE),
        (sandbox("Error"), session_logic.Ensure.REPLACE),
        (sandbox("Terminated"), session_logic.Ensure.REPLACE),
        (sandbox("Suspended"), session_logic.Ensure.RESUME),
        (sandbox("Suspending"), session_logic.Ensure.RESUME),
        (sandbox("Creating"), session_logic.Ensure.SERVE),
        (sandbox("Running"), session_logic.Ensure.SERVE),
        (sandbox(None), session_logic.Ensure.SERVE),
    ],
)
def test_put_creates_replaces_resumes_or_serves(existing: JSON | None, step: session_logic.Ensure) -> None:
    assert session_logic.ensure_step(existing) is step


def test_the_session_manifest_is_named_and_labelled_after_the_session() -> None:
    manifest = session_logic.session_manifest(
        {"timeout": 60, "envVars": {"A": "1"}, "templateID": "ignored"},
        namespace="team-a",
        session_id="chat-1",
        templates={"base"},
    )
    assert manifest["metadata"]["name"] == "session-chat-1" and manifest["metadata"]["namespace"] == "team-a"
    assert manifest["metadata"]["labels"] == {SESSION_LABEL: "chat-1"}
    assert manifest["spec"]["template"] == "base" and manifest["spec"]["env"] == {"A": "1"}
    assert manifest["spec"]["timeouts"]["maxLifetime"] == "60s"
    aliased = session_logic.session_manifest(
        {"template": "code-interpreter-v1"}, namespace="n", session_id="s", templates={"code-interpreter"}
    )
    assert aliased["spec"]["template"] == "code-interpreter"


def test_an_unknown_template_is_refused_with_400() -> None:
    with pytest.raises(e2b.Refused, match="template 'gpu' not found") as refused:
        session_logic.session_manifest({"template": "gpu"}, namespace="n", session_id="s", templates={"base"})
    assert refused.value.status == 400
    with pytest.raises(e2b.Refused, match="template 'base' not found"):
        session_logic.session_manifest({}, namespace="n", session_id="s", templates=set())


def test_get_shows_any_sandbox_that_has_not_ended() -> None:
    assert session_logic.session_sandbox(sandbox("Suspended"), "s")["status"]["phase"] == "Suspended"
    for body in (None, sandbox("Terminated")):
        with pytest.raises(e2b.Refused, match="session s has no sandbox") as refused:
            session_logic.session_sandbox(body, "s")
        assert refused.value.status == 404


def test_calls_into_the_sandbox_need_it_running() -> None:
    running = sandbox("Running", podIP="10.0.0.7")
    assert session_logic.serving_sandbox(running, "s") is running
    deleting = {**running, "metadata": {**running["metadata"], "deletionTimestamp": "2026-12-01T10:00:00Z"}}
    for body in (None, sandbox("Error"), deleting):
        with pytest.raises(e2b.Refused, match="PUT it first") as missing:
            session_logic.serving_sandbox(body, "s")
        assert missing.value.status == 404
    for body, shown in (
        (sandbox("Suspended"), "Suspended"),
        (sandbox("Running"), "Running"),
        (sandbox(None), "starting"),
    ):
        with pytest.raises(e2b.Refused, match=f"is {shown}, not Running") as busy:
            session_logic.serving_sandbox(body, "s")
        assert busy.value.status == 409


def test_describe_is_the_e2b_detail_with_the_session() -> None:
    described = session_logic.describe("chat-1", sandbox("Running"), None, "tok")
    assert described["sessionID"] == "chat-1" and described["phase"] == "Running"
    assert described["envdAccessToken"] == "tok" and described["state"] == "running"


# --- commands --------------------------------------------------------------------------------------


def decoded(data: bytes) -> JSON:
    [(flags, message)] = list(EnvelopeDecoder(max_length=1 << 20).feed(data))
    assert flags == 0
    result: JSON = json.loads(message)
    return result


def test_a_command_runs_in_a_login_shell_with_its_deadline() -> None:
    data, headers = session_logic.command_request({"cmd": "echo hi", "cwd": "/tmp", "envs": {"A": "1"}})
    assert decoded(data) == {
        "process": {"cmd": "/bin/bash", "args": ["-l", "-c", "echo hi"], "envs": {"A": "1"}, "cwd": "/tmp"}
    }
    assert headers["Connect-Timeout-Ms"] == "60000" and headers["Connect-Protocol-Version"] == "1"
    _, unbounded = session_logic.command_request({"cmd": "sleep 1", "timeout": 0})
    assert "Connect-Timeout-Ms" not in unbounded


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ({}, e2b.Refused),
        ({"cmd": ""}, e2b.Refused),
        ({"cmd": ["ls"]}, e2b.Refused),
        ({"cmd": "ls", "envs": {"A": 1}}, e2b.BadRequest),
        ({"cmd": "ls", "timeout": -1}, e2b.BadRequest),
    ],
)
def test_bad_commands_are_refused(payload: JSON, error: type[Exception]) -> None:
    with pytest.raises(error):
        session_logic.command_request(payload)


def event(**body: Any) -> bytes:
    return encode_envelope(json.dumps({"event": body}).encode())


def output(stream: str, data: bytes) -> bytes:
    return event(data={stream: base64.b64encode(data).decode()})


def test_command_output_is_folded_into_the_result_across_chunks() -> None:
    stream = (
        event(start={"pid": 7})
        + output("stdout", b"hel")
        + output("stdout", b"lo\n")
        + output("stderr", b"warn\n")
        + event(end={"exitCode": 3, "error": "exit status 3"})
        + encode_envelope(b"{}", FLAG_END_STREAM)
    )
    folded = session_logic.CommandOutput()
    for cut in range(0, len(stream), 7):  # envelopes split anywhere
        folded.feed(stream[cut : cut + 7])
    assert folded.result() == {"exitCode": 3, "stdout": "hello\n", "stderr": "warn\n", "error": "exit status 3"}


def test_command_output_is_capped() -> None:
    folded = session_logic.CommandOutput()
    chunk = b"x" * (1 << 20)
    for _ in range(5):
        folded.feed(output("stdout", chunk))
    assert len(folded.stdout) == session_logic.MAX_OUTPUT_BYTES
    assert session_logic.CommandOutput().result()["exitCode"] == 0


@pytest.mark.parametrize(("code", "status"), [("deadline_exceeded", 504), ("internal", 502)])
def test_a_stream_ending_in_an_error_is_refused(code: str, status: int) -> None:
    end = encode_envelope(json.dumps({"error": {"code": code, "message": "m"}}).encode(), FLAG_END_STREAM)
    with pytest.raises(e2b.Refused, match=f"{code}: m") as refused:
        session_logic.CommandOutput().feed(end)
    assert refused.value.status == status


@pytest.mark.parametrize(("status", "answered"), [(400, 400), (404, 404), (401, 502), (415, 502), (500, 502)])
def test_an_agent_refusing_the_command_passes_on_refusals_of_the_request_only(status: int, answered: int) -> None:
    # A 400 is about what the client sent (the gateway only forwards it); its token or failures are not.
    refused = session_logic.command_failure(status, "bad")
    assert refused.status == answered and str(refused) == f"the agent answered {status}: bad"


# --- code ------------------------------------------------------------------------------------------


def test_code_cells_are_validated() -> None:
    assert session_logic.execute_request({"code": "1+1"}) == {"code": "1+1"}
    assert session_logic.execute_request({"code": "x", "language": "js"}) == {"code": "x", "language": "js"}
    with pytest.raises(e2b.Refused, match="'code' must be a string"):
        session_logic.execute_request({"code": 1})


def test_execute_lines_are_folded_into_the_result() -> None:
    folded = session_logic.CodeOutput()
    lines: list[JSON] = [
        {"type": "stdout", "text": "a"},
        {"type": "stdout", "text": "b"},
        {"type": "stderr", "text": "w"},
        {"type": "result", "text": "2", "is_main_result": True},
        {"type": "error", "name": "E", "value": "v", "traceback": "t", "extra": 1},
        {"type": "number_of_executions", "execution_count": 4},
        {"type": "unknown"},
    ]
    folded.feed(b"\n")
    for line in lines:
        folded.feed(json.dumps(line).encode() + b"\n")
    assert folded.result() == {
        "results": [{"text": "2", "is_main_result": True}],
        "stdout": "ab",
        "stderr": "w",
        "error": {"name": "E", "value": "v", "traceback": "t"},
        "executionCount": 4,
    }


@pytest.mark.parametrize(("status", "answered"), [(400, 400), (404, 404), (500, 502), (503, 502)])
def test_interpreter_refusals_pass_on_client_errors_only(status: int, answered: int) -> None:
    assert session_logic.execute_failure(status, "t").status == answered


# --- files -----------------------------------------------------------------------------------------


def test_files_need_a_path_and_carry_only_content_headers() -> None:
    assert session_logic.file_path({"path": "/a"}) == "/a"
    with pytest.raises(e2b.Refused, match="'path'"):
        session_logic.file_path({})
    assert session_logic.file_request_headers("GET", "gzip") == {"Accept-Encoding": "gzip"}
    assert session_logic.file_request_headers("POST", "identity")["Content-Type"] == "application/octet-stream"
    kept = session_logic.file_response_headers(
        {"Content-Type": "text/plain", "Server": "envd", "Content-Encoding": "gzip"}
    )
    assert kept == {"Content-Type": "text/plain", "Content-Encoding": "gzip"}


# --- the handlers, over fake operations ------------------------------------------------------------


class FakeGateway:
    """The operations SessionOps names, recording what the handlers asked for."""

    def __init__(self, existing: JSON | None = None, *, create_conflicts: bool = False) -> None:
        self.sandboxes: dict[Key, JSON] = {} if existing is None else {("team-a", "session-chat-1"): existing}
        self.create_conflicts = create_conflicts
        self.calls: list[tuple[Any, ...]] = []

    def ops(self) -> SessionOps:
        def namespace_of(request: web.Request) -> str:
            if request.headers.get("X-API-KEY") != "key":
                raise e2b.Refused(401, "missing or unknown API key (X-API-KEY)")
            return "team-a"

        async def create_sandbox(namespace: str, manifest: JSON) -> None:
            self.calls.append(("create", namespace, manifest["metadata"]["name"]))
            if self.create_conflicts:
                raise ApiError(409, {"message": "exists"}, "POST", "/")
            self.sandboxes[(namespace, manifest["metadata"]["name"])] = {**manifest, "status": {"phase": "Creating"}}

        async def set_suspended(namespace: str, name: str, suspended: bool) -> None:
            self.calls.append(("suspended", name, suspended))

        async def delete_sandbox(namespace: str, name: str, *, wait: bool) -> bool:
            self.calls.append(("delete", name, wait))
            return self.sandboxes.pop((namespace, name), None) is not None

        async def until_serving(key: Key, *, delete_on_failure: bool) -> JSON:
            self.calls.append(("until_serving", key, delete_on_failure))
            body = self.sandboxes.get(key) or sandbox()
            return {**body, "metadata": {**body["metadata"], "uid": UID}, "status": {"phase": "Running"}}

        def upstream() -> Any:
            raise AssertionError("no agent call expected")

        return SessionOps(
            namespace_of=namespace_of,
            sandbox=self.sandboxes.get,
            templates=lambda: {"base": {"metadata": {"name": "base"}, "spec": {"image": "i"}}},
            token_of=lambda body: "tok",
            create_sandbox=create_sandbox,
            set_suspended=set_suspended,
            delete_sandbox=delete_sandbox,
            until_serving=until_serving,
            upstream=upstream,
            agent_headers=lambda body: {"X-Access-Token": "agent-tok"},
        )


@web.middleware
async def refusals(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """What the gateway's middleware does with a refusal, enough for these tests."""
    try:
        return await handler(request)
    except e2b.Refused as refused:
        return web.json_response({"code": refused.status, "message": str(refused)}, status=refused.status)


@contextlib.asynccontextmanager
async def serve(fake: FakeGateway) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    app = web.Application(middlewares=[refusals])
    for method, path, handler in routes(fake.ops()):
        app.router.add_route(method, path, handler)
    async with TestClient(TestServer(app)) as client:
        yield client


URL = "/api/v1/session/chat-1/sandbox"
KEY = {"X-API-KEY": "key"}


async def put(fake: FakeGateway, body: JSON | None = None) -> tuple[int, JSON]:
    async with serve(fake) as client:
        response = await client.put(URL, json=body or {}, headers=KEY)
        return response.status, await response.json()


async def test_put_creates_a_missing_sandbox_and_deletes_it_again_on_failure() -> None:
    fake = FakeGateway()
    status, body = await put(fake, {"timeout": 60})
    assert status == 201 and body["sessionID"] == "chat-1" and body["envdAccessToken"] == "tok"
    assert fake.calls == [
        ("create", "team-a", "session-chat-1"),
        ("until_serving", ("team-a", "session-chat-1"), True),
    ]


async def test_put_replaces_an_ended_sandbox() -> None:
    fake = FakeGateway(sandbox("Error"))
    status, _ = await put(fake)
    assert status == 201
    assert [call[0] for call in fake.calls] == ["delete", "create", "until_serving"]
    assert fake.calls[0] == ("delete", "session-chat-1", True)  # gone before the new one is made


async def test_put_resumes_a_paused_sandbox_and_serves_a_running_one() -> None:
    paused = FakeGateway(sandbox("Suspended"))
    assert (await put(paused))[0] == 200
    assert paused.calls[0] == ("suspended", "session-chat-1", False)
    running = FakeGateway(sandbox("Running"))
    assert (await put(running))[0] == 200
    assert running.calls == [("until_serving", ("team-a", "session-chat-1"), False)]


async def test_put_serves_the_sandbox_a_concurrent_put_created() -> None:
    fake = FakeGateway(create_conflicts=True)
    status, _ = await put(fake)
    assert status == 200 and fake.calls[-1] == ("until_serving", ("team-a", "session-chat-1"), False)


async def test_put_with_an_unknown_template_creates_nothing() -> None:
    fake = FakeGateway()
    status, body = await put(fake, {"template": "gpu"})
    assert status == 400 and body["message"] == "template 'gpu' not found" and fake.calls == []


async def test_get_and_delete_answer_404_without_a_sandbox() -> None:
    async with serve(FakeGateway()) as client:
        assert (await client.get(URL, headers=KEY)).status == 404
        assert (await client.delete(URL, headers=KEY)).status == 404
        assert (await client.get(URL)).status == 401
        assert (await client.post(URL + "/commands", json={"cmd": "ls"}, headers=KEY)).status == 404
    async with serve(FakeGateway(sandbox("Running"))) as client:
        assert (await client.delete(URL, headers=KEY)).status == 204


# --- boundaries ------------------------------------------------------------------------------------


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_session_api_does_not_know_the_gateway() -> None:
    assert "sandbox_operator.gateway.server" not in imported_modules(GATEWAY / "session.py")


@pytest.mark.parametrize("module", ["e2b.py", "session_logic.py"])
def test_the_decisions_are_pure(module: str) -> None:
    io = {"aiohttp", "asyncio", "sandbox_operator.kube", "sandbox_operator.gateway.cache"}
    assert not {name for name in imported_modules(GATEWAY / module) if name.split(".")[0] in io or name in io}
