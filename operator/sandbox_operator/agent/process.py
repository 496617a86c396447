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
from typing import Any

from .config import SECRET_ENV_VARS
from .connect import ConnectError, JsonObject
from .limits import ConcurrencyLimitError, ExecutionStats, OutputLimiter
from .protojson import encode_bytes
from .users import SandboxState, UserContext

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
# After the main process exits, how long descendants that inherited its output may keep it open
# before the command is reported as ended anyway (e.g. `server &` inside a foreground command).
OUTPUT_DRAIN_GRACE = 1.0
SIGNALS_BY_NAME: Mapping[str, int] = {"SIGNAL_SIGTERM": 15, "SIGNAL_SIGKILL": 9, "SIGNAL_UNSPECIFIED": 0}


def end_event(returncode: int, error: str | None) -> JsonObject:
    """ProcessEvent.EndEvent as proto3 JSON (defaults omitted), worded like Go's os.ProcessState."""
    end: JsonObject = {}
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
        """Signal the whole process group: the command and everything it started."""
        if self.finished.is_set():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)
        if self.popen.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signum)

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
        self._base_env = {key: value for key, value in os.environ.items() if key not in SECRET_ENV_VARS}
        self._tasks: set[asyncio.Task[None]] = set()

    def environment(self, user: UserContext, cwd: str, extra: Mapping[str, str]) -> dict[str, str]:
        env = dict(self._base_env)
        env.update(HOME=str(user.home), USER=user.name, LOGNAME=user.name, PWD=cwd)
        env.update(self.state.env_vars)
        env.update(extra)
        return env

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
        workdir = user.resolve(cwd) if cwd else (user.home if user.switch else self.state.workdir)
        if not workdir.is_dir():
            raise ConnectError("invalid_argument", f"cwd '{workdir}' does not exist or is not a directory")
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
        except (OSError, subprocess.SubprocessError) as error:
            if master_fd is not None:
                os.close(master_fd)
            self.stats.release(kind, 0.0, timed_out=False)
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
        if managed.stdin_fd is not None:
            os.set_blocking(managed.stdin_fd, False)
        # Subscribe before any reader runs: no output is published before the caller listens.
        queue = managed.subscribe()
        self.processes[managed.pid] = managed
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
            self.stats.release(kind, time.monotonic() - managed.started, managed.timed_out)
        managed.end = end_event(returncode, managed.timeout_error if managed.timed_out else None)
        managed.publish(managed.end)
        managed.finished.set()

    async def shutdown(self) -> None:
        running = list(self.processes.values())
        for managed in running:
            managed.kill_group()
        if running:
            await asyncio.wait([asyncio.ensure_future(m.finished.wait()) for m in running], timeout=3)


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
