"""The session API: its pure decisions (session_logic) and its handlers over fake SessionOps."""

from __future__ import annotations

import ast
import base64
import contextlib
import json
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sandbox_operator.agent.connect import FLAG_END_STREAM, EnvelopeDecoder, encode_envelope
from sandbox_operator.api import SandboxSpec
from sandbox_operator.api.names import (
    ENVD_PORT,
    EXECUTION_TIMEOUT_PREFIX,
    INTERPRETER_PORT,
    SESSION_LABEL,
    SESSION_TYPE_ANNOTATION,
)
from sandbox_operator.gateway import e2b, session_logic
from sandbox_operator.gateway.server import error_response
from sandbox_operator.gateway.session import Key, SessionOps, routes

JSON = dict[str, Any]
GATEWAY = Path(e2b.__file__).resolve().parent
UID = "0b5a9d1e-3f3c-4b0e-9d8e-1f2a3b4c5d6e"


def sandbox(phase: str | None = "Running", **status: Any) -> JSON:
    return {
        "metadata": {"name": "session-chat-1", "namespace": "team-a", "uid": UID},
        "spec": {"template": "base"},
        "status": {"phase": phase, **status} if phase else {},
    }


# --- names, requests and states -------------------------------------------------------------------


@pytest.mark.parametrize("session_id", ["a", "chat-1", "x" * 40, "0-0"])
def test_session_ids_name_the_sandbox(session_id: str) -> None:
    assert session_logic.session_name(session_id) == f"session-{session_id}"


@pytest.mark.parametrize("session_id", ["", "-a", "a-", "A", "a_b", "x" * 41, "a.b"])
def test_bad_session_ids_are_refused(session_id: str) -> None:
    with pytest.raises(e2b.Refused, match="a session id is") as refused:
        session_logic.session_name(session_id)
    assert refused.value.status == 400


LIMITS = session_logic.SessionLimits()


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({}, ("code_interpreter", "code-interpreter")),
        ({"sandbox_type": "code_interpreter"}, ("code_interpreter", "code-interpreter")),
        ({"sandbox_type": "custom"}, ("custom", "base")),
        ({"sandbox_type": "custom", "template_id": "gpu"}, ("custom", "gpu")),
        ({"sandbox_type": "code_interpreter", "template_id": "ci-2"}, ("code_interpreter", "ci-2")),
    ],
)
def test_start_requests_name_a_type_and_a_template(payload: JSON, expected: tuple[str, str]) -> None:
    assert session_logic.start_request(payload, LIMITS) == expected


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"sandbox_type": "jupyter"}, "sandbox_type must be 'code_interpreter' or 'custom', not 'jupyter'"),
        ({"sandbox_type": 3}, "sandbox_type must be"),
        ({"template_id": ""}, "template_id must be a non-empty string"),
        ({"template_id": ["a"]}, "template_id must be a non-empty string"),
    ],
)
def test_bad_start_requests_are_400(payload: JSON, message: str) -> None:
    with pytest.raises(e2b.Refused, match=re.escape(message)) as refused:
        session_logic.start_request(payload, LIMITS)
    assert refused.value.status == 400


def template(**spec: Any) -> JSON:
    return {"metadata": {"name": "t"}, "spec": {"image": "i", **spec}}


def manifest(templates: dict[str, JSON], wanted: str = "code-interpreter", **limits: Any) -> JSON:
    return session_logic.session_manifest(
        namespace="team-a",
        session_id="chat-1",
        sandbox_type=session_logic.SandboxType.CODE_INTERPRETER,
        wanted=wanted,
        templates=templates,
        limits=session_logic.SessionLimits(**limits),
    )


