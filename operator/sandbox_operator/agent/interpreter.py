"""Code interpreter: stateful execution contexts on Jupyter kernels, streamed as E2B JSON lines."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import queue
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from sandbox_operator.api.names import EXECUTION_TIMEOUT_PREFIX

from .config import without_secrets
from .interpreter_errors import InterpreterError as InterpreterError  # still importable from here
from .kernel_env import env_code
from .kernelwatch import (
    OUT_OF_MEMORY_MESSAGE,
    PROCESS_LIMIT_MESSAGE,
    ProcessWatch,
    exit_description,
    oom_killed,
    process_limit_near,
    spawn_failure,
)
from .limits import ConcurrencyLimitError, ExecutionSlot, ExecutionStats, OutputLimiter
from .sysmetrics import default_cgroup_root, memory_limit, oom_events_file, read_oom_kills
from .users import SandboxState
from .zmqcontext import shared_zmq_context as shared_zmq_context  # still importable from here

if TYPE_CHECKING:
    import zmq.asyncio
    from jupyter_client.asynchronous.client import AsyncKernelClient
    from jupyter_client.manager import AsyncKernelManager

log = logging.getLogger(__name__)

KEEPALIVE_INTERVAL: Final = 15.0
KERNEL_READY_TIMEOUT: Final = 120.0
# How often a starting kernel that has not answered yet is checked against the process limit.
KERNEL_STALL_CHECK: Final = 10.0
INTERRUPT_GRACE: Final = 5.0
# After the kernel process exited, how long to wait for output it sent just before (already on
# our socket, only the event loop has to see it).
DEATH_DRAIN_GRACE: Final = 0.05
# Installed kernels are read once; a language without a kernel rescans at most this often, so a
# kernel installed later in the sandbox is found without a disk scan per context.
KERNEL_SPEC_RESCAN_INTERVAL: Final = 30.0

# The SQLite history costs about a millisecond per execution and nothing in a sandbox reads it.
# ipykernel sleeps 0.5 ms before each execute_reply to let output reach IOPub first; the agent ends
# an execution on IOPub's idle status, which follows all its output on the same socket, so the
# sleep only adds latency (~1 ms per run_code). kernel_display adds the chart data of matplotlib
# figures (Result.chart).
PYTHON_KERNEL_ARGUMENTS: Final = (
    "--HistoryManager.enabled=False",
    "--IPythonKernel._execute_sleep=0",
    "--IPKernelApp.extensions=sandbox_operator.agent.kernel_display",
)
# SDK language names → canonical language.
LANGUAGE_ALIASES: Final[Mapping[str, str]] = {
    "python": "python",
    "python3": "python",
    "py": "python",
    "javascript": "javascript",
    "js": "javascript",
    "typescript": "javascript",
    "ts": "javascript",
    "r": "r",
    "java": "java",
    "bash": "bash",
    "sh": "bash",
}
# Canonical language → Jupyter kernel names that serve it, in order of preference.
KERNEL_NAMES: Final[Mapping[str, tuple[str, ...]]] = {
    "python": ("python3", "python"),
    "javascript": ("javascript", "deno", "tslab"),
    "r": ("ir",),
    "java": ("java",),
    "bash": ("bash",),
}
# Jupyter MIME type → field of the SDK's Result.
MIME_FIELDS: Final[Mapping[str, str]] = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
    "e2b/data": "data",
    "e2b/chart": "chart",
}

JsonLine = dict[str, Any]


def normalize_language(language: str | None) -> str:
    if language is None or not language.strip():
        return "python"
    name = language.strip().lower()
    if name not in LANGUAGE_ALIASES:
        supported = ", ".join(sorted(KERNEL_NAMES))
        raise InterpreterError(400, f"unsupported language {language!r}; supported languages: {supported}")
    return LANGUAGE_ALIASES[name]


def strip_quotes(text: str) -> str:
    """The reference server returns a str result's repr without its quotes."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def result_line(data: Mapping[str, Any], is_main_result: bool) -> JsonLine:
    """Jupyter MIME bundle → one `result` line."""
    line: JsonLine = {"type": "result"}
    extra: dict[str, Any] = {}
    for mime, value in data.items():
        if value is None:
            continue
        target = MIME_FIELDS.get(mime)
        if target is None:
            extra[mime] = value
        elif target == "text":
            line["text"] = strip_quotes(value) if isinstance(value, str) else value
        else:
            line[target] = value
    if extra:
        line["extra"] = extra
    line["is_main_result"] = is_main_result
    return line


def result_size(line: JsonLine) -> int:
    """Bytes the result line takes on the wire (what the output cap counts)."""
    return len(json.dumps(line, separators=(",", ":"), ensure_ascii=False).encode())


def truncated_result_line(marker: str, is_main_result: bool) -> JsonLine:
    """Stands in for a result bundle dropped by the output cap: its text is the cap's marker."""
    return {"type": "result", "text": marker.strip(), "is_main_result": is_main_result}


