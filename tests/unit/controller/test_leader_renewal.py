"""A leader's renewals (controller.leader.LeaderElector.hold): one slow answer from the API server
may use what is left of the renew deadline, as in client-go; only a deadline with no renewal at
all loses the Lease. The API server is a stand-in whose answers take as long as a test says."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from sandbox_operator.controller.leader import LeaderElector, LostLease
from sandbox_operator.kube import KubeClient
from sandbox_operator.lifecycle.lease import LeaseTimings

IDENTITY = "replica-a"
TIMINGS = LeaseTimings(duration_s=4.0, renew_deadline_s=1.5, retry_s=0.1)


class SlowLeases:
    """Holds one Lease held by IDENTITY; each read answers after `delay` seconds (None: never)."""

    def __init__(self, delay: float | None) -> None:
        self.delay = delay
        self.renewals = 0
        self.lease: dict[str, Any] = {
            "metadata": {"name": "sandbox-operator", "namespace": "ns", "resourceVersion": "1"},
            "spec": {"holderIdentity": IDENTITY, "leaseDurationSeconds": 4},
        }

    async def get(self, path: str) -> dict[str, Any]:
        if self.delay is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self.delay or 0)  # the API server's latency, not synchronization
        return self.lease

    async def request(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        assert method == "PUT" and body["spec"]["holderIdentity"] == IDENTITY
        self.renewals += 1
        self.lease = body
        return body


def elector(leases: SlowLeases) -> LeaderElector:
    client = cast(KubeClient, leases)
    return LeaderElector(client, namespace="ns", name="sandbox-operator", identity=IDENTITY, timings=TIMINGS)


async def renew_until(leases: SlowLeases, count: int) -> None:
    holding = asyncio.create_task(elector(leases).hold())
    try:
        async with asyncio.timeout(30):
            while leases.renewals < count:
                assert not holding.done(), holding.exception()
                await asyncio.sleep(0.05)
    finally:
        holding.cancel()


def test_answers_slower_than_the_retry_period_keep_the_lease() -> None:
    leases = SlowLeases(delay=4 * TIMINGS.retry_s)  # each read takes four retry periods
    asyncio.run(renew_until(leases, 3))
    assert leases.renewals >= 3


def test_no_answer_within_the_renew_deadline_loses_the_lease() -> None:
    async def hold() -> None:
        async with asyncio.timeout(10 * TIMINGS.renew_deadline_s):
            await elector(SlowLeases(delay=None)).hold()

    with pytest.raises(LostLease, match=r"not renewed for 1\.5 s"):
        asyncio.run(hold())
