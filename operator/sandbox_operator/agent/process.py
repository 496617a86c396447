"""process.Process: spawning commands (pipes or a real pseudo-terminal) and fanning out their events.

Processes are spawned with subprocess.Popen and watched with event-loop readers on their pipes and a
pidfd for their exit: about twice as fast per command as asyncio's subprocess transports, which start a
waiter thread per child.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from .config import without_secrets
from .connect import ConnectError, JsonObject
from .limits import ConcurrencyLimitError, ExecutionStats, OutputLimiter, exhaustion_message
from .protojson import encode_bytes
from .sysmetrics import default_cgroup_root, oom_events_file, read_oom_kills
from .users import PathError, SandboxState, UserContext

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
# After the main process exits, how long descendants that inherited its output may keep it open
# before the command is reported as ended anyway (e.g. `server &` inside a foreground command).
OUTPUT_DRAIN_GRACE = 1.0
SIGNALS_BY_NAME: Mapping[str, int] = {"SIGNAL_SIGTERM": 15, "SIGNAL_SIGKILL": 9, "SIGNAL_UNSPECIFIED": 0}
# A kill sweeps the command's session until nothing of it is left (a fork bomb forks while it is being
# killed), for at most this long, pausing KILL_SWEEP_INTERVAL between sweeps.
KILL_TREE_SECONDS: Final = 5.0
KILL_SWEEP_INTERVAL: Final = 0.01
# Ended commands whose process group still had members (`server &`, a fork bomb whose first shell
# returned at once) stay killable by pid while it has; at most this many are remembered (oldest go).
MAX_LEFTOVER_SESSIONS: Final = 256


# A command the OOM killer ended reports what a shell and Kubernetes report for it: 128 + SIGKILL.
OOM_EXIT_CODE: Final = 128 + signal.SIGKILL
OOM_ERROR: Final = "killed by the out-of-memory killer: the sandbox's memory limit was reached"


def end_event(returncode: int, error: str | None, *, oom_killed: bool = False) -> JsonObject:
    """ProcessEvent.EndEvent as proto3 JSON (defaults omitted), worded like Go's os.ProcessState.

    `oom_killed`: the command died of SIGKILL while the memory cgroup's OOM counter rose; it ends
    with exit code 137 and says why (envd's -1 would hide the cause)."""
    end: JsonObject = {}
    if oom_killed and returncode == -signal.SIGKILL:
        return {"end": {"exitCode": OOM_EXIT_CODE, "status": "signal: killed", "error": error or OOM_ERROR}}
    if returncode >= 0:
        if returncode:
            end["exitCode"] = returncode
        end["exited"] = True
        end["status"] = f"exit status {returncode}"
    else:
        end["exitCode"] = -1
        name = signal.strsignal(-returncode) or f"signal {-returncode}"
        end["status"] = f"signal: {name.lower()}"
    if error:
        end["error"] = error
    return {"end": end}


def data_event(stream: str, chunk: bytes) -> JsonObject:
    return {"data": {stream: encode_bytes(chunk)}}


def parse_proc_stat(text: str) -> tuple[str, int, int]:
    """(state, process group, session) from a /proc/<pid>/stat line; comm may hold spaces and ')'."""
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[2]), int(fields[3])


def session_members(session: int) -> list[int]:
    """Live pids (not zombies) in the session, or in the process group, numbered `session`.

    Every command is a session of its own, so this is its process tree, including the process groups
    a job-control shell makes; only a process that called setsid() itself leaves it.
    """
    members: list[int] = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                state, group, sid = parse_proc_stat(handle.read().decode(errors="replace"))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if state not in ("Z", "X") and session in (sid, group) and int(name) != me:
            members.append(int(name))
    return members


def signal_tree(session: int, signum: int) -> list[int]:
    """Signal the process group and every member of the session; returns the members that were alive
    before (empty: nothing of it was left)."""
    if session <= 1:
        return []
    members = session_members(session)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(session, signum)  # atomic against fork within the group
    for pid in members:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)
    return members


