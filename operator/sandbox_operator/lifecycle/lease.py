"""Leader election over a coordination.k8s.io/v1 Lease, as decisions: who holds it, when it may be
taken, and the object to write. Pure: controller.leader reads and writes the Lease.

The rules are client-go's leaderelection: a holder renews its Lease well within its duration; a
candidate takes it over only once `renewTime + leaseDurationSeconds` has passed (by its own clock),
writing with the Lease's resourceVersion so that two candidates cannot both win; a holder that
cannot renew within its renew deadline stops acting before anyone may take over; one that stops on
purpose releases the Lease (empty holder) so a standby need not wait out the duration.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sandbox_operator.api.names import LEASES

JSON = dict[str, Any]


@dataclass(frozen=True)
class LeaseTimings:
    """How long a Lease holds, when its holder renews, how long a holder may fail to renew before it
    stops acting, and how often a standby looks (client-go's defaults: 15 s, 10 s, 2 s)."""

    duration_s: float = 15.0
    renew_deadline_s: float = 10.0
    retry_s: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_s < self.renew_deadline_s < self.duration_s:
            raise ValueError(
                "leader election needs 0 < retry period < renew deadline < lease duration "
                f"(got {self.retry_s:g} s, {self.renew_deadline_s:g} s, {self.duration_s:g} s)"
            )


class LeaseStep(enum.Enum):
    """What a candidate does with the Lease as it is now."""

    CREATE = "create"  # no Lease yet
    TAKE_OVER = "take-over"  # free, expired, or released: write ourselves in as holder
    RENEW = "renew"  # ours: move renewTime on
    WAIT = "wait"  # another holder's, still valid


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def micro_time(moment: datetime) -> str:
    """A Lease's MicroTime: RFC 3339 with microseconds, UTC."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def holder(lease: Mapping[str, Any] | None) -> str | None:
    spec = (lease or {}).get("spec") or {}
    return spec.get("holderIdentity") or None


def expires_at(lease: Mapping[str, Any]) -> datetime | None:
    """When the current holding ends unless it is renewed; None when nobody holds it."""
    spec = lease.get("spec") or {}
    renewed = _time(spec.get("renewTime")) or _time(spec.get("acquireTime"))
    if not holder(lease) or renewed is None:
        return None
    return renewed + timedelta(seconds=float(spec.get("leaseDurationSeconds") or 0))


def lease_step(lease: Mapping[str, Any] | None, identity: str, now: datetime) -> LeaseStep:
    if lease is None:
        return LeaseStep.CREATE
    if holder(lease) == identity:
        return LeaseStep.RENEW
    end = expires_at(lease)
    return LeaseStep.TAKE_OVER if end is None or end <= now else LeaseStep.WAIT


def wait_seconds(lease: Mapping[str, Any], now: datetime, timings: LeaseTimings) -> float:
    """How long a standby sleeps before looking again: until the holding may end, at most a retry period."""
    end = expires_at(lease)
    if end is None:
        return 0.0
    return max(0.0, min(timings.retry_s, (end - now).total_seconds()))


def written_lease(
    lease: Mapping[str, Any] | None,
    *,
    namespace: str,
    name: str,
    identity: str,
    now: datetime,
    timings: LeaseTimings,
) -> JSON:
    """The Lease to write for CREATE, TAKE_OVER or RENEW: ourselves as holder, renewed now (written
    with the read resourceVersion, so a concurrent writer makes ours a 409)."""
    spec = dict((lease or {}).get("spec") or {})
    ours = spec.get("holderIdentity") == identity
    stamp = micro_time(now)
    spec.update(
        holderIdentity=identity,
        leaseDurationSeconds=max(1, round(timings.duration_s)),
        renewTime=stamp,
    )
    if not ours:
        spec["acquireTime"] = stamp
        spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if lease is not None else 0)
    metadata: JSON = {"name": name, "namespace": namespace}
    version = ((lease or {}).get("metadata") or {}).get("resourceVersion")
    if version:
        metadata["resourceVersion"] = version
    return {"apiVersion": f"{LEASES.group}/{LEASES.version}", "kind": "Lease", "metadata": metadata, "spec": spec}


def released_lease(lease: Mapping[str, Any], identity: str) -> JSON | None:
    """The Lease with no holder, for a holder that stops on purpose; None when it is not ours."""
    if holder(lease) != identity:
        return None
    spec = {k: v for k, v in (lease.get("spec") or {}).items() if k not in ("holderIdentity", "renewTime")}
    spec["leaseDurationSeconds"] = 1
    return {**lease, "spec": spec}
