"""reconcile_sandbox on a real Runtime against the in-memory API (tests/fakeapi.py), pass by pass:
the writes each pass makes, TemplateNotFound, a failed policy write, suspend/resume, deletion, and
the exact metric deltas (transitions, time to running, timeouts).

Each pass first delivers what changed in the fake API to the Runtime's event methods (as kopf's
watches would), then reconciles once and waits for the Events it spawned. Writes are compared as
(verb, resource). Writes the controller makes concurrently (the Service and NetworkPolicy go out
while the pod and claim are written) are compared as a group in any order; groups are in order.

The code reads the wall clock (datetime.now); time "passes" by moving timestamps of the objects
back (status.startedAt, metadata.creationTimestamp), never by waiting.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fakeapi import JSON, FakeApi, Harness, format_time, parse_time
from sandbox_operator.api.names import (
    CLAIMED_FROM_POOL_ANNOTATION,
    ENVD_PORT,
    EVENTS,
    NETWORK_POLICIES,
    NODES,
    PERSISTENT_VOLUME_CLAIMS,
    PODS,
    SANDBOX_POOLS,
    SANDBOX_TEMPLATES,
    SANDBOXES,
    SERVICES,
)
from sandbox_operator.controller.reconcile import reconcile_sandbox
from sandbox_operator.kube import ApiError
from sandbox_operator.lifecycle.pool import workspace_claim_of
from sandbox_operator.resources import child_names

NS = "team-a"
NAME = "sb"
KEY = (NS, NAME)
CHILDREN = child_names(NAME)
SHARED_DENY = "sbx-net-base-deny"  # the NetworkPolicy every deny-class pod of template base in NS shares
POD_IP = "127.3.0.9"  # loopback, like the container node's pod IPs (never reached: the agent is stubbed)
HOLD = "example.com/hold"  # a finalizer of somebody else's (a backup tool's, say)
TEMPLATE: JSON = {
    "apiVersion": "sandbox.dev/v1alpha1",
    "kind": "SandboxTemplate",
    "metadata": {"name": "base"},
    "spec": {"image": "img:1", "timeouts": {"idle": "10m", "maxLifetime": "1h"}},  # persistence: on
}

Write = tuple[str, str]
STATUS: Write = ("PATCH", "sandboxes/status")
EVENT: Write = ("POST", "events")
CREATE_POD: Write = ("POST", "pods")
CREATE_PVC: Write = ("POST", "persistentvolumeclaims")
CREATE_SERVICE: Write = ("POST", "services")
CREATE_POLICY: Write = ("POST", "networkpolicies")
DELETE_POD: Write = ("DELETE", "pods")

TRANSITIONS = "sandbox_operator_transitions_total"
TIMEOUTS = "sandbox_operator_timeouts_total"
TIME_TO_RUNNING = "sandbox_operator_time_to_running_seconds_count"
Series = tuple[tuple[str, str], ...]


@pytest.fixture
def harness() -> Harness:
    return Harness()


# --- helpers ----------------------------------------------------------------------------------------


def sandbox_body(**spec: Any) -> JSON:
    return {
        "apiVersion": "sandbox.dev/v1alpha1",
        "kind": "Sandbox",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {"template": "base", **spec},
    }


def assert_writes(actual: list[Write], *groups: list[Write]) -> None:
    """`actual` is `groups` one after the other; within a group, in any order."""
    chunks, start = [], 0
    for group in groups:
        chunks.append(sorted(actual[start : start + len(group)]))
        start += len(group)
    assert (chunks, len(actual)) == ([sorted(group) for group in groups], start), actual


def status(api: FakeApi) -> dict[str, Any]:
    return dict(api.objects[SANDBOXES.path(NS, NAME)].get("status") or {})


def condition(api: FakeApi, kind: str) -> dict[str, Any]:
    return next(c for c in status(api)["conditions"] if c["type"] == kind)


def events(api: FakeApi) -> list[tuple[str, str]]:
    """(type, reason) of the Events posted about the sandbox, oldest first."""
    return [(e["type"], e["reason"]) for e in api.of_kind(EVENTS, NS).values() if e["involvedObject"]["name"] == NAME]


def transition(from_phase: str, to_phase: str, reason: str) -> Series:
    return (("from", from_phase), ("reason", reason), ("to", to_phase))


def delta(after: dict[Series, float], before: dict[Series, float]) -> dict[Series, float]:
    """What changed between two readings of one metric's series."""
    keys = set(after) | set(before)
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in keys if after.get(k, 0.0) != before.get(k, 0.0)}


def minutes_ago(minutes: float) -> str:
    return format_time(datetime.now(UTC) - timedelta(minutes=minutes))


