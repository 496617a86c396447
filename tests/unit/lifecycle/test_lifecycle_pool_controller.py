"""controller/pools.py against an in-memory API: replacement of stale warm pods, the sweep of leaked
workspace claims, the claim order (workspace first) and status.claimed."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest

from sandbox_operator.api import Sandbox, SandboxTemplate
from sandbox_operator.api.names import CLAIMED_FROM_POOL_ANNOTATION, POOL_LABEL, SANDBOX_LABEL
from sandbox_operator.controller.pools import (
    ClaimInterruptedError,
    reconcile_pool,
    try_claim_pool_pod,
    workspace_claim_of,
)
from sandbox_operator.controller.runtime import Runtime
from sandbox_operator.controller.store import Store
from sandbox_operator.controller.workqueue import WorkQueue
from sandbox_operator.kube import ApiError

JSON = dict[str, Any]
NS = "team-a"
POOL_KEY = (NS, "warm")
TEMPLATE: JSON = {"metadata": {"name": "base", "resourceVersion": "1"}, "spec": {"image": "img:1"}}
POOL: JSON = {
    "apiVersion": "sandbox.dev/v1alpha1",
    "kind": "SandboxPool",
    "metadata": {"name": "warm", "namespace": NS, "uid": "pool-uid", "generation": 1, "resourceVersion": "1"},
    "spec": {"template": "base", "size": 1},
}


def _merge(into: JSON, patch: Mapping[str, Any]) -> None:
    for key, value in patch.items():
        if value is None:
            into.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


class FakeApi:
    """Just enough of the API server: objects by path, resourceVersions, merge patches with the
    resourceVersion precondition, deletes with uid/resourceVersion preconditions."""

    def __init__(self) -> None:
        self.objects: dict[str, JSON] = {}
        self.calls: list[tuple[str, str]] = []
        self.bodies: list[tuple[str, str, Any]] = []
        self.fail: dict[tuple[str, str], ApiError] = {}
        self._rv = itertools.count(100)

    def _check_failure(self, method: str, path: str) -> None:
        self.calls.append((method, path))
        error = self.fail.get((method, path))
        if error is not None:
            raise error

    async def create(self, path: str, body: JSON) -> JSON | None:
        self._check_failure("POST", path)
        obj = copy.deepcopy(body)
        meta = obj["metadata"]
        meta.setdefault("namespace", NS)
        meta["uid"] = f"uid-{meta['name']}"
        meta["resourceVersion"] = str(next(self._rv))
        meta["creationTimestamp"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.objects[f"{path}/{meta['name']}"] = obj
        return copy.deepcopy(obj)

    async def patch(self, path: str, body: JSON, *, merge: bool = True) -> JSON | None:
        self._check_failure("PATCH", path)
        self.bodies.append(("PATCH", path, copy.deepcopy(body)))
        target_path = path.removesuffix("/status")
        obj = self.objects.get(target_path)
        if obj is None:
            return None
        wanted = (body.get("metadata") or {}).get("resourceVersion")
        if wanted and wanted != obj["metadata"]["resourceVersion"]:
            raise ApiError(409, {"reason": "Conflict"}, "PATCH", path)
        patch = copy.deepcopy(body)
        patch.get("metadata", {}).pop("resourceVersion", None)
        _merge(obj, patch)
        obj["metadata"]["resourceVersion"] = str(next(self._rv))
        return copy.deepcopy(obj)

    async def request(self, method: str, path: str, body: Any = None, **_: Any) -> Any:
        assert method == "DELETE", method
        self._check_failure(method, path)
        obj = self.objects.get(path)
        if obj is None:
            raise ApiError(404, {"reason": "NotFound"}, method, path)
        for key, value in ((body or {}).get("preconditions") or {}).items():
            if obj["metadata"].get(key) != value:
                raise ApiError(409, {"reason": "Conflict"}, method, path)
        del self.objects[path]
        return {}

    def set_pod_status(self, name: str, phase: str, ready: bool) -> JSON:
        pod = self.objects[f"/api/v1/namespaces/{NS}/pods/{name}"]
        pod["status"] = {"phase": phase, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
        pod["metadata"]["resourceVersion"] = str(next(self._rv))
        return copy.deepcopy(pod)

    def of_kind(self, plural: str) -> dict[str, JSON]:
        prefix = f"/api/v1/namespaces/{NS}/{plural}/"
        return {p.removeprefix(prefix): o for p, o in self.objects.items() if p.startswith(prefix)}


class FakeRuntime:
    def __init__(self) -> None:
        self.client = FakeApi()
        self.store = Store()
        self.queue: WorkQueue[tuple[str, str, str]] = WorkQueue()
        self.claims_in_flight: set[tuple[str, str]] = set()
        self.store.put_template(TEMPLATE)
        self.store.put_pool(POOL)
        self.client.objects[f"/apis/sandbox.dev/v1alpha1/namespaces/{NS}/sandboxpools/warm"] = copy.deepcopy(POOL)

    @property
    def rt(self) -> Runtime:
        return cast(Runtime, self)

    def sync(self) -> None:
        """What the watches would deliver: the store mirrors the fake API's pods and claims."""
        # Copies, as a watch delivers them: the store keeps parts of what it is given.
        for pod in self.client.of_kind("pods").values():
            self.store.put_pod(copy.deepcopy(pod))
        for key in [k for k in self.store.pods if k[1] not in self.client.of_kind("pods")]:
            self.store.delete_pod(key)
        for claim in self.client.of_kind("persistentvolumeclaims").values():
            self.store.put_pvc(copy.deepcopy(claim))
        for key in [k for k in self.store.pvcs if k[1] not in self.client.of_kind("persistentvolumeclaims")]:
            self.store.delete_pvc(key)

    def age_claims(self, by: timedelta) -> None:
        for claim in self.client.of_kind("persistentvolumeclaims").values():
            created = datetime.strptime(claim["metadata"]["creationTimestamp"], "%Y-%m-%dT%H:%M:%SZ")
            claim["metadata"]["creationTimestamp"] = (created - by).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.store.pvcs.clear()
        self.sync()

    def pool_status(self) -> JSON:
        return dict(self.store.pools[POOL_KEY].get("status") or {})


