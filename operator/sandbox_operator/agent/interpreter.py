"""Code interpreter: stateful execution contexts on Jupyter kernels, streamed as E2B JSON lines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from .config import SECRET_ENV_VARS
from .limits import ConcurrencyLimitError, ExecutionSlot, ExecutionStats, OutputLimiter
from .users import SandboxState

if TYPE_CHECKING:
    from jupyter_client.asynchronous.client import AsyncKernelClient
    from jupyter_client.manager import AsyncKernelManager

log = logging.getLogger(__name__)

KEEPALIVE_INTERVAL: Final = 15.0
KERNEL_READY_TIMEOUT: Final = 120.0
INTERRUPT_GRACE: Final = 5.0
# Installed kernels are read once; a language without a kernel rescans at most this often, so a
# kernel installed later in the sandbox is found without a disk scan per context.
KERNEL_SPEC_RESCAN_INTERVAL: Final = 30.0

# The SQLite history costs about a millisecond per execution and nothing in a sandbox reads it.
# ipykernel sleeps 0.5 ms before each execute_reply to let output reach IOPub first; the agent ends
# an execution on IOPub's idle status, which follows all its output on the same socket, so the
# sleep only adds latency (~1 ms per run_code).
PYTHON_KERNEL_ARGUMENTS: Final = ("--HistoryManager.enabled=False", "--IPythonKernel._execute_sleep=0")
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


class InterpreterError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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


def pick_kernel(language: str, available: Mapping[str, str]) -> str | None:
    for name in KERNEL_NAMES[language]:
        if name in available:
            return name
    if language == "python":
        return "python3"  # ipykernel's built-in spec, present wherever ipykernel is
    return None


def _timestamp(header: Mapping[str, Any]) -> str:
    date = header.get("date")
    if isinstance(date, datetime):
        return date.isoformat()
    if isinstance(date, str):
        return date
    return datetime.now().astimezone().isoformat()


@dataclass
class KernelContext:
    id: str
    language: str
    cwd: str
    kernel_name: str
    manager: AsyncKernelManager
    client: AsyncKernelClient
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    execution: str | None = None  # msg_id of the running request

    def describe(self) -> dict[str, str]:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}


class CodeInterpreter:
    def __init__(self, state: SandboxState, stats: ExecutionStats) -> None:
        self.state = state
        self.stats = stats
        self.contexts: dict[str, KernelContext] = {}
        self._defaults: dict[str, asyncio.Future[KernelContext]] = {}
        self._sockets: str | None = None
        self._kernel_specs: dict[str, str] | None = None
        self._kernel_specs_at = 0.0

    def _socket_dir(self) -> str:
        """A private directory for the kernels' IPC sockets (never the workspace)."""
        if self._sockets is None:
            self._sockets = tempfile.mkdtemp(prefix="sandbox-agent-kernels-")
        return self._sockets

    # -- kernels -----------------------------------------------------------------------------

    async def _scan_kernel_specs(self) -> dict[str, str]:
        # find_kernel_specs walks the Jupyter data directories: off the event loop.
        specs = await asyncio.get_running_loop().run_in_executor(None, _find_kernel_specs)
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
        env = {key: value for key, value in os.environ.items() if key not in SECRET_ENV_VARS}
        user = self.state.user(None)
        env.update(HOME=str(user.home), USER=user.name, LOGNAME=user.name)
        env.pop("MPLBACKEND", None)  # let ipykernel pick the inline backend so figures come back as PNG
        env.update(self.state.env_vars)
        return env

    async def create_context(self, language: str | None, cwd: str | None) -> KernelContext:
        from jupyter_client.manager import AsyncKernelManager

        canonical = normalize_language(language)
        kernel_name = await self._kernel_name(canonical)
        workdir = self.state.user(None).resolve(cwd) if cwd else self.state.workdir
        if not workdir.is_dir():
            raise InterpreterError(400, f"cwd '{workdir}' does not exist or is not a directory")
        # IPC sockets are quicker than loopback TCP and not reachable over the network.
        context_id = secrets.token_hex(16)
        manager = AsyncKernelManager(
            kernel_name=kernel_name, transport="ipc", ip=os.path.join(self._socket_dir(), context_id)
        )
        started = time.monotonic()
        extra = list(PYTHON_KERNEL_ARGUMENTS) if kernel_name in KERNEL_NAMES["python"] else []
        await manager.start_kernel(cwd=str(workdir), env=self._kernel_env(), extra_arguments=extra)
        client = manager.client()
        client.start_channels()
        try:
            await client.wait_for_ready(timeout=KERNEL_READY_TIMEOUT)
        except RuntimeError as error:
            client.stop_channels()
            await manager.shutdown_kernel(now=True)
            raise InterpreterError(500, f"kernel {kernel_name!r} failed to start: {error}") from error
        context = KernelContext(
            id=context_id,
            language=language.strip().lower() if language else "python",
            cwd=str(workdir),
            kernel_name=kernel_name,
            manager=manager,
            client=client,
        )
        self.contexts[context.id] = context
        log.info("started %s kernel %s in %.2fs", kernel_name, context.id, time.monotonic() - started)
        return context

    async def default_context(self, language: str | None) -> KernelContext:
        canonical = normalize_language(language)
        pending = self._defaults.get(canonical)
        if pending is None or (
            pending.done() and (pending.exception() or pending.result().id not in self.contexts)
        ):
            pending = asyncio.ensure_future(self.create_context(canonical, None))
            self._defaults[canonical] = pending
        return await asyncio.shield(pending)

    def get(self, context_id: str) -> KernelContext:
        context = self.contexts.get(context_id)
        if context is None:
            raise InterpreterError(404, f"context {context_id!r} not found")
        return context

    async def restart(self, context_id: str) -> None:
        context = self.get(context_id)
        async with context.lock:
            await self._restart_kernel(context)

    async def _restart_kernel(self, context: KernelContext) -> None:
        await context.manager.restart_kernel(now=True)
        await context.client.wait_for_ready(timeout=KERNEL_READY_TIMEOUT)

    async def remove(self, context_id: str) -> None:
        context = self.contexts.pop(self.get(context_id).id)
        context.client.stop_channels()
        await context.manager.shutdown_kernel(now=True)

    async def shutdown(self) -> None:
        for context_id in list(self.contexts):
            with contextlib.suppress(Exception):
                await self.remove(context_id)
        if self._sockets is not None:
            shutil.rmtree(self._sockets, ignore_errors=True)

    async def interrupt(self, context: KernelContext) -> None:
        if context.execution is not None:
            with contextlib.suppress(Exception):
                await context.manager.interrupt_kernel()

    # -- execution ---------------------------------------------------------------------------

    async def _run_silently(self, context: KernelContext, code: str) -> None:
        msg_id = context.client.execute(code, silent=True, store_history=False, allow_stdin=False)
        while True:
            message = await context.client.get_iopub_msg(timeout=KERNEL_READY_TIMEOUT)
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            if message["msg_type"] == "status" and message["content"].get("execution_state") == "idle":
                return

    async def execute(
        self, context: KernelContext, code: str, env_vars: Mapping[str, str] | None
    ) -> AsyncIterator[JsonLine]:
        """Run code in the context; yields the JSON lines of the /execute stream, end_of_execution last."""
        try:
            self.stats.acquire()
        except ConcurrencyLimitError as error:
            raise InterpreterError(429, str(error)) from error
        execution = ExecutionSlot(started=time.monotonic())
        try:
            async with context.lock:
                restore = None
                if env_vars:
                    if context.kernel_name not in KERNEL_NAMES["python"]:
                        yield error_line("ValueError", "env_vars are only supported for Python contexts", "")
                        yield {"type": "end_of_execution"}
                        return
                    await self._run_silently(
                        context,
                        "import os as _e2b_os\n"
                        f"_e2b_saved_env = {{k: _e2b_os.environ.get(k) for k in {list(env_vars)!r}}}\n"
                        f"_e2b_os.environ.update({dict(env_vars)!r})",
                    )
                    restore = (
                        "for _e2b_k, _e2b_v in _e2b_saved_env.items():\n"
                        "    _e2b_os.environ.pop(_e2b_k, None) if _e2b_v is None "
                        "else _e2b_os.environ.__setitem__(_e2b_k, _e2b_v)\n"
                        "del _e2b_saved_env"
                    )
                try:
                    async for line in self._stream(context, code, execution):
                        yield line
                finally:
                    if restore is not None and context.id in self.contexts:
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(self._run_silently(context, restore), INTERRUPT_GRACE)
        finally:
            self.stats.release("code", time.monotonic() - execution.started, execution.timed_out)
        yield {"type": "end_of_execution"}

    async def _stream(
        self, context: KernelContext, code: str, execution: ExecutionSlot
    ) -> AsyncIterator[JsonLine]:
        """The kernel's messages for one request as JSON lines; marks `execution` when it timed out."""
        client = context.client
        # Drop replies left over from earlier requests so they never pile up in memory.
        with contextlib.suppress(queue.Empty):
            while True:
                await client.get_shell_msg(timeout=0)
        limiter = OutputLimiter(self.state.config.max_output_bytes)
        timeout = self.state.config.execution_timeout
        msg_id = client.execute(code, store_history=True, allow_stdin=False, stop_on_error=True)
        context.execution = msg_id
        deadline = time.monotonic() + timeout if timeout > 0 else None
        timed_out_at: float | None = None
        try:
            while True:
                now = time.monotonic()
                wait = KEEPALIVE_INTERVAL
                if timed_out_at is not None:
                    wait = min(wait, max(0.0, timed_out_at + INTERRUPT_GRACE - now))
                elif deadline is not None:
                    wait = min(wait, max(0.0, deadline - now))
                try:
                    message = await client.get_iopub_msg(timeout=wait)
                except queue.Empty:
                    now = time.monotonic()
                    if timed_out_at is not None and now >= timed_out_at + INTERRUPT_GRACE:
                        # The kernel ignored the interrupt (e.g. stuck in C code): state is lost.
                        execution.timed_out = True
                        await self._restart_kernel(context)
                        yield self._timeout_line(timeout, restarted=True)
                        return
                    if timed_out_at is None and deadline is not None and now >= deadline:
                        timed_out_at = now
                        await context.manager.interrupt_kernel()
                        continue
                    if not await context.manager.is_alive():
                        yield error_line(
                            "UnexpectedEndOfExecution",
                            "Connection to the execution was closed before the execution was finished",
                            "the kernel died; it is being restarted",
                        )
                        await self._restart_kernel(context)
                        return
                    yield {"type": "keepalive"}
                    continue
                if message["parent_header"].get("msg_id") != msg_id:
                    continue
                kind = message["msg_type"]
                content = message["content"]
                if kind == "status":
                    if content.get("execution_state") == "idle":
                        if timed_out_at is not None:
                            execution.timed_out = True
                            yield self._timeout_line(timeout, restarted=False)
                        return
                elif kind == "execute_input":
                    yield {"type": "number_of_executions", "execution_count": content.get("execution_count")}
                elif kind == "stream":
                    if timed_out_at is not None:
                        continue
                    text, marker = limiter.take_text(content.get("text", ""))
                    stream = "stderr" if content.get("name") == "stderr" else "stdout"
                    stamp = _timestamp(message["header"])
                    if text:
                        yield {"type": stream, "text": text, "timestamp": stamp}
                    if marker:
                        yield {"type": stream, "text": marker, "timestamp": stamp}
                elif kind in ("execute_result", "display_data"):
                    line = result_line(content.get("data", {}), is_main_result=kind == "execute_result")
                    # A cut image or HTML document is useless: a bundle fits the cap whole or is
                    # replaced by the marker (once per execution, shared with stdout/stderr).
                    keep, cut_marker = limiter.take_whole(result_size(line))
                    if keep:
                        yield line
                    elif cut_marker:
                        yield truncated_result_line(cut_marker.decode(), line["is_main_result"])
                elif kind == "error":
                    if timed_out_at is not None:
                        continue  # the KeyboardInterrupt we caused; reported as a timeout instead
                    yield error_line(
                        content.get("ename", "Error"),
                        content.get("evalue", ""),
                        "\n".join(content.get("traceback", [])),
                    )
        finally:
            context.execution = None

    @staticmethod
    def _timeout_line(timeout: float, restarted: bool) -> JsonLine:
        detail = " The kernel did not stop and was restarted; its state was lost." if restarted else ""
        return error_line(
            "TimeoutError",
            f"Execution timed out after {timeout:g}s (SANDBOX_EXECUTION_TIMEOUT) and was interrupted."
            + detail,
            "",
        )