def created_ago(api: FakeApi, by: timedelta) -> None:
    """The sandbox was created `by` earlier than it was."""

    def older(obj: JSON) -> None:
        obj["metadata"]["creationTimestamp"] = format_time(parse_time(obj["metadata"]["creationTimestamp"]) - by)

    api.rewrite(SANDBOXES.path(NS, NAME), older)


async def start(harness: Harness, **spec: Any) -> None:
    """A sandbox of TEMPLATE through its cold start to Running (the kubelet starts its pod)."""
    api = harness.api
    api.add(SANDBOX_TEMPLATES, TEMPLATE)
    api.add(SANDBOXES, sandbox_body(**spec))
    await harness.sandbox_pass(KEY)
    api.set_pod_status(NS, CHILDREN.pod, "Running", True, pod_ip=POD_IP)
    await harness.sandbox_pass(KEY)
    assert status(api)["phase"] == "Running"


# --- a cold start ---------------------------------------------------------------------------------


async def test_a_service_is_made_only_when_asked_for_and_goes_when_no_longer_asked(harness: Harness) -> None:
    api = harness.api
    api.add(SANDBOX_TEMPLATES, {**TEMPLATE, "spec": {**TEMPLATE["spec"], "network": {"service": True}}})
    api.add(SANDBOXES, sandbox_body())
    assert_writes(
        await harness.sandbox_pass(KEY), [CREATE_PVC, CREATE_POLICY, CREATE_SERVICE, CREATE_POD], [STATUS], [EVENT]
    )
    assert api.names(SERVICES, NS) == {CHILDREN.service}
    api.set_pod_status(NS, CHILDREN.pod, "Running", True, pod_ip=POD_IP)
    await harness.sandbox_pass(KEY)
    # The Sandbox's own network.service: false wins over the template's: the Service goes.
    api.edit(SANDBOXES.path(NS, NAME), {"spec": {"network": {"service": False}}})
    assert ("DELETE", "services") in await harness.sandbox_pass(KEY)
    assert api.names(SERVICES, NS) == set()
    assert ("DELETE", "services") not in await harness.sandbox_pass(KEY)  # once


async def test_a_cold_sandbox_gets_its_children_in_one_pass_and_runs_on_the_next(harness: Harness) -> None:
    api = harness.api
    api.add(SANDBOX_TEMPLATES, TEMPLATE)
    api.add(SANDBOXES, sandbox_body())
    # Pass 1: a new sandbox is not first marked Creating on its own; the same pass writes
    # everything its pod needs, then the status (phase Creating, the pod's name), then its Event.
    assert_writes(await harness.sandbox_pass(KEY), [CREATE_PVC, CREATE_POLICY, CREATE_POD], [STATUS], [EVENT])
    assert harness.last_pass.index(CREATE_PVC) < harness.last_pass.index(CREATE_POD)
    assert status(api)["phase"] == "Creating" and status(api)["podName"] == CHILDREN.pod
    assert "podIP" not in status(api) and condition(api, "Ready")["status"] == "False"
    pod = api.of_kind(PODS, NS)[CHILDREN.pod]
    assert workspace_claim_of(pod) == CHILDREN.pvc
    assert api.names(SERVICES, NS) == set()  # a Service is opt-in (network.service)
    assert api.names(NETWORK_POLICIES, NS) == {SHARED_DENY}
    # Pass 2: the kubelet reports the pod running and ready.
    api.set_pod_status(NS, CHILDREN.pod, "Running", True, pod_ip=POD_IP)
    assert await harness.sandbox_pass(KEY) == [STATUS, EVENT]
    now = status(api)
    assert (now["phase"], now["reason"]) == ("Running", "Started")
    assert now["podIP"] == POD_IP and now["endpoint"] == f"{POD_IP}:{ENVD_PORT}"
    assert now["startedAt"] and now["idleDeadline"] and now["expiresAt"]
    assert condition(api, "Ready")["status"] == "True"
    assert events(api) == [("Normal", "Creating"), ("Normal", "Started")]


async def test_an_unchanged_running_sandbox_costs_no_write(harness: Harness) -> None:
    await start(harness)
    transitions = harness.samples(TRANSITIONS)
    for _ in range(3):
        assert await harness.sandbox_pass(KEY) == []
    assert harness.samples(TRANSITIONS) == transitions
    assert harness.rt.queue.pending_deadlines == 1  # it wakes at its next deadline (idle, maxLifetime)


