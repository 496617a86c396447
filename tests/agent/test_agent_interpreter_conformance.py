"""What the unmodified SDKs rely on, checked against a real agent process.

- GET /contexts lists the default Python context from the start, as E2B's server does (it creates
  its default contexts at startup, template/server/main.py `lifespan`); the agent starts its kernel on
  first use.
- `run_code(timeout=)` is a client-side deadline in e2b-code-interpreter (code_interpreter_sync.py:
  `httpx.Timeout(timeout, connect=request_timeout)`, `except httpx.ReadTimeout: raise
  format_execution_timeout_error()`): the SDK drops the connection and raises TimeoutException. The
  agent must then interrupt the kernel at once, so that the context is free for the next run_code.
- A command's `timeout` is the stream's Connect-Timeout-Ms: the stream ends with the Connect error
  `deadline_exceeded` (e2b/envd/rpc.py maps Code.DEADLINE_EXCEEDED to TimeoutException; the JS SDK's
  envd/rpc.ts to TimeoutError), never with a plain `end` event and a non-zero exit (which both SDKs
  raise as CommandExitException / CommandExitError).
"""

from __future__ import annotations

import base64
import http.client
import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentlib import ACCESS_TOKEN, AgentProcess, FakeControlPlane, pid_children, start_agent, stop_agent
from e2b import TimeoutException

from testlib import wait_until

CODE_TIMEOUTS = 'sandbox_agent_execution_timeouts_total{kind="code"'
# Far above what an interrupted time.sleep needs to free the context (measured ~0.2 s), far below
# the 15 s keepalive at which a silent execution used to notice that its client had gone.
FREED_WITHIN = 6.0


@pytest.fixture(scope="module")
def fresh_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """No --prewarm-kernel: nothing has started a kernel when the module begins."""
    agent = start_agent(tmp_path_factory.mktemp("conformance"), token=ACCESS_TOKEN)
    yield agent
    stop_agent(agent)


@pytest.fixture(scope="module")
def fresh_sandbox(fresh_agent: AgentProcess, control_plane: FakeControlPlane) -> Any:
    from e2b_code_interpreter import Sandbox

    options = {"api_key": "e2b_" + "0" * 40, "api_url": control_plane.url, "sandbox_url": fresh_agent.envd_url}
    return Sandbox.create(**options)


def _contexts(agent: AgentProcess) -> list[dict[str, str]]:
    status, _, body = agent.request(
        "GET", "/contexts", headers={"E2B-Traffic-Access-Token": ACCESS_TOKEN}, port=agent.interpreter_port
    )
    assert status == 200, body
    listed: list[dict[str, str]] = json.loads(body)
    return listed


# -- GET /contexts --------------------------------------------------------------------------------


def test_the_default_python_context_is_listed_before_any_kernel_started(
    fresh_agent: AgentProcess, fresh_sandbox: Any
) -> None:
    # Listed at once, and still without a kernel: the listing does not slow the agent's start.
    listed = fresh_sandbox.list_code_contexts()
    assert [(c.language, c.cwd) for c in listed] == [("python", str(fresh_agent.workdir))]
    assert pid_children(fresh_agent.process.pid) == []

    # /init may move the default workdir before the first run: the unstarted default follows it.
    workdir = fresh_agent.workdir / "moved"
    workdir.mkdir()
    status, _, body = fresh_agent.request(
        "POST",
        "/init",
        body=json.dumps({"defaultWorkdir": str(workdir)}).encode(),
        headers={"X-Access-Token": ACCESS_TOKEN, "Content-Type": "application/json"},
    )
    assert status == 204, body
    assert [c.cwd for c in fresh_sandbox.list_code_contexts()] == [str(workdir)]

    # run_code without a context runs in exactly that listed context.
    fresh_sandbox.run_code("marker = 'default'")
    (default,) = fresh_sandbox.list_code_contexts()
    assert default.id == listed[0].id and default.cwd == str(workdir)
    assert fresh_sandbox.run_code("marker", context=default).text == "default"
    assert fresh_sandbox.run_code("import os; os.getcwd()").text == str(workdir)
    assert _contexts(fresh_agent) == [{"id": default.id, "language": "python", "cwd": str(workdir)}]


def test_created_contexts_are_listed_next_to_the_default(fresh_sandbox: Any) -> None:
    default_ids = {c.id for c in fresh_sandbox.list_code_contexts()}
    created = fresh_sandbox.create_code_context()
    try:
        listed = {c.id: c.language for c in fresh_sandbox.list_code_contexts()}
        assert listed == {**dict.fromkeys(default_ids, "python"), created.id: "python"}
    finally:
        fresh_sandbox.remove_code_context(created)


