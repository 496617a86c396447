"""Unit tests of what the agent does for running as a container: the init's pure parts, undumpable,
the resource_exhausted mapping, process-tree kills on local processes, a uid without a passwd entry."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import pwd
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
from agentlib import REPO_ROOT
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sandbox_operator.agent.config import AgentConfig, default_workdir
from sandbox_operator.agent.connect import ConnectError, JsonObject, encode_message_envelope
from sandbox_operator.agent.init import FORWARDED_SIGNALS, exit_code, should_forward
from sandbox_operator.agent.limits import ExecutionStats, exhaustion_message
from sandbox_operator.agent.process import ProcessManager, kill_tree, parse_proc_stat, session_members
from sandbox_operator.agent.rpc import server_stream, unary
from sandbox_operator.agent.users import SandboxState
from testlib import wait_until

EAGAIN_MESSAGE = "cannot start process: the sandbox's process limit is reached (EAGAIN)"

# -- the init --------------------------------------------------------------------------------------------


def test_exit_code_is_the_code_or_128_plus_the_signal() -> None:
    assert exit_code(0) == 0
    assert exit_code(3 << 8) == 3  # exited with 3
    assert exit_code(signal.SIGKILL) == 137  # killed by SIGKILL
    assert exit_code(signal.SIGTERM) == 143
    assert exit_code(0x7F | (signal.SIGSTOP << 8)) == 1  # stopped: not an exit, never passed in


def test_only_signals_from_outside_the_namespace_are_forwarded() -> None:
    assert {
        signal.SIGTERM,
        signal.SIGINT,
        signal.SIGHUP,
        signal.SIGQUIT,
        signal.SIGUSR1,
        signal.SIGUSR2,
    } == FORWARDED_SIGNALS
    for signum in FORWARDED_SIGNALS:
        assert should_forward(signum, 0)  # the runtime, from the parent namespace: si_pid reads 0
        assert not should_forward(signum, 42)  # user code inside the sandbox
    assert not should_forward(signal.SIGCHLD, 0)
    assert not should_forward(signal.SIGKILL, 0)


def test_the_agent_makes_itself_undumpable_first() -> None:
    # In a child process: PR_SET_DUMPABLE cannot be undone without an exec.
    code = (
        "import ctypes\n"
        "from sandbox_operator.agent.init import make_undumpable\n"
        "libc = ctypes.CDLL(None)\n"
        "before = libc.prctl(3, 0, 0, 0, 0)\n"  # PR_GET_DUMPABLE
        "ok = make_undumpable()\n"
        "print(before, ok, libc.prctl(3, 0, 0, 0, 0))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "operator")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=30)
    assert result.stdout.split() == ["1", "True", "0"], result.stderr
    main = (REPO_ROOT / "operator" / "sandbox_operator" / "agent" / "__main__.py").read_text()
    body = main.split("def main() -> None:", 1)[1]
    statements = [line.strip() for line in body.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert statements[:2] == ["make_undumpable()", "become_init_if_pid1()"]


# -- resource_exhausted ----------------------------------------------------------------------------------


def test_exhaustion_messages() -> None:
    assert exhaustion_message(BlockingIOError(errno.EAGAIN, "x"), "start process") == EAGAIN_MESSAGE
    assert exhaustion_message(OSError(errno.EAGAIN, "x"), "start process") == EAGAIN_MESSAGE
    assert exhaustion_message(OSError(errno.ENOMEM, "x"), "start process") == (
        "cannot start process: the sandbox is out of memory (ENOMEM)"
    )
    assert "open-file limit" in (exhaustion_message(OSError(errno.EMFILE, "x"), "start process") or "")
    assert exhaustion_message(RuntimeError("can't start new thread"), "serve the request") == (
        "cannot start a thread: the sandbox's process limit is reached (EAGAIN)"
    )
    assert exhaustion_message(FileNotFoundError(errno.ENOENT, "x"), "start process") is None
    assert exhaustion_message(RuntimeError("other"), "start process") is None
    assert exhaustion_message(ValueError("x"), "start process") is None


def _state(tmp_path: Path) -> SandboxState:
    return SandboxState(config=AgentConfig(workdir=tmp_path), access_token=None)


async def test_a_spawn_refused_with_eagain_is_resource_exhausted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> NoReturn:
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(subprocess, "Popen", refuse)  # what process.py calls
    state, stats = _state(tmp_path), ExecutionStats(limit=4)
    manager = ProcessManager(state, stats)
    for pty_size in (None, (80, 24)):
        with pytest.raises(ConnectError) as error:
            await manager.start(
                user=state.user(None), cmd="true", args=[], envs={}, cwd=None, tag=None, pty_size=pty_size, stdin=False
            )
        assert (error.value.code, error.value.message) == ("resource_exhausted", EAGAIN_MESSAGE)
    assert stats.running == 0  # the slots were given back


async def test_rpc_handlers_that_cannot_get_a_thread_answer_resource_exhausted() -> None:
    async def no_thread(request: web.Request, message: JsonObject) -> JsonObject:
        raise RuntimeError("can't start new thread")

    async def broken(request: web.Request, message: JsonObject) -> JsonObject:
        raise RuntimeError("a bug")

    async def stream(request: web.Request, message: JsonObject, deadline: float | None) -> AsyncIterator[JsonObject]:
        yield {"start": {}}
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    app = web.Application()
    app.router.add_post("/x.Y/NoThread", unary(no_thread))
    app.router.add_post("/x.Y/Broken", unary(broken))
    app.router.add_post("/x.Y/Stream", server_stream(stream))
    async with TestClient(TestServer(app)) as client:
        headers = {"Content-Type": "application/json"}
        response = await client.post("/x.Y/NoThread", data=b"{}", headers=headers)
        assert response.status == 429
        assert await response.json() == {
            "code": "resource_exhausted",
            "message": "cannot start a thread: the sandbox's process limit is reached (EAGAIN)",
        }
        assert (await client.post("/x.Y/Broken", data=b"{}", headers=headers)).status == 500
        response = await client.post(
            "/x.Y/Stream", data=encode_message_envelope({}), headers={"Content-Type": "application/connect+json"}
        )
        body = await response.read()
        end = json.loads(body[body.rindex(b'{"error"') :])  # the end-stream envelope comes last
        assert end["error"]["code"] == "resource_exhausted"
        assert "process limit is reached (EAGAIN)" in end["error"]["message"]


# -- process trees ---------------------------------------------------------------------------------------


def test_proc_stat_parsing_survives_odd_command_names() -> None:
    assert parse_proc_stat("4242 (a b) c) (x) S 1 4240 4239 0 -1 4194560 ...") == ("S", 4240, 4239)
    assert parse_proc_stat("7 (sleep) Z 1 7 7 0") == ("Z", 7, 7)


TREE = (
    "sleep 300 & (sleep 300 &); "
    f"{sys.executable} -c 'import os, time; os.setpgid(0, 0); time.sleep(300)' & "
    "echo started; wait"
)


async def test_kill_tree_ends_the_session_including_other_process_groups() -> None:
    leader = subprocess.Popen(["bash", "-c", TREE], stdout=subprocess.PIPE, start_new_session=True)  # noqa: ASYNC220
    try:
        assert leader.stdout is not None and leader.stdout.readline() == b"started\n"

        def groups() -> set[int]:
            return {os.getpgid(pid) for pid in session_members(leader.pid)}

        # The command's group, and the one the python process made for itself.
        await asyncio.to_thread(wait_until, lambda: len(groups()) == 2, timeout=10, message="two groups")
        assert len(session_members(leader.pid)) >= 4
        assert await kill_tree(leader.pid) is True
        assert session_members(leader.pid) == []
    finally:
        leader.kill()
        leader.wait()


async def test_what_an_ended_command_left_running_is_still_killed_by_its_pid(tmp_path: Path) -> None:
    state = _state(tmp_path)
    manager = ProcessManager(state, ExecutionStats())
    managed, _ = await manager.start(
        user=state.user(None),
        cmd="bash",
        args=["-c", "sleep 300 >/dev/null 2>&1 & exit 0"],
        envs={},
        cwd=None,
        tag=None,
        pty_size=None,
        stdin=False,
    )
    await asyncio.wait_for(managed.finished.wait(), 10)
    assert managed.end == {"end": {"exited": True, "status": "exit status 0"}}
    assert len(session_members(managed.pid)) == 1  # the sleep
    with pytest.raises(ConnectError) as error:
        manager.find("pid", managed.pid)  # no longer listed
    assert error.value.code == "not_found"
    await manager.send_signal("pid", managed.pid, signal.SIGKILL)
    assert session_members(managed.pid) == []
    with pytest.raises(ConnectError) as error:
        await manager.send_signal("pid", managed.pid, signal.SIGKILL)
    assert error.value.code == "not_found"
    await manager.shutdown()


# -- a uid without a passwd entry -------------------------------------------------------------------------


def test_a_uid_without_a_passwd_entry_is_a_user_named_by_its_uid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unknown(uid: int) -> NoReturn:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", unknown)
    user = _state(tmp_path).user(None)
    assert (user.name, user.uid, user.gid, user.home, user.switch) == (
        str(os.getuid()),
        os.getuid(),
        os.getgid(),
        tmp_path,
        False,
    )
    if not Path("/home/user").is_dir():
        assert default_workdir({"HOME": str(tmp_path)}) == tmp_path
