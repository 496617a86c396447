"""The allowed phase transitions of a Sandbox, as data (docs/design.md §4).

``None`` stands for "(new)": an object the operator has not written a phase to yet.
"""

from __future__ import annotations

from collections.abc import Mapping

from sandbox_operator.api import Phase

__all__ = [
    "ALLOWED_TRANSITIONS",
    "TERMINAL_PHASES",
    "is_allowed_transition",
]

ALLOWED_TRANSITIONS: Mapping[Phase | None, frozenset[Phase]] = {
    None: frozenset({Phase.CREATING}),
    # Creating → Suspending: a sandbox declared suspended before it ever ran never starts.
    Phase.CREATING: frozenset({Phase.RUNNING, Phase.SUSPENDING, Phase.ERROR, Phase.TERMINATING}),
    Phase.RUNNING: frozenset({Phase.SUSPENDING, Phase.TERMINATING, Phase.ERROR}),
    Phase.SUSPENDING: frozenset({Phase.SUSPENDED, Phase.ERROR}),
    Phase.SUSPENDED: frozenset({Phase.RESUMING, Phase.TERMINATING}),
    Phase.RESUMING: frozenset({Phase.RUNNING, Phase.ERROR}),
    # Error → Creating only within the retry budget, or after the spec changed; decide() enforces that.
    Phase.ERROR: frozenset({Phase.TERMINATING, Phase.CREATING}),
    Phase.TERMINATING: frozenset({Phase.TERMINATED}),
    Phase.TERMINATED: frozenset(),
}

# Terminated is final: the object stays until deleted (or until ttlAfterTerminated removes it).
TERMINAL_PHASES: frozenset[Phase] = frozenset({Phase.TERMINATED})


def is_allowed_transition(current: Phase | None, target: Phase | None) -> bool:
    """True when ``current → target`` is in the table; staying in the same phase is always allowed."""
    if current == target:
        return True
    if target is None:  # nothing goes back to "(new)"
        return False
    return target in ALLOWED_TRANSITIONS[current]