async def kill_tree(session: int, within: float = KILL_TREE_SECONDS) -> bool:
    """SIGKILL the session until no live member is left (True) or `within` seconds passed (False).

    killpg() is atomic against fork within the group, but members may be in other groups, in the middle
    of a fork or not yet counted; repeating until a sweep finds nothing settles it.
    """
    deadline = time.monotonic() + within
    while signal_tree(session, signal.SIGKILL):
        if time.monotonic() >= deadline:
            log.warning("processes of session %d survived %.1fs of SIGKILL", session, within)
            return False
        await asyncio.sleep(KILL_SWEEP_INTERVAL)
    return True


def set_window_size(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows or 24, cols or 80, 0, 0))


def _make_controlling_terminal() -> None:
    # Runs in the child after setsid(): its stdin is the pty slave.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


async def write_fd(fd: int, data: bytes) -> None:
    """Write all of data to a non-blocking fd, waiting for writability from the event loop."""
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
            view = view[written:]
        except BlockingIOError:
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_writer(fd, ready.set_result, None)
            try:
                await ready
            finally:
                loop.remove_writer(fd)


class ManagedProcess:
    def __init__(
        self,
        *,
        popen: subprocess.Popen[bytes],
        config: JsonObject,
        tag: str | None,
        master_fd: int | None,
        stdin_enabled: bool,
        limiter: OutputLimiter,
    ) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.config = config
        self.tag = tag
        self.master_fd = master_fd
        self.stdin_fd: int | None = popen.stdin.fileno() if popen.stdin is not None else None
        self.stdin_enabled = stdin_enabled
        self.limiter = limiter
        # Set when a timeout (SANDBOX_EXECUTION_TIMEOUT or the SDK's own) killed the command;
        # timeout_error is the end event's `error`.
        self.timed_out = False
        self.timeout_error: str | None = None
        self.finished = asyncio.Event()
        self.end: JsonObject | None = None
        self.started = time.monotonic()
        self.oom_kills_at_start = 0  # the memory cgroup's OOM counter when it started
        self.sweeper: asyncio.Task[bool] | None = None
        self._subscribers: list[asyncio.Queue[JsonObject]] = []

    def info(self) -> JsonObject:
        info: JsonObject = {"config": self.config, "pid": self.pid}
        if self.tag is not None:
            info["tag"] = self.tag
        return info

    def subscribe(self) -> asyncio.Queue[JsonObject]:
        queue: asyncio.Queue[JsonObject] = asyncio.Queue()
        self._subscribers.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[JsonObject]) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(queue)

    def publish(self, event: JsonObject) -> None:
        for queue in self._subscribers:
            queue.put_nowait(event)

    def publish_output(self, stream: str, chunk: bytes) -> None:
        kept, marker = self.limiter.take(chunk)
        if kept:
            self.publish(data_event(stream, kept))
        if marker:
            self.publish(data_event(stream, marker))

    def expire(self, error: str) -> None:
        """A timeout ran out: kill the command and report it as timed out (end event, metrics)."""
        if self.finished.is_set():
            return
        # A command whose main process already exited ended on its own; only its leftovers go.
        if self.popen.returncode is None and not self.timed_out:
            self.timed_out = True
            self.timeout_error = error
        self.kill_group()

    def kill_group(self, signum: int = signal.SIGKILL) -> None:
        """Signal the command's whole tree (its session: the command and everything it started). A
        SIGKILL goes on sweeping in the background until the tree is gone (see kill_tree)."""
        if self.finished.is_set():
            return
        if self.popen.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signum)
        signal_tree(self.pid, signum)
        if signum == signal.SIGKILL and (self.sweeper is None or self.sweeper.done()):
            self.sweeper = asyncio.get_running_loop().create_task(kill_tree(self.pid), name=f"kill-{self.pid}")
            _background.add(self.sweeper)
            self.sweeper.add_done_callback(_background.discard)

    async def killed(self) -> None:
        """Wait (bounded) until a SIGKILL sweep started by kill_group has finished."""
        if self.sweeper is not None:
            await asyncio.shield(self.sweeper)

    async def write_input(self, data: bytes) -> None:
        if self.master_fd is not None:
            try:
                await write_fd(self.master_fd, data)
            except OSError as error:
                raise ConnectError("failed_precondition", f"the terminal is closed: {error}") from error
            return
        if not self.stdin_enabled or self.popen.stdin is None:
            raise ConnectError(
                "failed_precondition", "stdin is not enabled for this process (start it with stdin=True)"
            )
        if self.stdin_fd is None:
            raise ConnectError("failed_precondition", "stdin of this process is closed")
        try:
            await write_fd(self.stdin_fd, data)
        except OSError as error:
            raise ConnectError("failed_precondition", "the process no longer reads its stdin") from error

    def close_stdin(self) -> None:
        if self.master_fd is not None:
            raise ConnectError("invalid_argument", "cannot close stdin of a PTY; send Ctrl+D (0x04) instead")
        if not self.stdin_enabled or self.popen.stdin is None:
            raise ConnectError("failed_precondition", "stdin is not enabled for this process")
        if self.stdin_fd is not None:
            self.stdin_fd = None
            self.popen.stdin.close()