def test_the_session_sandbox_keeps_the_session_timeouts_and_suspends_when_idle() -> None:
    made = manifest({"code-interpreter": template()})
    assert made["metadata"]["name"] == "session-chat-1" and made["metadata"]["namespace"] == "team-a"
    assert made["metadata"]["labels"] == {SESSION_LABEL: "chat-1"}
    assert made["metadata"]["annotations"][SESSION_TYPE_ANNOTATION] == "code_interpreter"
    assert made["spec"]["timeouts"] == {"maxLifetime": "3600s", "idle": "1800s", "execution": "300s"}
    assert made["spec"]["onIdle"] == "suspend" and made["spec"]["template"] == "code-interpreter"
    SandboxSpec.model_validate(made["spec"])  # what the CRD's model accepts
    configured = manifest({"code-interpreter": template()}, execution_s=20, idle_s=60, lifetime_s=120)
    assert configured["spec"]["timeouts"] == {"maxLifetime": "120s", "idle": "60s", "execution": "20s"}


def test_a_template_lifetime_limit_caps_every_session_timeout() -> None:
    capped = manifest({"code-interpreter": template(timeouts={"maxLifetimeLimit": "10m"})})
    assert capped["spec"]["timeouts"] == {"maxLifetime": "600s", "idle": "600s", "execution": "300s"}
    SandboxSpec.model_validate(capped["spec"])


def test_an_unknown_or_forbidden_template_is_refused() -> None:
    with pytest.raises(e2b.Refused, match="template 'gpu' not found") as missing:
        manifest({"base": template()}, wanted="gpu")
    assert missing.value.status == 400
    with pytest.raises(e2b.Refused, match="allowedNamespaces") as forbidden:
        manifest({"code-interpreter": template(allowedNamespaces=["other"])})
    assert forbidden.value.status == 403


def deleting(body: JSON) -> JSON:
    return {**body, "metadata": {**body["metadata"], "deletionTimestamp": "2026-12-01T10:00:00Z"}}


@pytest.mark.parametrize(
    ("existing", "step"),
    [
        (None, session_logic.Ensure.CREATE),
        (sandbox("Error"), session_logic.Ensure.REPLACE),
        (sandbox("Terminated"), session_logic.Ensure.REPLACE),
        (deleting(sandbox("Running")), session_logic.Ensure.REPLACE),  # stopped: a start waits, then makes a new one
        (sandbox("Suspended"), session_logic.Ensure.RESUME),
        (sandbox("Suspending"), session_logic.Ensure.RESUME),
        (sandbox("Creating"), session_logic.Ensure.SERVE),
        (sandbox("Running"), session_logic.Ensure.SERVE),
        (sandbox(None), session_logic.Ensure.SERVE),
    ],
)
def test_a_call_creates_replaces_resumes_or_serves(existing: JSON | None, step: session_logic.Ensure) -> None:
    assert session_logic.ensure_step(existing) is step


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (sandbox(None), "starting"),
        (sandbox("Creating"), "starting"),
        (sandbox("Running"), "starting"),  # no pod IP yet
        (sandbox("Running", podIP="127.3.0.9"), "running"),
        (sandbox("Resuming"), "starting"),
        (sandbox("Suspending"), "stopped"),
        (sandbox("Suspended"), "stopped"),
        (sandbox("Terminated"), "stopped"),
        (sandbox("Error"), "error"),
    ],
)
def test_sandbox_info_status_follows_the_phase(body: JSON, status: str) -> None:
    assert session_logic.session_status(body).value == status


def test_sandbox_info_has_the_contract_fields_in_iso_8601() -> None:
    body = sandbox("Running", podIP="127.3.0.9", lastActivityAt="2026-12-01T10:05:00Z")
    body["metadata"]["creationTimestamp"] = "2026-12-01T10:00:00Z"
    body["metadata"]["annotations"] = {SESSION_TYPE_ANNOTATION: "code_interpreter"}
    info = session_logic.sandbox_info("chat-1", body, None)
    assert info == {
        "sandbox_id": e2b.sandbox_id_of(body),
        "session_id": "chat-1",
        "sandbox_type": "code_interpreter",
        "status": "running",
        "created_at": "2026-12-01T10:00:00Z",
        "last_activity": "2026-12-01T10:05:00Z",
    }
    later = datetime(2026, 12, 1, 10, 7, tzinfo=UTC)
    assert session_logic.sandbox_info("chat-1", body, later)["last_activity"] == "2026-12-01T10:07:00Z"
    for stamp in (info["created_at"], info["last_activity"]):
        assert datetime.fromisoformat(stamp.replace("Z", "+00:00")).tzinfo is not None


