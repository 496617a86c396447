"""Deterministic names, label sets and the E2B sandbox ID of a sandbox's children (the label keys
themselves are in api.names)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sandbox_operator.api.names import (
    MANAGED_BY,
    MANAGED_BY_LABEL,
    NAME_LABEL,
    SANDBOX_ID_LABEL,
    SANDBOX_LABEL,
    TEMPLATE_LABEL,
)

__all__ = [
    "LABEL_MAX",
    "SANDBOX_ID_LENGTH",
    "ChildNames",
    "bounded_name",
    "child_names",
    "label_value",
    "sandbox_id_for",
    "sandbox_labels",
    "selector_labels",
]

LABEL_MAX = 63  # DNS labels: hostnames, Service names, label values
SANDBOX_ID_LENGTH = 20  # like E2B's IDs
_HASH_LENGTH = 8
_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def bounded_name(prefix: str, name: str, suffix: str = "", limit: int = LABEL_MAX) -> str:
    """``prefix + name + suffix``, or, when that is too long, a truncated name plus a short hash of the
    full name so that two long names sharing a prefix still get different children."""
    full = f"{prefix}{name}{suffix}"
    if len(full) <= limit:
        return full
    tag = _digest(name)[:_HASH_LENGTH]
    room = limit - len(prefix) - len(suffix) - len(tag) - 1
    head = name[:room].rstrip("-.")
    return f"{prefix}{head}-{tag}{suffix}"


@dataclass(frozen=True, slots=True)
class ChildNames:
    pod: str
    pvc: str
    service: str
    network_policy: str
    hostname: str


def child_names(name: str) -> ChildNames:
    """Names of the children of Sandbox ``name``; all are DNS labels (at most 63 characters).

    The pod, Service and NetworkPolicy share ``sbx-<name>`` (different kinds may share a name); the
    workspace claim is ``sbx-<name>-workspace``. Sandbox names are DNS labels (the CRD enforces it),
    so the pod's hostname is the sandbox name itself.
    """
    base = bounded_name("sbx-", name)
    return ChildNames(
        pod=base,
        pvc=bounded_name("sbx-", name, "-workspace"),
        service=base,
        network_policy=base,
        hostname=name[:LABEL_MAX].rstrip("-") or "sandbox",
    )


def label_value(value: str) -> str:
    """A valid label value: names up to 63 characters stay as they are, longer ones are shortened
    with a hash (SandboxTemplate names may be DNS subdomains up to 253 characters)."""
    return bounded_name("", value)


def sandbox_id_for(namespace: str, name: str, uid: str) -> str:
    """An E2B-shaped sandbox ID: 20 lowercase letters and digits, no '-' or '.', derived from the
    object's uid (so a re-created object with the same name gets a new ID) and stable across
    operator restarts. Host routing ``{port}-{id}.{domain}`` relies on the missing '-' and '.'."""
    number = int(_digest(f"{namespace}/{name}/{uid}"), 16)
    chars = []
    for _ in range(SANDBOX_ID_LENGTH):
        number, digit = divmod(number, 36)
        chars.append(_BASE36[digit])
    return "".join(chars)


def selector_labels(name: str) -> dict[str, str]:
    """The labels that select the pod of Sandbox ``name`` (Service selector, NetworkPolicy podSelector)."""
    return {MANAGED_BY_LABEL: MANAGED_BY, SANDBOX_LABEL: name}


def sandbox_labels(name: str, template: str, sandbox_id: str) -> dict[str, str]:
    """Labels every child of a sandbox carries."""
    return {
        MANAGED_BY_LABEL: MANAGED_BY,
        NAME_LABEL: "sandbox",
        SANDBOX_LABEL: name,
        TEMPLATE_LABEL: label_value(template),
        SANDBOX_ID_LABEL: sandbox_id,
    }
