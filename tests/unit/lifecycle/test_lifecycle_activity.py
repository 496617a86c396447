"""The idle timeout asks the agent at its deadline (idle_deadline_passed, with_activity): activity
the status has not caught up with yet keeps a busy sandbox Running."""

from __future__ import annotations

from datetime import timedelta

from lifecycle_factories import at, desired, observed

from sandbox_operator.api import Phase
from sandbox_operator.lifecycle import decide
from sandbox_operator.lifecycle.observe import idle_deadline_passed, with_activity

IDLE = timedelta(minutes=30)  # desired()'s idle timeout


def test_the_check_is_due_only_once_the_status_deadline_has_passed() -> None:
    running = observed(Phase.RUNNING)  # started at T0 + 5s, no activity recorded
    assert not idle_deadline_passed(desired(), running, at(4, minutes=30))
    assert idle_deadline_passed(desired(), running, at(5, minutes=30))


def test_no_check_outside_running_or_without_an_idle_timeout() -> None:
    assert not idle_deadline_passed(desired(idle_timeout=None), observed(Phase.RUNNING), at(minutes=59))
    for phase in (Phase.CREATING, Phase.SUSPENDED, Phase.RESUMING, Phase.TERMINATED):
        assert not idle_deadline_passed(desired(), observed(phase), at(minutes=59))
    assert not idle_deadline_passed(desired(), observed(Phase.RUNNING, deleting=True), at(minutes=59))


def test_fresh_agent_activity_moves_the_deadline_and_is_written() -> None:
    stale = observed(Phase.RUNNING, last_activity_at=at(minutes=1))
    now = at(minutes=31)
    assert decide(desired(), stale, now).phase is Phase.SUSPENDING  # on the status alone: suspended
    fresh = with_activity(stale, at(20, minutes=30) + timedelta(microseconds=400))
    assert fresh.last_activity_at == at(20, minutes=30)  # whole seconds, like the status
    decision = decide(desired(max_lifetime=None), fresh, now)
    assert decision.phase is Phase.RUNNING
    assert decision.fired_timeout is None
    assert decision.status.last_activity_at == at(20, minutes=30)
    assert decision.status.idle_deadline == at(20, minutes=30) + IDLE
    assert decision.wake_at == at(20, minutes=30) + IDLE


def test_older_or_no_agent_activity_changes_nothing() -> None:
    known = observed(Phase.RUNNING, last_activity_at=at(minutes=10))
    assert with_activity(known, None) is known
    assert with_activity(known, at(minutes=9)) is known
    assert with_activity(known, at(minutes=10)) is known
    assert decide(desired(), with_activity(known, at(minutes=5)), at(minutes=41)).phase is Phase.SUSPENDING