def test_status_shows_nothing_for_a_sandbox_being_deleted() -> None:
    assert session_logic.live_sandbox(None) is None
    assert session_logic.live_sandbox(deleting(sandbox("Running"))) is None
    kept = sandbox("Suspended")
    assert session_logic.live_sandbox(kept) is kept


@pytest.mark.parametrize(
    ("status", "answered"),
    [(400, 400), (401, 401), (404, 404), (408, 408), (413, 413), (422, 400), (502, 500), (504, 500)],
)
def test_errors_are_detail_objects_with_the_contract_statuses(status: int, answered: int) -> None:
    assert session_logic.error_body(status, "why") == (answered, {"detail": "why"})


@pytest.mark.parametrize("value", [0, -1, e2b.MAX_TIMEOUT_S + 1])
def test_limits_refuse_timeouts_out_of_range(value: int) -> None:
    with pytest.raises(ValueError, match="session execution timeout"):
        session_logic.SessionLimits(execution_s=value)


# --- ExecutionResult -------------------------------------------------------------------------------


def cell(**fields: Any) -> JSON:
    return {"results": [], "stdout": "", "stderr": "", "error": None, "executionCount": 1, **fields}


def test_a_result_carries_output_and_success() -> None:
    done = session_logic.execution_result(
        cell(stdout="hello\n", results=[{"text": "42", "is_main_result": True}]), 0.0123, 300
    )
    assert done == {"success": True, "output": "hello\n42", "error": None, "execution_time_ms": 12, "artifacts": []}


def test_failing_code_names_the_exception() -> None:
    error = {"name": "NameError", "value": "name 'y' is not defined", "traceback": "..."}
    failed = session_logic.execution_result(cell(error=error), 0.001, 300)
    assert failed["success"] is False and failed["error"] == "NameError: name 'y' is not defined"


def test_rich_results_are_artifacts() -> None:
    chart = {"type": "line", "title": "t", "elements": []}
    results = [{"png": "iVBOR", "chart": chart, "text": "<Figure>"}, {"html": "<b>x</b>"}]
    artifacts = session_logic.execution_result(cell(results=results), 0, 300)["artifacts"]
    assert artifacts[0]["type"] == "chart" and artifacts[0]["data"] == chart
    assert artifacts[0]["formats"] == {"png": "iVBOR", "chart": chart}
    assert artifacts[1] == {"type": "html", "data": "<b>x</b>"}


def test_the_interpreters_timeout_is_408_but_user_code_raising_timeouterror_is_a_result() -> None:
    ours = {"name": "TimeoutError", "value": EXECUTION_TIMEOUT_PREFIX + " 1s", "traceback": ""}
    with pytest.raises(e2b.Refused, match="timed out after 1 s") as refused:
        session_logic.execution_result(cell(error=ours), 1.0, 1)
    assert refused.value.status == 408
    theirs = {"name": "TimeoutError", "value": "my own", "traceback": ""}
    assert session_logic.execution_result(cell(error=theirs), 0, 1)["error"] == "TimeoutError: my own"


# --- install ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("packages", [["six"], ["numpy>=1.26,<3", "requests[socks]==2.32.3", "a.b_c-d~=1.0"]])
def test_requirements_are_accepted(packages: list[str]) -> None:
    assert session_logic.install_packages({"packages": packages}) == packages
    compile(session_logic.install_code(packages), "<install>", "exec")  # the cell is valid Python
    assert repr(packages) in session_logic.install_code(packages)


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"packages": []},
        {"packages": "six"},
        {"packages": [1]},
        {"packages": ["--index-url=https://evil.example"]},
        {"packages": ["-r", "reqs.txt"]},
        {"packages": ["https://evil.example/x.whl"]},
        {"packages": ["./local"]},
        {"packages": ["git+https://x/y"]},
        {"packages": ["six; os_name=='posix'"]},
        {"packages": ["six'); import os #"]},
        {"packages": ["x" * 201]},
        {"packages": ["a"] * 65},
    ],
)
def test_anything_pip_would_read_as_an_option_url_or_path_is_400(payload: JSON) -> None:
    with pytest.raises(e2b.Refused) as refused:
        session_logic.install_packages(payload)
    assert refused.value.status == 400