async def test_a_slow_start_writes_what_it_waits_for_once(harness: Harness) -> None:
    api = harness.api
    api.add(SANDBOX_TEMPLATES, TEMPLATE)
    api.add(SANDBOXES, sandbox_body())
    created_ago(api, timedelta(minutes=1))  # past the grace in which a fast start skips this write
    await harness.sandbox_pass(KEY)
    assert await harness.sandbox_pass(KEY) == [STATUS]  # the pod is Pending
    assert (status(api)["phase"], status(api)["reason"]) == ("Creating", "PodPending")
    assert await harness.sandbox_pass(KEY) == []


async def test_a_template_without_persistence_creates_no_claim(harness: Harness) -> None:
    api = harness.api
    api.add(SANDBOX_TEMPLATES, {**TEMPLATE, "spec": {**TEMPLATE["spec"], "persistence": {"enabled": False}}})
    api.add(SANDBOXES, sandbox_body())
    assert_writes(await harness.sandbox_pass(KEY), [CREATE_POLICY, CREATE_POD], [STATUS], [EVENT])
    assert api.names(PERSISTENT_VOLUME_CLAIMS, NS) == set()
    pod = api.of_kind(PODS, NS)[CHILDREN.pod]
    assert workspace_claim_of(pod) is None


async def test_a_sandbox_on_a_warm_pod_runs_in_one_status_write_and_counts_as_a_pool_start(harness: Harness) -> None:
    api = harness.api
    api.add(SANDBOX_TEMPLATES, TEMPLATE)
    api.add(
        SANDBOX_POOLS,
        {"apiVersion": "sandbox.dev/v1alpha1", "kind": "SandboxPool", "metadata": {"name": "warm", "namespace": NS}},
    )
    api.edit(SANDBOX_POOLS.path(NS, "warm"), {"spec": {"template": "base", "size": 1}})
    await harness.pool_pass((NS, "warm"))
    (warm,) = api.names(PODS, NS)
    api.set_pod_status(NS, warm, "Running", True, pod_ip=POD_IP)
    api.add(SANDBOXES, sandbox_body())
    transitions, starts = harness.samples(TRANSITIONS), harness.samples(TIME_TO_RUNNING)
    # The claim relabels the warm pod's workspace and the pod (no create; the pool wrote the shared
    # policy before its first warm pod); one status write takes the sandbox from nothing to Running,
    # with both phase changes' Events.
    assert selected_by(api, warm) == {SHARED_DENY}
    assert_writes(
        await harness.sandbox_pass(KEY),
        [("PATCH", "persistentvolumeclaims"), ("PATCH", "pods")],
        [STATUS],
        [EVENT, EVENT],
    )
    assert selected_by(api, warm) == {SHARED_DENY}
    assert (status(api)["phase"], status(api)["podName"], status(api)["podIP"]) == ("Running", warm, POD_IP)
    assert api.of_kind(PODS, NS)[warm]["metadata"]["annotations"][CLAIMED_FROM_POOL_ANNOTATION] == "warm"
    assert delta(harness.samples(TRANSITIONS), transitions) == {
        transition("", "Creating", "Creating"): 1,
        transition("Creating", "Running", "Started"): 1,
    }
    assert delta(harness.samples(TIME_TO_RUNNING), starts) == {(("source", "pool"),): 1}
    assert await harness.sandbox_pass(KEY) == []


# --- a missing template ---------------------------------------------------------------------------


async def test_a_missing_template_is_reported_once_and_the_sandbox_proceeds_when_it_appears(harness: Harness) -> None:
    api = harness.api
    api.add(SANDBOXES, sandbox_body())
    assert await harness.sandbox_pass(KEY) == [STATUS, EVENT]
    assert (status(api)["phase"], status(api)["reason"]) == ("Creating", "TemplateNotFound")
    ready = condition(api, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "TemplateNotFound")
    assert events(api) == [("Warning", "TemplateNotFound")]
    assert api.names(PODS, NS) == set() and api.names(PERSISTENT_VOLUME_CLAIMS, NS) == set()
    assert await harness.sandbox_pass(KEY) == []  # already said: no second status write, no Event
    api.add(SANDBOX_TEMPLATES, TEMPLATE)
    assert_writes(await harness.sandbox_pass(KEY), [CREATE_PVC, CREATE_POLICY, CREATE_POD], [STATUS])
    assert (status(api)["reason"], condition(api, "Ready")["reason"]) == ("Creating", "Creating")
    assert events(api) == [("Warning", "TemplateNotFound")]


