from __future__ import annotations

import pytest

from sandbox_operator.kube.client import _resource_of


@pytest.mark.parametrize(
    ("path", "resource"),
    [
        ("/api/v1/namespaces/ns/pods", "pods"),
        ("/api/v1/namespaces/ns/pods/p1", "pods"),
        ("/apis/sandbox.dev/v1alpha1/namespaces/ns/sandboxes/s/status", "sandboxes/status"),
        ("/api/v1/namespaces/ns/events", "events"),
        ("/apis/sandbox.dev/v1alpha1/sandboxtemplates/base", "sandboxtemplates"),
        ("/api/v1/namespaces", "namespaces"),
    ],
)
def test_write_accounting_names_the_resource(path: str, resource: str) -> None:
    assert _resource_of(path) == resource
