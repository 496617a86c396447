"""Kernels that die: the execution ends at once with the cause, the context gets a fresh kernel,
nothing leaks, and other contexts carry on. Also: a kernel start costs the agent no thread."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentlib import AgentProcess, start_agent, stop_agent

from testlib import wait_until

# Generous on purpose: the old heartbeat/keepalive check noticed a death only after ~15 s; the
# process watch does so at once (timings are printed with -s).
DEATH_NOTICE_DEADLINE = 10.0


@pytest.fixture(scope="module")
def kernel_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    process = start_agent(tmp_path_factory.mktemp("kernels"), token=None)
    yield process
    stop_agent(process)


@pytest.fixture(scope="module")
def timeout_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    process = start_agent(tmp_path_factory.mktemp("kernel-timeout"), token=None, env={"SANDBOX_EXECUTION_TIMEOUT": "1"})
    yield process
    stop_agent(process)


def post(agent: AgentProcess, path: str, body: dict[str, Any], timeout: float = 60) -> tuple[int, bytes]:
    # urllib closes the connection after each request: no keep-alive socket skews the fd counts.
    request = urllib.request.Request(
        agent.interpreter_url + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def execute(agent: AgentProcess, code: str, context_id: str | None = None) -> tuple[list[dict[str, Any]], float]:
    """The /execute JSON lines and how long the request took."""
    started = time.monotonic()
    status, body = post(agent, "/execute", {"code": code, "context_id": context_id})
    elapsed = time.monotonic() - started
    assert status == 200, body
    return [json.loads(line) for line in body.splitlines() if line.strip()], elapsed


def errors(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line["type"] == "error"]


def text(lines: list[dict[str, Any]]) -> str | None:
    return next((line.get("text") for line in lines if line["type"] == "result" and line["is_main_result"]), None)


def stdout(lines: list[dict[str, Any]]) -> str:
    return "".join(line["text"] for line in lines if line["type"] == "stdout")


def create_context(agent: AgentProcess) -> str:
    status, body = post(agent, "/contexts", {"cwd": str(agent.workdir)})
    assert status == 200, body
    context_id: str = json.loads(body)["id"]
    return context_id


def remove_context(agent: AgentProcess, context_id: str) -> None:
    request = urllib.request.Request(f"{agent.interpreter_url}/contexts/{context_id}", method="DELETE")
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 204


def tasks(agent: AgentProcess) -> int:
    return len(os.listdir(f"/proc/{agent.process.pid}/task"))


def open_fds(agent: AgentProcess) -> int:
    return len(os.listdir(f"/proc/{agent.process.pid}/fd"))


def test_starting_a_kernel_starts_no_thread_in_the_agent(kernel_agent: AgentProcess) -> None:
    first = create_context(kernel_agent)
    before = tasks(kernel_agent)
    second = create_context(kernel_agent)
    assert text(execute(kernel_agent, "40 + 2", second)[0]) == "42"
    # Each kernel manager and client used to bring its own zmq context (2 threads each) plus a
    # heartbeat thread: +5 threads per kernel, and libzmq abort()s the agent when it cannot start one.
    assert tasks(kernel_agent) == before
    remove_context(kernel_agent, second)
    remove_context(kernel_agent, first)
    assert tasks(kernel_agent) == before


@pytest.mark.parametrize(
    ("code", "cause"),
    [
        ("import os\nos.kill(os.getpid(), 9)", "the kernel died (killed by signal 9, SIGKILL)"),
        ("import ctypes\nctypes.string_at(0)", "the kernel died (killed by signal 11, SIGSEGV)"),
        ("import os\nos._exit(3)", "the kernel died (exit code 3)"),
    ],
    ids=["sigkill", "segfault", "exit"],
)
def test_a_dying_kernel_ends_the_execution_with_its_cause_and_the_next_run_gets_a_fresh_kernel(
    kernel_agent: AgentProcess, code: str, cause: str
) -> None:
    context = create_context(kernel_agent)
    try:
        execute(kernel_agent, "state = 'kept until the kernel dies'", context)
        last_words = "print('last words', flush=True)\nimport time\ntime.sleep(0.2)\n"
        lines, elapsed = execute(kernel_agent, last_words + code, context)
        print(f"\n{cause}: the execution ended {elapsed:.3f}s after it was sent")
        assert elapsed < DEATH_NOTICE_DEADLINE
        assert stdout(lines) == "last words\n"  # what the kernel sent before it died still arrives
        (error,) = errors(lines)
        assert error["name"] == "ContextRestarting"
        assert error["value"].startswith(cause + "; the context was restarted")
        assert lines[-1] == {"type": "end_of_execution"}
        after, _ = execute(kernel_agent, "'state' in dir()", context)
        assert errors(after) == []
        assert text(after) == "False"
    finally:
        remove_context(kernel_agent, context)


def test_a_death_with_per_call_env_vars_does_not_wait_for_their_restore(kernel_agent: AgentProcess) -> None:
    context = create_context(kernel_agent)
    try:
        started = time.monotonic()
        status, body = post(
            kernel_agent,
            "/execute",
            {"code": "import os\nos.kill(os.getpid(), 9)", "context_id": context, "env_vars": {"ONLY_NOW": "1"}},
        )
        assert status == 200 and time.monotonic() - started < DEATH_NOTICE_DEADLINE
        assert b'"name":"ContextRestarting"' in body
        after, _ = execute(kernel_agent, "import os\nos.environ.get('ONLY_NOW', 'unset')", context)
        assert text(after) == "unset"
    finally:
        remove_context(kernel_agent, context)


def test_the_sdk_sees_the_death_as_an_execution_error(kernel_agent: AgentProcess) -> None:
    from e2b_code_interpreter import Sandbox

    sandbox = Sandbox.create(debug=True, sandbox_url=kernel_agent.envd_url)
    context = sandbox.create_code_context(cwd=str(kernel_agent.workdir))
    try:
        execution = sandbox.run_code("import os\nos.kill(os.getpid(), 9)", context=context)
        assert execution.error is not None
        assert execution.error.name == "ContextRestarting"
        assert "the kernel died (killed by signal 9" in execution.error.value
        assert sandbox.run_code("6 * 7", context=context).text == "42"
    finally:
        sandbox.remove_code_context(context)


def test_a_kernel_dying_between_executions_is_replaced(kernel_agent: AgentProcess) -> None:
    context = create_context(kernel_agent)
    try:
        lines, _ = execute(
            kernel_agent,
            "import os, threading\nstate = 1\nthreading.Timer(0.2, lambda: os._exit(5)).start()\n'armed'",
            context,
        )
        assert text(lines) == "armed"
        wait_until(
            lambda: "died: the kernel died (exit code 5)" in kernel_agent.log_path.read_text(),
            timeout=10,
            message="the agent to notice the idle kernel's death",
        )
        after, _ = execute(kernel_agent, "'state' in dir()", context)
        assert errors(after) == [] and text(after) == "False"
    finally:
        remove_context(kernel_agent, context)


def test_a_dying_kernel_leaks_no_socket_and_holds_up_no_other_context(kernel_agent: AgentProcess) -> None:
    victim, bystander = create_context(kernel_agent), create_context(kernel_agent)
    for context in (victim, bystander):
        execute(kernel_agent, "1", context)
    baseline = open_fds(kernel_agent)
    finished: list[tuple[list[dict[str, Any]], float]] = []
    # The bystander prints for ~3 s while the victim's kernel is killed three times.
    chatter = "import time\nfor i in range(30):\n    print(i, flush=True)\n    time.sleep(0.1)"
    worker = threading.Thread(target=lambda: finished.append(execute(kernel_agent, chatter, bystander)))
    worker.start()
    try:
        for _ in range(3):
            lines, elapsed = execute(kernel_agent, "import os\nos.kill(os.getpid(), 9)", victim)
            assert errors(lines)[0]["name"] == "ContextRestarting" and elapsed < DEATH_NOTICE_DEADLINE
            assert text(execute(kernel_agent, "'alive'", victim)[0]) == "alive"
    finally:
        worker.join(timeout=60)
    ((lines, elapsed),) = finished
    assert errors(lines) == []
    assert stdout(lines) == "".join(f"{i}\n" for i in range(30))
    assert elapsed < 15
    # Each kernel is three zmq sockets (shell, IOPub, the manager's control) and a pidfd: a leak per
    # death would show here. (Connections of finished HTTP requests may take a moment to close.)
    wait_until(lambda: open_fds(kernel_agent) <= baseline, timeout=10, message=f"agent fds back to {baseline}")
    remove_context(kernel_agent, victim)
    remove_context(kernel_agent, bystander)
    wait_until(lambda: open_fds(kernel_agent) < baseline, timeout=10, message="fewer fds once the contexts are gone")


@pytest.mark.parametrize(
    "code",
    [
        "print('started', flush=True)\nimport time\ntime.sleep(60)",
        "import time\nend = time.time() + 60\nwhile time.time() < end:\n    print('chatter')",
    ],
    ids=["waiting", "printing"],
)
def test_removing_a_context_ends_its_running_execution(kernel_agent: AgentProcess, code: str) -> None:
    context = create_context(kernel_agent)
    result: list[tuple[list[dict[str, Any]], float]] = []
    worker = threading.Thread(target=lambda: result.append(execute(kernel_agent, code, context)))
    worker.start()
    time.sleep(1.0)
    remove_context(kernel_agent, context)
    worker.join(timeout=30)
    ((lines, elapsed),) = result
    assert elapsed < 30
    (error,) = errors(lines)
    assert error["name"] == "UnexpectedEndOfExecution"
    assert "the context was removed" in error["traceback"]


def test_a_kernel_that_ignores_the_timeout_interrupt_is_replaced(timeout_agent: AgentProcess, tmp_path: Path) -> None:
    execute(timeout_agent, "state = 1")
    lines, elapsed = execute(
        timeout_agent, "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)"
    )
    (error,) = errors(lines)
    assert error["name"] == "TimeoutError" and "restarted" in error["value"]
    assert elapsed < 15  # 1 s timeout + 5 s interrupt grace; the restart runs after the answer
    after, _ = execute(timeout_agent, "'state' in dir()")
    assert errors(after) == [] and text(after) == "False"