@pytest.mark.xfail(
    strict=True,
    reason="the TemplateNotFound report writes phase Creating without counting the transition into it",
)
async def test_a_sandbox_that_waited_for_its_template_counts_its_entry_into_creating(harness: Harness) -> None:
    harness.api.add(SANDBOXES, sandbox_body())
    before = harness.samples(TRANSITIONS)
    await harness.sandbox_pass(KEY)
    assert status(harness.api)["phase"] == "Creating"
    entered = {k: v for k, v in delta(harness.samples(TRANSITIONS), before).items() if k[0] == ("from", "")}
    assert [(dict(k)["to"], v) for k, v in entered.items()] == [("Creating", 1)]  # whatever its reason label


# --- a failed policy write ------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "reason"), [(500, "InternalError"), (403, "Forbidden")])
async def test_a_failed_policy_write_leaves_no_pod_without_its_policy(harness: Harness, code: int, reason: str) -> None:
    # The policy is written alongside the workspace claim, but the pod waits for it: a refused
    # policy write fails the pass before any pod exists, so no pod ever runs without its policy.
    api = harness.api
    api.add(SANDBOX_TEMPLATES, TEMPLATE)
    api.add(SANDBOXES, sandbox_body())
    transitions = harness.samples(TRANSITIONS)
    api.fail("POST", NETWORK_POLICIES.collection(NS), code, reason)
    with pytest.raises(ApiError) as failed:
        await harness.sandbox_pass(KEY)
    assert failed.value.status == code
    assert_writes(harness.last_pass, [CREATE_PVC, CREATE_POLICY])
    assert [w.status for w in api.written(*CREATE_POLICY)] == [code]
    assert api.written(*CREATE_POD) == []
    # What exists afterwards: the claim (harmless without a pod), no pod, no policy, no status.
    assert api.names(PODS, NS) == set()
    assert api.names(PERSISTENT_VOLUME_CLAIMS, NS) == {CHILDREN.pvc}
    assert api.names(NETWORK_POLICIES, NS) == set()
    assert status(api) == {} and events(api) == []
    assert delta(harness.samples(TRANSITIONS), transitions) == {}
    # The retry writes the policy, then the pod, and nothing it already has.
    api.heal("POST", NETWORK_POLICIES.collection(NS))
    assert_writes(await harness.sandbox_pass(KEY), [CREATE_POLICY, CREATE_POD], [STATUS], [EVENT])
    assert harness.last_pass.index(CREATE_POLICY) < harness.last_pass.index(CREATE_POD)
    assert api.names(NETWORK_POLICIES, NS) == {SHARED_DENY}
    assert api.names(PODS, NS) == {CHILDREN.pod}


# --- shared NetworkPolicies --------------------------------------------------------------------------

RELABEL_POD: Write = ("PATCH", "pods")
DELETE_POLICY: Write = ("DELETE", "networkpolicies")


def pod_labels(api: FakeApi, name: str = CHILDREN.pod) -> dict[str, str]:
    return dict(api.of_kind(PODS, NS)[name]["metadata"]["labels"])


def selected_by(api: FakeApi, pod: str = CHILDREN.pod) -> set[str]:
    """The NetworkPolicies whose podSelector matches the pod's labels."""
    labels = pod_labels(api, pod)
    return {
        name
        for name, policy in api.of_kind(NETWORK_POLICIES, NS).items()
        if policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    }


async def test_sandboxes_of_one_template_and_class_share_one_policy_written_once(harness: Harness) -> None:
    api = harness.api
    api.add(SANDBOX_TEMPLATES, {**TEMPLATE, "spec": {**TEMPLATE["spec"], "persistence": {"enabled": False}}})
    for name in ("one", "two"):
        api.add(SANDBOXES, {**sandbox_body(), "metadata": {"name": name, "namespace": NS}})
    assert_writes(await harness.sandbox_pass((NS, "one")), [CREATE_POLICY, CREATE_POD], [STATUS], [EVENT])
    # The second sandbox finds the policy current: one pod, one status, one Event.
    assert_writes(await harness.sandbox_pass((NS, "two")), [CREATE_POD], [STATUS], [EVENT])
    assert api.names(NETWORK_POLICIES, NS) == {SHARED_DENY}
    for name in ("one", "two"):
        assert selected_by(api, child_names(name).pod) == {SHARED_DENY}
    policy = api.of_kind(NETWORK_POLICIES, NS)[SHARED_DENY]
    assert "ownerReferences" not in policy["metadata"]  # it outlives any one sandbox
    # Deleting a sandbox leaves the shared policy to the others.
    api.remove(SANDBOXES.path(NS, "one"))
    assert DELETE_POLICY not in await harness.sandbox_pass((NS, "one"))
    assert api.names(NETWORK_POLICIES, NS) == {SHARED_DENY}


