"""Pure builders: Sandbox + SandboxTemplate → Pod / PVC / Service / NetworkPolicy dicts."""

from sandbox_operator.resources.builders import (
    CONTAINER_NAME,
    ImageNotAllowedError,
    PolicySettings,
    ResourcesExceedMaxError,
    build_network_policy,
    build_pod,
    build_pvc,
    build_service,
    build_shared_network_policy,
    governing_network_policy,
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
    "PolicySettings",
    "ResourcesExceedMaxError",
    "build_network_policy",
    "build_pod",
    "build_pvc",
    "build_service",
    "build_shared_network_policy",
    "child_names",
    "governing_network_policy",
    "owner_reference",
    "sandbox_id",
    "sandbox_id_for",
    "sandbox_labels",
    "selector_labels",
    "spec_hash",
]
