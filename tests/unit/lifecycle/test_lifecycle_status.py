"""status_patch / merge_conditions: the smallest write that records a Decision."""

from __future__ import annotations

from datetime import timedelta

from lifecycle_factories import T0, at, desired, observed

from sandbox_operator.api import Phase
from sandbox_operator.lifecycle import decide, format_time, merge_conditions, parse_time, status_patch


def test_first_patch_writes_phase_conditions_and_deadlines() -> None:
    decision = decide(desired(), observed(Phase.CREATING), at(3))
    patch = status_patch(decision, {"phase": "Creating"}, at(3))
    assert patch["phase"] == "Running"
    assert patch["startedAt"] == "2026-01-01T00:00:03Z"
    assert patch["expiresAt"] == "2026-01-01T01:00:00Z"
    assert patch["idleDeadline"] == "2026-01-01T00:30:03Z"
    assert [c["type"] for c in patch["conditions"]] == ["Ready", "Suspended", "Terminated", "Reconciling", "Stalled"]
    assert all(c["lastTransitionTime"] == "2026-01-01T00:00:03Z" for c in patch["conditions"])


def test_unchanged_decision_patches_nothing() -> None:
    decision = decide(desired(), observed(Phase.CREATING), at(3))
    written = status_patch(decision, {}, at(3))
    # The API server returns what was written; a later identical decision is a no-op.
    assert status_patch(decision, written, at(50)) == {}


def test_transition_time_moves_only_with_the_status() -> None:
    previous = [
        {
            "type": "Ready",
            "status": "True",
            "reason": "Started",
            "message": "m",
            "lastTransitionTime": "2026-01-01T00:00:03Z",
        }
    ]
    running = decide(desired(), observed(Phase.RUNNING), at(10))
    (ready, *_) = merge_conditions(previous, running.conditions, at(10))
    assert ready["lastTransitionTime"] == "2026-01-01T00:00:03Z"
    suspending = decide(desired(suspended=True), observed(Phase.RUNNING), at(20))
    (ready, *_) = merge_conditions(previous, suspending.conditions, at(20))
    assert (ready["status"], ready["lastTransitionTime"]) == ("False", "2026-01-01T00:00:20Z")


def test_foreign_conditions_are_kept() -> None:
    foreign = {"type": "PoolClaimed", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}
    merged = merge_conditions([foreign], decide(desired(), observed(Phase.RUNNING), at(1)).conditions, at(1))
    assert merged[-1] == foreign


def test_leaving_running_clears_the_idle_deadline() -> None:
    decision = decide(desired(suspended=True), observed(Phase.RUNNING), at(20))
    patch = status_patch(decision, {"phase": "Running", "idleDeadline": "2026-01-01T00:30:05Z"}, at(20))
    assert patch["idleDeadline"] is None


def test_last_activity_is_never_moved_back() -> None:
    decision = decide(desired(), observed(Phase.RESUMING), at(300))
    newer = {"lastActivityAt": format_time(at(400))}
    assert "lastActivityAt" not in status_patch(decision, newer, at(300))
    assert status_patch(decision, {}, at(300))["lastActivityAt"] == "2026-01-01T00:05:00Z"


def test_observed_generation_is_recorded() -> None:
    decision = decide(desired(generation=4), observed(Phase.RUNNING), at(1))
    patch = status_patch(decision, {}, at(1))
    assert patch["observedGeneration"] == 4
    assert {c["observedGeneration"] for c in patch["conditions"]} == {4}


def test_time_round_trip() -> None:
    assert format_time(T0 + timedelta(microseconds=999)) == "2026-01-01T00:00:00Z"
    assert parse_time("2026-01-01T00:00:00Z") == T0
    assert parse_time("not a time") is None
    assert parse_time(None) is None


def test_attempt_counter_absent_means_zero() -> None:
    decision = decide(desired(), observed(Phase.RUNNING), at(10))
    assert "recreateAttempts" not in status_patch(decision, {}, at(10))
    lost = decide(desired(), observed(Phase.RUNNING, pod=None), at(10))
    patch = status_patch(lost, {}, at(10))
    assert (patch["recreateAttempts"], patch["lastRecreateAt"]) == (1, "2026-01-01T00:00:10Z")


def test_waiting_reasons_within_creating_wait_out_the_grace() -> None:
    from sandbox_operator.lifecycle.status import PROGRESS_GRACE, progress_write_due

    created = T0
    soon, later = created + timedelta(seconds=0.5), created + PROGRESS_GRACE + timedelta(seconds=1)
    creating = {
        "phase": "Creating",
        "reason": "Creating",
        "conditions": [{"type": "Ready", "status": "False", "reason": "Creating"}],
    }
    progress = {
        "reason": "PodScheduling",
        "message": "waiting for the scheduler",
        "conditions": [{"type": "Ready", "status": "False", "reason": "PodScheduling"}],
    }
    assert progress_write_due(progress, creating, created, soon) == created + PROGRESS_GRACE
    assert progress_write_due(progress, creating, created, later) is None  # a slow start shows its reason
    # Anything beyond progress is written at once: a phase change, a pod name, a condition flipping.
    assert progress_write_due({**progress, "phase": "Running"}, creating, created, soon) is None
    assert progress_write_due({**progress, "podName": "sbx-a"}, creating, created, soon) is None
    flipped = {"conditions": [{"type": "Ready", "status": "True"}]}
    assert progress_write_due(flipped, creating, created, soon) is None
    # Only within Creating, and never for the first write of a new object.
    assert progress_write_due(progress, {**creating, "phase": "Running"}, created, soon) is None
    assert progress_write_due(progress, {}, created, soon) is None
    assert progress_write_due({}, creating, created, soon) is None
