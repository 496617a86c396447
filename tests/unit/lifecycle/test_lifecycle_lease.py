"""Leader election decisions (lifecycle.lease): who may take the Lease, and what is written."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sandbox_operator.lifecycle.lease import (
    LeaseStep,
    LeaseTimings,
    expires_at,
    lease_step,
    micro_time,
    released_lease,
    wait_seconds,
    written_lease,
)

NOW = datetime(2026, 12, 2, 22, 0, 0, tzinfo=UTC)
TIMINGS = LeaseTimings(duration_s=15, renew_deadline_s=10, retry_s=2)


def lease(holder: str | None, renewed: datetime | None = NOW, duration: int = 15, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {"name": "sandbox-operator", "namespace": "sandbox-system", "resourceVersion": "41"},
        "spec": {"leaseDurationSeconds": duration, "leaseTransitions": 3, **spec},
    }
    if holder is not None:
        body["spec"]["holderIdentity"] = holder
    if renewed is not None:
        body["spec"]["renewTime"] = micro_time(renewed)
    return body


@pytest.mark.parametrize(
    ("current", "step"),
    [
        (None, LeaseStep.CREATE),
        (lease("me"), LeaseStep.RENEW),
        (lease("other"), LeaseStep.WAIT),
        (lease("other", NOW - timedelta(seconds=14)), LeaseStep.WAIT),  # 1 s left
        (lease("other", NOW - timedelta(seconds=15)), LeaseStep.TAKE_OVER),  # expired just now
        (lease("other", NOW - timedelta(hours=1)), LeaseStep.TAKE_OVER),
        (lease(None), LeaseStep.TAKE_OVER),  # released
        (lease("other", None), LeaseStep.TAKE_OVER),  # never renewed: nothing to wait for
    ],
)
def test_a_candidate_takes_only_a_free_or_expired_lease(current: dict[str, Any] | None, step: LeaseStep) -> None:
    assert lease_step(current, "me", NOW) is step


def test_a_take_over_writes_ourselves_with_the_read_version_and_counts_the_transition() -> None:
    old = lease("other", NOW - timedelta(seconds=30))
    written = written_lease(
        old, namespace="sandbox-system", name="sandbox-operator", identity="me", now=NOW, timings=TIMINGS
    )
    assert written["apiVersion"] == "coordination.k8s.io/v1" and written["kind"] == "Lease"
    assert written["metadata"] == {"name": "sandbox-operator", "namespace": "sandbox-system", "resourceVersion": "41"}
    assert written["spec"] == {
        "holderIdentity": "me",
        "leaseDurationSeconds": 15,
        "renewTime": "2026-12-02T22:00:00.000000Z",
        "acquireTime": "2026-12-02T22:00:00.000000Z",
        "leaseTransitions": 4,
    }


def test_a_renewal_moves_only_the_renew_time() -> None:
    acquired = NOW - timedelta(minutes=5)
    ours = lease("me", NOW - timedelta(seconds=2), acquireTime=micro_time(acquired))
    later = NOW + timedelta(seconds=1)
    renewed = written_lease(ours, namespace="n", name="l", identity="me", now=later, timings=TIMINGS)["spec"]
    assert renewed["acquireTime"] == micro_time(acquired) and renewed["leaseTransitions"] == 3
    assert renewed["renewTime"] == micro_time(later)


def test_a_first_lease_has_no_version_and_no_transitions() -> None:
    created = written_lease(None, namespace="n", name="l", identity="me", now=NOW, timings=TIMINGS)
    assert "resourceVersion" not in created["metadata"] and created["spec"]["leaseTransitions"] == 0


def test_a_standby_looks_again_when_the_holding_may_end_at_most_a_retry_period_later() -> None:
    assert wait_seconds(lease("other", NOW - timedelta(seconds=14)), NOW, TIMINGS) == 1.0
    assert wait_seconds(lease("other"), NOW, TIMINGS) == 2.0
    assert wait_seconds(lease(None), NOW, TIMINGS) == 0.0
    assert expires_at(lease("other")) == NOW + timedelta(seconds=15)


def test_only_the_holder_releases_and_a_released_lease_is_free_at_once() -> None:
    ours = lease("me")
    freed = released_lease(ours, "me")
    assert freed is not None and "holderIdentity" not in freed["spec"] and "renewTime" not in freed["spec"]
    assert freed["metadata"]["resourceVersion"] == "41"  # a conflicting renewal elsewhere makes it a 409
    assert lease_step(freed, "standby", NOW) is LeaseStep.TAKE_OVER
    assert released_lease(lease("other"), "me") is None


@pytest.mark.parametrize(("duration", "deadline", "retry"), [(10, 10, 2), (15, 10, 10), (15, 10, 0), (5, 10, 2)])
def test_timings_must_nest(duration: float, deadline: float, retry: float) -> None:
    with pytest.raises(ValueError, match="retry period < renew deadline < lease duration"):
        LeaseTimings(duration, deadline, retry)