# --- upload, download, listing ---------------------------------------------------------------------


def test_upload_targets_are_the_file_name_in_the_directory() -> None:
    assert session_logic.directory_query({}, session_logic.DEFAULT_UPLOAD_DIR) == "/home/user/upload"
    assert session_logic.directory_query({"path": "/data/"}, "/x") == "/data"
    assert session_logic.upload_target("/home/user/upload", "report.csv") == "/home/user/upload/report.csv"
    assert session_logic.upload_target("/d", "../../etc/passwd") == "/d/passwd"  # the name only
    assert session_logic.upload_target("/d", "C:\\Users\\me\\a.txt") == "/d/a.txt"
    for bad in ("", None, "..", "dir/"):
        with pytest.raises(e2b.Refused) as refused:
            session_logic.upload_target("/d", bad)
        assert refused.value.status == 400
    with pytest.raises(e2b.Refused, match="absolute directory"):
        session_logic.directory_query({"path": "rel"}, "/x")


def test_downloads_are_attachments_named_after_the_file() -> None:
    headers = session_logic.download_headers("/home/user/out.csv", {})
    assert headers == {
        "Content-Type": "application/octet-stream",
        "Content-Disposition": 'attachment; filename="out.csv"',
    }
    quoted = session_logic.download_headers('/d/ré"sumé.txt', {})["Content-Disposition"]
    assert quoted == "attachment; filename=\"r__sum_.txt\"; filename*=UTF-8''r%C3%A9%22sum%C3%A9.txt"


def test_listings_are_path_size_and_kind() -> None:
    answer = {
        "entries": [
            {"name": "b", "path": "/home/user/b", "type": "FILE_TYPE_DIRECTORY", "size": "4096"},
            {"name": "a.txt", "path": "/home/user/a.txt", "type": "FILE_TYPE_FILE", "size": "5"},
        ]
    }
    assert session_logic.listed_entries(answer) == [
        {"path": "/home/user/a.txt", "size": 5, "is_directory": False},
        {"path": "/home/user/b", "size": 4096, "is_directory": True},
    ]
    garbled: list[Any] = [{}, {"entries": [{"path": 1}]}, {"entries": [{"path": "/a", "size": "big"}]}, []]
    for bad in garbled:
        with pytest.raises(e2b.Refused) as refused:
            session_logic.listed_entries(bad)
        assert refused.value.status == 502


@pytest.mark.parametrize(("status", "answered"), [(404, 404), (400, 400), (500, 500), (401, 500)])
def test_agent_refusals_of_files_map_to_the_contract(status: int, answered: int) -> None:
    assert session_logic.agent_refusal(status, "x", "/p").status == answered


def test_commands_answer_an_execution_result_with_the_exit_code() -> None:
    result = {"exitCode": 3, "stdout": "o", "stderr": "e", "error": None}
    answer = session_logic.command_result(result, 0.002)
    assert answer["success"] is False and answer["exit_code"] == 3 and answer["output"] == "oe"
    assert answer["error"] == "exit status 3"
    assert session_logic.command_result({**result, "exitCode": 0}, 0)["success"] is True


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


@pytest.mark.parametrize(("code", "status"), [("deadline_exceeded", 408), ("internal", 502)])
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


def test_code_cells_are_validated_and_bounded_by_the_session_timeout() -> None:
    limits = session_logic.SessionLimits(execution_s=300)
    assert session_logic.execute_request({"code": "1+1"}, limits) == ({"code": "1+1", "timeout": 300}, 300)
    assert session_logic.execute_request({"code": "x", "timeout": 2}, limits)[1] == 2
    assert session_logic.execute_request({"code": "x", "timeout": 9000}, limits)[1] == 300  # never longer
    for bad, message in (({"code": 1}, "'code' must be a string"), ({"code": "  "}, "'code' is empty")):
        with pytest.raises(e2b.Refused, match=message):
            session_logic.execute_request(bad, limits)
    with pytest.raises(e2b.BadRequest, match="timeout"):
        session_logic.execute_request({"code": "x", "timeout": "soon"}, limits)


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