async def test_concurrent_first_passes_write_the_shared_policy_once(harness: Harness) -> None:
    api = harness.api
    api.add(SANDBOX_TEMPLATES, {**TEMPLATE, "spec": {**TEMPLATE["spec"], "persistence": {"enabled": False}}})
    names = [f"burst-{i}" for i in range(20)]
    for name in names:
        api.add(SANDBOXES, {**sandbox_body(), "metadata": {"name": name, "namespace": NS}})
    api.take()
    harness.deliver()
    await asyncio.gather(*(reconcile_sandbox(harness.rt, (NS, name)) for name in names))
    await harness.settle()
    writes = api.take()
    assert writes.count(CREATE_POLICY) == 1 and writes.count(CREATE_POD) == len(names)
    assert all(selected_by(api, child_names(name).pod) == {SHARED_DENY} for name in names)


async def test_an_allow_list_of_its_own_gets_its_own_policy_and_back(harness: Harness) -> None:
    api = harness.api
    api.add(SANDBOX_TEMPLATES, {**TEMPLATE, "spec": {**TEMPLATE["spec"], "persistence": {"enabled": False}}})
    own = {"egress": "allowList", "egressAllow": ["203.0.113.0/24"]}
    api.add(SANDBOXES, sandbox_body(network=own))
    assert_writes(await harness.sandbox_pass(KEY), [CREATE_POLICY, CREATE_POD], [STATUS], [EVENT])
    assert api.names(NETWORK_POLICIES, NS) == {CHILDREN.network_policy}
    assert pod_labels(api)["sandbox.dev/egress-class"] == "own"
    assert selected_by(api) == {CHILDREN.network_policy}
    api.set_pod_status(NS, CHILDREN.pod, "Running", True, pod_ip=POD_IP)
    await harness.sandbox_pass(KEY)
    # Its author drops the allow-list: the shared deny policy is written, the pod relabelled for it,
    # and only then its own policy deleted (the pod is never selected by none).
    api.edit(SANDBOXES.path(NS, NAME), {"spec": {"network": None}})
    writes = await harness.sandbox_pass(KEY)
    assert writes[:3] == [CREATE_POLICY, RELABEL_POD, DELETE_POLICY], writes
    assert api.names(NETWORK_POLICIES, NS) == {SHARED_DENY}
    assert selected_by(api) == {SHARED_DENY}
    assert not {CREATE_POLICY, RELABEL_POD, DELETE_POLICY} & set(await harness.sandbox_pass(KEY))  # settled
    # And back to an allow-list: its own policy first, then the relabel (the shared one stays).
    api.edit(SANDBOXES.path(NS, NAME), {"spec": {"network": own}})
    writes = await harness.sandbox_pass(KEY)
    assert writes[:2] == [CREATE_POLICY, RELABEL_POD], writes
    assert selected_by(api) == {CHILDREN.network_policy}


async def test_a_pod_made_before_policies_were_shared_moves_to_the_shared_one(harness: Harness) -> None:
    api = harness.api
    api.add(SANDBOX_TEMPLATES, {**TEMPLATE, "spec": {**TEMPLATE["spec"], "persistence": {"enabled": False}}})
    api.add(SANDBOXES, sandbox_body())
    await harness.sandbox_pass(KEY)
    api.set_pod_status(NS, CHILDREN.pod, "Running", True, pod_ip=POD_IP)
    await harness.sandbox_pass(KEY)
    # As an older operator left it: a policy of its own, a pod without the class label.
    api.remove(NETWORK_POLICIES.path(NS, SHARED_DENY))
    api.rewrite(PODS.path(NS, CHILDREN.pod), lambda pod: pod["metadata"]["labels"].pop("sandbox.dev/egress-class"))
    sandbox = api.objects[SANDBOXES.path(NS, NAME)]
    own = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": CHILDREN.network_policy,
            "namespace": NS,
            "labels": {"app.kubernetes.io/managed-by": "sandbox-operator", "sandbox.dev/sandbox": NAME},
            "annotations": {"sandbox.dev/spec-hash": "older"},
            "ownerReferences": [{"uid": sandbox["metadata"]["uid"], "kind": "Sandbox", "name": NAME}],
        },
        "spec": {"podSelector": {"matchLabels": {"sandbox.dev/sandbox": NAME}}},
    }
    api.add(NETWORK_POLICIES, own, NS)
    writes = await harness.sandbox_pass(KEY)
    assert writes[:3] == [CREATE_POLICY, RELABEL_POD, DELETE_POLICY], writes
    assert api.names(NETWORK_POLICIES, NS) == {SHARED_DENY}
    assert selected_by(api) == {SHARED_DENY}


