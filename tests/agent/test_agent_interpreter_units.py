"""Kernel health without kernels: cgroup counters, exit descriptions, the process watch, the shared
zmq context."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from sandbox_operator.agent import kernelwatch
from sandbox_operator.agent.interpreter import close_channels, shared_zmq_context
from sandbox_operator.agent.kernelwatch import (
    PROCESS_LIMIT_MESSAGE,
    ProcessWatch,
    exit_description,
    oom_killed,
    process_limit_near,
    spawn_failure,
    user_tasks,
)
from sandbox_operator.agent.sysmetrics import (
    ResourceSampler,
    default_cgroup_root,
    memory_limit,
    oom_events_file,
    pids_usage,
    read_oom_kills,
)
from testlib import wait_until

V2_EVENTS = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n"
V1_OOM_CONTROL = "oom_kill_disable 0\nunder_oom 0\noom_kill 4\n"


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_oom_kill_counter_and_limit_are_read_from_each_cgroup_layout(tmp_path: Path) -> None:
    v2 = write(tmp_path / "v2", {"cgroup.controllers": "cpu memory pids\n", "memory.events": V2_EVENTS})
    write(v2, {"memory.max": "314572800\n"})
    assert (read_oom_kills(oom_events_file(v2)), memory_limit(v2)) == (1, 300 * 1024 * 1024)
    # v1 as mounted in a container: one directory per controller under the root.
    mounted = write(
        tmp_path / "v1", {"memory/memory.oom_control": V1_OOM_CONTROL, "memory/memory.limit_in_bytes": "1048576\n"}
    )
    assert oom_events_file(mounted) == mounted / "memory" / "memory.oom_control"
    assert (read_oom_kills(oom_events_file(mounted)), memory_limit(mounted)) == (4, 1024 * 1024)
    # v1 with the root pointing at a memory cgroup directory itself (what the tests do).
    direct = write(
        tmp_path / "direct",
        {"memory.oom_control": V1_OOM_CONTROL, "memory.limit_in_bytes": "9223372036854771712\n"},
    )
    assert (read_oom_kills(oom_events_file(direct)), memory_limit(direct)) == (4, None)  # unlimited
    # Linux < 4.13 has no oom_kill line; no cgroup at all reads as unknown too.
    old = write(tmp_path / "old", {"memory.oom_control": "oom_kill_disable 0\nunder_oom 0\n"})
    old_limit = write(old, {"memory.limit_in_bytes": "1\n"})
    assert read_oom_kills(oom_events_file(old_limit)) is None
    assert read_oom_kills(oom_events_file(tmp_path / "nothing")) is None


def test_pids_usage_and_the_process_limit(tmp_path: Path) -> None:
    full = write(tmp_path / "full", {"cgroup.controllers": "pids\n", "pids.current": "95\n", "pids.max": "100\n"})
    assert pids_usage(full) == (95, 100)
    assert process_limit_near(full)
    roomy = write(tmp_path / "roomy", {"cgroup.controllers": "pids\n", "pids.current": "5\n", "pids.max": "max\n"})
    assert pids_usage(roomy) == (5, None)
    if os.getuid() == 0:  # RLIMIT_NPROC does not bind root
        assert not process_limit_near(roomy)
    v1 = write(tmp_path / "v1", {"pids/pids.current": "3\n", "pids/pids.max": "10\n"})
    assert pids_usage(v1) == (3, 10) and process_limit_near(v1)
    assert user_tasks(os.getuid()) >= 1


def test_the_cgroup_root_is_overridable(tmp_path: Path) -> None:
    assert default_cgroup_root({}) == Path("/sys/fs/cgroup")
    assert default_cgroup_root({"SANDBOX_CGROUP_ROOT": str(tmp_path)}) == tmp_path
    # /metrics reads a v1 memory cgroup directory given as the root, too.
    direct = write(
        tmp_path / "memcg",
        {"memory.usage_in_bytes": "4096\n", "memory.limit_in_bytes": "8192\n", "memory.stat": "total_cache 12\n"},
    )
    sample = ResourceSampler(tmp_path, cgroup_root=direct).sample()
    assert (sample.memory_used, sample.memory_limit, sample.memory_cache) == (4096, 8192, 12)


def test_exit_descriptions_and_causes(tmp_path: Path) -> None:
    assert exit_description(-9) == "killed by signal 9, SIGKILL"
    assert exit_description(-11) == "killed by signal 11, SIGSEGV"
    assert exit_description(-200) == "killed by signal 200"
    assert exit_description(3) == "exit code 3"
    events = write(tmp_path, {"memory.events": V2_EVENTS}) / "memory.events"
    assert oom_killed(-9, 0, events)  # the counter (1) rose during the execution
    assert not oom_killed(-9, 1, events)  # a SIGKILL from someone else
    assert not oom_killed(-11, 0, events)  # the OOM killer only sends SIGKILL
    assert not oom_killed(-9, None, events)  # no counter to compare


def test_spawn_failures_for_lack_of_a_resource_are_503() -> None:
    status, message = spawn_failure(BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")) or (0, "")
    assert status == 503 and message.startswith(PROCESS_LIMIT_MESSAGE)
    assert (spawn_failure(OSError(errno.ENOMEM, "Cannot allocate memory")) or (0,))[0] == 503
    assert spawn_failure(FileNotFoundError(errno.ENOENT, "No such file or directory")) is None


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polling"])
async def test_the_process_watch_sees_an_exit_at_once(pidfd: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not pidfd:

        def refuse(pid: int, flags: int = 0) -> int:
            raise OSError(errno.ENOSYS, "Function not implemented")

        monkeypatch.setattr(os, "pidfd_open", refuse)
    child = subprocess.Popen(["sleep", "30"])  # noqa: ASYNC220 (the Popen is what the watch is for)
    watch = ProcessWatch(child)
    try:
        await asyncio.sleep(0.05)
        assert not watch.exited.done()
        killed_at = time.monotonic()
        child.kill()
        assert await asyncio.wait_for(watch.exited, 5) == -9
        assert time.monotonic() - killed_at < kernelwatch.POLL_INTERVAL + 0.5
    finally:
        watch.close()
        child.kill()
        child.wait()
    exited = subprocess.Popen(["sh", "-c", "exit 7"])  # noqa: ASYNC220
    exited.wait()  # already reaped: pidfd_open fails, the poll still reports it
    assert await asyncio.wait_for(ProcessWatch(exited).exited, 5) == 7


def own_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_the_shared_zmq_context_starts_its_threads_up_front() -> None:
    import zmq

    before = own_threads()
    context = shared_zmq_context()
    try:
        started = own_threads()
        assert started == before + 2  # libzmq's I/O and reaper threads, now rather than on a kernel start
        sockets = [context.socket(zmq.DEALER) for _ in range(6)]
        assert own_threads() == started
        for socket in sockets:
            socket.close(linger=0)
    finally:
        context.destroy(linger=0)
    wait_until(lambda: own_threads() == before, timeout=5, message="the zmq threads to end")


class Channel:
    def __init__(self) -> None:
        self.stopped = False

    def is_alive(self) -> bool:
        return not self.stopped

    def stop(self) -> None:
        self.stopped = True


class Client:
    """Like jupyter_client's: a channel property creates (and connects) the channel on first use."""

    def __init__(self) -> None:
        self._shell_channel: Channel | None = Channel()
        self._iopub_channel: Channel | None = Channel()
        self._stdin_channel: Channel | None = None
        self._control_channel: Channel | None = None
        self._hb_channel: Channel | None = None

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"close_channels touched {name}")


def test_closing_a_client_opens_no_channel() -> None:
    client = Client()
    shell, iopub = client._shell_channel, client._iopub_channel
    close_channels(client)  # type: ignore[arg-type]
    assert shell is not None and shell.stopped and iopub is not None and iopub.stopped