# --- the handlers, over fake operations and a fake agent -------------------------------------------


class FakeAgent:
    """An agent's HTTP answers on loopback, at the ports the handlers call (envd and the interpreter)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.executed: list[JSON] = []

    def apps(self) -> dict[int, web.Application]:
        envd, interpreter = web.Application(), web.Application()
        envd.router.add_route("GET", "/files", self.read)
        envd.router.add_route("POST", "/files", self.write)
        envd.router.add_route("POST", "/filesystem.Filesystem/ListDir", self.list_dir)
        interpreter.router.add_route("POST", "/execute", self.execute)
        return {ENVD_PORT: envd, INTERPRETER_PORT: interpreter}

    async def read(self, request: web.Request) -> web.StreamResponse:
        data = self.files.get(request.query["path"])
        if data is None:
            return web.json_response({"code": 404, "message": "no such file"}, status=404)
        return web.Response(body=data, content_type="text/plain")

    async def write(self, request: web.Request) -> web.StreamResponse:
        self.files[request.query["path"]] = await request.read()
        return web.json_response([{"path": request.query["path"]}])

    async def list_dir(self, request: web.Request) -> web.StreamResponse:
        wanted = (await request.json())["path"].rstrip("/") + "/"
        entries = [
            {"path": path, "type": "FILE_TYPE_FILE", "size": str(len(data))}
            for path, data in self.files.items()
            if path.startswith(wanted) and "/" not in path[len(wanted) :]
        ]
        return web.json_response({"entries": entries})

    async def execute(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.executed.append(body)
        lines: list[JSON] = [{"type": "stdout", "text": f"ran {body['code']}\n"}]
        if body["code"] == "slow":
            lines.append({"type": "error", "name": "TimeoutError", "value": EXECUTION_TIMEOUT_PREFIX + " 1s"})
        elif body["code"] == "boom":
            lines.append({"type": "error", "name": "NameError", "value": "name 'y' is not defined"})
        lines.append({"type": "end_of_execution"})
        return web.Response(body=b"".join(json.dumps(line).encode() + b"\n" for line in lines))


class FakeGateway:
    """The operations SessionOps names, recording what the handlers asked for."""

    def __init__(self, pod_ip: str, existing: JSON | None = None, **limits: Any) -> None:
        self.pod_ip = pod_ip
        self.sandboxes: dict[Key, JSON] = {} if existing is None else {("team-a", "session-chat-1"): existing}
        self.calls: list[tuple[Any, ...]] = []
        self.limits = session_logic.SessionLimits(**limits)
        self.created = 0

    def ops(self, upstream: Callable[[], Any]) -> SessionOps:
        def namespace_of(request: web.Request) -> str:
            if request.headers.get("X-API-KEY") != "key":
                raise e2b.Refused(401, "missing or unknown API key (X-API-KEY)")
            return "team-a"

        async def create_sandbox(namespace: str, manifest: JSON) -> None:
            self.calls.append(("create", namespace, manifest["metadata"]["name"]))
            self.created += 1
            metadata = {**manifest["metadata"], "uid": f"uid-{self.created}"}
            self.sandboxes[(namespace, metadata["name"])] = {**manifest, "metadata": metadata, "status": {}}

        async def set_suspended(namespace: str, name: str, suspended: bool) -> None:
            self.calls.append(("suspended", name, suspended))

        async def delete_sandbox(namespace: str, name: str, *, wait: bool) -> bool:
            self.calls.append(("delete", name, wait))
            return self.sandboxes.pop((namespace, name), None) is not None

        async def until_serving(key: Key, *, delete_on_failure: bool) -> JSON:
            self.calls.append(("until_serving", key, delete_on_failure))
            body = self.sandboxes[key]
            body["status"] = {"phase": "Running", "podIP": self.pod_ip}
            return body

        return SessionOps(
            namespace_of=namespace_of,
            sandbox=self.sandboxes.get,
            templates=lambda: {name: template() for name in ("base", "code-interpreter")},
            token_of=lambda body: "tok",
            create_sandbox=create_sandbox,
            set_suspended=set_suspended,
            delete_sandbox=delete_sandbox,
            until_serving=until_serving,
            upstream=upstream,
            agent_headers=lambda body: {"X-Access-Token": "agent-tok"},
            max_upload_bytes=1 << 20,
            limits=self.limits,
        )


@web.middleware
async def refusals(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """What the gateway's middleware does with a refusal (its own error_response)."""
    try:
        return await handler(request)
    except e2b.Refused as refused:
        return error_response(request, refused.status, str(refused))
    except e2b.BadRequest as exc:
        return error_response(request, 400, str(exc))


