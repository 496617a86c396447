"""commands.* and pty.* through the unmodified e2b SDK (sandbox_url + access token from a fake API)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from agentlib import AgentProcess
from e2b import CommandExitException, PtySize, TimeoutException

from testlib import wait_until


def test_run_returns_stdout_stderr_and_exit_code(sandbox: Any) -> None:
    result = sandbox.commands.run("echo out; echo err >&2")
    assert (result.stdout, result.stderr, result.exit_code) == ("out\n", "err\n", 0)


def test_non_zero_exit_raises_command_exit_exception(sandbox: Any) -> None:
    with pytest.raises(CommandExitException) as error:
        sandbox.commands.run("echo failing >&2; exit 7")
    assert error.value.exit_code == 7
    assert error.value.stderr == "failing\n"


def test_env_and_cwd_are_applied(sandbox: Any, agent: Any) -> None:
    (agent.workdir / "sub").mkdir(exist_ok=True)
    result = sandbox.commands.run('echo "$GREETING"; pwd', envs={"GREETING": "hello"}, cwd="sub")
    assert result.stdout == f"hello\n{agent.workdir / 'sub'}\n"


def test_access_token_is_not_visible_to_user_processes(sandbox: Any) -> None:
    result = sandbox.commands.run('echo "[$SANDBOX_ACCESS_TOKEN]"')
    assert result.stdout == "[]\n"


def test_missing_cwd_is_an_invalid_argument(sandbox: Any) -> None:
    from e2b import InvalidArgumentException

    with pytest.raises(InvalidArgumentException, match="does not exist"):
        sandbox.commands.run("true", cwd="/no/such/dir")


def test_command_timeout_raises_timeout_and_kills_the_command(sandbox: Any, agent: AgentProcess) -> None:
    timeouts = 'sandbox_agent_execution_timeouts_total{kind="command"'
    before = agent.metric(timeouts)
    with pytest.raises(TimeoutException):
        sandbox.commands.run("sleep 30 # timeout-probe", timeout=0.5)
    # The command's process group is gone, not left running.
    wait_until(
        lambda: not any("timeout-probe" in " ".join(p.args) for p in sandbox.commands.list()),
        timeout=10,
        message="the timed-out command to disappear",
    )
    # The SDK's own timeout counts like SANDBOX_EXECUTION_TIMEOUT (once the kill is recorded).
    wait_until(lambda: agent.metric(timeouts) == before + 1, timeout=10, message="the timeout to be counted")


def test_background_command_connect_and_kill(sandbox: Any) -> None:
    handle = sandbox.commands.run("echo started; sleep 60", background=True)
    assert handle.pid > 0
    assert handle.pid in [process.pid for process in sandbox.commands.list()]
    reconnected = sandbox.commands.connect(handle.pid)
    assert reconnected.pid == handle.pid
    assert sandbox.commands.kill(handle.pid) is True
    with pytest.raises(CommandExitException) as error:
        reconnected.wait()
    assert error.value.exit_code == -1
    assert sandbox.commands.kill(handle.pid) is False


def test_stdin_send_stream_and_close(sandbox: Any) -> None:
    handle = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.send_stdin(handle.pid, "one\n")
    sandbox.commands.stream_input(handle.pid, iter([b"two\n", "three\n"]))
    sandbox.commands.close_stdin(handle.pid)
    result = handle.wait()
    assert result.stdout == "one\ntwo\nthree\n"
    assert result.exit_code == 0


def test_output_callbacks_stream_before_the_end(sandbox: Any) -> None:
    seen: list[str] = []
    sandbox.commands.run("echo a; echo b", on_stdout=seen.append)
    assert "".join(seen) == "a\nb\n"


def test_pty_create_input_resize(sandbox: Any) -> None:
    output = bytearray()
    handle = sandbox.pty.create(PtySize(rows=24, cols=80))
    results: list[Any] = []
    reader = threading.Thread(target=lambda: results.append(handle.wait(on_pty=output.extend)))
    reader.start()
    sandbox.pty.send_stdin(handle.pid, b"stty size; echo marker-$((6*7))\n")
    wait_until(lambda: b"marker-42\r\n" in output, timeout=10, message="the first PTY command's output")
    assert b"24 80" in output
    sandbox.pty.resize(handle.pid, PtySize(rows=40, cols=100))
    sandbox.pty.send_stdin(handle.pid, b"stty size; exit\n")
    reader.join(timeout=10)
    assert b"40 100" in output
    assert results[0].exit_code == 0


def test_kill_of_unknown_pid_returns_false(sandbox: Any) -> None:
    assert sandbox.commands.kill(999_999) is False


def test_many_short_commands_do_not_leak_processes(sandbox: Any) -> None:
    for index in range(5):
        assert sandbox.commands.run(f"echo {index}").stdout == f"{index}\n"
    # Fails (instead of passing silently) when a finished command stays listed past the deadline.
    wait_until(
        lambda: not [p for p in sandbox.commands.list() if p.args[-1].startswith("echo ")],
        timeout=10,
        message="the finished echo commands to leave the process list",
    )
