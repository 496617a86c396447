"""controller/pools.py against an in-memory API (fakeapi.FakeApi and a real Runtime): replacement
of stale warm pods, the sweep of leaked workspace claims, the claim order (workspace first) and
status.claimed."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from fakeapi import JSON, FakeApi, Harness, format_time, parse_time
from sandbox_operator.api import Sandbox, SandboxTemplate
from sandbox_operator.api.names import (
    CLAIMED_FROM_POOL_ANNOTATION,
    PERSISTENT_VOLUME_CLAIMS,
    PODS,
    POOL_LABEL,
    SANDBOX_LABEL,
    SANDBOX_POOLS,
    SANDBOX_TEMPLATES,
)
from sandbox_operator.controller.pools import ClaimInterruptedError, reconcile_pool, try_claim_pool_pod
from sandbox_operator.kube import ApiError
from sandbox_operator.lifecycle.pool import warm_pod_selector, workspace_claim_of

NS = "team-a"
POOL_KEY = (NS, "warm")
TEMPLATE: JSON = {
    "apiVersion": "sandbox.dev/v1alpha1",
    "kind": "SandboxTemplate",
    "metadata": {"name": "base"},
    "spec": {"image": "img:1"},
}
POOL: JSON = {
    "apiVersion": "sandbox.dev/v1alpha1",
    "kind": "SandboxPool",
    "metadata": {"name": "warm", "namespace": NS},
    "spec": {"template": "base", "size": 1},
}


@pytest.fixture
def harness() -> Harness:
    """The shared harness with the template and the pool of size 1 created (not yet delivered)."""
    harness = Harness()
    harness.api.add(SANDBOX_TEMPLATES, TEMPLATE)
    harness.api.add(SANDBOX_POOLS, POOL)
    return harness


def pods(api: FakeApi) -> dict[str, JSON]:
    return api.of_kind(PODS, NS)


def claims(api: FakeApi) -> dict[str, JSON]:
    return api.of_kind(PERSISTENT_VOLUME_CLAIMS, NS)


def age_claims(api: FakeApi, by: timedelta) -> None:
    """Time passes for the claims: their creationTimestamp moves back by `by`."""

    def older(claim: JSON) -> None:
        created = parse_time(claim["metadata"]["creationTimestamp"])
        claim["metadata"]["creationTimestamp"] = format_time(created - by)

    for name in claims(api):
        api.rewrite(PERSISTENT_VOLUME_CLAIMS.path(NS, name), older)


def pool_status(api: FakeApi) -> dict[str, Any]:
    return dict(api.objects[SANDBOX_POOLS.path(NS, "warm")].get("status") or {})


async def filled(harness: Harness) -> str:
    """Reconcile an empty pool of size 1 and let its warm pod become ready; the pod's name."""
    await harness.pool_pass(POOL_KEY)
    (name,) = pods(harness.api)
    harness.api.set_pod_status(NS, name, "Running", True)
    harness.deliver()
    return name


def sandbox(name: str = "sb") -> Sandbox:
    return Sandbox.from_body(
        {
            "apiVersion": "sandbox.dev/v1alpha1",
            "kind": "Sandbox",
            "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}"},
            "spec": {"template": "base"},
        }
    )


def template() -> SandboxTemplate:
    return SandboxTemplate.from_body(TEMPLATE)


# --- replacement ----------------------------------------------------------------------------------


async def test_a_pool_fills_with_a_pod_and_its_workspace_claim(harness: Harness) -> None:
    api = harness.api
    name = await filled(harness)
    claim = workspace_claim_of(pods(api)[name])
    assert claim is not None and set(claims(api)) == {claim}
    assert await harness.pool_pass(POOL_KEY) == [("PATCH", "sandboxpools/status")]
    assert pool_status(api)["ready"] == 1 and pool_status(api)["claimed"] == 0
    assert await harness.pool_pass(POOL_KEY) == []  # a full pool costs no write


@pytest.mark.parametrize("phase", ["Failed", "Succeeded"])
async def test_a_finished_warm_pod_and_its_claim_are_replaced(harness: Harness, phase: str) -> None:
    api = harness.api
    old = await filled(harness)
    old_claim = workspace_claim_of(pods(api)[old])
    api.set_pod_status(NS, old, phase, False)
    await harness.pool_pass(POOL_KEY)
    assert old not in pods(api) and len(pods(api)) == 1
    (new_pod,) = pods(api).values()
    assert set(claims(api)) == {workspace_claim_of(new_pod)}
    assert old_claim not in claims(api)


