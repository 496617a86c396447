"""Kernel processes: noticing a kernel's exit at once, and saying why it died or could not start."""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import signal
import subprocess
from pathlib import Path
from typing import Any, Final

from .sysmetrics import pids_usage, read_oom_kills

# Without pidfds (Linux < 5.3, or a seccomp profile that refuses pidfd_open) the exit is polled.
POLL_INTERVAL: Final = 0.15
# Tasks (threads count) one ipykernel needs to come up: main, heartbeat, IOPub, control, parent
# poller and its zmq I/O threads. When fewer than this many are left under the process limit, a
# kernel that died during start-up is reported as stopped by that limit.
KERNEL_TASK_HEADROOM: Final = 16

PROCESS_LIMIT_MESSAGE: Final = "cannot start a kernel: the sandbox's process limit is reached"
OUT_OF_MEMORY_MESSAGE: Final = "cannot start a kernel: out of memory"


class ProcessWatch:
    """Resolves `exited` with the return code as soon as a child process exits.

    A pidfd on the event loop costs no thread and no wake-ups while the child lives; the kernel's
    heartbeat would notice a death only after several missed beats.
    """

    def __init__(self, popen: subprocess.Popen[Any]) -> None:
        self.popen = popen
        self._loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[int] = self._loop.create_future()
        self._pidfd: int | None = None
        self._timer: asyncio.Handle | None = None
        try:
            self._pidfd = os.pidfd_open(popen.pid)
        except OSError:  # no pidfds here, or the child is already reaped: poll instead
            self._timer = self._loop.call_soon(self._check)
        else:
            self._loop.add_reader(self._pidfd, self._check)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _check(self) -> None:
        code = self.popen.poll()
        if code is not None:
            self._finish(code)
        elif self._pidfd is None:
            self._timer = self._loop.call_later(POLL_INTERVAL, self._check)

    def _finish(self, code: int) -> None:
        self.close()
        if not self.exited.done():
            self.exited.set_result(code)

    def reap(self) -> None:
        """Resolve now if the process has exited (after the agent killed and waited for it)."""
        code = self.popen.poll()
        if code is not None:
            self._finish(code)

    def close(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def exit_description(returncode: int) -> str:
    """'killed by signal 9, SIGKILL' or 'exit code 3' (a Popen return code)."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            return f"killed by signal {-returncode}"
        return f"killed by signal {-returncode}, {name}"
    return f"exit code {returncode}"


def oom_killed(returncode: int, oom_before: int | None, events_file: Path) -> bool:
    """True when a SIGKILL came with a rise of the memory cgroup's oom_kill counter (the OOM
    killer only ever sends SIGKILL)."""
    if returncode != -signal.SIGKILL or oom_before is None:
        return False
    after = read_oom_kills(events_file)
    return after is not None and after > oom_before


def user_tasks(uid: int) -> int:
    """Tasks (processes and threads) of a real uid visible in /proc: what RLIMIT_NPROC counts."""
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            status = Path("/proc", name, "status").read_text()
        except OSError:
            continue
        real_uid = threads = None
        for line in status.splitlines():
            if line.startswith("Uid:"):
                real_uid = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
        if real_uid == uid:
            total += threads or 1
    return total


def process_limit_near(cgroup_root: Path, headroom: int = KERNEL_TASK_HEADROOM) -> bool:
    """Whether fewer than `headroom` tasks are left under RLIMIT_NPROC or the pids cgroup's limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    # RLIMIT_NPROC does not apply to root.
    if soft != resource.RLIM_INFINITY and os.getuid() != 0 and user_tasks(os.getuid()) + headroom > soft:
        return True
    current, limit = pids_usage(cgroup_root)
    return current is not None and limit is not None and current + headroom > limit


def spawn_failure(error: OSError) -> tuple[int, str] | None:
    """(HTTP status, message) for a kernel that could not be spawned for lack of a resource."""
    if error.errno == errno.EAGAIN:  # fork(): RLIMIT_NPROC or the pids cgroup
        return 503, f"{PROCESS_LIMIT_MESSAGE} ({error.strerror}); stop some processes or code contexts and retry"
    if error.errno == errno.ENOMEM:
        return 503, f"{OUT_OF_MEMORY_MESSAGE} ({error.strerror})"
    if error.errno in (errno.EMFILE, errno.ENFILE):
        return 503, f"cannot start a kernel: the open-file limit is reached ({error.strerror})"
    return None