async def test_a_deleted_shared_policy_is_written_again(harness: Harness) -> None:
    api = harness.api
    api.add(SANDBOX_TEMPLATES, {**TEMPLATE, "spec": {**TEMPLATE["spec"], "persistence": {"enabled": False}}})
    api.add(SANDBOXES, sandbox_body())
    await harness.sandbox_pass(KEY)
    api.set_pod_status(NS, CHILDREN.pod, "Running", True, pod_ip=POD_IP)
    await harness.sandbox_pass(KEY)
    harness.deliver()
    queue = harness.rt.queue
    while len(queue):  # drain what earlier events queued: only the deletion may queue it again
        queue.done(await queue.get())
    api.remove(NETWORK_POLICIES.path(NS, SHARED_DENY))
    harness.deliver()
    assert len(queue) == 1 and await queue.get() == ("sandbox", NS, NAME)  # woken by the deletion
    assert CREATE_POLICY in await harness.sandbox_pass(KEY)
    assert selected_by(api) == {SHARED_DENY}


# --- metrics --------------------------------------------------------------------------------------


async def test_a_cold_start_counts_each_phase_change_once_and_its_time_to_running_once(harness: Harness) -> None:
    transitions, starts, timeouts = (harness.samples(n) for n in (TRANSITIONS, TIME_TO_RUNNING, TIMEOUTS))
    await start(harness)
    await harness.sandbox_pass(KEY)  # unchanged: counts nothing
    assert delta(harness.samples(TRANSITIONS), transitions) == {
        transition("", "Creating", "Creating"): 1,
        transition("Creating", "Running", "Started"): 1,
    }
    assert delta(harness.samples(TIME_TO_RUNNING), starts) == {(("source", "cold"),): 1}
    assert delta(harness.samples(TIMEOUTS), timeouts) == {}


@pytest.mark.parametrize("on_idle", ["suspend", "terminate"])
async def test_an_idle_timeout_counts_one_timeout(harness: Harness, on_idle: str) -> None:
    api = harness.api
    await start(harness, onIdle=on_idle)
    # Idle for 20 minutes (the template's idle timeout is 10m); the agent reports no activity.
    api.edit(SANDBOXES.path(NS, NAME, "status"), {"status": {"startedAt": minutes_ago(20)}})
    transitions, timeouts = harness.samples(TRANSITIONS), harness.samples(TIMEOUTS)
    first, final = ("Suspending", "Suspended") if on_idle == "suspend" else ("Terminating", "Terminated")
    # No spec write: an idle suspension is recorded in status (suspendedBy) and held there.
    assert await harness.sandbox_pass(KEY) == [DELETE_POD, STATUS, EVENT]
    assert harness.rt.agents_asked == [POD_IP]  # the agent had the last word on idleness
    assert (status(api)["phase"], status(api)["reason"]) == (first, "IdleTimeout")
    assert await harness.sandbox_pass(KEY) == [STATUS, EVENT]
    assert (status(api)["phase"], status(api)["reason"]) == (final, "IdleTimeout")
    assert await harness.sandbox_pass(KEY) == []
    assert delta(harness.samples(TIMEOUTS), timeouts) == {(("kind", "idle"),): 1}
    assert delta(harness.samples(TRANSITIONS), transitions) == {
        transition("Running", first, "IdleTimeout"): 1,
        transition(first, final, "IdleTimeout"): 1,
    }
    if on_idle == "suspend":
        assert "suspended" not in api.objects[SANDBOXES.path(NS, NAME)]["spec"]  # spec as its author wrote it
        assert status(api)["suspendedBy"] == "IdleTimeout"
        assert api.names(PERSISTENT_VOLUME_CLAIMS, NS) == {CHILDREN.pvc}


async def test_the_max_lifetime_counts_one_timeout(harness: Harness) -> None:
    api = harness.api
    await start(harness)
    created_ago(api, timedelta(hours=2))  # the template's maxLifetime is 1h
    transitions, timeouts = harness.samples(TRANSITIONS), harness.samples(TIMEOUTS)
    assert await harness.sandbox_pass(KEY) == [DELETE_POD, STATUS, EVENT]
    assert (status(api)["phase"], status(api)["reason"]) == ("Terminating", "MaxLifetime")
    assert await harness.sandbox_pass(KEY) == [STATUS, EVENT]
    assert (status(api)["phase"], status(api)["reason"]) == ("Terminated", "MaxLifetime")
    assert await harness.sandbox_pass(KEY) == []
    assert delta(harness.samples(TIMEOUTS), timeouts) == {(("kind", "max_lifetime"),): 1}
    assert delta(harness.samples(TRANSITIONS), transitions) == {
        transition("Running", "Terminating", "MaxLifetime"): 1,
        transition("Terminating", "Terminated", "MaxLifetime"): 1,
    }


