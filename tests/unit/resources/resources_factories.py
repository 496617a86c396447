"""Sandbox and SandboxTemplate objects as the API server would return them."""

from __future__ import annotations

from typing import Any

from sandbox_operator.api import Sandbox, SandboxTemplate

UID = "6f1c2d3e-0000-4000-8000-00000000abcd"


def sandbox(name: str = "demo", status: dict[str, Any] | None = None, **spec: Any) -> Sandbox:
    return Sandbox.from_body(
        {
            "apiVersion": "sandbox.dev/v1alpha1",
            "kind": "Sandbox",
            "metadata": {
                "name": name,
                "namespace": "team-a",
                "uid": UID,
                "generation": 1,
                "creationTimestamp": "2026-01-01T00:00:00Z",
            },
            "spec": {"template": "code-interpreter", **spec},
            "status": status or {},
        }
    )


def template(**spec: Any) -> SandboxTemplate:
    return SandboxTemplate.from_body(
        {"metadata": {"name": "code-interpreter"}, "spec": {"image": "ghcr.io/example/agent:1", **spec}}
    )