def test_a_removed_default_is_replaced_by_a_new_one_on_the_next_run(fresh_sandbox: Any) -> None:
    (old,) = fresh_sandbox.list_code_contexts()
    fresh_sandbox.remove_code_context(old)
    assert fresh_sandbox.list_code_contexts() == []
    assert fresh_sandbox.run_code("40 + 2").text == "42"
    (new,) = fresh_sandbox.list_code_contexts()
    assert new.id != old.id and new.language == "python"


def test_a_prewarmed_agent_lists_its_default_context(code_sandbox: Any) -> None:
    code_sandbox.run_code("prewarmed = 1")
    python = [c for c in code_sandbox.list_code_contexts() if c.language == "python"]
    assert python, "the default Python context is missing from the listing"
    assert any(code_sandbox.run_code("prewarmed", context=c).text == "1" for c in python)


# -- run_code(timeout=): the SDK's own deadline -------------------------------------------------------


def test_the_sdk_timeout_raises_timeout_and_frees_the_context_at_once(
    fresh_agent: AgentProcess, fresh_sandbox: Any
) -> None:
    fresh_sandbox.run_code("kept = 'still here'")
    before = fresh_agent.metric(CODE_TIMEOUTS)
    with pytest.raises(TimeoutException, match="Execution timed out"):
        fresh_sandbox.run_code("import time\ntime.sleep(120)", timeout=1)
    started = time.monotonic()
    # Without the interrupt this would wait for the 120 s sleep (or, before, the next keepalive).
    assert fresh_sandbox.run_code("kept").text == "still here"
    assert time.monotonic() - started < FREED_WITHIN
    # A client that gave up is not the agent's execution timeout.
    assert fresh_agent.metric(CODE_TIMEOUTS) == before


def test_an_execution_abandoned_on_the_wire_is_interrupted(fresh_agent: AgentProcess) -> None:
    """The same without the SDK: the client reads the first line and closes the connection."""
    context = _contexts(fresh_agent)[0]
    headers = {"Content-Type": "application/json", "X-Access-Token": ACCESS_TOKEN}
    body = {"code": "import time\nfor tick in range(1200):\n    time.sleep(0.1)", "context_id": context["id"]}
    connection = http.client.HTTPConnection("127.0.0.1", fresh_agent.interpreter_port, timeout=30)
    connection.request("POST", "/execute", body=json.dumps(body), headers=headers)
    response = connection.getresponse()
    assert response.status == 200
    assert json.loads(response.readline())["type"] == "number_of_executions"
    connection.close()

    started = time.monotonic()
    follow_up = {"code": "tick", "context_id": context["id"]}
    status, _, raw = fresh_agent.request(
        "POST", "/execute", body=json.dumps(follow_up).encode(), headers=headers, port=fresh_agent.interpreter_port
    )
    assert status == 200, raw
    lines = [json.loads(line) for line in raw.splitlines()]
    results = [line for line in lines if line["type"] == "result" and line["is_main_result"]]
    # The loop was stopped early (it would count to 1199 over two minutes) and the state kept.
    assert len(results) == 1 and int(results[0]["text"]) < 1199
    assert time.monotonic() - started < FREED_WITHIN


def test_a_kernel_that_ignores_the_interrupt_after_the_client_left_is_replaced(fresh_sandbox: Any) -> None:
    context = fresh_sandbox.create_code_context()
    try:
        fresh_sandbox.run_code("doomed = 1", context=context)
        stubborn = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(120)"
        with pytest.raises(TimeoutException):
            fresh_sandbox.run_code(stubborn, context=context, timeout=1)
        started = time.monotonic()
        # 5 s interrupt grace, then a fresh kernel: the context is usable again, its state lost.
        execution = fresh_sandbox.run_code("'doomed' in globals()", context=context)
        assert execution.text == "False"
        assert time.monotonic() - started < 30
    finally:
        fresh_sandbox.remove_code_context(context)


# -- commands.run(timeout=): deadline_exceeded on the wire ------------------------------------------------


def _envelope(message: dict[str, Any]) -> bytes:
    payload = json.dumps(message).encode()
    return struct.pack(">BI", 0, len(payload)) + payload


def _stream(
    agent: AgentProcess, method: str, message: dict[str, Any], timeout_ms: int | None
) -> list[tuple[int, dict[str, Any]]]:
    """The envelopes of a server stream, read without a client-side deadline of its own (the SDK
    has one, which hides what the agent sends)."""
    headers = {"Content-Type": "application/connect+json", "Connect-Protocol-Version": "1"}
    if agent.token:
        headers["X-Access-Token"] = agent.token
    if timeout_ms is not None:
        headers["Connect-Timeout-Ms"] = str(timeout_ms)
    connection = http.client.HTTPConnection("127.0.0.1", agent.envd_port, timeout=60)
    try:
        connection.request("POST", f"/process.Process/{method}", body=_envelope(message), headers=headers)
        response = connection.getresponse()
        assert response.status == 200
        data = response.read()
    finally:
        connection.close()
    envelopes = []
    while data:
        flags, length = struct.unpack(">BI", data[:5])
        envelopes.append((flags, json.loads(data[5 : 5 + length])))
        data = data[5 + length :]
    return envelopes


