"""Leader election for replicated operators: one replica acts, the others stand by (docs/operator.md).

A standby only reads the Lease (and answers its liveness probe, so the kubelet does not restart it);
once it holds the Lease it runs the operator and renews in the background. A leader that cannot
renew within the renew deadline stops the operator and exits non-zero before anyone may take over,
so two replicas never act at once; the Deployment restarts it as a standby. On SIGTERM the leader
releases the Lease, so a rolling update hands over in a retry period, not a lease duration. The
decisions are lifecycle.lease's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge

from sandbox_operator.api.names import LEASES
from sandbox_operator.kube import ApiError, KubeClient
from sandbox_operator.lifecycle.lease import (
    LeaseStep,
    LeaseTimings,
    lease_step,
    released_lease,
    wait_seconds,
    written_lease,
)

log = logging.getLogger(__name__)

JSON = dict[str, object]


class LostLease(Exception):
    """The Lease could not be renewed within the renew deadline: this replica must stop acting."""


class LeaderElector:
    def __init__(
        self,
        client: KubeClient,
        *,
        namespace: str,
        name: str,
        identity: str,
        timings: LeaseTimings,
        registry: CollectorRegistry | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.timings = timings
        self._now = now
        self.leader = Gauge(
            "sandbox_operator_leader",
            "1 while this replica holds the leader election Lease and acts; 0 while it stands by.",
            registry=registry,
        )
        self.leader.set(0)

    async def _try(self) -> bool:
        """One look at the Lease, and a write when the rules allow one; whether we hold it now."""
        path = LEASES.path(self.namespace, self.name)
        lease = await self.client.get(path)
        now = self._now()
        step = lease_step(lease, self.identity, now)
        if step is LeaseStep.WAIT:
            return False
        body = written_lease(
            lease, namespace=self.namespace, name=self.name, identity=self.identity, now=now, timings=self.timings
        )
        try:
            if step is LeaseStep.CREATE:
                await self.client.request("POST", LEASES.collection(self.namespace), body)
            else:
                await self.client.request("PUT", path, body)
        except ApiError as exc:
            if exc.status == 409:  # another candidate wrote first: look again
                return False
            raise
        return True

    async def acquire(self) -> None:
        """Wait until this replica holds the Lease."""
        log.info("leader election: %s waits for Lease %s/%s", self.identity, self.namespace, self.name)
        while True:
            try:
                if await self._try():
                    break
                lease = await self.client.get(LEASES.path(self.namespace, self.name))
                delay = wait_seconds(lease or {}, self._now(), self.timings) or self.timings.retry_s
            except (ApiError, OSError, TimeoutError) as exc:  # the API server is away: keep trying
                log.warning("leader election: cannot read or write the Lease: %s", exc)
                delay = self.timings.retry_s
            await asyncio.sleep(min(delay, self.timings.retry_s))  # polling the Lease at the retry period
        self.leader.set(1)
        log.info("leader election: %s holds Lease %s/%s and acts", self.identity, self.namespace, self.name)

    async def hold(self) -> None:
        """Renew until cancelled; LostLease when a renewal has not succeeded within the renew deadline."""
        last_renewed = time.monotonic()
        while True:
            await asyncio.sleep(self.timings.retry_s)
            # One slow answer (a loaded API server) may use what is left of the deadline, as in
            # client-go; a retry-period bound lost the Lease to three slow renewals in a row.
            left = self.timings.renew_deadline_s - (time.monotonic() - last_renewed)
            try:
                renewed = left > 0 and await asyncio.wait_for(self._try(), left)
            except (ApiError, OSError, TimeoutError) as exc:
                log.warning("leader election: renewal failed: %s", exc)
                renewed = False
            if renewed:
                last_renewed = time.monotonic()
            elif time.monotonic() - last_renewed >= self.timings.renew_deadline_s:
                self.leader.set(0)
                raise LostLease(f"the Lease was not renewed for {self.timings.renew_deadline_s:g} s")

    async def release(self) -> None:
        """Give the Lease up (a clean stop), so a standby takes over without waiting it out."""
        self.leader.set(0)
        with contextlib.suppress(ApiError, OSError, TimeoutError):
            lease = await self.client.get(LEASES.path(self.namespace, self.name))
            freed = released_lease(lease, self.identity) if lease is not None else None
            if freed is not None:
                await self.client.request("PUT", LEASES.path(self.namespace, self.name), freed)
                log.info("leader election: released Lease %s/%s", self.namespace, self.name)


async def _healthz(_: web.Request) -> web.Response:
    return web.json_response({"standby": True})


async def while_standing_by(host: str, port: int, wait: Awaitable[None]) -> None:
    """Answer the liveness probe at /healthz while `wait` (acquiring the Lease) runs; the port is
    free again when it returns, for the operator's own liveness endpoint."""
    runner: web.AppRunner | None = None
    if port:
        app = web.Application()
        app.router.add_get("/healthz", _healthz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
    try:
        await wait
    finally:
        if runner is not None:
            await runner.cleanup()
