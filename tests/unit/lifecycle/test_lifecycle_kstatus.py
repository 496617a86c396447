"""The Ready, Reconciling and Stalled conditions of a Sandbox, phase by phase, as kstatus reads them
(docs/lifecycle.md, "Status for GitOps tools"). kstatus_of() restates the library's generic rules
for custom resources (sigs.k8s.io/cli-utils/pkg/kstatus/status); hack/gitops-health runs the library
itself over recorded objects in tests/integration/test_gitops_health.py."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

import pytest
from hypothesis import given, settings
from lifecycle_factories import READY_POD, T0, at, desired, observed, pod
from test_lifecycle_properties import desireds, moments, observeds

from sandbox_operator.api import Phase
from sandbox_operator.lifecycle import (
    Decision,
    Desired,
    Observed,
    PodPhase,
    Reason,
    decide,
    status_patch,
)


def kstatus_of(status: dict[str, Any], generation: int | None) -> str:
    """kstatus's rules for a custom resource: an unobserved generation is InProgress; then
    Reconciling=True is InProgress and Stalled=True is Failed, whichever comes first; then, as a
    last resort, a Ready condition: True is Current, any other status InProgress; else Current."""
    observed_generation = status.get("observedGeneration")
    if generation is not None and observed_generation is not None and observed_generation != generation:
        return "InProgress"
    conditions = status.get("conditions") or []
    for condition in conditions:
        if condition["type"] == "Reconciling" and condition["status"] == "True":
            return "InProgress"
        if condition["type"] == "Stalled" and condition["status"] == "True":
            return "Failed"
    for condition in conditions:
        if condition["type"] == "Ready":
            return "Current" if condition["status"] == "True" else "InProgress"
    return "Current"


def states(decision: Decision) -> dict[str, str]:
    """Status per condition type; "-" for a Ready that is withdrawn (absent from the status)."""
    found = {str(c.type): str(c.status) for c in decision.conditions}
    assert ("Ready" in found) != ("Ready" in decision.withdrawn)
    return {"Ready": "-", **found}


def verdict(decision: Decision, generation: int | None) -> str:
    return kstatus_of(status_patch(decision, {}, at(1)), generation)


SCENARIOS: list[tuple[str, Desired, Observed, Phase, tuple[str, str, str], str]] = [
    # name, desired, observed, phase decided, (Ready, Reconciling, Stalled), kstatus
    ("new", desired(), observed(None, pod=None), Phase.CREATING, ("False", "True", "False"), "InProgress"),
    (
        "creating",
        desired(),
        observed(Phase.CREATING, pod=None),
        Phase.CREATING,
        ("False", "True", "False"),
        "InProgress",
    ),
    (
        "pulling",
        desired(),
        observed(Phase.CREATING, pod=pod(PodPhase.PENDING, waiting_reasons=("ImagePullBackOff",))),
        Phase.CREATING,
        ("False", "True", "False"),
        "InProgress",
    ),
    (
        "started",
        desired(),
        observed(Phase.CREATING, pod=READY_POD),
        Phase.RUNNING,
        ("True", "False", "False"),
        "Current",
    ),
    ("running", desired(), observed(Phase.RUNNING), Phase.RUNNING, ("True", "False", "False"), "Current"),
    (
        "running, pod lost",
        desired(),
        observed(Phase.RUNNING, pod=None),
        Phase.RUNNING,
        ("False", "True", "False"),
        "InProgress",
    ),
    (
        "suspending",
        desired(suspended=True),
        observed(Phase.RUNNING),
        Phase.SUSPENDING,
        ("False", "True", "False"),
        "InProgress",
    ),
    (
        "suspended",
        desired(suspended=True),
        observed(Phase.SUSPENDING, pod=None, reason=Reason.SUSPEND_REQUESTED),
        Phase.SUSPENDED,
        ("-", "False", "False"),
        "Current",
    ),
    (
        "suspended, old pod still going",
        desired(),
        observed(Phase.SUSPENDED, pod=pod(PodPhase.RUNNING, deleting=True)),
        Phase.SUSPENDED,
        ("False", "True", "False"),
        "InProgress",
    ),
    (
        "suspended, resume refused",
        desired(image_violation="image evil is not allowed"),
        observed(Phase.SUSPENDED, pod=None, reason=Reason.SUSPEND_REQUESTED),
        Phase.SUSPENDED,
        ("False", "False", "True"),
        "Failed",
    ),
    (
        "resuming",
        desired(),
        observed(Phase.SUSPENDED, pod=None),
        Phase.RESUMING,
        ("False", "True", "False"),
        "InProgress",
    ),
    (
        "resumed",
        desired(),
        observed(Phase.RESUMING, pod=READY_POD),
        Phase.RUNNING,
        ("True", "False", "False"),
        "Current",
    ),
    (
        "image error",
        desired(),
        observed(Phase.CREATING, pod=pod(PodPhase.PENDING, waiting_reasons=("InvalidImageName",))),
        Phase.ERROR,
        ("False", "False", "True"),
        "Failed",
    ),
    (
        "error stays",
        desired(),
        observed(Phase.ERROR, pod=None, reason=Reason.OOM_KILLED, message="out of memory"),
        Phase.ERROR,
        ("False", "False", "True"),
        "Failed",
    ),
    (
        "refused",
        desired(namespace_violation="not in team-a"),
        observed(Phase.CREATING, pod=None),
        Phase.ERROR,
        ("False", "False", "True"),
        "Failed",
    ),
    (
        "max lifetime",
        desired(),
        observed(Phase.RUNNING),
        Phase.TERMINATING,
        ("False", "True", "False"),
        "InProgress",
    ),
    (
        "terminated",
        desired(),
        observed(Phase.TERMINATING, pod=None, reason=Reason.MAX_LIFETIME),
        Phase.TERMINATED,
        ("-", "False", "False"),
        "Current",
    ),
]


@pytest.mark.parametrize(
    ("desired_", "observed_", "phase", "expected", "kstatus"),
    [scenario[1:] for scenario in SCENARIOS],
    ids=[scenario[0] for scenario in SCENARIOS],
)
def test_conditions_and_kstatus_per_phase(
    desired_: Desired, observed_: Observed, phase: Phase, expected: tuple[str, str, str], kstatus: str
) -> None:
    # The max-lifetime scenario is decided after the lifetime ended; all others well within it.
    now = at(minutes=61) if phase is Phase.TERMINATING else at(60)
    decision = decide(replace(desired_, generation=3), replace(observed_, observed_generation=3), now)
    assert decision.phase is phase
    got = states(decision)
    assert (got["Ready"], got["Reconciling"], got["Stalled"]) == expected
    assert verdict(decision, 3) == kstatus


def test_stalled_carries_the_error_reason_and_message() -> None:
    decision = decide(desired(), observed(Phase.ERROR, pod=None, reason=Reason.OOM_KILLED, message="oom"), at(60))
    (stalled,) = [c for c in decision.conditions if c.type == "Stalled"]
    assert (stalled.reason, stalled.message) == (Reason.OOM_KILLED, "oom")
    (reconciling,) = [c for c in decision.conditions if c.type == "Reconciling"]
    assert reconciling.reason == "Error"  # a False condition names the phase


def test_observed_generation_is_written_with_the_conditions() -> None:
    decision = decide(desired(generation=5), observed(Phase.RUNNING, observed_generation=4), at(60))
    patch = status_patch(decision, {}, at(60))
    assert patch["observedGeneration"] == 5
    assert {c["observedGeneration"] for c in patch["conditions"]} == {5}
    assert kstatus_of(patch, 5) == "Current"
    assert kstatus_of(patch, 6) == "InProgress"  # a newer spec the operator has not seen yet


def test_an_error_waiting_for_its_old_pod_does_not_acknowledge_the_new_spec() -> None:
    failed = pod(PodPhase.FAILED, terminated_reasons=("Error",))
    decision = decide(
        desired(generation=2), observed(Phase.ERROR, pod=failed, reason=Reason.POD_FAILED, observed_generation=1), T0
    )
    assert decision.status.observed_generation == 1
    assert verdict(decision, 2) == "InProgress"  # the new spec is not acted on yet


@settings(max_examples=300, deadline=None)
@given(desireds, observeds, moments)
def test_never_both_reconciling_and_stalled(desired_: Desired, observed_: Observed, now: datetime) -> None:
    decision = decide(desired_, observed_, now)
    got = states(decision)
    assert not (got["Reconciling"] == "True" and got["Stalled"] == "True")
    if decision.phase is Phase.ERROR:
        assert got["Stalled"] == "True"
    if got["Ready"] == "True":
        assert got["Reconciling"] == got["Stalled"] == "False"
    if decision.phase in (Phase.CREATING, Phase.RESUMING, Phase.SUSPENDING, Phase.TERMINATING):
        assert got["Reconciling"] == "True"
    if decision.phase is Phase.TERMINATED:
        assert got["Reconciling"] == got["Stalled"] == "False" and got["Ready"] == "-"
    # kstatus reads every settled sandbox (no Reconciling, no Stalled) Current: no Ready=False left.
    if got["Reconciling"] == got["Stalled"] == "False":
        assert got["Ready"] in ("True", "-")


def test_a_withdrawn_ready_is_removed_from_the_status() -> None:
    running = decide(desired(), observed(Phase.RUNNING), at(60))
    written = status_patch(running, {}, at(60))
    suspended = decide(
        desired(suspended=True), observed(Phase.SUSPENDING, pod=None, reason=Reason.SUSPEND_REQUESTED), at(70)
    )
    patch = status_patch(suspended, written, at(70))
    assert "Ready" not in {c["type"] for c in patch["conditions"]}
    assert kstatus_of(patch, None) == "Current"
    foreign = {"type": "Audited", "status": "True", "reason": "Checked", "message": ""}
    kept = status_patch(suspended, {**written, "conditions": [*written["conditions"], foreign]}, at(70))
    assert foreign in kept["conditions"]
