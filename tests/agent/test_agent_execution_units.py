"""Decisions of an execution and an upload without a kernel or a server: the timeout clock, IOPub
message → JSON lines, the /execute body and the upload error mapping."""

from __future__ import annotations

import errno
import json
import zlib
from typing import Any

import pytest

from sandbox_operator.agent.envd import _BadUpload, _UploadTooLarge, upload_error
from sandbox_operator.agent.interpreter import (
    CONFIGURED_TIMEOUT_SOURCE,
    INTERRUPT_GRACE,
    KEEPALIVE_INTERVAL,
    REQUESTED_TIMEOUT_SOURCE,
    ExecutionTimeout,
    InterpreterError,
    Silence,
    execution_timeout,
    is_idle,
    message_lines,
    next_wait,
    on_silence,
    timeout_line,
)
from sandbox_operator.agent.interpreter_http import MAX_EXECUTE_TIMEOUT, ExecuteRequest, execute_request
from sandbox_operator.agent.limits import OutputLimiter, truncation_marker
from sandbox_operator.api.names import EXECUTION_TIMEOUT_PREFIX

STAMP = "2024-01-02T03:04:05+00:00"


def message(kind: str, **content: Any) -> dict[str, Any]:
    return {"msg_type": kind, "content": content, "header": {"date": STAMP}, "parent_header": {}}


# -- the timeout clock -------------------------------------------------------------------------


def test_the_wait_ends_at_the_next_keepalive_deadline_or_end_of_grace() -> None:
    assert next_wait(100.0, None, None) == KEEPALIVE_INTERVAL
    assert next_wait(100.0, 1000.0, None) == KEEPALIVE_INTERVAL
    assert next_wait(100.0, 102.0, None) == 2.0
    assert next_wait(100.0, 90.0, None) == 0.0  # past the deadline: look once more without waiting
    # Once interrupted, the grace counts, not the deadline.
    assert next_wait(100.0, 90.0, 99.0) == INTERRUPT_GRACE - 1.0
    assert next_wait(100.0, 90.0, 100.0 - INTERRUPT_GRACE - 1) == 0.0


def test_silence_means_keepalive_then_interrupt_then_give_up() -> None:
    assert on_silence(100.0, None, None) is Silence.KEEPALIVE
    assert on_silence(100.0, 101.0, None) is Silence.KEEPALIVE
    assert on_silence(100.0, 100.0, None) is Silence.INTERRUPT
    # Interrupted once only: within the grace it keeps waiting, after it gives up.
    assert on_silence(100.0, 90.0, 100.0 - INTERRUPT_GRACE / 2) is Silence.KEEPALIVE
    assert on_silence(100.0, 90.0, 100.0 - INTERRUPT_GRACE) is Silence.GIVE_UP


def test_the_deadline_is_the_tighter_of_the_request_and_the_configured_timeout() -> None:
    assert execution_timeout(None, 0.0) is None
    assert execution_timeout(None, 5.0) == ExecutionTimeout(5.0, CONFIGURED_TIMEOUT_SOURCE)
    assert execution_timeout(2.0, 0.0) == ExecutionTimeout(2.0, REQUESTED_TIMEOUT_SOURCE)
    assert execution_timeout(2.0, 5.0) == ExecutionTimeout(2.0, REQUESTED_TIMEOUT_SOURCE)
    assert execution_timeout(9.0, 5.0) == ExecutionTimeout(5.0, CONFIGURED_TIMEOUT_SOURCE)
    assert execution_timeout(5.0, 5.0) == ExecutionTimeout(5.0, CONFIGURED_TIMEOUT_SOURCE)


def test_the_timeout_line_starts_with_the_shared_prefix_and_names_the_limit() -> None:
    line = timeout_line(ExecutionTimeout(1.5, REQUESTED_TIMEOUT_SOURCE), restarted=False)
    assert line == {
        "type": "error",
        "name": "TimeoutError",
        "value": f"{EXECUTION_TIMEOUT_PREFIX} 1.5s (the request's timeout) and was interrupted.",
        "traceback": "",
    }
    restarted = timeout_line(ExecutionTimeout(30.0, CONFIGURED_TIMEOUT_SOURCE), restarted=True)
    assert restarted["value"].startswith(f"{EXECUTION_TIMEOUT_PREFIX} 30s (SANDBOX_EXECUTION_TIMEOUT)")
    assert restarted["value"].endswith("its state was lost.")


# -- IOPub messages → JSON lines ---------------------------------------------------------------


def test_only_an_idle_status_ends_the_execution() -> None:
    assert is_idle(message("status", execution_state="idle"))
    assert not is_idle(message("status", execution_state="busy"))
    assert not is_idle(message("stream", execution_state="idle"))


def test_messages_become_lines() -> None:
    limiter = OutputLimiter(0)
    assert message_lines(message("execute_input", execution_count=3), limiter, interrupted=False) == [
        {"type": "number_of_executions", "execution_count": 3}
    ]
    assert message_lines(message("stream", name="stderr", text="oops"), limiter, interrupted=False) == [
        {"type": "stderr", "text": "oops", "timestamp": STAMP}
    ]
    assert message_lines(message("stream", text="hi"), limiter, interrupted=False) == [
        {"type": "stdout", "text": "hi", "timestamp": STAMP}
    ]
    assert message_lines(message("stream", text=""), limiter, interrupted=False) == []
    result = message("execute_result", data={"text/plain": "'x'"})
    assert message_lines(result, limiter, interrupted=False) == [
        {"type": "result", "text": "x", "is_main_result": True}
    ]
    error = message("error", ename="NameError", evalue="x", traceback=["a", "b"])
    assert message_lines(error, limiter, interrupted=False) == [
        {"type": "error", "name": "NameError", "value": "x", "traceback": "a\nb"}
    ]
    assert message_lines(message("error"), limiter, interrupted=False) == [
        {"type": "error", "name": "Error", "value": "", "traceback": ""}
    ]
    assert message_lines(message("status", execution_state="busy"), limiter, interrupted=False) == []
    assert message_lines(message("comm_open"), limiter, interrupted=False) == []


