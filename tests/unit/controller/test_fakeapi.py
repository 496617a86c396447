"""The in-memory API server of the controller tests (tests/fakeapi.py) answers like the real one
for the requests the controller makes: if it did not, the controller tests would prove nothing."""

from __future__ import annotations

import pytest

from fakeapi import JSON, FakeApi, Harness
from sandbox_operator.api.names import (
    MANAGED_BY,
    MANAGED_BY_LABEL,
    NETWORK_POLICIES,
    PODS,
    SANDBOX_LABEL,
    SANDBOXES,
)
from sandbox_operator.kube import ApiError

NS = "team-a"


def sandbox_body(name: str = "sb") -> JSON:
    return {
        "apiVersion": "sandbox.dev/v1alpha1",
        "kind": "Sandbox",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"template": "base"},
        "status": {"phase": "Running"},  # a create ignores status
    }


def pod_body(name: str = "sbx-sb", labels: dict[str, str] | None = None) -> JSON:
    default = {MANAGED_BY_LABEL: MANAGED_BY, SANDBOX_LABEL: "sb"}
    return {"metadata": {"name": name, "labels": default if labels is None else labels}, "spec": {}}


async def test_a_create_assigns_identity_and_a_duplicate_is_already_exists() -> None:
    api = FakeApi()
    created = await api.create(SANDBOXES.collection(NS), sandbox_body())
    assert created is not None
    meta = created["metadata"]
    assert meta["uid"] and meta["resourceVersion"] and meta["creationTimestamp"] and meta["generation"] == 1
    assert "status" not in created
    assert await api.create(SANDBOXES.collection(NS), sandbox_body()) is None  # 409 AlreadyExists
    assert [(w.verb, w.resource, w.status) for w in api.log] == [("POST", "sandboxes", 200), ("POST", "sandboxes", 409)]
    assert (await api.create(PODS.collection(NS), pod_body()) or {})["status"] == {"phase": "Pending"}


async def test_a_merge_patch_keeps_status_and_spec_apart_and_checks_the_resource_version() -> None:
    api = FakeApi()
    created = api.add(SANDBOXES, sandbox_body())
    path = SANDBOXES.path(NS, "sb")
    spec_patched = await api.patch(path, {"spec": {"suspended": True}, "status": {"phase": "Error"}})
    assert spec_patched is not None and "status" not in spec_patched
    assert spec_patched["metadata"]["generation"] == 2
    status_patched = await api.patch(f"{path}/status", {"status": {"phase": "Running"}, "spec": {"suspended": False}})
    assert status_patched is not None and status_patched["spec"]["suspended"] is True
    assert status_patched["status"] == {"phase": "Running"} and status_patched["metadata"]["generation"] == 2
    noop = await api.patch(f"{path}/status", {"status": {"phase": "Running"}})
    assert noop is not None and noop["metadata"]["resourceVersion"] == status_patched["metadata"]["resourceVersion"]
    stale = created["metadata"]["resourceVersion"]
    with pytest.raises(ApiError) as conflict:
        await api.patch(path, {"metadata": {"resourceVersion": stale, "labels": {"a": "b"}}})
    assert conflict.value.status == 409
    assert await api.patch(SANDBOXES.path(NS, "missing"), {"spec": {}}) is None  # 404


async def test_a_delete_honours_its_preconditions_and_finalizers() -> None:
    api = FakeApi()
    pod = api.add(PODS, pod_body(), NS)
    path = PODS.path(NS, "sbx-sb")
    assert await api.delete(path, uid="another-uid") is False  # 409: another incarnation
    with pytest.raises(ApiError) as conflict:
        await api.request("DELETE", path, {"preconditions": {"resourceVersion": "1"}})
    assert conflict.value.status == 409 and path in api.objects
    assert await api.delete(path, uid=pod["metadata"]["uid"]) is True
    assert path not in api.objects and await api.delete(path) is False  # 404
    held = api.add(SANDBOXES, {**sandbox_body(), "metadata": {"name": "sb", "namespace": NS, "finalizers": ["x/y"]}})
    sandbox_path = SANDBOXES.path(NS, "sb")
    assert await api.delete(sandbox_path, uid=held["metadata"]["uid"]) is True
    assert api.objects[sandbox_path]["metadata"]["deletionTimestamp"]
    await api.patch(sandbox_path, {"metadata": {"finalizers": []}})
    assert sandbox_path not in api.objects


async def test_an_injected_failure_is_answered_and_recorded_until_healed() -> None:
    api = FakeApi()
    collection = NETWORK_POLICIES.collection(NS)
    api.fail("POST", collection, 403, "Forbidden")
    with pytest.raises(ApiError) as refused:
        await api.create(collection, {"metadata": {"name": "np"}, "spec": {}})
    assert (refused.value.status, refused.value.reason) == (403, "Forbidden")
    api.heal("POST", collection)
    assert await api.create(collection, {"metadata": {"name": "np"}, "spec": {}}) is not None
    assert api.take() == [("POST", "networkpolicies"), ("POST", "networkpolicies")]
    assert [w.status for w in api.log] == [403, 200]
    assert api.take() == []


async def test_the_watch_delivers_changes_once_and_only_the_operators_children() -> None:
    harness = Harness()
    api = harness.api
    api.add(PODS, pod_body(), NS)
    api.add(PODS, pod_body("stranger", labels={}), NS)  # no managed-by label: not watched
    assert harness.deliver() == 1
    assert set(harness.rt.store.pods) == {(NS, "sbx-sb")}
    assert harness.deliver() == 0
    api.remove(PODS.path(NS, "sbx-sb"))
    assert harness.deliver() == 1 and harness.rt.store.pods == {}
