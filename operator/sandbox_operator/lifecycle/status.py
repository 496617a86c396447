"""Turn a Decision into the smallest status merge patch (camelCase, RFC 3339 times).

Only fields whose value changes are in the patch, so an unchanged sandbox costs no API write: the
controller skips the PATCH when ``status_patch`` returns ``{}``. ``lastActivityAt`` belongs to the
gateway; it is only written when the lifecycle moves it forward (on resume), never cleared.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sandbox_operator.lifecycle.types import DecidedCondition, Decision

__all__ = ["PROGRESS_GRACE", "format_time", "merge_conditions", "parse_time", "progress_write_due", "status_patch"]

# A sandbox that starts quickly goes Creating -> Running in two status writes: the waiting reasons in
# between (scheduling, binding the workspace, pulling the image) are written only once Creating has
# lasted this long, so a slow start still says what it waits for.
PROGRESS_GRACE = timedelta(seconds=2)
_PROGRESS_FIELDS = frozenset({"reason", "message", "conditions"})


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC with whole seconds, the way metav1.Time serialises."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: object) -> datetime | None:
    """A datetime from an RFC 3339 string or a datetime; None for anything else."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _same_time(left: object, right: datetime | None) -> bool:
    parsed = parse_time(left)
    if parsed is None or right is None:
        return parsed is None and right is None
    return format_time(parsed) == format_time(right)


def merge_conditions(
    previous: Sequence[Mapping[str, Any]] | None,
    conditions: Sequence[DecidedCondition],
    now: datetime,
    observed_generation: int | None = None,
    withdrawn: Collection[str] = (),
) -> list[dict[str, Any]]:
    """Conditions as status dicts; ``lastTransitionTime`` moves only when a condition's status does.

    Types in ``withdrawn`` are dropped; condition types the lifecycle does not own (written by
    someone else) are kept as they are.
    """
    by_type = {str(item.get("type")): item for item in previous or () if str(item.get("type")) not in withdrawn}
    merged: list[dict[str, Any]] = []
    for condition in conditions:
        before = by_type.pop(str(condition.type), None)
        unchanged = before is not None and before.get("status") == condition.status and before.get("lastTransitionTime")
        entry: dict[str, Any] = {
            "type": str(condition.type),
            "status": str(condition.status),
            "reason": condition.reason,
            "message": condition.message,
            "lastTransitionTime": before["lastTransitionTime"] if unchanged and before else format_time(now),
        }
        if observed_generation is not None:
            entry["observedGeneration"] = observed_generation
        merged.append(entry)
    merged.extend(dict(item) for item in by_type.values())
    return merged


def _conditions_equal(left: object, right: list[dict[str, Any]]) -> bool:
    if not isinstance(left, list) or len(left) != len(right):
        return False
    keys = ("type", "status", "reason", "message", "observedGeneration")
    return all(
        isinstance(old, Mapping)
        and all(old.get(key) == new.get(key) for key in keys)
        and _same_time(old.get("lastTransitionTime"), parse_time(new["lastTransitionTime"]))
        for old, new in zip(left, right, strict=True)
    )


def status_patch(decision: Decision, current: Mapping[str, Any] | None, now: datetime) -> dict[str, Any]:
    """The merge patch for ``status`` that records ``decision`` over ``current`` (the status as read)."""
    current = current or {}
    fields = decision.status
    patch: dict[str, Any] = {}

    def put(key: str, value: object) -> None:
        if current.get(key) != value:
            patch[key] = value

    def put_time(key: str, value: datetime | None) -> None:
        if not _same_time(current.get(key), value):
            patch[key] = format_time(value) if value is not None else None

    if decision.phase is not None:
        put("phase", str(decision.phase))
    put("reason", decision.reason)
    put("message", decision.message)
    put_time("startedAt", fields.started_at)
    put_time("terminatedAt", fields.terminated_at)
    put_time("expiresAt", fields.expires_at)
    put_time("idleDeadline", fields.idle_deadline)
    put_time("lastRecreateAt", fields.last_recreate_at)
    if current.get("recreateAttempts", 0) != fields.recreate_attempts:  # absent means 0
        patch["recreateAttempts"] = fields.recreate_attempts
    if fields.observed_generation is not None:
        put("observedGeneration", fields.observed_generation)
    put("suspendedBy", None if fields.suspended_by is None else str(fields.suspended_by))
    put("resumeRequestSeen", fields.resume_request_seen)
    activity = fields.last_activity_at
    if activity is not None:
        known = parse_time(current.get("lastActivityAt"))
        if known is None or known < activity.replace(microsecond=0):
            patch["lastActivityAt"] = format_time(activity)
    previous = current.get("conditions")
    conditions = merge_conditions(
        previous if isinstance(previous, list) else None,
        decision.conditions,
        now,
        fields.observed_generation,
        withdrawn=[str(kind) for kind in decision.withdrawn],
    )
    if not _conditions_equal(previous, conditions):
        patch["conditions"] = conditions
    return patch


def progress_write_due(
    patch: Mapping[str, Any], current: Mapping[str, Any], created: datetime | None, now: datetime
) -> datetime | None:
    """None when `patch` should be written now; else when it should be, at the earliest.

    Only a patch that restates progress within Creating waits (reason, message, and conditions whose
    status stays the same): a phase change, a new pod name or a condition flipping is written at once.
    """
    if current.get("phase") != "Creating" or created is None or not patch or not set(patch) <= _PROGRESS_FIELDS:
        return None
    if "conditions" in patch and _condition_statuses(current.get("conditions")) != _condition_statuses(
        patch["conditions"]
    ):
        return None
    due = created + PROGRESS_GRACE
    return due if now < due else None


def _condition_statuses(conditions: object) -> dict[object, object]:
    if not isinstance(conditions, list):
        return {}
    return {c.get("type"): c.get("status") for c in conditions if isinstance(c, Mapping)}
