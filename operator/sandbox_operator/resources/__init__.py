"""Pure builders: Sandbox + SandboxTemplate → Pod / PVC / Service / NetworkPolicy dicts."""

from sandbox_operator.resources.builders import (
    CONTAINER_NAME,
    ImageNotAllowedError,
    ResourcesExceedMaxError,
    build_network_policy,
    build_pod,
    build_pvc,
    build_service,
    owner_reference,
    sandbox_id,
    spec_hash,
)
from sandbox_operator.resources.names import (
    ChildNames,
    child_names,
    sandbox_id_for,
    sandbox_labels,
    selector_labels,
)

__all__ = [
    "CONTAINER_NAME",
    "ChildNames",
    "ImageNotAllowedError",
    "ResourcesExceedMaxError",
    "build_network_policy",
    "build_pod",
    "build_pvc",
    "build_service",
    "child_names",
    "owner_reference",
    "sandbox_id",
    "sandbox_id_for",
    "sandbox_labels",
    "selector_labels",
    "spec_hash",
]