async def test_an_agent_that_saw_activity_keeps_an_idle_looking_sandbox_running(harness: Harness) -> None:
    api = harness.api
    await start(harness)
    api.edit(SANDBOXES.path(NS, NAME, "status"), {"status": {"startedAt": minutes_ago(20)}})
    active = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    harness.rt.agent_last_activity[POD_IP] = active
    timeouts = harness.samples(TIMEOUTS)
    assert await harness.sandbox_pass(KEY) == [STATUS]
    assert status(api)["phase"] == "Running" and status(api)["lastActivityAt"] == format_time(active)
    assert status(api)["idleDeadline"] == format_time(active + timedelta(minutes=10))
    assert api.names(PODS, NS) == {CHILDREN.pod}
    assert await harness.sandbox_pass(KEY) == []
    assert harness.rt.agents_asked == [POD_IP]  # asked at the deadline only
    assert delta(harness.samples(TIMEOUTS), timeouts) == {}


# --- suspend and resume ---------------------------------------------------------------------------


async def test_suspend_and_resume_by_spec_delete_and_recreate_the_pod_on_the_same_workspace(harness: Harness) -> None:
    api = harness.api
    await start(harness)
    workspace_uid = api.of_kind(PERSISTENT_VOLUME_CLAIMS, NS)[CHILDREN.pvc]["metadata"]["uid"]
    transitions = harness.samples(TRANSITIONS)
    api.edit(SANDBOXES.path(NS, NAME), {"spec": {"suspended": True}})
    assert await harness.sandbox_pass(KEY) == [DELETE_POD, STATUS, EVENT]
    assert status(api)["phase"] == "Suspending" and api.names(PODS, NS) == set()
    assert await harness.sandbox_pass(KEY) == [STATUS, EVENT]
    assert status(api)["phase"] == "Suspended" and condition(api, "Suspended")["status"] == "True"
    assert await harness.sandbox_pass(KEY) == []
    assert api.of_kind(PERSISTENT_VOLUME_CLAIMS, NS)[CHILDREN.pvc]["metadata"]["uid"] == workspace_uid

    api.edit(SANDBOXES.path(NS, NAME), {"spec": {"suspended": False}})
    assert await harness.sandbox_pass(KEY) == [CREATE_POD, STATUS, EVENT]  # its other children are still there
    assert status(api)["phase"] == "Resuming"
    pod = api.of_kind(PODS, NS)[CHILDREN.pod]
    assert workspace_claim_of(pod) == CHILDREN.pvc
    api.set_pod_status(NS, CHILDREN.pod, "Running", True, pod_ip=POD_IP)
    assert await harness.sandbox_pass(KEY) == [STATUS, EVENT]
    assert (status(api)["phase"], status(api)["reason"]) == ("Running", "Resumed")
    assert status(api)["lastActivityAt"]  # a resume is activity: the idle clock restarts
    assert api.of_kind(PERSISTENT_VOLUME_CLAIMS, NS)[CHILDREN.pvc]["metadata"]["uid"] == workspace_uid
    assert api.written("DELETE", "persistentvolumeclaims") == []
    assert delta(harness.samples(TRANSITIONS), transitions) == {
        transition("Running", "Suspending", "SuspendRequested"): 1,
        transition("Suspending", "Suspended", "SuspendRequested"): 1,
        transition("Suspended", "Resuming", "ResumeRequested"): 1,
        transition("Resuming", "Running", "Resumed"): 1,
    }


# --- deletion -------------------------------------------------------------------------------------


