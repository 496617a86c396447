"""The operator's store: newer-wins writes, child indexes, retired templates."""

from __future__ import annotations

from typing import Any

from sandbox_operator.api.names import SANDBOX_LABEL
from sandbox_operator.controller.store import Store


def obj(name: str, rv: str, namespace: str | None = "ns", **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "resourceVersion": rv, **extra.pop("meta", {})}
    if namespace:
        meta["namespace"] = namespace
    return {"metadata": meta, **extra}


def test_older_watch_events_never_overwrite_a_newer_object() -> None:
    store = Store()
    store.put_sandbox(obj("a", "10", status={"phase": "Running"}))
    store.put_sandbox(obj("a", "9", status={"phase": "Creating"}))
    assert store.sandboxes[("ns", "a")]["status"]["phase"] == "Running"


def test_pods_are_indexed_by_sandbox_and_stripped() -> None:
    store = Store()
    pod = obj(
        "sbx-a",
        "1",
        meta={"labels": {SANDBOX_LABEL: "a"}, "managedFields": [{"x": 1}]},
        spec={"nodeName": "n", "containers": [{"name": "c"}], "volumes": []},
    )
    store.put_pod(pod)
    (stored,) = store.pods_of_sandbox(("ns", "a"))
    assert "managedFields" not in stored["metadata"] and "containers" not in stored["spec"]
    store.delete_pod(("ns", "sbx-a"))
    assert store.pods_of_sandbox(("ns", "a")) == []


def test_a_deleted_template_serves_only_sandboxes_that_already_started() -> None:
    store = Store()
    store.put_template(obj("base", "1", namespace=None, spec={"image": "i"}))
    store.delete_template("base")
    assert store.template_for("base", started=False) is None
    retired = store.template_for("base", started=True)
    assert retired is not None and retired["spec"] == {"image": "i"}
    store.put_template(obj("base", "2", namespace=None, spec={"image": "j"}))
    assert store.template_for("base", started=False)["spec"] == {"image": "j"}  # type: ignore[index]
    assert store.retired_templates == {}


def test_a_stripped_pod_keeps_its_noexecute_tolerations_for_node_loss() -> None:
    store = Store()
    unreachable = {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute", "tolerationSeconds": 300}
    schedule_only = {"key": "gpu", "effect": "NoSchedule"}
    pod = obj("sbx-a", "1", meta={"labels": {SANDBOX_LABEL: "a"}}, spec={"tolerations": [unreachable, schedule_only]})
    assert store.put_pod(pod)["spec"]["tolerations"] == [unreachable]
    assert "tolerations" not in store.put_pod(obj("sbx-b", "1", spec={}))["spec"]