@pytest.fixture
async def agent() -> AsyncIterator[tuple[str, FakeAgent]]:
    """A fake agent on a loopback address of its own (the handlers call fixed ports)."""
    fake = FakeAgent()
    runners: list[web.AppRunner] = []
    for _ in range(20):  # an address whose ports are free
        ip = f"127.{secrets.randbelow(200) + 20}.{secrets.randbelow(250) + 1}.{secrets.randbelow(250) + 1}"
        try:
            for port, app in fake.apps().items():
                runner = web.AppRunner(app)
                await runner.setup()
                runners.append(runner)
                await web.TCPSite(runner, ip, port).start()
        except OSError:
            for runner in runners:
                await runner.cleanup()
            runners.clear()
            continue
        break
    else:
        pytest.fail("no free loopback address for the fake agent")
    try:
        yield ip, fake
    finally:
        for runner in runners:
            await runner.cleanup()


@contextlib.asynccontextmanager
async def serve(fake: FakeGateway) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async with aiohttp.ClientSession() as upstream:
        app = web.Application(middlewares=[refusals])
        for method, path, handler in routes(fake.ops(lambda: upstream)):
            app.router.add_route(method, path, handler)
        async with TestClient(TestServer(app)) as client:
            yield client


URL = "/api/v1/session/chat-1/sandbox"
KEY = {"X-API-KEY": "key"}


async def test_start_status_stop_and_start_again(agent: tuple[str, FakeAgent]) -> None:
    fake = FakeGateway(agent[0])
    async with serve(fake) as client:
        first = await client.post(URL + "/start", json={"sandbox_type": "code_interpreter"}, headers=KEY)
        info = await first.json()
        assert first.status == 200 and info["status"] == "running" and info["session_id"] == "chat-1"
        assert info["sandbox_type"] == "code_interpreter"
        again = await (await client.post(URL + "/start", json={}, headers=KEY)).json()
        assert again["sandbox_id"] == info["sandbox_id"] and fake.created == 1
        assert (await (await client.get(URL + "/status", headers=KEY)).json())["sandbox_id"] == info["sandbox_id"]
        assert (await client.post(URL + "/stop", headers=KEY)).status == 204
        status = await client.get(URL + "/status", headers=KEY)
        assert status.status == 200 and await status.json() is None
        assert (await client.post(URL + "/stop", headers=KEY)).status == 204  # nothing runs: still 204
        renewed = await (await client.post(URL + "/start", json={}, headers=KEY)).json()
        assert renewed["sandbox_id"] != info["sandbox_id"] and fake.created == 2


async def test_bad_start_bodies_are_400_details_and_create_nothing(agent: tuple[str, FakeAgent]) -> None:
    fake = FakeGateway(agent[0])
    async with serve(fake) as client:
        for body, needle in (
            ({"sandbox_type": "gpu"}, "sandbox_type"),
            ({"sandbox_type": "custom", "template_id": "nope"}, "template 'nope' not found"),
        ):
            response = await client.post(URL + "/start", json=body, headers=KEY)
            assert response.status == 400 and needle in (await response.json())["detail"]
        bad_json = await client.post(URL + "/start", data=b"{", headers=KEY)
        assert bad_json.status == 400 and "detail" in await bad_json.json()
        unauthorised = await client.post(URL + "/start", json={})
        assert unauthorised.status == 401 and "X-API-KEY" in (await unauthorised.json())["detail"]
    assert fake.created == 0