async def filled(runtime: FakeRuntime) -> str:
    """Reconcile an empty pool of size 1 and let its warm pod become ready; the pod's name."""
    await reconcile_pool(runtime.rt, POOL_KEY)
    (name,) = runtime.client.of_kind("pods")
    runtime.client.set_pod_status(name, "Running", True)
    runtime.sync()
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


async def test_a_pool_fills_with_a_pod_and_its_workspace_claim() -> None:
    runtime = FakeRuntime()
    name = await filled(runtime)
    claim = workspace_claim_of(runtime.client.of_kind("pods")[name])
    assert claim is not None and set(runtime.client.of_kind("persistentvolumeclaims")) == {claim}
    await reconcile_pool(runtime.rt, POOL_KEY)
    assert runtime.pool_status()["ready"] == 1 and runtime.pool_status()["claimed"] == 0


@pytest.mark.parametrize("phase", ["Failed", "Succeeded"])
async def test_a_finished_warm_pod_and_its_claim_are_replaced(phase: str) -> None:
    runtime = FakeRuntime()
    old = await filled(runtime)
    old_claim = workspace_claim_of(runtime.client.of_kind("pods")[old])
    runtime.client.set_pod_status(old, phase, False)
    runtime.sync()
    await reconcile_pool(runtime.rt, POOL_KEY)
    pods = runtime.client.of_kind("pods")
    assert old not in pods and len(pods) == 1
    (new_pod,) = pods.values()
    assert set(runtime.client.of_kind("persistentvolumeclaims")) == {workspace_claim_of(new_pod)}
    assert old_claim not in runtime.client.of_kind("persistentvolumeclaims")


async def test_a_warm_pod_of_an_older_template_is_replaced() -> None:
    runtime = FakeRuntime()
    old = await filled(runtime)
    runtime.store.put_template({**TEMPLATE, "spec": {"image": "img:2"}})
    await reconcile_pool(runtime.rt, POOL_KEY)
    pods = runtime.client.of_kind("pods")
    assert old not in pods and len(pods) == 1
    (new_pod,) = pods.values()
    assert new_pod["spec"]["containers"][0]["image"] == "img:2"
    assert len(runtime.client.of_kind("persistentvolumeclaims")) == 1


async def test_a_pod_that_changed_since_the_store_saw_it_is_not_deleted() -> None:
    runtime = FakeRuntime()
    old = await filled(runtime)
    runtime.client.set_pod_status(old, "Failed", False)
    runtime.sync()
    runtime.client.set_pod_status(old, "Failed", False)  # a newer version the store has not seen
    await reconcile_pool(runtime.rt, POOL_KEY)
    assert old in runtime.client.of_kind("pods")
    assert runtime.queue.pending_deadlines == 1  # it looks again soon


# --- the sweep of leaked claims -------------------------------------------------------------------


async def test_the_claim_of_a_warm_pod_deleted_out_of_band_is_deleted() -> None:
    runtime = FakeRuntime()
    old = await filled(runtime)
    old_claim = workspace_claim_of(runtime.client.of_kind("pods")[old])
    del runtime.client.objects[f"/api/v1/namespaces/{NS}/pods/{old}"]
    runtime.age_claims(timedelta(minutes=1))
    await reconcile_pool(runtime.rt, POOL_KEY)
    claims = runtime.client.of_kind("persistentvolumeclaims")
    assert old_claim not in claims
    (new_pod,) = runtime.client.of_kind("pods").values()
    assert set(claims) == {workspace_claim_of(new_pod)}


async def test_a_young_unused_claim_waits_for_its_grace_period() -> None:
    runtime = FakeRuntime()
    old = await filled(runtime)
    old_claim = workspace_claim_of(runtime.client.of_kind("pods")[old])
    del runtime.client.objects[f"/api/v1/namespaces/{NS}/pods/{old}"]
    runtime.sync()
    await reconcile_pool(runtime.rt, POOL_KEY)
    assert old_claim in runtime.client.of_kind("persistentvolumeclaims")
    assert runtime.queue.pending_deadlines == 1


