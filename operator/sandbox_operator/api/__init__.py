"""The ``sandbox.dev/v1alpha1`` API: pydantic models (the source of truth), parsing helpers, the
names every component puts on the wire (``api.names``) and the CRD generator
(``python -m sandbox_operator.api.crdgen``).

The package imports its modules on first use (PEP 562): the models cost ~0.6 s of imports, which
the agent, reading only ``api.names``, must not pay at start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .names import AGENT_PORTS, API_VERSION, GROUP, VERSION
    from .policy import image_allowed, image_of, image_violation, namespace_allowed, namespace_violation
    from .quantity import (
        DURATION_PATTERN,
        QUANTITY_PATTERN,
        format_duration,
        is_duration,
        is_quantity,
        parse_bytes,
        parse_duration,
        parse_millicores,
        parse_quantity,
    )
    from .resolve import (
        ResolvedResources,
        ResolvedTimeouts,
        ResourceLimitViolation,
        capped_lifetime,
        resolve_resources,
        resolve_timeouts,
    )
    from .v1alpha1 import (
        KINDS,
        SANDBOX_NAME_MAX,
        Condition,
        ConditionStatus,
        EgressMode,
        ImagePolicy,
        ImagePolicyMode,
        ImagePullPolicy,
        NetworkSpec,
        ObjectMeta,
        OnIdle,
        Persistence,
        Phase,
        ResourceUsage,
        Sandbox,
        SandboxPool,
        SandboxPoolSpec,
        SandboxPoolStatus,
        SandboxResources,
        SandboxSpec,
        SandboxStatus,
        SandboxTemplate,
        SandboxTemplateSpec,
        SandboxTimeouts,
        SecuritySettings,
        TemplateResourceDefaults,
        TemplateResources,
        TemplateTimeouts,
    )

_HOMES: dict[str, str] = {
    "AGENT_PORTS": "names",
    "API_VERSION": "names",
    "DURATION_PATTERN": "quantity",
    "GROUP": "names",
    "KINDS": "v1alpha1",
    "QUANTITY_PATTERN": "quantity",
    "SANDBOX_NAME_MAX": "v1alpha1",
    "VERSION": "names",
    "Condition": "v1alpha1",
    "ConditionStatus": "v1alpha1",
    "EgressMode": "v1alpha1",
    "ImagePolicy": "v1alpha1",
    "ImagePolicyMode": "v1alpha1",
    "ImagePullPolicy": "v1alpha1",
    "NetworkSpec": "v1alpha1",
    "ObjectMeta": "v1alpha1",
    "OnIdle": "v1alpha1",
    "Persistence": "v1alpha1",
    "Phase": "v1alpha1",
    "ResolvedResources": "resolve",
    "ResolvedTimeouts": "resolve",
    "ResourceLimitViolation": "resolve",
    "ResourceUsage": "v1alpha1",
    "Sandbox": "v1alpha1",
    "SandboxPool": "v1alpha1",
    "SandboxPoolSpec": "v1alpha1",
    "SandboxPoolStatus": "v1alpha1",
    "SandboxResources": "v1alpha1",
    "SandboxSpec": "v1alpha1",
    "SandboxStatus": "v1alpha1",
    "SandboxTemplate": "v1alpha1",
    "SandboxTemplateSpec": "v1alpha1",
    "SandboxTimeouts": "v1alpha1",
    "SecuritySettings": "v1alpha1",
    "TemplateResourceDefaults": "v1alpha1",
    "TemplateResources": "v1alpha1",
    "TemplateTimeouts": "v1alpha1",
    "capped_lifetime": "resolve",
    "format_duration": "quantity",
    "image_allowed": "policy",
    "image_of": "policy",
    "image_violation": "policy",
    "is_duration": "quantity",
    "is_quantity": "quantity",
    "namespace_allowed": "policy",
    "namespace_violation": "policy",
    "parse_bytes": "quantity",
    "parse_duration": "quantity",
    "parse_millicores": "quantity",
    "parse_quantity": "quantity",
    "resolve_resources": "resolve",
    "resolve_timeouts": "resolve",
}

__all__ = [
    "AGENT_PORTS",
    "API_VERSION",
    "DURATION_PATTERN",
    "GROUP",
    "KINDS",
    "QUANTITY_PATTERN",
    "SANDBOX_NAME_MAX",
    "VERSION",
    "Condition",
    "ConditionStatus",
    "EgressMode",
    "ImagePolicy",
    "ImagePolicyMode",
    "ImagePullPolicy",
    "NetworkSpec",
    "ObjectMeta",
    "OnIdle",
    "Persistence",
    "Phase",
    "ResolvedResources",
    "ResolvedTimeouts",
    "ResourceLimitViolation",
    "ResourceUsage",
    "Sandbox",
    "SandboxPool",
    "SandboxPoolSpec",
    "SandboxPoolStatus",
    "SandboxResources",
    "SandboxSpec",
    "SandboxStatus",
    "SandboxTemplate",
    "SandboxTemplateSpec",
    "SandboxTimeouts",
    "SecuritySettings",
    "TemplateResourceDefaults",
    "TemplateResources",
    "TemplateTimeouts",
    "capped_lifetime",
    "format_duration",
    "image_allowed",
    "image_of",
    "image_violation",
    "is_duration",
    "is_quantity",
    "namespace_allowed",
    "namespace_violation",
    "parse_bytes",
    "parse_duration",
    "parse_millicores",
    "parse_quantity",
    "resolve_resources",
    "resolve_timeouts",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # once: later lookups do not come here
    return value
