"""The NetworkPolicy that governs each sandbox pod: one shared by a namespace's pods of one template
and egress class (api.egress_class), or, for a sandbox with an allow-list or ports of its own, its
own. Every pod is created only after its policy is written (reconcile, pools)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sandbox_operator.api.names import NETWORK_POLICIES, SPEC_HASH_ANNOTATION
from sandbox_operator.controller.inflight import ChildKind
from sandbox_operator.kube import JSON

if TYPE_CHECKING:
    from sandbox_operator.controller.context import ReconcileContext


async def write_child(rt: ReconcileContext, kind: ChildKind, collection: str, body: JSON) -> None:
    """Create a Service / NetworkPolicy, or bring an existing one up to `body` with a merge patch
    (lists are replaced whole). A POST first: the common case is a new child, and a POST costs the
    API server less than a server-side apply, which matters in a burst."""
    name = str(body["metadata"]["name"])
    key = (str(body["metadata"]["namespace"]), name)
    written: JSON | None = None
    if rt.store.child_hash(kind, key) is None:
        written = await rt.client.create(collection, body)  # None: it exists (409), maybe outdated
    if written is None:
        patch = {
            "metadata": {"labels": body["metadata"]["labels"], "annotations": body["metadata"]["annotations"]},
            "spec": body["spec"],
        }
        written = await rt.client.patch(f"{collection}/{name}", patch)
    if written is not None:
        rt.store.put_child_hash(kind, written)


def _digest(body: JSON) -> str:
    return str(body["metadata"]["annotations"][SPEC_HASH_ANNOTATION])


def shared_policy_current(rt: ReconcileContext, body: JSON) -> bool:
    key = (str(body["metadata"]["namespace"]), str(body["metadata"]["name"]))
    return rt.store.child_hash("networkpolicy", key) == _digest(body)


async def ensure_shared_policy(rt: ReconcileContext, body: JSON) -> None:
    """Write a shared NetworkPolicy unless the watch (or this process) already has it current; at
    most one write per policy at a time, however many sandboxes wait for it."""
    if shared_policy_current(rt, body):
        return
    namespace = str(body["metadata"]["namespace"])
    key = (namespace, str(body["metadata"]["name"]))
    collection = NETWORK_POLICIES.collection(namespace)
    await rt.in_flight.write_once(key, _digest(body), lambda: write_child(rt, "networkpolicy", collection, body))
