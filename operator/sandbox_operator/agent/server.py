"""Wires the services together and serves the envd and code-interpreter listeners."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Middleware

from .config import AgentConfig
from .envd import EnvdServer
from .filesystem import FilesystemService
from .guard import LIMITS, ConnectionGuard, ListenerLimits
from .interpreter import CodeInterpreter
from .interpreter_http import InterpreterServer
from .limits import ExecutionStats
from .process import ProcessManager
from .sysmetrics import ResourceSampler
from .users import SandboxState

log = logging.getLogger("sandbox_operator.agent")

# aiohttp's own bounds on a request's head, stated here so that docs/agent.md can list them.
MAX_REQUEST_LINE_BYTES = 8190
MAX_HEADER_BYTES = 8190
MAX_HEADERS = 128
# How long aiohttp reads and drops an unread body after answering, before it closes the connection.
LINGERING_SECONDS = 5.0


@dataclass(frozen=True)
class Listener:
    runner: web.AppRunner
    server: asyncio.Server


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.state = SandboxState(config=config, access_token=config.access_token)
        self.stats = ExecutionStats(limit=config.max_concurrent_executions)
        self.processes = ProcessManager(self.state, self.stats)
        self.filesystem = FilesystemService()
        self.interpreter = CodeInterpreter(self.state, self.stats)
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

    async def _listen(self, build: Callable[[ConnectionGuard], web.Application], port: int) -> Listener:
        """An app on host:port behind a ConnectionGuard (header deadline), with aiohttp's keep-alive
        timeout and request-head limits."""
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
        try:
            server = await asyncio.get_running_loop().create_server(
                guard.protocol, self.config.host, port, reuse_address=True, backlog=1024
            )
        except BaseException:
            await runner.cleanup()
            raise
        return Listener(runner, server)

    async def run(self, stop: asyncio.Event) -> None:
        listeners: list[Listener] = []
        wanted: list[tuple[Callable[[ConnectionGuard], web.Application], int]] = [
            (self.envd_app, self.config.envd_port)
        ]
        if self.config.interpreter_port:
            wanted.append((self.interpreter_app, self.config.interpreter_port))
        try:
            for build, port in wanted:
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
                prewarm = asyncio.create_task(self._prewarm(), name="prewarm-kernel")
            await stop.wait()
            if prewarm is not None:
                prewarm.cancel()
        finally:
            log.info("sandbox-agent stopping")
            # Stop listening and end keep-alive connections first: a request arriving while the
            # processes are being stopped must be refused (a client retries elsewhere), not start
            # a command that is killed a moment later.
            for listener in listeners:
                listener.server.close()
                if listener.runner.server is not None:
                    listener.runner.server.pre_shutdown()
            await self.processes.shutdown()
            await self.interpreter.shutdown()
            self.filesystem.close()
            for listener in reversed(listeners):
                await listener.runner.cleanup()

    async def _prewarm(self) -> None:
        try:
            await self.interpreter.default_context(None)
        except Exception:
            log.exception("could not start the default Python kernel")


async def serve(config: AgentConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    await Agent(config).run(stop)


def configure_logging() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Jupyter's loggers are chatty at INFO about connection files.
    logging.getLogger("traitlets").setLevel(logging.WARNING)
