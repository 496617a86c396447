"""Wires the services together and serves the envd and code-interpreter listeners.

On the way to /health only what envd needs is imported; the code interpreter (Jupyter, ZeroMQ) loads
in the background shortly after the listeners serve, or at its first request (lazy.Deferred); its
requests wait for it meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Middleware

from .config import AgentConfig
from .envd import EnvdServer
from .filesystem import FilesystemService
from .guard import LIMITS, ConnectionGuard, ListenerLimits
from .interpreter_http import InterpreterServer
from .lazy import Deferred, import_modules
from .limits import ExecutionStats
from .listen import BACKLOG, BoundPort, bind_listeners
from .process import ProcessManager
from .sysmetrics import ResourceSampler
from .users import SandboxState
from .zmqcontext import shared_zmq_context

if TYPE_CHECKING:
    from .interpreter import CodeInterpreter

log = logging.getLogger("sandbox_operator.agent")

# aiohttp's own bounds on a request's head, stated here so that docs/agent.md can list them.
MAX_REQUEST_LINE_BYTES = 8190
MAX_HEADER_BYTES = 8190
MAX_HEADERS = 128
# How long aiohttp reads and drops an unread body after answering, before it closes the connection.
LINGERING_SECONDS = 5.0


# Imported off the event loop once the agent listens: the interpreter; with a kernel to prewarm also
# jupyter_client, which that kernel start would otherwise import on the event loop.
INTERPRETER_MODULES = (f"{__package__}.interpreter",)
KERNEL_CLIENT_MODULES = ("jupyter_client.manager", "jupyter_client.asynchronous.client")
# Without a kernel to prewarm, the interpreter loads this long after the agent listens (or at its
# first request, whichever is first): the first commands after a create come within tens of ms, and
# an import on the worker thread meanwhile holds the GIL for part of them (~15 ms here, measured).
INTERPRETER_LOAD_DELAY_SECONDS = 0.25


@dataclass(frozen=True)
class Listener:
    runner: web.AppRunner
    servers: Sequence[asyncio.Server]
    guard: ConnectionGuard


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.state = SandboxState(config=config, access_token=config.access_token)
        self.stats = ExecutionStats(limit=config.max_concurrent_executions)
        self.processes = ProcessManager(self.state, self.stats)
        self.filesystem = FilesystemService()
        # Now, not when the interpreter loads: its threads must exist before any user process (see
        # zmqcontext). About 10 ms of the start.
        self.zmq = shared_zmq_context()
        self.interpreter: Deferred[CodeInterpreter] = Deferred("code interpreter", self._load_interpreter)
        self.envd = EnvdServer(self.state, self.stats, self.processes, self.filesystem, ResourceSampler(config.workdir))
        self.interpreter_http = InterpreterServer(self.interpreter, self.state, self.stats)

    @property
    def limits(self) -> ListenerLimits:
        return ListenerLimits(
            header_timeout=self.config.header_timeout,
            keepalive_timeout=self.config.keepalive_timeout,
            body_timeout=self.config.body_timeout,
            max_body_bytes=self.config.max_rpc_body_bytes,
        )

    def _app(self, guard: ConnectionGuard | None, middleware: Middleware) -> web.Application:
        middlewares = [middleware] if guard is None else [guard.middleware, middleware]
        app = web.Application(middlewares=middlewares, client_max_size=self.config.max_rpc_body_bytes)
        app[LIMITS] = self.limits
        return app

    def envd_app(self, guard: ConnectionGuard | None = None) -> web.Application:
        app = self._app(guard, self.envd.middleware)
        self.envd.routes(app)
        # With the SDK's sandbox_url every data-plane request reaches one address, so the envd
        # listener serves the code-interpreter routes as well (no paths collide).
        self.interpreter_http.routes(app, with_health=False)
        return app

    def interpreter_app(self, guard: ConnectionGuard | None = None) -> web.Application:
        app = self._app(guard, self.interpreter_http.middleware)
        self.interpreter_http.routes(app, with_health=True)
        return app

    async def _load_interpreter(self) -> CodeInterpreter:
        modules = INTERPRETER_MODULES + (KERNEL_CLIENT_MODULES if self.config.prewarm_kernel else ())
        await import_modules(modules)
        from .interpreter import CodeInterpreter

        return CodeInterpreter(self.state, self.stats, zmq_context=self.zmq)

    async def _listen(self, build: Callable[[ConnectionGuard], web.Application], bound: BoundPort) -> Listener:
        """An app on the bound sockets behind a ConnectionGuard (header deadline), with aiohttp's
        keep-alive timeout and request-head limits."""
        guard = ConnectionGuard(self.config.header_timeout)
        runner = web.AppRunner(
            build(guard),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=2.0,
            keepalive_timeout=self.config.keepalive_timeout,
            max_line_size=MAX_REQUEST_LINE_BYTES,
            max_field_size=MAX_HEADER_BYTES,
            max_headers=MAX_HEADERS,
            lingering_time=LINGERING_SECONDS,
        )
        await runner.setup()
        guard.factory = runner.server
        loop = asyncio.get_running_loop()
        servers: list[asyncio.Server] = []
        try:
            for sock in bound.sockets:
                servers.append(await loop.create_server(guard.protocol, sock=sock, backlog=BACKLOG))
        except BaseException:
            for server in servers:
                server.close()
            await runner.cleanup()
            raise
        return Listener(runner, servers, guard)

    async def run(self, stop: asyncio.Event, bound: Sequence[BoundPort] | None = None) -> None:
        """Serve until `stop`; on `bound` (listen.bind_listeners: the envd port, then the interpreter's
        unless it is 0), else on sockets bound here."""
        listeners: list[Listener] = []
        delayed_load: asyncio.TimerHandle | None = None
        ports = list(bound) if bound is not None else bind_listeners(self.config)
        builds = [self.envd_app] + ([self.interpreter_app] if self.config.interpreter_port else [])
        try:
            for build, port in zip(builds, ports, strict=True):
                listeners.append(await self._listen(build, port))
            log.info(
                "sandbox-agent ready: envd on %s:%d, code interpreter on %s, workdir %s",
                self.config.host,
                self.config.envd_port,
                f"{self.config.host}:{self.config.interpreter_port}" if self.config.interpreter_port else "envd port",
                self.config.workdir,
            )
            prewarm = None
            if self.config.prewarm_kernel:
                prewarm = asyncio.create_task(self._prewarm(), name="prewarm-kernel")  # loads it now
            else:
                delayed_load = asyncio.get_running_loop().call_later(
                    INTERPRETER_LOAD_DELAY_SECONDS, self.interpreter.start
                )
            await stop.wait()
            if prewarm is not None:
                prewarm.cancel()
        finally:
            if delayed_load is not None:
                delayed_load.cancel()
            log.info("sandbox-agent stopping")
            # The sandbox is going away (killed, paused, evicted): streams still in flight are cut
            # first, as a stopped VM's are, so an SDK waiting on one raises its "sandbox was killed"
            # error instead of reading a clean end it would take for the command's own. Then no
            # new connections: a request arriving while the processes stop is refused, not started.
            for listener in listeners:
                listener.guard.abort_all()
                for server in listener.servers:
                    server.close()
            for port in ports:
                port.close()  # those not served yet (a start that failed); closing twice is harmless
            await self.processes.shutdown()
            interpreter = await self.interpreter.close()
            if interpreter is not None:
                await interpreter.shutdown()  # destroys the ZeroMQ context too
            else:
                self.zmq.destroy(linger=0)
            self.filesystem.close()
            for listener in reversed(listeners):
                await listener.runner.cleanup()

    async def _prewarm(self) -> None:
        try:
            await (await self.interpreter.get()).default_context(None)
        except Exception:
            log.exception("could not start the default Python kernel")


async def serve(config: AgentConfig, bound: Sequence[BoundPort] | None = None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    await Agent(config).run(stop, bound)


def configure_logging() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Jupyter's loggers are chatty at INFO about connection files.
    logging.getLogger("traitlets").setLevel(logging.WARNING)
