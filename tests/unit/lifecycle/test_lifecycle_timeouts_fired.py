"""Decision.fired_timeout: set on the step a timeout causes, never on the steps that follow it (the
metric sandbox_operator_timeouts_total counts from it: once per timeout)."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from lifecycle_factories import at, desired, fed_back, observed

from sandbox_operator.api import OnIdle, Phase
from sandbox_operator.lifecycle import Decision, DeletePod, Observed, TimeoutKind, decide
from sandbox_operator.lifecycle.types import Desired


def _run_to_rest(wanted: Desired, start: Observed, moments: list[int]) -> list[Decision]:
    """decide() pass after pass, each fed what the previous wrote (status: an idle suspension is held
    there, spec is never written); the pod goes when asked to."""
    decisions, state = [], start
    for minute in moments:
        decision = decide(wanted, state, at(minutes=minute))
        decisions.append(decision)
        state = fed_back(state, decision)
        if decision.has_action(DeletePod):
            state = replace(state, pod=None)
    return decisions


def test_an_idle_suspension_fires_once_over_all_its_steps() -> None:
    wanted = desired(max_lifetime=None)
    steps = _run_to_rest(wanted, observed(Phase.RUNNING), [31, 31, 32])
    assert [d.phase for d in steps] == [Phase.SUSPENDING, Phase.SUSPENDED, Phase.SUSPENDED]
    assert [d.fired_timeout for d in steps] == [TimeoutKind.IDLE, None, None]
    assert all(d.reason == "IdleTimeout" for d in steps)  # the reason stays; the count does not


def test_an_idle_termination_fires_once() -> None:
    wanted = desired(max_lifetime=None, on_idle=OnIdle.TERMINATE)
    steps = _run_to_rest(wanted, observed(Phase.RUNNING), [31, 31, 32])
    assert [d.phase for d in steps] == [Phase.TERMINATING, Phase.TERMINATED, Phase.TERMINATED]
    assert [d.fired_timeout for d in steps] == [TimeoutKind.IDLE, None, None]


@pytest.mark.parametrize("phase", [Phase.RUNNING, Phase.SUSPENDED, Phase.CREATING, Phase.ERROR])
def test_max_lifetime_fires_once_from_any_live_phase(phase: Phase) -> None:
    wanted = desired(idle_timeout=None, suspended=phase is Phase.SUSPENDED)
    steps = _run_to_rest(wanted, observed(phase), [61, 61, 62])
    assert steps[0].phase is Phase.TERMINATING
    assert [d.fired_timeout for d in steps] == [TimeoutKind.MAX_LIFETIME, None, None]


def test_no_timeout_no_fired_timeout() -> None:
    decision = decide(desired(), observed(Phase.RUNNING, last_activity_at=at(minutes=20)), at(minutes=35))
    assert decision.phase is Phase.RUNNING
    assert decision.fired_timeout is None


def test_a_user_suspend_is_not_a_timeout() -> None:
    decision = decide(desired(suspended=True, idle_timeout=timedelta(minutes=1)), observed(Phase.RUNNING), at(30))
    assert decision.phase is Phase.SUSPENDING
    assert decision.fired_timeout is None