def _start(command: str) -> dict[str, Any]:
    return {"process": {"cmd": "/bin/bash", "args": ["-l", "-c", command]}, "stdin": False}


def _assert_ends_with_deadline_exceeded(envelopes: list[tuple[int, dict[str, Any]]]) -> str:
    assert envelopes[0][1]["event"]["start"]["pid"] > 0
    flags, trailer = envelopes[-1]
    assert flags == 0x02, envelopes
    assert trailer["error"]["code"] == "deadline_exceeded", trailer
    # Every other envelope is a message: the end-stream one comes once, last.
    assert all(flag == 0 for flag, _ in envelopes[:-1])
    message: str = trailer["error"]["message"]
    return message


def test_a_command_timeout_ends_the_stream_with_deadline_exceeded(agent: AgentProcess, tmp_path: Path) -> None:
    marker = tmp_path / "survived"
    started = time.monotonic()
    envelopes = _stream(agent, "Start", _start(f"echo begun; sleep 30; touch {marker}"), 1000)
    elapsed = time.monotonic() - started
    assert "timeout" in _assert_ends_with_deadline_exceeded(envelopes)
    assert 0.9 < elapsed < 10
    data = [m["event"]["data"] for _, m in envelopes if "data" in m.get("event", {})]
    assert b"".join(base64.b64decode(chunk["stdout"]) for chunk in data) == b"begun\n"
    # The command was killed at the deadline (like E2B's envd, whose process context ends with it).
    wait_until(lambda: not any("sleep 30" in json.dumps(p) for p in _list(agent)), timeout=10, message="the kill")
    assert not marker.exists()


def test_the_execution_timeout_ends_the_stream_with_deadline_exceeded(limited_agent: AgentProcess) -> None:
    """SANDBOX_EXECUTION_TIMEOUT (1.5 s), no client timeout: the end event says why, the trailer is
    still deadline_exceeded, so the SDKs raise a timeout rather than CommandExitException."""
    envelopes = _stream(limited_agent, "Start", _start("sleep 30"), None)
    message = _assert_ends_with_deadline_exceeded(envelopes)
    assert "SANDBOX_EXECUTION_TIMEOUT" in message


def test_a_connect_timeout_ends_only_the_stream(agent: AgentProcess) -> None:
    """commands.connect(pid, timeout=): the stream ends with deadline_exceeded, the command runs on
    (E2B's envd applies the deadline to the Connect handler only)."""
    (_, first), *_ = _stream_start_background(agent)
    pid = first["event"]["start"]["pid"]
    try:
        envelopes = _stream(agent, "Connect", {"process": {"pid": pid}}, 800)
        _assert_ends_with_deadline_exceeded(envelopes)
        assert any(process.get("pid") == pid for process in _list(agent))
    finally:
        _unary(agent, "SendSignal", {"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"})


def _stream_start_background(agent: AgentProcess) -> list[tuple[int, dict[str, Any]]]:
    """Start a chatty command and leave after its start event (it keeps running: no deadline)."""
    headers = {"Content-Type": "application/connect+json", "Connect-Protocol-Version": "1"}
    if agent.token:
        headers["X-Access-Token"] = agent.token
    connection = http.client.HTTPConnection("127.0.0.1", agent.envd_port, timeout=30)
    try:
        body = _envelope(_start("while :; do echo tick; sleep 0.01; done"))
        connection.request("POST", "/process.Process/Start", body=body, headers=headers)
        response = connection.getresponse()
        assert response.status == 200
        flags, length = struct.unpack(">BI", response.read(5))
        return [(flags, json.loads(response.read(length)))]
    finally:
        connection.close()


def _unary(agent: AgentProcess, method: str, message: dict[str, Any]) -> dict[str, Any]:
    headers = {"Content-Type": "application/json", "Connect-Protocol-Version": "1"}
    if agent.token:
        headers["X-Access-Token"] = agent.token
    status, _, body = agent.request("POST", f"/process.Process/{method}", json.dumps(message).encode(), headers)
    assert status == 200, body
    reply: dict[str, Any] = json.loads(body)
    return reply


def _list(agent: AgentProcess) -> list[dict[str, Any]]:
    processes: list[dict[str, Any]] = _unary(agent, "List", {}).get("processes", [])
    return processes