async def test_a_deleted_sandbox_deletes_its_children_and_leaves_the_finalizer_that_holds_it(harness: Harness) -> None:
    # The operator puts no finalizer on a Sandbox (children go by ownerReference garbage
    # collection); one held by somebody else's finalizer is seen deleting: its children go at once,
    # it goes Terminated, and it disappears when that finalizer's owner lets go.
    api = harness.api
    api.add(SANDBOX_TEMPLATES, TEMPLATE)
    api.add(SANDBOXES, {**sandbox_body(), "metadata": {"name": NAME, "namespace": NS, "finalizers": [HOLD]}})
    await harness.sandbox_pass(KEY)
    api.set_pod_status(NS, CHILDREN.pod, "Running", True, pod_ip=POD_IP)
    await harness.sandbox_pass(KEY)
    transitions = harness.samples(TRANSITIONS)
    api.remove(SANDBOXES.path(NS, NAME))  # kubectl delete: held by the finalizer
    assert api.objects[SANDBOXES.path(NS, NAME)]["metadata"]["deletionTimestamp"]
    # Pass 1: every child goes, one after the other (the shared NetworkPolicy stays for the others).
    assert await harness.sandbox_pass(KEY) == [DELETE_POD, ("DELETE", "persistentvolumeclaims"), STATUS, EVENT]
    assert (status(api)["phase"], status(api)["reason"]) == ("Terminating", "Deleted")
    for resource in (PODS, PERSISTENT_VOLUME_CLAIMS, SERVICES):
        assert api.names(resource, NS) == set(), resource
    assert api.names(NETWORK_POLICIES, NS) == {SHARED_DENY}
    # Pass 2: the pod is gone: Terminated. The finalizer is not the operator's to remove.
    assert await harness.sandbox_pass(KEY) == [STATUS, EVENT]
    assert (status(api)["phase"], status(api)["reason"]) == ("Terminated", "Deleted")
    assert await harness.sandbox_pass(KEY) == []
    assert api.objects[SANDBOXES.path(NS, NAME)]["metadata"]["finalizers"] == [HOLD]
    assert api.written("PATCH", "sandboxes") == []
    api.edit(SANDBOXES.path(NS, NAME), {"metadata": {"finalizers": []}})  # its owner lets go
    assert SANDBOXES.path(NS, NAME) not in api.objects
    assert await harness.sandbox_pass(KEY) == []  # the DELETED event emptied the store
    assert KEY not in harness.rt.store.sandboxes
    assert delta(harness.samples(TRANSITIONS), transitions) == {
        transition("Running", "Terminating", "Deleted"): 1,
        transition("Terminating", "Terminated", "Deleted"): 1,
    }


# --- node loss ------------------------------------------------------------------------------------

NODE = "node-a"


def _add_node(api: FakeApi, ready: str) -> None:
    reason = "KubeletReady" if ready == "True" else "NodeStatusUnknown"
    condition = {"type": "Ready", "status": ready, "reason": reason, "lastTransitionTime": minutes_ago(1)}
    api.add(NODES, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})

    def report(node: JSON) -> None:
        node["status"] = {"conditions": [condition]}

    api.rewrite(NODES.path(None, NODE), report)


def _strand_pod(api: FakeApi, *, deleted_ago: timedelta | None = None) -> None:
    """The node lifecycle controller's work: the pod bound to NODE marked not ready (and, when
    `deleted_ago`, the taint manager's deletion that long ago, which no kubelet will confirm)."""

    def strand(pod: JSON) -> None:
        pod["spec"]["nodeName"] = NODE
        pod["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
        if deleted_ago is not None:
            pod["metadata"]["deletionTimestamp"] = format_time(datetime.now(UTC) - deleted_ago)

    api.rewrite(PODS.path(NS, CHILDREN.pod), strand)


async def test_a_pod_on_a_lost_node_is_reported_then_force_deleted_and_replaced(harness: Harness) -> None:
    api = harness.api
    await start(harness)
    _add_node(api, "Unknown")
    _strand_pod(api)
    assert await harness.sandbox_pass(KEY) == [STATUS, EVENT]
    assert (status(api)["phase"], status(api)["reason"]) == ("Running", "NodeLost")
    assert "(NodeStatusUnknown since " in status(api)["message"]
    # The pod IP stays: a node cut off from the control plane may well still serve its sandboxes.
    assert condition(api, "Ready")["status"] == "False" and status(api)["podIP"] == POD_IP
    assert events(api)[-1] == ("Warning", "NodeLost")
    assert await harness.sandbox_pass(KEY) == []  # waiting costs nothing

    _strand_pod(api, deleted_ago=timedelta(seconds=1))  # evicted; its grace period is over
    writes = await harness.sandbox_pass(KEY)
    assert writes[0] == DELETE_POD and EVENT in writes
    (force,) = api.written("DELETE", "pods")[-1:]
    assert force.body["gracePeriodSeconds"] == 0
    assert force.body["preconditions"]["uid"]

    assert api.names(PODS, NS) == set()
    assert CREATE_POD in await harness.sandbox_pass(KEY)
    assert (status(api)["phase"], status(api)["reason"]) == ("Running", "PodRecreated")


async def test_a_node_that_cannot_be_read_is_not_a_lost_one(harness: Harness) -> None:
    api = harness.api
    await start(harness)
    api.fail("GET", NODES.path(None, NODE), 403, "Forbidden")
    _strand_pod(api, deleted_ago=timedelta(seconds=1))
    writes = await harness.sandbox_pass(KEY)
    assert DELETE_POD not in writes  # no force without knowing the node is gone
    assert status(api)["reason"] != "NodeLost"
