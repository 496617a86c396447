"""Node loss, decided: a sandbox pod's node stops reporting (its Ready condition goes Unknown).

The sandbox stays in its phase with reason NodeLost while Kubernetes keeps the pod on the node; it
recovers with the same pod if the node comes back; once the pod is evicted (deleted on a node that
will never confirm it) it is force-deleted after its grace period and replaced, in every phase, so
nothing waits on a Terminating pod forever. The container-node test is tests/chaos/test_node_loss.py.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from lifecycle_factories import at, condition, desired, events, fed_back, observed, pod, work

from sandbox_operator.api import Phase
from sandbox_operator.lifecycle import (
    CreatePod,
    DeletePod,
    EventType,
    ForceDeletePod,
    NodeObservation,
    PodPhase,
    Reason,
    decide,
)
from sandbox_operator.lifecycle.observe import node_observation, node_to_check, pod_observation, with_node

P = Phase
LOST = NodeObservation(name="node-a", ready=False, reason="NodeStatusUnknown", since=at(50))
BACK = NodeObservation(name="node-a", ready=True, reason="KubeletReady", since=at(200))
# What the node lifecycle controller leaves: the pod still Running, Ready False; the pod carries the
# DefaultTolerationSeconds admission plugin's toleration of the unreachable taint.
STRANDED = pod(PodPhase.RUNNING, ready=False, node=LOST, unreachable_toleration=300)


def evicted(due_seconds: float) -> Any:
    """The stranded pod after the taint manager deleted it (grace period ending at `due_seconds`)."""
    return replace(STRANDED, deleting=True, deletion_due=at(due_seconds))


def test_a_running_sandbox_on_a_lost_node_says_so_and_waits_for_it() -> None:
    decision = decide(desired(), observed(P.RUNNING, reason=Reason.STARTED, pod=STRANDED), at(60))
    assert (decision.phase, decision.reason) == (P.RUNNING, Reason.NODE_LOST)
    assert decision.message == (
        "the node node-a of the sandbox pod is not ready (NodeStatusUnknown since 2026-01-01T00:00:50Z); "
        "the sandbox waits for it: Kubernetes evicts the pod 300 s after the node became unreachable, "
        "then a new pod is made"
    )
    assert work(decision) == []  # the pod is not touched: the node may come back
    (event,) = events(decision)
    assert (event.type, event.reason, event.message) == (EventType.WARNING, Reason.NODE_LOST, decision.message)
    assert condition(decision, "Ready") == ("False", Reason.NODE_LOST)
    assert condition(decision, "Reconciling")[0] == "True" and condition(decision, "Stalled")[0] == "False"
    assert decision.wake_at is not None and decision.wake_at <= at(90)  # looks at the node again


def test_the_node_lost_event_is_posted_once() -> None:
    first = observed(P.RUNNING, reason=Reason.STARTED, pod=STRANDED)
    again = decide(desired(), fed_back(first, decide(desired(), first, at(60))), at(90))
    assert (again.reason, events(again)) == (Reason.NODE_LOST, [])


def test_the_node_coming_back_brings_the_same_pod_back() -> None:
    lost = observed(P.RUNNING, reason=Reason.STARTED, pod=STRANDED)
    waiting = decide(desired(), lost, at(60))
    back = replace(fed_back(lost, waiting), pod=pod(PodPhase.RUNNING, ready=True, node=None))
    recovered = decide(desired(), back, at(200))
    assert (recovered.phase, recovered.reason, work(recovered)) == (P.RUNNING, Reason.STARTED, [])
    (event,) = events(recovered)
    assert (event.type, event.reason) == (EventType.NORMAL, Reason.NODE_RECOVERED)
    assert recovered.status.recreate_attempts == 0  # nothing was replaced


def test_an_evicted_pod_is_waited_for_until_its_grace_period_ends() -> None:
    decision = decide(desired(), observed(P.RUNNING, reason=Reason.NODE_LOST, pod=evicted(365)), at(362))
    assert (decision.phase, decision.reason) == (P.RUNNING, Reason.NODE_LOST)
    assert "is being deleted there" in decision.message
    assert work(decision) == []
    assert decision.wake_at == at(365)


def test_an_evicted_pod_past_its_grace_period_is_force_deleted_then_replaced() -> None:
    stuck = observed(P.RUNNING, reason=Reason.NODE_LOST, pod=evicted(365))
    forced = decide(desired(), stuck, at(366))
    assert (forced.phase, forced.reason) == (P.RUNNING, Reason.NODE_LOST)
    assert work(forced) == [ForceDeletePod()]
    (event,) = events(forced)
    assert (event.type, event.reason) == (EventType.WARNING, Reason.NODE_LOST)
    assert "without the node's confirmation" in event.message

    gone = replace(fed_back(stuck, forced), pod=None)
    replaced = decide(desired(), gone, at(367))
    assert (replaced.phase, replaced.reason) == (P.RUNNING, Reason.POD_RECREATED)
    assert work(replaced) == [CreatePod()]
    (event,) = events(replaced)
    assert event.message == "the sandbox pod was lost with its node; recreating it (attempt 1 of 3)"


@pytest.mark.parametrize(
    ("phase", "fields"),
    [
        (P.SUSPENDING, {"reason": Reason.SUSPEND_REQUESTED}),
        (P.TERMINATING, {"reason": Reason.MAX_LIFETIME}),
        (P.RUNNING, {"deleting": True}),  # the Sandbox itself deleted
        (P.CREATING, {}),
    ],
)
def test_no_phase_waits_forever_for_a_pod_deleted_on_a_lost_node(phase: Phase, fields: dict[str, Any]) -> None:
    decision = decide(desired(suspended=phase is P.SUSPENDING), observed(phase, pod=evicted(10), **fields), at(11))
    assert ForceDeletePod() in work(decision)
    assert DeletePod() not in work(decision)  # deleting already: the force is what is missing


def test_a_pod_being_deleted_on_a_healthy_node_is_left_to_its_kubelet() -> None:
    going = replace(evicted(10), node=BACK)
    decision = decide(desired(suspended=True), observed(P.SUSPENDING, pod=going), at(100))
    assert ForceDeletePod() not in work(decision)


def test_an_unknown_node_is_not_a_lost_one() -> None:
    """No node looked up (a read refused by RBAC, a node object gone): the old behaviour."""
    decision = decide(desired(), observed(P.RUNNING, pod=replace(STRANDED, node=None)), at(60))
    assert decision.reason == Reason.POD_NOT_READY


# --- observing ---------------------------------------------------------------------------------------------


def _pod_body(ready: str, *, deleting: bool = False, node: str | None = "node-a") -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "sbx", "uid": "u1"}
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T00:06:05Z"
    spec: dict[str, Any] = {
        "tolerations": [
            {
                "key": "node.kubernetes.io/not-ready",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 30,
            },
            {
                "key": "node.kubernetes.io/unreachable",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 20,
            },
        ]
    }
    if node:
        spec["nodeName"] = node
    status = {"phase": "Running", "conditions": [{"type": "Ready", "status": ready}]}
    return {"metadata": metadata, "spec": spec, "status": status}


def _observed(pod_body: dict[str, Any] | None) -> Any:
    return observed(P.RUNNING, pod=pod_observation(pod_body) if pod_body is not None else None)


def test_only_a_bound_pod_that_is_not_ready_or_going_needs_its_node_looked_up() -> None:
    assert node_to_check(_observed(_pod_body("True"))) is None
    assert node_to_check(_observed(_pod_body("False"))) == "node-a"
    assert node_to_check(_observed(_pod_body("True", deleting=True))) == "node-a"
    assert node_to_check(_observed(_pod_body("False", node=None))) is None
    assert node_to_check(_observed(None)) is None


def test_a_pod_observation_carries_its_deletion_deadline_toleration_and_node() -> None:
    seen = with_node(_observed(_pod_body("True", deleting=True)), LOST).pod
    assert seen is not None
    assert (seen.deletion_due, seen.unreachable_toleration, seen.node_name, seen.node_lost) == (
        at(365),
        20,
        "node-a",
        True,
    )
    unknown = _observed(_pod_body("False"))
    assert with_node(unknown, None) is unknown  # a node that could not be read: nothing known, nothing lost


def test_a_node_observation_reads_the_ready_condition() -> None:
    stopped = {
        "metadata": {"name": "node-a"},
        "status": {
            "conditions": [
                {"type": "MemoryPressure", "status": "Unknown"},
                {
                    "type": "Ready",
                    "status": "Unknown",
                    "reason": "NodeStatusUnknown",
                    "lastTransitionTime": "2026-01-01T00:00:50Z",
                },
            ]
        },
    }
    assert node_observation(stopped) == LOST
    assert node_observation({"metadata": {"name": "node-a"}, "status": {}}).ready is False
    healthy = {"metadata": {"name": "n"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    assert node_observation(healthy).ready is True


def test_the_wait_before_eviction_is_said_without_a_toleration_too() -> None:
    decision = decide(desired(), observed(P.RUNNING, pod=replace(STRANDED, unreachable_toleration=None)), at(60))
    assert "when its toleration of the node's taint runs out" in decision.message
    assert decision.wake_at is not None and decision.wake_at - at(60) <= timedelta(seconds=30)