def error_line(name: str, value: str, traceback: str) -> JsonLine:
    return {"type": "error", "name": name, "value": value, "traceback": traceback}


def _find_kernel_specs() -> dict[str, str]:
    from jupyter_client.kernelspec import KernelSpecManager

    return dict(KernelSpecManager().find_kernel_specs())


# Kernels that may publish output after the idle status of its request (Deno's); for them an
# execution also waits for the execute_reply and a probe request's idle (at most LATE_OUTPUT_WAIT s).
LATE_OUTPUT_KERNELS: Final = frozenset({"deno"})
LATE_OUTPUT_WAIT: Final = 2.0
# E2B's server creates default contexts for Python and JavaScript at its start; Python's is listed
# from the agent's start, these once the installed kernels are known.
LISTED_DEFAULT_LANGUAGES: Final = ("javascript",)
# Kernels whose ZeroMQ library speaks TCP only (Deno's zeromq-rs, JeroMQ); they listen on loopback.
TCP_ONLY_KERNELS: Final = frozenset({"deno", "java"})


def kernel_transport(kernel_name: str) -> str:
    """IPC sockets where the kernel can: quicker than loopback TCP and not reachable over the network."""
    return "tcp" if kernel_name in TCP_ONLY_KERNELS else "ipc"


def pick_kernel(language: str, available: Mapping[str, str]) -> str | None:
    for name in KERNEL_NAMES[language]:
        if name in available:
            return name
    if language == "python":
        return "python3"  # ipykernel's built-in spec, present wherever ipykernel is
    return None


def close_channels(client: AsyncKernelClient) -> None:
    """Close the channels the client opened. (stop_channels() first creates, connects and closes
    every channel it did not open, heartbeat thread object included.)"""
    for name in ("_shell_channel", "_iopub_channel", "_stdin_channel", "_control_channel", "_hb_channel"):
        channel = getattr(client, name, None)
        if channel is not None and channel.is_alive():
            channel.stop()


def _has_message(socket: Any) -> bool:
    import zmq

    return bool(socket.get(zmq.EVENTS) & zmq.POLLIN)


def _log_revive_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("could not restart a kernel: %s (the next execution tries again)", task.exception())


def _timestamp(header: Mapping[str, Any]) -> str:
    date = header.get("date")
    if isinstance(date, datetime):
        return date.isoformat()
    if isinstance(date, str):
        return date
    return datetime.now().astimezone().isoformat()


# Which limit set an execution's deadline, as its TimeoutError line names it.
CONFIGURED_TIMEOUT_SOURCE: Final = "SANDBOX_EXECUTION_TIMEOUT"
REQUESTED_TIMEOUT_SOURCE: Final = "the request's timeout"


@dataclass(frozen=True)
class ExecutionTimeout:
    """An execution's effective timeout (s) and the limit it comes from."""

    seconds: float
    source: str


def execution_timeout(requested: float | None, configured: float) -> ExecutionTimeout | None:
    """The tighter of the request's `timeout` and SANDBOX_EXECUTION_TIMEOUT (when > 0); None when
    neither applies. A tie names the configured limit."""
    if configured > 0 and (requested is None or configured <= requested):
        return ExecutionTimeout(configured, CONFIGURED_TIMEOUT_SOURCE)
    if requested is not None:
        return ExecutionTimeout(requested, REQUESTED_TIMEOUT_SOURCE)
    return None


def timeout_line(timeout: ExecutionTimeout, restarted: bool) -> JsonLine:
    """The agent's own TimeoutError line: its value starts with EXECUTION_TIMEOUT_PREFIX (the gateway
    tells it from user code raising TimeoutError by that) and names the effective timeout and its limit."""
    detail = " The kernel did not stop and was restarted; its state was lost." if restarted else ""
    return error_line(
        "TimeoutError",
        f"{EXECUTION_TIMEOUT_PREFIX} {timeout.seconds:g}s ({timeout.source}) and was interrupted." + detail,
        "",
    )


class Silence(enum.Enum):
    """What an execution does when no message came within its wait."""

    KEEPALIVE = "keepalive"  # tell the client it is still running
    INTERRUPT = "interrupt"  # the deadline passed: interrupt the kernel
    GIVE_UP = "give_up"  # the interrupt was ignored for INTERRUPT_GRACE: restart the kernel


def next_wait(now: float, deadline: float | None, timed_out_at: float | None) -> float:
    """Seconds to wait for the next message: until the next keepalive, the deadline, or (once
    interrupted) the end of the interrupt's grace, whichever comes first."""
    if timed_out_at is not None:
        return min(KEEPALIVE_INTERVAL, max(0.0, timed_out_at + INTERRUPT_GRACE - now))
    if deadline is not None:
        return min(KEEPALIVE_INTERVAL, max(0.0, deadline - now))
    return KEEPALIVE_INTERVAL