async def test_a_claim_handed_to_a_sandbox_is_never_swept() -> None:
    runtime = FakeRuntime()
    await filled(runtime)
    claimed = await try_claim_pool_pod(runtime.rt, sandbox(), template())
    assert claimed is not None
    claim = workspace_claim_of(claimed)
    # The sandbox suspends: its pod goes, the workspace stays.
    del runtime.client.objects[f"/api/v1/namespaces/{NS}/pods/{claimed['metadata']['name']}"]
    runtime.age_claims(timedelta(minutes=1))
    await reconcile_pool(runtime.rt, POOL_KEY)
    assert claim in runtime.client.of_kind("persistentvolumeclaims")


# --- claims ---------------------------------------------------------------------------------------


async def test_a_claim_relabels_the_workspace_first_locked_by_its_resource_version() -> None:
    runtime = FakeRuntime()
    name = await filled(runtime)
    claim = workspace_claim_of(runtime.client.of_kind("pods")[name])
    runtime.client.bodies.clear()
    claimed = await try_claim_pool_pod(runtime.rt, sandbox(), template())
    assert claimed is not None and claimed["metadata"]["name"] == name
    (pvc_path, pvc_body), (pod_path, pod_body) = [(p, b) for _, p, b in runtime.client.bodies[:2]]
    assert pvc_path.endswith(f"/persistentvolumeclaims/{claim}") and pod_path.endswith(f"/pods/{name}")
    assert "resourceVersion" in pvc_body["metadata"] and "resourceVersion" not in pod_body["metadata"]
    workspace = runtime.store.pvc_of_sandbox((NS, "sb"))
    assert workspace is not None and workspace["metadata"]["name"] == claim
    labels = claimed["metadata"]["labels"]
    assert labels[SANDBOX_LABEL] == "sb" and POOL_LABEL not in labels
    assert claimed["metadata"]["annotations"][CLAIMED_FROM_POOL_ANNOTATION] == "warm"


async def test_a_claim_whose_workspace_changed_is_lost_and_touches_nothing() -> None:
    runtime = FakeRuntime()
    name = await filled(runtime)
    claim = workspace_claim_of(runtime.client.of_kind("pods")[name])
    runtime.client.objects[f"/api/v1/namespaces/{NS}/persistentvolumeclaims/{claim}"]["metadata"]["resourceVersion"] = (
        "999"  # another operator process took it first
    )
    assert await try_claim_pool_pod(runtime.rt, sandbox(), template()) is None
    assert not [c for c in runtime.client.calls if c[0] == "PATCH" and "/pods/" in c[1]]


async def test_a_claim_interrupted_at_the_pod_leaves_the_workspace_with_the_sandbox() -> None:
    runtime = FakeRuntime()
    name = await filled(runtime)
    claim = workspace_claim_of(runtime.client.of_kind("pods")[name])
    pod_path = f"/api/v1/namespaces/{NS}/pods/{name}"
    runtime.client.fail[("PATCH", pod_path)] = ApiError(500, {"reason": "InternalError"}, "PATCH", pod_path)
    with pytest.raises(ApiError):
        await try_claim_pool_pod(runtime.rt, sandbox(), template())
    # The sandbox's retry finds this workspace by its label (and mounts it on a cold pod) ...
    workspace = runtime.store.pvc_of_sandbox((NS, "sb"))
    assert workspace is not None and workspace["metadata"]["name"] == claim
    # ... no other sandbox can take the warm pod, and the pool replaces it but keeps the workspace.
    assert await try_claim_pool_pod(runtime.rt, sandbox("other"), template()) is None
    del runtime.client.fail[("PATCH", pod_path)]
    runtime.sync()
    await reconcile_pool(runtime.rt, POOL_KEY)
    assert name not in runtime.client.of_kind("pods")
    assert claim in runtime.client.of_kind("persistentvolumeclaims")
    assert len(runtime.client.of_kind("pods")) == 1


async def test_a_warm_pod_gone_after_its_workspace_was_claimed_fails_the_reconcile() -> None:
    runtime = FakeRuntime()
    name = await filled(runtime)
    del runtime.client.objects[f"/api/v1/namespaces/{NS}/pods/{name}"]  # the store has not seen it yet
    with pytest.raises(ClaimInterruptedError):
        await try_claim_pool_pod(runtime.rt, sandbox(), template())
    assert runtime.store.pvc_of_sandbox((NS, "sb")) is not None


async def test_status_claimed_counts_sandboxes_on_claimed_pods() -> None:
    runtime = FakeRuntime()
    await filled(runtime)
    claimed = await try_claim_pool_pod(runtime.rt, sandbox(), template())
    assert claimed is not None
    await reconcile_pool(runtime.rt, POOL_KEY)
    assert runtime.pool_status()["claimed"] == 1
    del runtime.client.objects[f"/api/v1/namespaces/{NS}/pods/{claimed['metadata']['name']}"]
    runtime.sync()
    await reconcile_pool(runtime.rt, POOL_KEY)
    assert runtime.pool_status()["claimed"] == 0
