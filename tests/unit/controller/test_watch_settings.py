"""kopf's server-side selectors for the child watches: they must match the core resources."""

from __future__ import annotations

import kopf
import pytest
from kopf._cogs.structs.references import Resource

from sandbox_operator.controller.main import CHILD_SELECTOR, restrict_child_watches


def core(plural: str, kind: str) -> Resource:
    return Resource(group="", version="v1", plural=plural, kind=kind, namespaced=True)


@pytest.mark.parametrize(
    ("plural", "kind"),
    [("pods", "Pod"), ("persistentvolumeclaims", "PersistentVolumeClaim"), ("services", "Service")],
)
def test_child_watches_carry_the_managed_by_selector(plural: str, kind: str) -> None:
    settings = kopf.OperatorSettings()
    restrict_child_watches(settings)
    assert settings.watching.label_selectors.collect(core(plural, kind)) == [CHILD_SELECTOR]


def test_network_policy_watch_carries_the_selector() -> None:
    settings = kopf.OperatorSettings()
    restrict_child_watches(settings)
    policies = Resource(
        group="networking.k8s.io", version="v1", plural="networkpolicies", kind="NetworkPolicy", namespaced=True
    )
    assert settings.watching.label_selectors.collect(policies) == [CHILD_SELECTOR]


def test_other_resources_are_not_restricted() -> None:
    settings = kopf.OperatorSettings()
    restrict_child_watches(settings)
    sandboxes = Resource(group="sandbox.dev", version="v1alpha1", plural="sandboxes", kind="Sandbox", namespaced=True)
    assert settings.watching.label_selectors.collect(sandboxes) == []
    assert settings.watching.label_selectors.collect(core("configmaps", "ConfigMap")) == []