class ProcessManager:
    def __init__(self, state: SandboxState, stats: ExecutionStats) -> None:
        self.state = state
        self.stats = stats
        self.processes: dict[int, ManagedProcess] = {}
        self._base_env = without_secrets(os.environ)
        self._tasks: set[asyncio.Task[None]] = set()
        # pid of an ended command → nothing; ordered oldest first (see MAX_LEFTOVER_SESSIONS).
        self._leftovers: dict[int, None] = {}
        self._oom_file = oom_events_file(default_cgroup_root())

    def environment(self, user: UserContext, cwd: str, extra: Mapping[str, str]) -> dict[str, str]:
        env = dict(self._base_env)
        env.update(HOME=str(user.home), USER=user.name, LOGNAME=user.name, PWD=cwd)
        env.update(self.state.env_vars)
        env.update(extra)
        return without_secrets(env)

    def find(self, kind: str, value: int | str) -> ManagedProcess:
        if kind == "pid":
            found = self.processes.get(int(value))
            if found is not None:
                return found
        else:
            for candidate in self.processes.values():
                if candidate.tag == value:
                    return candidate
        raise ConnectError("not_found", f"process with {kind} {value} not found")

    def running(self) -> list[JsonObject]:
        return [process.info() for process in self.processes.values()]

    async def send_signal(self, kind: str, value: int | str, signum: int) -> None:
        """Signal a command's whole tree; a SIGKILL returns once nothing of it is left (bounded).

        A command whose main process has ended is no longer listed, but what it left running in its
        session (a fork bomb whose first shell returned at once, `server &`) is still killed by its pid.
        """
        try:
            managed = self.find(kind, value)
        except ConnectError:
            session = int(value) if kind == "pid" else 0
            if session not in self._leftovers:
                raise
            if not signal_tree(session, signum):
                del self._leftovers[session]
                raise
            if signum == signal.SIGKILL:
                await kill_tree(session)
                self._leftovers.pop(session, None)
            return
        managed.kill_group(signum)
        if signum == signal.SIGKILL:
            await managed.killed()

    def _remember_leftovers(self, session: int) -> None:
        # Forget groups that emptied meanwhile (one cheap signal-0 each): their pid may be reused.
        for known in [session, *self._leftovers]:
            try:
                os.killpg(known, 0)
            except (ProcessLookupError, PermissionError):
                self._leftovers.pop(known, None)
            else:
                self._leftovers[known] = None
        while len(self._leftovers) > MAX_LEFTOVER_SESSIONS:
            del self._leftovers[next(iter(self._leftovers))]

    async def start(
        self,
        *,
        user: UserContext,
        cmd: str,
        args: list[str],
        envs: dict[str, str],
        cwd: str | None,
        tag: str | None,
        pty_size: tuple[int, int] | None,
        stdin: bool,
    ) -> tuple[ManagedProcess, asyncio.Queue[JsonObject]]:
        if not cmd:
            raise ConnectError("invalid_argument", "process.cmd must not be empty")
        try:
            workdir = user.resolve(cwd) if cwd else (user.home if user.switch else self.state.workdir)
        except PathError as error:
            raise ConnectError("invalid_argument", f"cwd: {error}") from error
        if not workdir.is_dir():
            raise ConnectError("invalid_argument", f"cwd '{workdir}' does not exist or is not a directory")
        if "\x00" in cmd or any("\x00" in arg for arg in args):
            raise ConnectError("invalid_argument", "process.cmd and process.args must not contain a NUL byte")
        kind = "pty" if pty_size else "command"
        try:
            self.stats.acquire()
        except ConcurrencyLimitError as error:
            raise ConnectError("resource_exhausted", str(error)) from error
        spawn: dict[str, Any] = {
            "cwd": str(workdir),
            "env": self.environment(user, str(workdir), envs),
            "start_new_session": True,
        }
        if user.switch:
            spawn.update(user=user.uid, group=user.gid, extra_groups=os.getgrouplist(user.name, user.gid))
        master_fd: int | None = None
        try:
            if pty_size is not None:
                master_fd, slave_fd = os.openpty()
                try:
                    set_window_size(slave_fd, *pty_size)
                    # Popen rather than asyncio's transports: see the module docstring.
                    popen = subprocess.Popen(  # noqa: ASYNC220
                        [cmd, *args],
                        stdin=slave_fd,
                        stdout=slave_fd,
                        stderr=slave_fd,
                        preexec_fn=_make_controlling_terminal,
                        **spawn,
                    )
                finally:
                    os.close(slave_fd)
                os.set_blocking(master_fd, False)
            else:
                popen = subprocess.Popen(  # noqa: ASYNC220
                    [cmd, *args],
                    stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    **spawn,
                )
        except (OSError, subprocess.SubprocessError, ValueError) as error:  # ValueError: bad env or args
            if master_fd is not None:
                os.close(master_fd)
            self.stats.release(kind, 0.0, timed_out=False)
            # Out of processes (fork/exec EAGAIN under the pids limit), memory or fds: the sandbox is
            # full, not the request wrong; the SDK raises RateLimitException for resource_exhausted.
            exhausted = exhaustion_message(error, "start process")
            if exhausted is not None:
                raise ConnectError("resource_exhausted", exhausted) from error
            raise ConnectError("invalid_argument", f"failed to start process {cmd!r}: {error}") from error

        config: JsonObject = {"cmd": cmd, "args": args, "envs": envs}
        if cwd:
            config["cwd"] = cwd
        managed = ManagedProcess(
            popen=popen,
            config=config,
            tag=tag,
            master_fd=master_fd,
            stdin_enabled=stdin or master_fd is not None,
            limiter=OutputLimiter(self.state.config.max_output_bytes),
        )
        managed.oom_kills_at_start = self._oom_kills()
        if managed.stdin_fd is not None:
            os.set_blocking(managed.stdin_fd, False)
        # Subscribe before any reader runs: no output is published before the caller listens.
        queue = managed.subscribe()
        self.processes[managed.pid] = managed
        self._leftovers.pop(managed.pid, None)  # the pid names this command now
        task = asyncio.create_task(self._supervise(managed, kind), name=f"process-{managed.pid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return managed, queue

    async def _supervise(self, managed: ManagedProcess, kind: str) -> None:
        loop = asyncio.get_running_loop()
        readers: list[asyncio.Future[None]] = []
        if managed.master_fd is not None:
            readers.append(_read_fd(managed.master_fd, lambda chunk: managed.publish_output("pty", chunk)))
        else:
            for name, pipe in (("stdout", managed.popen.stdout), ("stderr", managed.popen.stderr)):
                if pipe is not None:
                    readers.append(_read_fd(pipe.fileno(), _publisher(managed, name)))
        timeout = self.state.config.execution_timeout
        timer: asyncio.TimerHandle | None = None
        # A PTY is an interactive session, not one execution: the agent cannot see where a typed
        # command starts or ends, and killing the shell after N s would break terminals. It stays
        # bounded by the SDK's own `timeout` (enforced in envd.start) and the sandbox's lifetime.
        if timeout > 0 and kind != "pty":
            message = f"execution timed out after {timeout:g}s (SANDBOX_EXECUTION_TIMEOUT) and was killed"
            timer = loop.call_later(timeout, managed.expire, message)
        try:
            returncode = await _wait_exit(managed.popen)
            if readers:
                _, pending = await asyncio.wait(readers, timeout=OUTPUT_DRAIN_GRACE)
                for reader in pending:
                    reader.cancel()
        finally:
            if timer is not None:
                timer.cancel()
            for pipe in (managed.popen.stdin, managed.popen.stdout, managed.popen.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
            if managed.master_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(managed.master_fd)
            self.processes.pop(managed.pid, None)
            self._remember_leftovers(managed.pid)
            self.stats.release(kind, time.monotonic() - managed.started, managed.timed_out)
        oom_killed = returncode == -signal.SIGKILL and self._oom_kills() > managed.oom_kills_at_start
        managed.end = end_event(returncode, managed.timeout_error if managed.timed_out else None, oom_killed=oom_killed)
        managed.publish(managed.end)
        managed.finished.set()

    def _oom_kills(self) -> int:
        return read_oom_kills(self._oom_file) or 0

    async def shutdown(self) -> None:
        running = list(self.processes.values())
        for managed in running:
            managed.kill_group()
        waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(m.finished.wait()) for m in running]
        waits += [asyncio.ensure_future(kill_tree(session, within=3)) for session in self._leftovers]
        self._leftovers.clear()
        if waits:
            await asyncio.wait(waits, timeout=3)


# Strong references to fire-and-forget kill sweeps (the event loop keeps only weak ones).
_background: set[asyncio.Task[bool]] = set()


def _publisher(managed: ManagedProcess, stream: str) -> Callable[[bytes], None]:
    return lambda chunk: managed.publish_output(stream, chunk)


def _read_fd(fd: int, on_chunk: Callable[[bytes], None]) -> asyncio.Future[None]:
    """Read fd from the event loop until EOF (or EIO, how a PTY master reports a closed terminal)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    os.set_blocking(fd, False)

    def readable() -> None:
        try:
            chunk = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as error:
            if error.errno != errno.EIO:
                log.debug("read from fd %d failed: %s", fd, error)
            chunk = b""
        if chunk:
            on_chunk(chunk)
            return
        loop.remove_reader(fd)
        if not done.done():
            done.set_result(None)

    def cancelled(future: asyncio.Future[None]) -> None:
        if future.cancelled():
            loop.remove_reader(fd)

    loop.add_reader(fd, readable)
    done.add_done_callback(cancelled)
    return done


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


async def _wait_exit(popen: subprocess.Popen[bytes]) -> int:
    """Wait for the child's exit without a thread when pidfds exist (Linux 5.3+)."""
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(popen.pid)
    except (AttributeError, OSError):
        exited: asyncio.Future[int] = loop.create_future()

        def wait() -> None:
            code = popen.wait()
            loop.call_soon_threadsafe(_resolve, exited, code)

        threading.Thread(target=wait, name=f"wait-{popen.pid}", daemon=True).start()
        return await exited
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(pidfd, _resolve, ready, None)
    try:
        await ready
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    return popen.wait()