def on_silence(now: float, deadline: float | None, timed_out_at: float | None) -> Silence:
    if timed_out_at is not None and now >= timed_out_at + INTERRUPT_GRACE:
        return Silence.GIVE_UP
    if timed_out_at is None and deadline is not None and now >= deadline:
        return Silence.INTERRUPT
    return Silence.KEEPALIVE


def is_idle(message: Mapping[str, Any]) -> bool:
    """The kernel's idle status, which follows all of a request's output on IOPub."""
    return bool(message["msg_type"] == "status" and message["content"].get("execution_state") == "idle")


def stream_lines(content: Mapping[str, Any], header: Mapping[str, Any], limiter: OutputLimiter) -> list[JsonLine]:
    """A stdout/stderr chunk as the part the output cap lets through, then the cap's marker."""
    text, marker = limiter.take_text(content.get("text", ""))
    stream = "stderr" if content.get("name") == "stderr" else "stdout"
    stamp = _timestamp(header)
    return [{"type": stream, "text": part, "timestamp": stamp} for part in (text, marker) if part]


def display_lines(content: Mapping[str, Any], is_main_result: bool, limiter: OutputLimiter) -> list[JsonLine]:
    """A result bundle whole, or the cap's marker in its place."""
    line = result_line(content.get("data", {}), is_main_result=is_main_result)
    # A cut image or HTML document is useless: a bundle fits the cap whole or is
    # replaced by the marker (once per execution, shared with stdout/stderr).
    keep, cut_marker = limiter.take_whole(result_size(line))
    if keep:
        return [line]
    if cut_marker:
        return [truncated_result_line(cut_marker.decode(), line["is_main_result"])]
    return []


def message_lines(message: Mapping[str, Any], limiter: OutputLimiter, *, interrupted: bool) -> list[JsonLine]:
    """The JSON lines for one IOPub message of the running request (none for a status).
    Once `interrupted` for a timeout, output and the interrupt's own error are dropped."""
    kind = message["msg_type"]
    content = message["content"]
    if kind == "execute_input":
        return [{"type": "number_of_executions", "execution_count": content.get("execution_count")}]
    if kind == "stream":
        return [] if interrupted else stream_lines(content, message["header"], limiter)
    if kind in ("execute_result", "display_data"):
        return display_lines(content, kind == "execute_result", limiter)
    if kind == "error" and not interrupted:  # the KeyboardInterrupt we caused is reported as a timeout
        return [
            error_line(
                content.get("ename", "Error"), content.get("evalue", ""), "\n".join(content.get("traceback", []))
            )
        ]
    return []


async def _drop_stale_replies(client: AsyncKernelClient) -> None:
    """Drop replies left over from earlier requests so they never pile up in memory."""
    with contextlib.suppress(queue.Empty):
        while True:
            await client.get_shell_msg(timeout=0)


class KernelExited(Exception):
    """The kernel process exited while an execution waited for it."""


@dataclass(eq=False)
class Kernel:
    """One kernel process: its manager and client (on the interpreter's zmq context) and exit watch."""

    manager: AsyncKernelManager
    client: AsyncKernelClient
    watch: ProcessWatch
    # The memory cgroup's oom_kill counter when the kernel or its current execution started.
    oom_mark: int | None
    # Set when the agent itself stops the kernel: its exit is then no death.
    stopping: str | None = None
    # Why it died ("the kernel died: out of memory"), once it did.
    death: str | None = None
    # The IOPub receive in flight; kept across waits so that no message is lost to a timeout.
    pending: asyncio.Task[Any] | None = None
    # Clear while an execution reads from the kernel: a restart after its death waits for it to
    # have read what the kernel sent before dying.
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def pid(self) -> int:
        return self.watch.pid


@dataclass(eq=False)
class KernelContext:
    id: str
    language: str
    cwd: str
    kernel_name: str
    kernel: Kernel | None  # None after a (re)start failed; the next execution starts one
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    execution: str | None = None  # msg_id of the running request
    revive: asyncio.Task[None] | None = None  # the restart after the kernel died
    # A default context listed before its kernel first started (E2B lists its default Python
    # context from the start): its kernel and working directory are settled at that first start,
    # since the sandbox's workdir may change through /init before it.
    unstarted: bool = False

    def describe(self) -> dict[str, str]:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}


