"""The operator's in-memory view of the cluster, fed by kopf's watch streams.

Objects are stripped to what the reconciler reads (no managedFields, no last-applied annotations),
which keeps memory flat at thousands of sandboxes (docs/design.md §7: ≤ 150 MB at 1,000).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

from sandbox_operator.api.names import POOL_LABEL, SANDBOX_LABEL, SPEC_HASH_ANNOTATION

JSON = dict[str, Any]
Key = tuple[str, str]  # (namespace, name)

_DROPPED_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",)


def strip(body: Mapping[str, Any], *, keep_spec: bool = True) -> JSON:
    """A copy of an object without managedFields and bulky annotations (and spec, if asked)."""
    meta = dict(body.get("metadata") or {})
    meta.pop("managedFields", None)
    annotations = meta.get("annotations")
    if annotations:
        meta["annotations"] = {k: v for k, v in annotations.items() if k not in _DROPPED_ANNOTATIONS}
    stripped: JSON = {"metadata": meta}
    if keep_spec and "spec" in body:
        stripped["spec"] = body["spec"]
    if "status" in body:
        stripped["status"] = body["status"]
    return stripped


def strip_pod(body: Mapping[str, Any]) -> JSON:
    """Pods: keep metadata, the few spec fields we compare, and status (minus noisy parts)."""
    stripped = strip(body, keep_spec=False)
    spec = body.get("spec") or {}
    stripped["spec"] = {"nodeName": spec.get("nodeName"), "volumes": spec.get("volumes", [])}
    # Only the NoExecute tolerations: how long the pod stays on a node that stopped reporting.
    tolerations = [
        t for t in spec.get("tolerations") or () if isinstance(t, Mapping) and t.get("effect") == "NoExecute"
    ]
    if tolerations:
        stripped["spec"]["tolerations"] = tolerations
    return stripped


class NamespaceView(Mapping[str, "JSON"]):
    """The objects of one namespace of a (namespace, name)-keyed table, by name; a live view."""

    def __init__(self, table: Mapping[Key, JSON], namespace: str) -> None:
        self._table = table
        self._namespace = namespace

    def __getitem__(self, name: str) -> JSON:
        return self._table[(self._namespace, name)]

    def __iter__(self) -> Iterator[str]:
        return (name for namespace, name in list(self._table) if namespace == self._namespace)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class Store:
    def __init__(self) -> None:
        self.sandboxes: dict[Key, JSON] = {}
        self.templates: dict[str, JSON] = {}
        # The last version of each deleted template: sandboxes already started from it keep their
        # timeouts and limits (a template deletion must not switch off maxLifetime or idle).
        self.retired_templates: dict[str, JSON] = {}
        self.pools: dict[Key, JSON] = {}
        self.pods: dict[Key, JSON] = {}
        self.pvcs: dict[Key, JSON] = {}
        # (kind, namespace, name) -> spec digest of each Service / NetworkPolicy we own.
        self.child_hashes: dict[tuple[str, str, str], str] = {}
        # Secondary indexes: pods by owning sandbox, warm pods by pool.
        self._pods_by_sandbox: dict[Key, set[str]] = defaultdict(set)
        self._pods_by_pool: dict[Key, set[str]] = defaultdict(set)
        self._pvc_by_sandbox: dict[Key, str] = {}

    # --- sandboxes, templates, pools -----------------------------------------------------------

    def put_sandbox(self, body: Mapping[str, Any]) -> Key:
        key = key_of(body)
        if not is_newer(body, self.sandboxes.get(key)):
            return key
        self.sandboxes[key] = strip(body)
        return key

    def delete_sandbox(self, key: Key) -> None:
        self.sandboxes.pop(key, None)

    def put_template(self, body: Mapping[str, Any]) -> str:
        name = str(body["metadata"]["name"])
        self.templates[name] = strip(body)
        self.retired_templates.pop(name, None)
        return name

    def delete_template(self, name: str) -> None:
        retired = self.templates.pop(name, None)
        if retired is not None:
            self.retired_templates[name] = retired

    def template_for(self, name: str, *, started: bool) -> JSON | None:
        """The template a sandbox reconciles against: the live one, or for a sandbox that already
        started, the last version seen before it was deleted. New sandboxes need a live template."""
        live = self.templates.get(name)
        if live is not None or not started:
            return live
        return self.retired_templates.get(name)

    def put_pool(self, body: Mapping[str, Any]) -> Key:
        key = key_of(body)
        self.pools[key] = strip(body)
        return key

    def delete_pool(self, key: Key) -> None:
        self.pools.pop(key, None)

    def sandboxes_using_template(self, template: str) -> Iterator[Key]:
        for key, body in self.sandboxes.items():
            if (body.get("spec") or {}).get("template") == template:
                yield key

    # --- services and network policies: only the digest the operator applied -------------------

    def put_child_hash(self, kind: str, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        self.child_hashes[(kind, *key_of(body))] = str((meta.get("annotations") or {}).get(SPEC_HASH_ANNOTATION, ""))

    def delete_child_hash(self, kind: str, key: Key) -> None:
        self.child_hashes.pop((kind, *key), None)

    def child_hash(self, kind: str, key: Key) -> str | None:
        return self.child_hashes.get((kind, *key))

    # --- pods ------------------------------------------------------------------------------------

    def put_pod(self, body: Mapping[str, Any]) -> JSON:
        key = key_of(body)
        current = self.pods.get(key)
        if current is not None and not is_newer(body, current):
            return current
        self._unindex_pod(key)
        pod = strip_pod(body)
        self.pods[key] = pod
        labels = pod["metadata"].get("labels") or {}
        if SANDBOX_LABEL in labels:
            self._pods_by_sandbox[(key[0], labels[SANDBOX_LABEL])].add(key[1])
        elif POOL_LABEL in labels:
            self._pods_by_pool[(key[0], labels[POOL_LABEL])].add(key[1])
        return pod

    def delete_pod(self, key: Key) -> JSON | None:
        self._unindex_pod(key)
        return self.pods.pop(key, None)

    def _unindex_pod(self, key: Key) -> None:
        old = self.pods.get(key)
        if old is None:
            return
        labels = old["metadata"].get("labels") or {}
        for index, label in ((self._pods_by_sandbox, SANDBOX_LABEL), (self._pods_by_pool, POOL_LABEL)):
            owner = labels.get(label)
            if owner is not None:
                names = index.get((key[0], owner))
                if names is not None:
                    names.discard(key[1])
                    if not names:
                        del index[(key[0], owner)]

    def pods_of_sandbox(self, key: Key) -> list[JSON]:
        return [self.pods[(key[0], n)] for n in sorted(self._pods_by_sandbox.get(key, ()))]

    def pods_of_pool(self, key: Key) -> list[JSON]:
        return [self.pods[(key[0], n)] for n in sorted(self._pods_by_pool.get(key, ()))]

    # --- pvcs ------------------------------------------------------------------------------------

    def put_pvc(self, body: Mapping[str, Any]) -> None:
        key = key_of(body)
        current = self.pvcs.get(key)
        if current is not None and not is_newer(body, current):
            return
        self._unindex_pvc(key)
        pvc = strip(body, keep_spec=False)
        self.pvcs[key] = pvc
        owner = (pvc["metadata"].get("labels") or {}).get(SANDBOX_LABEL)
        if owner:
            self._pvc_by_sandbox[(key[0], owner)] = key[1]

    def delete_pvc(self, key: Key) -> None:
        self._unindex_pvc(key)
        self.pvcs.pop(key, None)

    def _unindex_pvc(self, key: Key) -> None:
        old = self.pvcs.get(key)
        owner = ((old or {}).get("metadata", {}).get("labels") or {}).get(SANDBOX_LABEL)
        if owner and self._pvc_by_sandbox.get((key[0], owner)) == key[1]:
            del self._pvc_by_sandbox[(key[0], owner)]

    def pvcs_in(self, namespace: str) -> NamespaceView:
        """The workspace claims of one namespace, by name (lookups are O(1))."""
        return NamespaceView(self.pvcs, namespace)

    def pods_in(self, namespace: str) -> list[JSON]:
        return [pod for (ns, _), pod in list(self.pods.items()) if ns == namespace]

    def pvc_of_sandbox(self, key: Key) -> JSON | None:
        """The workspace claim labelled for this sandbox (its own, or one it took from a pool)."""
        name = self._pvc_by_sandbox.get(key)
        return self.pvcs.get((key[0], name)) if name else None


def key_of(body: Mapping[str, Any]) -> Key:
    meta = body["metadata"]
    return (str(meta.get("namespace") or ""), str(meta["name"]))


def is_newer(body: Mapping[str, Any], current: Mapping[str, Any] | None) -> bool:
    """True unless `current` has a higher resourceVersion than `body`.

    The reconciler stores the API server's answers to its own writes at once; a watch event that
    arrives later with an older version must not roll the store back. resourceVersions are opaque
    by contract but are etcd revisions in every real API server; non-numeric ones are always taken.
    """
    if current is None:
        return True
    try:
        return int(body["metadata"]["resourceVersion"]) >= int(current["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return True
