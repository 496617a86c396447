"""The transition table, checked pair by pair against docs/design.md §4."""

from __future__ import annotations

import itertools

import pytest

from sandbox_operator.api import Phase
from sandbox_operator.lifecycle import ALLOWED_TRANSITIONS, TERMINAL_PHASES, is_allowed_transition

P = Phase
# Written out again on purpose: a change to the table must be a change to this list too.
EXPECTED: dict[Phase | None, set[Phase]] = {
    None: {P.CREATING},
    P.CREATING: {P.RUNNING, P.SUSPENDING, P.ERROR, P.TERMINATING},
    P.RUNNING: {P.SUSPENDING, P.TERMINATING, P.ERROR},
    P.SUSPENDING: {P.SUSPENDED, P.ERROR},
    P.SUSPENDED: {P.RESUMING, P.TERMINATING},
    P.RESUMING: {P.RUNNING, P.ERROR},
    P.ERROR: {P.TERMINATING, P.CREATING},
    P.TERMINATING: {P.TERMINATED},
    P.TERMINATED: set(),
}
STATES: list[Phase | None] = [None, *Phase]


def test_table_covers_every_phase() -> None:
    assert set(ALLOWED_TRANSITIONS) == set(STATES)


@pytest.mark.parametrize(("current", "target"), list(itertools.product(STATES, STATES)))
def test_every_pair(current: Phase | None, target: Phase | None) -> None:
    allowed = current == target or target in EXPECTED[current]
    assert is_allowed_transition(current, target) is allowed


def test_terminated_is_the_only_final_phase() -> None:
    assert {P.TERMINATED} == TERMINAL_PHASES
    assert all(ALLOWED_TRANSITIONS[phase] for phase in Phase if phase is not P.TERMINATED)


def test_nothing_goes_back_to_new() -> None:
    assert not any(is_allowed_transition(phase, None) for phase in Phase)
