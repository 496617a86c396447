"""Execution timeout, output cap and concurrency limit (agent started with tight SANDBOX_* limits)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from agentlib import AgentProcess
from e2b import RateLimitException, TimeoutException

from testlib import wait_until

MARKER = "[output truncated: the limit of 2000 bytes per execution was reached]"
COMMAND_TIMEOUTS = 'sandbox_agent_execution_timeouts_total{kind="command"'
CODE_TIMEOUTS = 'sandbox_agent_execution_timeouts_total{kind="code"'


def test_execution_timeout_kills_the_command_and_reports_a_timeout(
    limited_sandbox: Any, limited_agent: AgentProcess
) -> None:
    before = limited_agent.metric(COMMAND_TIMEOUTS)
    with pytest.raises(TimeoutException, match="SANDBOX_EXECUTION_TIMEOUT"):
        limited_sandbox.commands.run("sleep 30", timeout=0)
    assert limited_agent.metric(COMMAND_TIMEOUTS) == before + 1


def test_execution_timeout_interrupts_code_and_keeps_the_context(
    limited_sandbox: Any, limited_agent: AgentProcess
) -> None:
    limited_sandbox.run_code("kept = 'still here'")
    before = limited_agent.metric(CODE_TIMEOUTS)
    execution = limited_sandbox.run_code("import time\nwhile True:\n    time.sleep(0.05)")
    assert execution.error is not None
    assert execution.error.name == "TimeoutError"
    assert "SANDBOX_EXECUTION_TIMEOUT" in execution.error.value
    assert limited_agent.metric(CODE_TIMEOUTS) == before + 1
    assert limited_sandbox.run_code("kept").text == "still here"


def test_a_timeout_error_raised_by_user_code_is_not_an_execution_timeout(
    limited_sandbox: Any, limited_agent: AgentProcess
) -> None:
    before = limited_agent.metric(CODE_TIMEOUTS)
    execution = limited_sandbox.run_code("raise TimeoutError('from the user')")
    assert execution.error is not None and execution.error.value == "from the user"
    assert limited_agent.metric(CODE_TIMEOUTS) == before


def test_command_output_is_capped_with_a_marker(limited_sandbox: Any) -> None:
    result = limited_sandbox.commands.run("head -c 10000 /dev/zero | tr '\\0' a")
    marker = "\n[output truncated: the limit of 2000 bytes per execution was reached]\n"
    assert result.stdout == "a" * 2000 + marker


def test_code_output_is_capped_with_a_marker(limited_sandbox: Any) -> None:
    execution = limited_sandbox.run_code("print('b' * 10000)")
    stdout = "".join(execution.logs.stdout)
    kept, _, marker = stdout.partition("\n[output truncated")
    assert kept == "b" * 2000
    assert "limit of 2000 bytes" in marker


def test_huge_result_bundles_are_replaced_by_the_marker(limited_sandbox: Any) -> None:
    small = limited_sandbox.run_code("from IPython.display import HTML, display\ndisplay(HTML('<b>ok</b>'))")
    assert [result.html for result in small.results] == ["<b>ok</b>"]

    # A bundle that does not fit is dropped whole (a cut image is garbage); so is everything after it.
    displayed = limited_sandbox.run_code(
        "display(HTML('<p>' + 'x' * 5000 + '</p>'))\ndisplay(HTML('<b>after</b>'))\nprint('late')"
    )
    assert [(result.text, result.html, result.is_main_result) for result in displayed.results] == [
        (MARKER, None, False)
    ]
    assert displayed.logs.stdout == []

    main = limited_sandbox.run_code("'c' * 5000")
    assert main.text == MARKER
    assert len(main.results) == 1 and main.results[0].is_main_result


def test_concurrency_limit_answers_with_a_clear_error(limited_sandbox: Any, limited_agent: Any) -> None:
    first = limited_sandbox.commands.run("sleep 20", background=True, timeout=0)
    second = limited_sandbox.commands.run("sleep 20", background=True, timeout=0)
    try:
        with pytest.raises(RateLimitException, match="SANDBOX_MAX_CONCURRENT_EXECUTIONS"):
            limited_sandbox.commands.run("true")
        status, _, body = limited_agent.request(
            "POST",
            "/execute",
            body=json.dumps({"code": "1"}).encode(),
            headers={"Content-Type": "application/json"},
            port=limited_agent.interpreter_port,
        )
        assert status == 429
        assert b"SANDBOX_MAX_CONCURRENT_EXECUTIONS" in body
    finally:
        limited_sandbox.commands.kill(first.pid)
        limited_sandbox.commands.kill(second.pid)
    wait_until(lambda: limited_sandbox.commands.list() == [], timeout=10, message="the background commands to end")
    assert limited_sandbox.commands.run("echo free again").stdout == "free again\n"