async def test_execute_starts_the_sandbox_and_answers_an_execution_result(agent: tuple[str, FakeAgent]) -> None:
    ip, fake_agent = agent
    fake = FakeGateway(ip, execution_s=30)
    async with serve(fake) as client:
        response = await client.post(URL + "/execute", json={"code": "x = 1"}, headers=KEY)
        result = await response.json()
        assert response.status == 200 and result["success"] is True and result["output"] == "ran x = 1\n"
        assert result["error"] is None and isinstance(result["execution_time_ms"], int) and result["artifacts"] == []
        assert fake.created == 1 and fake_agent.executed == [{"code": "x = 1", "timeout": 30}]
        failed = await (await client.post(URL + "/execute", json={"code": "boom"}, headers=KEY)).json()
        assert failed["success"] is False and "NameError" in failed["error"]
        slow = await client.post(URL + "/execute", json={"code": "slow"}, headers=KEY)
        assert slow.status == 408 and "timed out" in (await slow.json())["detail"]
        empty = await client.post(URL + "/execute", json={"code": 5}, headers=KEY)
        assert empty.status == 400 and (await empty.json())["detail"] == "'code' must be a string"
    assert fake.created == 1


async def test_install_runs_pip_in_the_kernel(agent: tuple[str, FakeAgent]) -> None:
    ip, fake_agent = agent
    async with serve(FakeGateway(ip)) as client:
        response = await client.post(URL + "/install", json={"packages": ["six==1.16.0"]}, headers=KEY)
        assert response.status == 200 and (await response.json())["success"] is True
        assert "'six==1.16.0'" in fake_agent.executed[0]["code"] and "pip" in fake_agent.executed[0]["code"]
        refused = await client.post(URL + "/install", json={"packages": ["--pre"]}, headers=KEY)
        assert refused.status == 400 and "not a requirement" in (await refused.json())["detail"]


async def test_upload_download_and_list(agent: tuple[str, FakeAgent]) -> None:
    ip, fake_agent = agent
    async with serve(FakeGateway(ip)) as client:
        missing = await client.get(URL + "/files", headers=KEY)
        assert missing.status == 404 and "POST /start" in (await missing.json())["detail"]
        form = aiohttp.FormData()
        form.add_field("note", "skipped")
        form.add_field("file", b"a,b\n1,2\n", filename="data.csv", content_type="text/csv")
        uploaded = await client.post(URL + "/upload", data=form, headers=KEY)
        assert uploaded.status == 200 and await uploaded.json() == {"path": "/home/user/upload/data.csv"}
        assert fake_agent.files == {"/home/user/upload/data.csv": b"a,b\n1,2\n"}
        down = await client.get(URL + "/download", params={"path": "/home/user/upload/data.csv"}, headers=KEY)
        assert down.status == 200 and await down.read() == b"a,b\n1,2\n"
        assert down.headers["Content-Type"] == "application/octet-stream"
        assert down.headers["Content-Disposition"] == 'attachment; filename="data.csv"'
        gone = await client.get(URL + "/download", params={"path": "/nope.txt"}, headers=KEY)
        assert gone.status == 404 and "/nope.txt" in (await gone.json())["detail"]
        listed = await client.get(URL + "/files", params={"path": "/home/user/upload"}, headers=KEY)
        assert await listed.json() == [{"path": "/home/user/upload/data.csv", "size": 8, "is_directory": False}]
        no_file = aiohttp.FormData()
        no_file.add_field("other", "x")
        assert (await client.post(URL + "/upload", data=no_file, headers=KEY)).status == 400
        raw = await client.post(URL + "/upload", data=b"bytes", headers=KEY)
        assert raw.status == 400 and "multipart" in (await raw.json())["detail"]
        huge = aiohttp.FormData()
        huge.add_field("file", b"x" * ((1 << 20) + 1), filename="big.bin")
        assert (await client.post(URL + "/upload", data=huge, headers=KEY)).status == 413


async def test_the_anonymous_namespace_is_opt_in(agent: tuple[str, FakeAgent]) -> None:
    async with serve(FakeGateway(agent[0])) as client:
        assert (await client.get(URL + "/status")).status == 401
    async with serve(FakeGateway(agent[0], anonymous_namespace="team-a")) as client:
        response = await client.get(URL + "/status")
        assert response.status == 200 and await response.json() is None


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
