"""The /execute body's own `timeout` (our extension, used by the gateway's session API) on a real
kernel: the execution is interrupted at min(timeout, SANDBOX_EXECUTION_TIMEOUT), reported with the
agent's TimeoutError line, and the context keeps its state."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from agentlib import AgentProcess

from sandbox_operator.api.names import EXECUTION_TIMEOUT_PREFIX

CODE_TIMEOUTS = 'sandbox_agent_execution_timeouts_total{kind="code"'
# The interrupt lands at once in time.sleep: far below the 30 s the code asks for.
ENDS_WITHIN = 10.0


def post(agent: AgentProcess, path: str, body: bytes) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if agent.token:
        headers["X-Access-Token"] = agent.token
    request = urllib.request.Request(agent.interpreter_url + path, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=2 * ENDS_WITHIN) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def execute(agent: AgentProcess, body: dict[str, Any]) -> tuple[list[dict[str, Any]], float]:
    started = time.monotonic()
    status, raw = post(agent, "/execute", json.dumps(body).encode())
    elapsed = time.monotonic() - started
    assert status == 200, raw
    return [json.loads(line) for line in raw.splitlines() if line.strip()], elapsed


def new_context(agent: AgentProcess) -> str:
    status, raw = post(agent, "/contexts", json.dumps({"cwd": str(agent.workdir)}).encode())
    assert status == 200, raw
    context_id: str = json.loads(raw)["id"]
    return context_id


def errors(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line["type"] == "error"]


def main_text(lines: list[dict[str, Any]]) -> str | None:
    return next((line.get("text") for line in lines if line["type"] == "result" and line["is_main_result"]), None)


def test_the_request_timeout_interrupts_the_code_and_keeps_the_context(agent: AgentProcess) -> None:
    """The agent has no SANDBOX_EXECUTION_TIMEOUT: the request's 1 s is the deadline."""
    context_id = new_context(agent)
    execute(agent, {"code": "kept = 'still here'", "context_id": context_id})
    before = agent.metric(CODE_TIMEOUTS)

    lines, elapsed = execute(agent, {"code": "import time; time.sleep(30)", "timeout": 1, "context_id": context_id})

    assert 1.0 <= elapsed < ENDS_WITHIN, elapsed
    [error] = errors(lines)
    assert error["name"] == "TimeoutError"
    assert error["value"].startswith(EXECUTION_TIMEOUT_PREFIX)
    assert error["value"] == f"{EXECUTION_TIMEOUT_PREFIX} 1s (the request's timeout) and was interrupted."
    assert lines[-1] == {"type": "end_of_execution"}
    assert agent.metric(CODE_TIMEOUTS) == before + 1
    after, _ = execute(agent, {"code": "kept", "context_id": context_id})
    assert main_text(after) == "still here"
    assert errors(after) == []


def test_the_configured_timeout_caps_a_longer_request_timeout(limited_agent: AgentProcess) -> None:
    """SANDBOX_EXECUTION_TIMEOUT=1.5 there: a request's 30 s does not lift it."""
    lines, elapsed = execute(limited_agent, {"code": "import time; time.sleep(30)", "timeout": 30})
    assert elapsed < ENDS_WITHIN, elapsed
    [error] = errors(lines)
    assert error["name"] == "TimeoutError"
    assert error["value"].startswith(f"{EXECUTION_TIMEOUT_PREFIX} 1.5s (SANDBOX_EXECUTION_TIMEOUT)")


def test_code_that_ends_in_time_is_not_cut(agent: AgentProcess) -> None:
    lines, _ = execute(agent, {"code": "import time; time.sleep(0.2); 6 * 7", "timeout": 20})
    assert main_text(lines) == "42"
    assert errors(lines) == []


@pytest.mark.parametrize(
    ("timeout", "message"),
    [
        ("true", "'timeout' must be a number of seconds, not bool"),
        ('"5"', "'timeout' must be a number of seconds, not str"),
        ("-1", "'timeout' must be a finite number of seconds > 0, not -1"),
        ("NaN", "'timeout' must be a finite number of seconds > 0, not nan"),
        ("1e400", "'timeout' must be a finite number of seconds > 0, not inf"),
        ("2592001", "'timeout' must be at most 2592000 seconds (30 days)"),
    ],
)
def test_a_bad_timeout_is_a_400_with_the_reason(agent: AgentProcess, timeout: str, message: str) -> None:
    status, raw = post(agent, "/execute", f'{{"code": "1", "timeout": {timeout}}}'.encode())
    assert status == 400, raw
    assert json.loads(raw) == {"code": 400, "message": message}