async def test_a_warm_pod_of_an_older_template_is_replaced(harness: Harness) -> None:
    api = harness.api
    old = await filled(harness)
    api.edit(SANDBOX_TEMPLATES.path(None, "base"), {"spec": {"image": "img:2"}})
    await harness.pool_pass(POOL_KEY)
    assert old not in pods(api) and len(pods(api)) == 1
    (new_pod,) = pods(api).values()
    assert new_pod["spec"]["containers"][0]["image"] == "img:2"
    assert len(claims(api)) == 1


async def test_a_pod_that_changed_since_the_store_saw_it_is_not_deleted(harness: Harness) -> None:
    api = harness.api
    old = await filled(harness)
    api.set_pod_status(NS, old, "Failed", False)
    harness.deliver()
    api.set_pod_status(NS, old, "Failed", False)  # a newer version the store has not seen
    await reconcile_pool(harness.rt, POOL_KEY)
    assert old in pods(api)
    assert [(w.verb, w.status) for w in api.written("DELETE", "pods")] == [("DELETE", 409)]
    assert harness.rt.queue.pending_deadlines == 1  # it looks again soon


# --- the sweep of leaked claims -------------------------------------------------------------------


async def test_the_claim_of_a_warm_pod_deleted_out_of_band_is_deleted(harness: Harness) -> None:
    api = harness.api
    old = await filled(harness)
    old_claim = workspace_claim_of(pods(api)[old])
    api.remove(PODS.path(NS, old))
    age_claims(api, timedelta(minutes=1))
    await harness.pool_pass(POOL_KEY)
    assert old_claim not in claims(api)
    (new_pod,) = pods(api).values()
    assert set(claims(api)) == {workspace_claim_of(new_pod)}


async def test_a_young_unused_claim_waits_for_its_grace_period(harness: Harness) -> None:
    api = harness.api
    old = await filled(harness)
    old_claim = workspace_claim_of(pods(api)[old])
    api.remove(PODS.path(NS, old))
    await harness.pool_pass(POOL_KEY)
    assert old_claim in claims(api)
    assert harness.rt.queue.pending_deadlines == 1


async def test_a_claim_handed_to_a_sandbox_is_never_swept(harness: Harness) -> None:
    api = harness.api
    await filled(harness)
    claimed = await try_claim_pool_pod(harness.rt, sandbox(), template())
    assert claimed is not None
    claim = workspace_claim_of(claimed)
    # The sandbox suspends: its pod goes, the workspace stays.
    api.remove(PODS.path(NS, claimed["metadata"]["name"]))
    age_claims(api, timedelta(minutes=1))
    await harness.pool_pass(POOL_KEY)
    assert claim in claims(api)


# --- claims ---------------------------------------------------------------------------------------


async def test_a_claim_relabels_the_workspace_first_locked_by_its_resource_version(harness: Harness) -> None:
    api = harness.api
    name = await filled(harness)
    claim = workspace_claim_of(pods(api)[name])
    start = len(api.log)
    claimed = await try_claim_pool_pod(harness.rt, sandbox(), template())
    assert claimed is not None and claimed["metadata"]["name"] == name
    pvc_write, pod_write = api.log[start:]
    assert (pvc_write.verb, pvc_write.path) == ("PATCH", PERSISTENT_VOLUME_CLAIMS.path(NS, str(claim)))
    assert (pod_write.verb, pod_write.path) == ("PATCH", PODS.path(NS, name))
    assert "resourceVersion" in pvc_write.body["metadata"] and "resourceVersion" not in pod_write.body["metadata"]
    workspace = harness.rt.store.pvc_of_sandbox((NS, "sb"))
    assert workspace is not None and workspace["metadata"]["name"] == claim
    labels = claimed["metadata"]["labels"]
    assert labels[SANDBOX_LABEL] == "sb" and POOL_LABEL not in labels
    assert claimed["metadata"]["annotations"][CLAIMED_FROM_POOL_ANNOTATION] == "warm"


async def test_a_claim_whose_workspace_changed_is_lost_and_touches_nothing(harness: Harness) -> None:
    api = harness.api
    name = await filled(harness)
    claim = workspace_claim_of(pods(api)[name])
    # Another operator process took it first: a newer version the store has not seen.
    api.rewrite(PERSISTENT_VOLUME_CLAIMS.path(NS, str(claim)), lambda _: None)
    assert await try_claim_pool_pod(harness.rt, sandbox(), template()) is None
    assert [(w.verb, w.resource, w.status) for w in api.log[-1:]] == [("PATCH", "persistentvolumeclaims", 409)]
    assert api.written("PATCH", "pods") == []


