"""Deadlines of a sandbox, computed from durations (Desired) and timestamps (Observed).

- maxLifetime counts from the object's creation (as the CRD documents it, and as E2B counts its
  timeout from the create call); it is wall-clock time and keeps running while suspended, so a
  slow start or a suspension never extends a sandbox's life. An API client's requested end
  (Desired.end_at, the sandbox.dev/end-at annotation of E2B's set_timeout) replaces it.
- idle counts from the latest of ``lastActivityAt`` and ``startedAt``; it only applies while Running
  (a resume writes ``lastActivityAt``, so a resumed sandbox gets a full idle period).
- ttl counts from ``terminatedAt``; None keeps a Terminated object, zero deletes it at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sandbox_operator.lifecycle.types import Desired, OnIdle

__all__ = ["Deadlines", "compute_deadlines", "expires_at"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Deadlines:
    max_lifetime: datetime | None
    idle: datetime | None
    ttl: datetime | None


def _after(start: datetime | None, duration: timedelta | None, *, zero_is_none: bool = True) -> datetime | None:
    # For timeouts a zero duration means "no limit"; for the TTL it means "right away".
    if start is None or duration is None or (zero_is_none and not duration):
        return None
    return start + duration


def compute_deadlines(
    desired: Desired,
    *,
    created_at: datetime,
    started_at: datetime | None,
    last_activity_at: datetime | None,
    terminated_at: datetime | None,
) -> Deadlines:
    activity_marks = [mark for mark in (last_activity_at, started_at) if mark is not None]
    return Deadlines(
        max_lifetime=desired.end_at or _after(created_at, desired.max_lifetime),
        # Not started yet → no idle clock: a slow image pull is not idleness.
        idle=_after(max(activity_marks) if started_at else None, desired.idle_timeout),
        ttl=_after(terminated_at, desired.ttl_after_terminated, zero_is_none=False),
    )


def expires_at(desired: Desired, deadlines: Deadlines) -> datetime | None:
    """When the sandbox will be terminated if nothing changes (E2B's ``endAt``).

    That is the maxLifetime deadline, or the idle deadline when idleness terminates, whichever comes
    first. An idle suspension does not end the sandbox, so it does not count.
    """
    candidates = [deadlines.max_lifetime]
    if desired.on_idle is OnIdle.TERMINATE:
        candidates.append(deadlines.idle)
    return min((moment for moment in candidates if moment is not None), default=None)