def test_after_the_timeout_interrupt_output_and_its_error_are_dropped_but_results_kept() -> None:
    limiter = OutputLimiter(0)
    assert message_lines(message("stream", text="late"), limiter, interrupted=True) == []
    assert message_lines(message("error", ename="KeyboardInterrupt"), limiter, interrupted=True) == []
    assert message_lines(message("display_data", data={"text/plain": "p"}), limiter, interrupted=True) == [
        {"type": "result", "text": "p", "is_main_result": False}
    ]


def test_the_output_cap_cuts_streams_and_drops_whole_results() -> None:
    limiter = OutputLimiter(10)
    marker = truncation_marker(10).decode()
    assert message_lines(message("stream", text="0123456789abc"), limiter, interrupted=False) == [
        {"type": "stdout", "text": "0123456789", "timestamp": STAMP},
        {"type": "stdout", "text": marker, "timestamp": STAMP},
    ]
    assert message_lines(message("stream", text="more"), limiter, interrupted=False) == []  # marker once
    assert message_lines(message("execute_result", data={"text/plain": "r"}), limiter, interrupted=False) == []

    limiter = OutputLimiter(10)
    big = message("display_data", data={"image/png": "A" * 100})
    assert message_lines(big, limiter, interrupted=False) == [
        {"type": "result", "text": marker.strip(), "is_main_result": False}
    ]


# -- the /execute body -------------------------------------------------------------------------


def test_an_execute_body_is_checked_in_order() -> None:
    assert execute_request({"code": "1"}) == ExecuteRequest("1", None, None, None)
    assert execute_request({"code": "1", "context_id": "c", "env_vars": {"A": "b"}}) == ExecuteRequest(
        "1", "c", None, {"A": "b"}
    )
    assert execute_request({"code": "", "language": "js"}) == ExecuteRequest("", None, "js", None)
    refusals: list[tuple[dict[str, Any], str]] = [
        ({"code": 1, "context_id": 1, "language": 1}, "'code' must be a string"),
        ({"code": "1", "context_id": "c", "language": "py"}, "not both"),
        ({"code": "1", "language": 3, "env_vars": []}, "'language' must be a string"),
        ({"code": "1", "env_vars": {"A": 1}, "context_id": 2}, "'env_vars' must be a map of strings"),
        ({"code": "1", "env_vars": ["A"]}, "'env_vars' must be a map of strings"),
        ({"code": "1", "context_id": 2}, "'context_id' must be a string"),
    ]
    for body, message_part in refusals:
        with pytest.raises(InterpreterError, match=message_part) as caught:
            execute_request(body)
        assert caught.value.status == 400


# -- upload errors -----------------------------------------------------------------------------


def _answer(error: Exception) -> tuple[int, str]:
    response = upload_error(error, 1024)
    assert isinstance(response.text, str)
    body = json.loads(response.text)
    assert body["code"] == response.status
    return response.status, body["message"]


def test_upload_errors_map_to_envd_statuses() -> None:
    assert _answer(_BadUpload("no 'file' part")) == (400, "no 'file' part")
    assert _answer(_UploadTooLarge()) == (413, "upload exceeds the limit of 1024 bytes")
    assert _answer(IsADirectoryError(errno.EISDIR, "Is a directory", "/d")) == (400, "path '/d' is a directory")
    assert _answer(PermissionError(errno.EACCES, "denied", "/f")) == (401, "permission denied: '/f'")
    assert _answer(OSError(errno.ENOSPC, "full")) == (507, "not enough disk space available")
    assert _answer(OSError(errno.EIO, "bad")) == (500, "error writing file: [Errno 5] bad")
    assert _answer(zlib.error("bad header")) == (400, "invalid gzip body: bad header")
    with pytest.raises(ValueError):
        upload_error(ValueError("not an upload error"), 1024)


def test_an_execute_timeout_is_a_positive_finite_number_of_seconds() -> None:
    assert execute_request({"code": "1", "timeout": 1}) == ExecuteRequest("1", None, None, None, 1.0)
    assert execute_request({"code": "1", "timeout": 0.25}).timeout == 0.25
    assert execute_request({"code": "1", "timeout": None}).timeout is None
    assert execute_request({"code": "1", "timeout": MAX_EXECUTE_TIMEOUT}).timeout == MAX_EXECUTE_TIMEOUT
    refusals: list[tuple[Any, str]] = [
        (True, "must be a number of seconds, not bool"),
        ("5", "must be a number of seconds, not str"),
        ([1], "must be a number of seconds, not list"),
        ({"s": 1}, "must be a number of seconds, not dict"),
        (0, "finite number of seconds > 0, not 0"),
        (-1.5, "finite number of seconds > 0, not -1.5"),
        (float("nan"), "finite number of seconds > 0, not nan"),
        (float("inf"), "finite number of seconds > 0, not inf"),
        (float("-inf"), "finite number of seconds > 0"),
        (MAX_EXECUTE_TIMEOUT + 1, "at most 2592000 seconds \\(30 days\\)"),
        (10**400, "at most"),  # too big for a float: refused, not an OverflowError
    ]
    for value, message_part in refusals:
        with pytest.raises(InterpreterError, match=message_part) as caught:
            execute_request({"code": "1", "timeout": value})
        assert caught.value.status == 400, value