async def test_a_claim_interrupted_at_the_pod_leaves_the_workspace_with_the_sandbox(harness: Harness) -> None:
    api = harness.api
    name = await filled(harness)
    claim = workspace_claim_of(pods(api)[name])
    pod_path = PODS.path(NS, name)
    api.fail("PATCH", pod_path, 500)
    with pytest.raises(ApiError):
        await try_claim_pool_pod(harness.rt, sandbox(), template())
    # The sandbox's retry finds this workspace by its label (and mounts it on a cold pod) ...
    workspace = harness.rt.store.pvc_of_sandbox((NS, "sb"))
    assert workspace is not None and workspace["metadata"]["name"] == claim
    # ... no other sandbox can take the warm pod, and the pool replaces it but keeps the workspace.
    assert await try_claim_pool_pod(harness.rt, sandbox("other"), template()) is None
    api.heal("PATCH", pod_path)
    await harness.pool_pass(POOL_KEY)
    assert name not in pods(api)
    assert claim in claims(api)
    assert len(pods(api)) == 1


async def test_a_warm_pod_gone_after_its_workspace_was_claimed_fails_the_reconcile(harness: Harness) -> None:
    api = harness.api
    name = await filled(harness)
    api.remove(PODS.path(NS, name))  # the store has not seen it yet
    with pytest.raises(ClaimInterruptedError):
        await try_claim_pool_pod(harness.rt, sandbox(), template())
    assert harness.rt.store.pvc_of_sandbox((NS, "sb")) is not None


async def test_status_claimed_counts_sandboxes_on_claimed_pods(harness: Harness) -> None:
    api = harness.api
    await filled(harness)
    claimed = await try_claim_pool_pod(harness.rt, sandbox(), template())
    assert claimed is not None
    await harness.pool_pass(POOL_KEY)
    assert pool_status(api)["claimed"] == 1
    api.remove(PODS.path(NS, claimed["metadata"]["name"]))
    await harness.pool_pass(POOL_KEY)
    assert pool_status(api)["claimed"] == 0


def selected(selector: str, obj: JSON) -> bool:
    """An equality-based label selector (``k=v,k2=v2``) matches the object's labels."""
    labels = obj["metadata"].get("labels") or {}
    return all(labels.get(key) == value for key, value in (term.split("=", 1) for term in selector.split(",")))


async def test_status_selector_selects_the_warm_pods_and_not_a_claimed_one(harness: Harness) -> None:
    api = harness.api
    warm_pod = await filled(harness)
    await harness.pool_pass(POOL_KEY)
    selector = pool_status(api)["selector"]
    assert selector == warm_pod_selector("warm")
    assert [name for name, pod in pods(api).items() if selected(selector, pod)] == [warm_pod]
    claimed = await try_claim_pool_pod(harness.rt, sandbox(), template())
    assert claimed is not None and claimed["metadata"]["name"] == warm_pod
    harness.deliver()
    await harness.pool_pass(POOL_KEY)  # refills: a new warm pod
    assert not selected(selector, pods(api)[warm_pod])
    assert {name for name, pod in pods(api).items() if selected(selector, pod)} == set(pods(api)) - {warm_pod}
    assert len(pods(api)) == 2


# --- a template the pool's namespace may not use --------------------------------------------------


async def test_a_pool_keeps_no_warm_pods_of_a_template_its_namespace_may_not_use(harness: Harness) -> None:
    api = harness.api
    await filled(harness)
    assert len(pods(api)) == 1
    api.edit(SANDBOX_TEMPLATES.path(None, "base"), {"spec": {"allowedNamespaces": ["team-b"]}})
    await harness.pool_pass(POOL_KEY)
    assert pods(api) == {}  # the warm pod goes: no sandbox here could claim it
    conditions = {c["type"]: (c["status"], c["reason"]) for c in pool_status(api)["conditions"]}
    assert conditions["Ready"] == ("False", "TemplateNotAllowed")
    assert conditions["Stalled"] == ("True", "TemplateNotAllowed")  # kstatus: Failed
    assert conditions["Reconciling"] == ("False", "TemplateNotAllowed")
    await harness.pool_pass(POOL_KEY)
    assert pods(api) == {}  # and none is made again
