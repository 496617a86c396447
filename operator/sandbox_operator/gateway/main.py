"""`sandbox-operator gateway`: serve the E2B API and the data-plane proxy until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import signal

from prometheus_client import start_http_server

from sandbox_operator import eventloop
from sandbox_operator.api.names import GATEWAY_FIELD_MANAGER
from sandbox_operator.gateway.listener import ListenerLimits, guarded_runner, listen
from sandbox_operator.gateway.server import Gateway, GatewayConfig
from sandbox_operator.gateway.session_logic import SessionLimits
from sandbox_operator.keys import TOKEN_KEY_ENV, read_token_key
from sandbox_operator.kube import Credentials, KubeClient

log = logging.getLogger(__name__)

# A create, patch or delete the API server has not answered in this long is refused (503), well
# before the SDKs' own request timeout (60 s): someone is waiting. Reads (the caches' lists) keep the
# client's 30 s.
API_WRITE_TIMEOUT_S = 15.0


def load_token_key(path: str | None) -> bytes:
    """The key sandbox access tokens derive from (keys.read_token_key), or — for a single gateway in
    development — a random one (tokens then change when the gateway restarts, and agents started
    with the operator's key refuse the gateway)."""
    key = read_token_key(path)
    if key is not None:
        return key
    log.warning(
        "no --token-key-file or %s: using a random token key; sandbox access tokens will not "
        "survive a gateway restart, and replicas will not agree on them",
        TOKEN_KEY_ENV,
    )
    return secrets.token_bytes(32)


async def serve(
    *,
    kubeconfig: str | None,
    host: str,
    port: int,
    metrics_port: int,
    config: GatewayConfig,
    limits: ListenerLimits,
    stop: asyncio.Event | None = None,
) -> None:
    if metrics_port == port:
        raise SystemExit("--metrics-port must differ from --port: metrics are not for the public listener")
    credentials = await asyncio.to_thread(Credentials.load, kubeconfig)
    client = KubeClient(
        credentials,
        reload=functools.partial(Credentials.load, kubeconfig),
        field_manager=GATEWAY_FIELD_MANAGER,
        write_timeout=API_WRITE_TIMEOUT_S,
    )
    gateway = Gateway(client, config)
    if metrics_port:
        # Its own port (and, in the chart, its own Service): the public listener serves no /metrics.
        start_http_server(metrics_port, addr=host, registry=gateway.registry)
    runner, guard = guarded_runner(gateway.app(), limits)
    await runner.setup()
    server: asyncio.Server | None = None
    watching_api = asyncio.create_task(gateway.watch_api(), name="watch-api")
    try:
        await gateway.cache.synced(within=60)
        server = await listen(runner, guard, host, port)
        log.info(
            "gateway serving the E2B API and sandbox traffic on %s:%d (API keys from secrets in %s)",
            host,
            port,
            config.keys_namespace,
        )
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        watching_api.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching_api
        if server is not None:
            server.close()  # no new connections; runner.cleanup() ends the open ones
        await runner.cleanup()
        await client.close()


def run_gateway(
    *,
    kubeconfig: str | None,
    host: str,
    port: int,
    metrics_port: int,
    keys_namespace: str,
    domain: str | None,
    token_key_file: str | None,
    create_timeout: float,
    body_timeout: float,
    limits: ListenerLimits,
    session: SessionLimits | None = None,
) -> int:
    config = GatewayConfig(
        token_key=load_token_key(token_key_file),
        keys_namespace=keys_namespace,
        domain=domain,
        create_timeout=create_timeout,
        body_timeout=body_timeout,
        session=session or SessionLimits(),
    )
    eventloop.run(
        serve(kubeconfig=kubeconfig, host=host, port=port, metrics_port=metrics_port, config=config, limits=limits)
    )
    return 0