class CodeInterpreter:
    def __init__(
        self,
        state: SandboxState,
        stats: ExecutionStats,
        *,
        cgroup_root: Path | None = None,
        zmq_context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.state = state
        self.stats = stats
        self.contexts: dict[str, KernelContext] = {}
        # Canonical language → its default context (what /execute without a context_id uses).
        self._defaults: dict[str, KernelContext] = {}
        self._sockets: str | None = None
        self._kernel_specs: dict[str, str] | None = None
        self._kernel_specs_at = 0.0
        self.cgroup_root = default_cgroup_root() if cgroup_root is None else cgroup_root
        self._oom_file = oom_events_file(self.cgroup_root)
        # Its own (shutdown destroys it): the agent's, made at its start (zmqcontext), or a new one.
        self._zmq = shared_zmq_context() if zmq_context is None else zmq_context
        # E2B's server creates its default Python context at startup, so GET /contexts lists it from
        # the start; here it is listed at once and its kernel starts on first use (or at startup with
        # --prewarm-kernel), which keeps the agent's own start fast.
        self._register_default("python", "python3")
        self._defaults_listed = False  # the others: _list_defaults, on the first request

    def _socket_dir(self) -> str:
        """A private directory for the kernels' IPC sockets (never the workspace)."""
        if self._sockets is None:
            self._sockets = tempfile.mkdtemp(prefix="sandbox-agent-kernels-")
        return self._sockets

    # -- kernels -----------------------------------------------------------------------------

    async def _scan_kernel_specs(self) -> dict[str, str]:
        # find_kernel_specs walks the Jupyter data directories: off the event loop when a thread
        # can be had (near the process limit it cannot; then the scan runs on the loop).
        try:
            specs = await asyncio.get_running_loop().run_in_executor(None, _find_kernel_specs)
        except RuntimeError:
            specs = _find_kernel_specs()
        self._kernel_specs, self._kernel_specs_at = specs, time.monotonic()
        return specs

    async def _kernel_name(self, language: str) -> str:
        available = self._kernel_specs
        if available is None:
            available = await self._scan_kernel_specs()
        name = pick_kernel(language, available)
        if name is None and time.monotonic() - self._kernel_specs_at >= KERNEL_SPEC_RESCAN_INTERVAL:
            available = await self._scan_kernel_specs()
            name = pick_kernel(language, available)
        if name is not None:
            return name
        have = ", ".join(sorted(available)) or "none"
        raise InterpreterError(
            400,
            f"language {language!r} is not available in this sandbox: no Jupyter kernel installed for it "
            f"(installed kernels: {have})",
        )

    def _kernel_env(self) -> dict[str, str]:
        env = dict(os.environ)
        user = self.state.user(None)
        env.update(HOME=str(user.home), USER=user.name, LOGNAME=user.name)
        env.pop("MPLBACKEND", None)  # let ipykernel pick the inline backend so figures come back as PNG
        env.update(self.state.env_vars)
        return without_secrets(env)  # last: no layer may hand the kernel the token

    def _oom_kills(self) -> int | None:
        return read_oom_kills(self._oom_file)

    async def _start_kernel(self, context_id: str, kernel_name: str, cwd: str) -> Kernel:
        """Start a kernel and wait until it answers; InterpreterError (503 for a resource limit) if not."""
        try:
            return await self._spawn_kernel(context_id, kernel_name, cwd)
        except InterpreterError as error:
            log.warning("could not start a %s kernel for context %s: %s", kernel_name, context_id, error.message)
            raise

    async def _spawn_kernel(self, context_id: str, kernel_name: str, cwd: str) -> Kernel:
        from jupyter_client.manager import AsyncKernelManager

        transport = kernel_transport(kernel_name)
        manager = AsyncKernelManager(
            kernel_name=kernel_name,
            transport=transport,
            ip=os.path.join(self._socket_dir(), context_id) if transport == "ipc" else "127.0.0.1",
            context=self._zmq,
        )
        extra = list(PYTHON_KERNEL_ARGUMENTS) if kernel_name in KERNEL_NAMES["python"] else []
        oom_before = self._oom_kills()
        try:
            await manager.start_kernel(cwd=cwd, env=self._kernel_env(), extra_arguments=extra)
        except BaseException as error:
            await self._discard(manager, None)
            if not isinstance(error, Exception):
                raise  # cancelled (the agent is stopping): no kernel left behind
            refusal = spawn_failure(error) if isinstance(error, OSError) else None
            if refusal is not None:
                raise InterpreterError(*refusal) from error
            raise InterpreterError(500, f"kernel {kernel_name!r} failed to start: {error}") from error
        popen = getattr(manager.provisioner, "process", None)
        if not isinstance(popen, subprocess.Popen):
            await self._discard(manager, None)
            raise InterpreterError(500, f"kernel {kernel_name!r} failed to start: no kernel process to watch")
        watch = ProcessWatch(popen)
        client = manager.client(context=self._zmq)
        # No heartbeat channel: it is a thread per kernel, and the process watch notices a death sooner.
        # Nor stdin (allow_stdin is off) or control (the manager has its own) sockets.
        client.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
        ready = asyncio.ensure_future(client.wait_for_ready(timeout=KERNEL_READY_TIMEOUT))
        stalled = False
        try:
            while not stalled:
                done, _ = await asyncio.wait(
                    (ready, watch.exited), timeout=KERNEL_STALL_CHECK, return_when=asyncio.FIRST_COMPLETED
                )
                if done:
                    break
                # A kernel whose IOPub thread could not start lives on without ever answering
                # (a non-daemon thread keeps the process alive): do not wait two minutes for it.
                stalled = process_limit_near(self.cgroup_root)
        except asyncio.CancelledError:  # the agent is stopping: no kernel left behind
            ready.cancel()
            await self._discard(manager, client)
            watch.close()
            raise
        if not ready.done():
            ready.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await ready
        watch.reap()  # wait_for_ready may have reaped a dead kernel before the watch's callback ran
        failure = None if ready.cancelled() else ready.exception()
        if ready.cancelled() or failure is not None:
            # wait_for_ready sees a death only a second late; the watch sees it at once.
            code = watch.exited.result() if watch.exited.done() else None
            await self._discard(manager, client)
            watch.close()
            if stalled:
                raise InterpreterError(
                    503,
                    f"{PROCESS_LIMIT_MESSAGE}: the kernel did not answer within {KERNEL_STALL_CHECK:g}s "
                    "with too few processes left for its threads; stop some processes or code contexts and retry",
                )
            if code is None:
                raise InterpreterError(500, f"kernel {kernel_name!r} failed to start: {failure}") from failure
            raise self._start_failure(kernel_name, code, oom_before) from failure
        return Kernel(manager=manager, client=client, watch=watch, oom_mark=oom_before)

    def _start_failure(self, kernel_name: str, code: int, oom_before: int | None) -> InterpreterError:
        """Why a kernel died before it answered: out of memory, the process limit, or its own fault."""
        how = exit_description(code)
        if oom_killed(code, oom_before, self._oom_file):
            return InterpreterError(503, f"{OUT_OF_MEMORY_MESSAGE}: the kernel was OOM-killed during start-up")
        # A kernel that cannot start its threads (ipykernel, libzmq) dies of it: RuntimeError or abort().
        if process_limit_near(self.cgroup_root):
            return InterpreterError(
                503,
                f"{PROCESS_LIMIT_MESSAGE}: the kernel died during start-up ({how}) with too few processes "
                "left for its threads; stop some processes or code contexts and retry",
            )
        return InterpreterError(500, f"kernel {kernel_name!r} failed to start: it died during start-up ({how})")

    async def _discard(self, manager: AsyncKernelManager, client: AsyncKernelClient | None) -> None:
        """Close a kernel's sockets and files and kill it if it runs (never the shared zmq context)."""
        if client is not None:
            close_channels(client)
        try:
            await manager.shutdown_kernel(now=True)
        except Exception:
            log.warning("could not shut down a kernel cleanly", exc_info=True)
            with contextlib.suppress(Exception):
                await manager.cleanup_resources()

    async def _stop_kernel(self, kernel: Kernel, reason: str) -> None:
        if kernel.stopping is None:
            kernel.stopping = reason
        if kernel.pending is not None:
            kernel.pending.cancel()  # an execution waiting on it ends (KernelExited)
            kernel.pending = None
        await self._discard(kernel.manager, kernel.client)
        kernel.watch.reap()
        kernel.watch.close()

    def _watch(self, context: KernelContext, kernel: Kernel) -> None:
        kernel.watch.exited.add_done_callback(lambda exited: self._kernel_exited(context, kernel, exited.result()))

    def _kernel_exited(self, context: KernelContext, kernel: Kernel, code: int) -> None:
        """A kernel process exited: when the agent did not stop it, say why and start a fresh one now,
        so the next execution does not wait for it (as Jupyter's restarter, without its 3 s poll)."""
        if kernel.stopping is not None:
            return
        self._death_of(kernel, code)
        if context.kernel is kernel and self.contexts.get(context.id) is context:
            log.warning(
                "the kernel (pid %d) of context %s died: %s; starting a fresh one", kernel.pid, context.id, kernel.death
            )
            self._schedule_revive(context, kernel, "it died")

    def _death_of(self, kernel: Kernel, code: int) -> str:
        if kernel.death is None:
            if oom_killed(code, kernel.oom_mark, self._oom_file):
                limit = memory_limit(self.cgroup_root)
                detail = f" (memory limit {limit // (1024 * 1024)} MiB)" if limit else ""
                kernel.death = f"the kernel died: out of memory{detail}"
            else:
                kernel.death = f"the kernel died ({exit_description(code)})"
        return kernel.death

    def _schedule_revive(self, context: KernelContext, old: Kernel, reason: str) -> None:
        if context.revive is not None and not context.revive.done():
            return
        context.revive = asyncio.ensure_future(self._revive(context, old, reason))
        context.revive.add_done_callback(_log_revive_failure)

    async def _revive(self, context: KernelContext, old: Kernel, reason: str) -> None:
        await old.idle.wait()
        await self._stop_kernel(old, reason)
        if context.kernel is old:
            context.kernel = None
        if self.contexts.get(context.id) is not context:
            return  # removed meanwhile
        kernel = await self._start_kernel(context.id, context.kernel_name, context.cwd)
        context.kernel = kernel
        self._watch(context, kernel)
        log.info("restarted the %s kernel of context %s (pid %d)", context.kernel_name, context.id, kernel.pid)

    async def _live_kernel(self, context: KernelContext) -> Kernel:
        """The context's running kernel; started first when it died or a restart failed (under its lock)."""
        revive = context.revive
        if revive is not None:
            with contextlib.suppress(Exception):  # a failed restart was logged; it is retried below
                await asyncio.shield(revive)
            if revive.done():
                context.revive = None
        kernel = context.kernel
        if kernel is None or kernel.watch.exited.done():
            kernel = await self._replace_kernel(context)
        return kernel

    async def _replace_kernel(self, context: KernelContext) -> Kernel:
        old, context.kernel = context.kernel, None
        if old is not None:
            await self._stop_kernel(old, "restarted")
        if context.unstarted:
            context.kernel_name = await self._kernel_name(normalize_language(context.language))
            context.cwd = str(self.state.workdir)
        started = time.monotonic()
        kernel = await self._start_kernel(context.id, context.kernel_name, context.cwd)
        context.kernel = kernel
        self._watch(context, kernel)
        if context.unstarted:
            context.unstarted = False
            log.info("started %s kernel %s in %.2fs", context.kernel_name, context.id, time.monotonic() - started)
        return kernel

    async def create_context(self, language: str | None, cwd: str | None) -> KernelContext:
        canonical = normalize_language(language)
        await self._list_defaults()
        kernel_name = await self._kernel_name(canonical)
        workdir = self.state.user(None).resolve(cwd) if cwd else self.state.workdir
        if not workdir.is_dir():
            raise InterpreterError(400, f"cwd '{workdir}' does not exist or is not a directory")
        if not os.access(workdir, os.R_OK | os.X_OK):
            # The kernel runs as the sandbox's user: its start would fail on the chdir (EACCES).
            raise InterpreterError(400, f"cwd '{workdir}' is not accessible to the sandbox's user")
        context_id = secrets.token_hex(16)
        started = time.monotonic()
        kernel = await self._start_kernel(context_id, kernel_name, str(workdir))
        context = KernelContext(
            id=context_id,
            language=language.strip().lower() if language else "python",
            cwd=str(workdir),
            kernel_name=kernel_name,
            kernel=kernel,
        )
        self.contexts[context.id] = context
        self._watch(context, kernel)
        log.info("started %s kernel %s in %.2fs", kernel_name, context.id, time.monotonic() - started)
        return context

    def _register_default(self, canonical: str, kernel_name: str) -> KernelContext:
        """List a default context for the language now; its kernel starts on first use."""
        context = KernelContext(
            id=secrets.token_hex(16),
            language=canonical,
            cwd=str(self.state.workdir),
            kernel_name=kernel_name,
            kernel=None,
            unstarted=True,
        )
        self.contexts[context.id] = context
        self._defaults[canonical] = context
        return context

    def _default(self, canonical: str) -> KernelContext | None:
        context = self._defaults.get(canonical)
        return context if context is not None and self.contexts.get(context.id) is context else None

    async def default_context(self, language: str | None) -> KernelContext:
        """The language's default context with its kernel started (a removed default is replaced by
        a new one). Raises InterpreterError before anything is listed for a language without a kernel,
        and when the kernel cannot start (the context stays listed; the next call tries again)."""
        canonical = normalize_language(language)
        await self._list_defaults()
        context = self._default(canonical)
        if context is None:
            kernel_name = await self._kernel_name(canonical)
            context = self._default(canonical) or self._register_default(canonical, kernel_name)
        if context.kernel is None:
            async with context.lock:
                await self._live_kernel(context)
        return context

    async def _list_defaults(self) -> None:
        """Also list E2B's other default context (JavaScript) where its kernel is installed, once,
        before any context of the user's (they are listed after the defaults, as E2B's are)."""
        if self._defaults_listed:
            return
        self._defaults_listed = True
        available = self._kernel_specs if self._kernel_specs is not None else await self._scan_kernel_specs()
        for language in LISTED_DEFAULT_LANGUAGES:
            kernel_name = pick_kernel(language, available)
            if kernel_name is not None and self._default(language) is None:
                self._register_default(language, kernel_name)

    async def listing(self) -> list[dict[str, str]]:
        """GET /contexts: every context, the default ones included before their kernel started."""
        await self._list_defaults()
        for context in self.contexts.values():
            if context.unstarted:
                context.cwd = str(self.state.workdir)
        return [context.describe() for context in self.contexts.values()]

    def get(self, context_id: str) -> KernelContext:
        context = self.contexts.get(context_id)
        if context is None:
            raise InterpreterError(404, f"context {context_id!r} not found")
        return context

    async def restart(self, context_id: str) -> None:
        context = self.get(context_id)
        async with context.lock:
            if context.revive is not None and not context.revive.done():
                await self._live_kernel(context)  # a restart after a death is under way: that is it
            else:
                await self._replace_kernel(context)

    async def remove(self, context_id: str) -> None:
        context = self.contexts.pop(self.get(context_id).id)
        if context.revive is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(context.revive)
        kernel, context.kernel = context.kernel, None
        if kernel is not None:
            await self._stop_kernel(kernel, "the context was removed")

    async def shutdown(self) -> None:
        for context_id in list(self.contexts):
            with contextlib.suppress(Exception):
                await self.remove(context_id)
        # Every socket is closed by now; linger=0 so that term() never waits for a dead peer.
        self._zmq.destroy(linger=0)
        if self._sockets is not None:
            shutil.rmtree(self._sockets, ignore_errors=True)

    # -- execution ---------------------------------------------------------------------------

    async def _late_lines(
        self, context: KernelContext, kernel: Kernel, msg_id: str, limiter: OutputLimiter, interrupted: bool
    ) -> list[JsonLine]:
        """Output of the request that came after its idle status: Deno's kernel publishes a result
        after it now and then (5 in 150 runs here). So, for such a kernel, once the execute_reply is
        in, a kernel_info_request goes after it and its idle status is awaited on IOPub: one socket,
        in order, so whatever the kernel published for this request before it handled the probe has
        arrived by then, in flight or not (taking only what was queued at the reply lost a result
        under load). Bounded by LATE_OUTPUT_WAIT."""
        if context.kernel_name not in LATE_OUTPUT_KERNELS:
            return []
        deadline = time.monotonic() + LATE_OUTPUT_WAIT
        with contextlib.suppress(queue.Empty):
            while (left := deadline - time.monotonic()) > 0:
                reply = await kernel.client.get_shell_msg(timeout=left)
                if reply["parent_header"].get("msg_id") == msg_id:
                    break
        probe = kernel.client.kernel_info()  # its reply on the shell channel is skipped like any stale one
        lines: list[JsonLine] = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = await self._next_message(kernel, left)
            except KernelExited:
                break  # it died after its idle status: the request is answered, what came is all
            if message is None:
                break
            parent = message["parent_header"].get("msg_id")
            if parent == probe and is_idle(message):
                break
            if parent == msg_id:
                lines.extend(message_lines(message, limiter, interrupted=interrupted))
        return lines

    async def _next_message(
        self, kernel: Kernel, wait: float, wake: asyncio.Future[Any] | None = None
    ) -> dict[str, Any] | None:
        """The kernel's next IOPub message, None after `wait` s without one (or as soon as `wake` is
        done). Raises KernelExited once the kernel process is gone and what it sent before has been read."""
        if kernel.stopping is not None and kernel.death is None:
            raise KernelExited  # the agent stopped it (context removed): its sockets are closed
        pending = kernel.pending
        if pending is None:
            if _has_message(kernel.client.iopub_channel.socket):
                # Queued already (output comes in bursts): read it without a task and a wait.
                queued: dict[str, Any] = await kernel.client.get_iopub_msg(timeout=0)
                return queued
            pending = kernel.pending = asyncio.ensure_future(kernel.client.get_iopub_msg())
        exited = kernel.watch.exited
        if not exited.done():
            waits: tuple[asyncio.Future[Any], ...] = (pending, exited) if wake is None else (pending, exited, wake)
            await asyncio.wait(waits, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        if exited.done() and not pending.done():
            # What the kernel sent before it died is queued on our socket already: read it first.
            await asyncio.wait((pending,), timeout=DEATH_DRAIN_GRACE)
        if pending.done():
            kernel.pending = None
            if pending.cancelled():  # the agent stopped the kernel (context removed)
                raise KernelExited
            message: dict[str, Any] = pending.result()
            return message
        if exited.done():
            pending.cancel()
            kernel.pending = None
            raise KernelExited
        return None

    async def _run_silently(self, kernel: Kernel, code: str) -> None:
        msg_id = kernel.client.execute(code, silent=True, store_history=False, allow_stdin=False)
        deadline = time.monotonic() + KERNEL_READY_TIMEOUT
        while time.monotonic() < deadline:
            message = await self._next_message(kernel, KEEPALIVE_INTERVAL)
            if message is None or message["parent_header"].get("msg_id") != msg_id:
                continue
            if message["msg_type"] == "status" and message["content"].get("execution_state") == "idle":
                return
        raise InterpreterError(504, f"the kernel did not answer within {KERNEL_READY_TIMEOUT:g}s")

    def _exit_line(self, kernel: Kernel) -> JsonLine:
        """The error that ends an execution whose kernel process exited."""
        if kernel.stopping is not None and kernel.death is None:
            # Stopped by the agent (context removed, agent shutting down): E2B's words for a lost execution.
            return error_line(
                "UnexpectedEndOfExecution",
                "Connection to the execution was closed before the execution was finished",
                f"the kernel was stopped: {kernel.stopping}",
            )
        code = kernel.watch.exited.result() if kernel.watch.exited.done() else -signal.SIGKILL
        # E2B's server reports its kernel's death (Jupyter's restarter restarting it) as
        # ContextRestarting; the value says why it died.
        return error_line(
            "ContextRestarting",
            f"{self._death_of(kernel, code)}; the context was restarted with a fresh kernel "
            "(variables and imports are lost)",
            "",
        )

    async def execute(
        self,
        context: KernelContext,
        code: str,
        env_vars: Mapping[str, str] | None,
        time_limit: float | None = None,
        abandoned: asyncio.Event | None = None,
    ) -> AsyncIterator[JsonLine]:
        """Run code in the context; yields the JSON lines of the /execute stream, end_of_execution last.
        `time_limit` (s, > 0) is the request's own timeout; SANDBOX_EXECUTION_TIMEOUT still caps it.
        `abandoned` is set when the client is gone (the SDK's own `timeout` ran out, or it disconnected):
        the kernel is interrupted at once so that the context is free for the next execution."""
        try:
            self.stats.acquire()
        except ConcurrencyLimitError as error:
            raise InterpreterError(429, str(error)) from error
        execution = ExecutionSlot(started=time.monotonic())
        try:
            async with context.lock:
                # Raised before the first line, a failed (re)start is the request's HTTP error.
                kernel = await self._live_kernel(context)
                kernel.oom_mark = self._oom_kills()
                kernel.idle.clear()
                restore = None
                try:
                    if env_vars:
                        code_for_env = env_code(normalize_language(context.language), env_vars)
                        if code_for_env is None:
                            message = f"env_vars are not supported for {context.language} contexts"
                            yield error_line("ValueError", message, "")
                            yield {"type": "end_of_execution"}
                            return
                        await self._run_silently(kernel, code_for_env.apply)
                        restore = code_for_env.restore
                    async for line in self._stream(context, kernel, code, execution, time_limit, abandoned):
                        yield line
                except KernelExited:
                    yield self._exit_line(kernel)
                finally:
                    if restore is not None and context.kernel is kernel and not kernel.watch.exited.done():
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(self._run_silently(kernel, restore), INTERRUPT_GRACE)
                    kernel.idle.set()
        finally:
            self.stats.release("code", time.monotonic() - execution.started, execution.timed_out)
        yield {"type": "end_of_execution"}

    async def _stream(
        self,
        context: KernelContext,
        kernel: Kernel,
        code: str,
        execution: ExecutionSlot,
        requested: float | None,
        abandoned: asyncio.Event | None = None,
    ) -> AsyncIterator[JsonLine]:
        """The kernel's messages for one request as JSON lines; marks `execution` when it timed out.
        Raises KernelExited when the kernel process exits. Once `abandoned` is set the kernel is
        interrupted (restarted if it ignores that for INTERRUPT_GRACE), not counted as a timeout."""
        if abandoned is not None and abandoned.is_set():
            return  # the client left before the code was sent: nobody reads its result
        client = kernel.client
        await _drop_stale_replies(client)
        limiter = OutputLimiter(self.state.config.max_output_bytes)
        timeout = execution_timeout(requested, self.state.config.execution_timeout)
        msg_id = client.execute(code, store_history=True, allow_stdin=False, stop_on_error=True)
        context.execution = msg_id
        deadline = time.monotonic() + timeout.seconds if timeout is not None else None
        # When the kernel was interrupted (for the deadline, or because the client left).
        timed_out_at: float | None = None
        client_left = False
        gone = asyncio.ensure_future(abandoned.wait()) if abandoned is not None else None
        try:
            while True:
                if timed_out_at is None and gone is not None and gone.done():
                    client_left = True
                    timed_out_at = time.monotonic()
                    with contextlib.suppress(Exception):  # a kernel that died meanwhile ends below
                        await kernel.manager.interrupt_kernel()
                message = await self._next_message(
                    kernel,
                    next_wait(time.monotonic(), deadline, timed_out_at),
                    gone if timed_out_at is None else None,
                )
                if message is None:
                    now = time.monotonic()
                    if timed_out_at is None and gone is not None and gone.done():
                        continue  # interrupted at the top of the loop
                    action = on_silence(now, deadline, timed_out_at)
                    if action is Silence.GIVE_UP:
                        # The kernel ignored the interrupt (e.g. stuck in C code): state is lost.
                        if client_left:
                            self._schedule_revive(context, kernel, "it ignored the interrupt after the client left")
                            return
                        execution.timed_out = True
                        self._schedule_revive(context, kernel, "it ignored the interrupt after a timeout")
                        assert timeout is not None  # only a deadline gives up
                        yield timeout_line(timeout, restarted=True)
                        return
                    if action is Silence.INTERRUPT:
                        timed_out_at = now
                        await kernel.manager.interrupt_kernel()
                    else:
                        yield {"type": "keepalive"}
                    continue
                if message["parent_header"].get("msg_id") != msg_id:
                    continue
                if is_idle(message):
                    lines = await self._late_lines(context, kernel, msg_id, limiter, timed_out_at is not None)
                    if timed_out_at is not None and not client_left:
                        execution.timed_out = True
                        assert timeout is not None  # only a deadline interrupts
                        lines.append(timeout_line(timeout, restarted=False))
                    for line in lines:
                        yield line
                    return
                for line in message_lines(message, limiter, interrupted=timed_out_at is not None):
                    yield line
        finally:
            context.execution = None
            if gone is not None:
                gone.cancel()
