"""Wires the services together and serves the envd and code-interpreter listeners."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from aiohttp import web

from .config import AgentConfig
from .envd import EnvdServer
from .filesystem import FilesystemService
from .interpreter import CodeInterpreter
from .interpreter_http import InterpreterServer
from .limits import ExecutionStats
from .process import ProcessManager
from .sysmetrics import ResourceSampler
from .users import SandboxState

log = logging.getLogger("sandbox_operator.agent")


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

    def envd_app(self) -> web.Application:
        app = web.Application(middlewares=[self.envd.middleware], client_max_size=self.config.max_rpc_body_bytes)
        self.envd.routes(app)
        # With the SDK's sandbox_url every data-plane request reaches one address, so the envd
        # listener serves the code-interpreter routes as well (no paths collide).
        self.interpreter_http.routes(app, with_health=False)
        return app

    def interpreter_app(self) -> web.Application:
        app = web.Application(
            middlewares=[self.interpreter_http.middleware], client_max_size=self.config.max_rpc_body_bytes
        )
        self.interpreter_http.routes(app, with_health=True)
        return app

    async def run(self, stop: asyncio.Event) -> None:
        runners: list[web.AppRunner] = []
        listeners = [(self.envd_app(), self.config.envd_port)]
        if self.config.interpreter_port:
            listeners.append((self.interpreter_app(), self.config.interpreter_port))
        try:
            for app, port in listeners:
                runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
                await runner.setup()
                runners.append(runner)
                await web.TCPSite(runner, self.config.host, port, reuse_address=True, backlog=1024).start()
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
            for runner in runners:
                for site in list(runner.sites):
                    await site.stop()
                if runner.server is not None:
                    runner.server.pre_shutdown()
            await self.processes.shutdown()
            await self.interpreter.shutdown()
            self.filesystem.close()
            for runner in reversed(runners):
                await runner.cleanup()

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
