"""Pure builders: Sandbox + SandboxTemplate → Pod / PVC / Service / NetworkPolicy bodies.

The bodies are plain dicts in the API server's JSON shape (camelCase), ready for any client's
create call. Every child carries the sandbox labels and a controller ownerReference to the Sandbox,
so garbage collection removes it with the Sandbox. See docs/lifecycle.md for the choices made.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sandbox_operator.api import (
    API_VERSION,
    EgressClass,
    EgressMode,
    ResolvedEgress,
    ResolvedResources,
    Sandbox,
    SandboxTemplate,
    egress_class,
    image_of,
    image_violation,
    resolve_egress,
    resolve_resources,
    resolve_timeouts,
)
from sandbox_operator.api.names import (
    AGENT_PORTS,
    AGENT_TOKEN_ENV,
    AGENT_TOKEN_ID_ANNOTATION,
    ALWAYS_DENIED_CIDRS,
    COMPONENT_LABEL,
    DEFAULT_CLUSTER_CIDRS,
    DEFAULT_DNS_NAMESPACE,
    DEFAULT_DNS_POD_LABELS,
    EGRESS_CLASS_LABEL,
    EGRESS_HOSTS_NOT_ENFORCED_ANNOTATION,
    ENVD_PORT,
    GATEWAY_COMPONENT,
    INTERPRETER_PORT,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    NAME_LABEL,
    OPERATOR_COMPONENT,
    RESERVED_ENV_PREFIXES,
    SPEC_HASH_ANNOTATION,
    TEMPLATE_LABEL,
)
from sandbox_operator.resources.names import (
    bounded_name,
    child_names,
    label_value,
    sandbox_id_for,
    sandbox_labels,
    selector_labels,
)
from sandbox_operator.resources.tokens import AgentToken

__all__ = [
    "CONTAINER_NAME",
    "ImageNotAllowedError",
    "PolicySettings",
    "ResourcesExceedMaxError",
    "build_network_policy",
    "build_pod",
    "build_pvc",
    "build_service",
    "build_shared_network_policy",
    "governing_network_policy",
    "owner_reference",
    "sandbox_id",
    "shared_policy_name",
    "shared_policy_selector",
    "spec_hash",
]

CONTAINER_NAME = "sandbox"
WORKSPACE_VOLUME = "workspace"
TMP_VOLUME = "tmp"
TERMINATION_GRACE_SECONDS = 5  # a sandbox has nothing to flush; suspend/terminate should be quick
# Liveness on the agent's /health: a stopped or wedged agent would otherwise hang every call. About 6 s
# (3 misses, 2 s apart) to detect it, while a GC pause or a CPU-starved second is not a restart.
LIVENESS_PERIOD_SECONDS = 2
LIVENESS_TIMEOUT_SECONDS = 2
LIVENESS_FAILURE_THRESHOLD = 3
# The agent listens ~1 s after start; a slow node (gVisor, CPU contention) must not fail a start. Not a
# startupProbe: that would hold back the readiness probe, i.e. Running, by up to a period.
LIVENESS_INITIAL_DELAY_SECONDS = 10


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def spec_hash(body: dict[str, Any]) -> str:
    """A short digest of a child's spec and annotations (other than the hash itself)."""
    annotations = {k: v for k, v in (body["metadata"].get("annotations") or {}).items() if k != SPEC_HASH_ANNOTATION}
    text = json.dumps({"spec": body["spec"], "annotations": annotations}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _hashed(body: dict[str, Any]) -> dict[str, Any]:
    body["metadata"].setdefault("annotations", {})[SPEC_HASH_ANNOTATION] = spec_hash(body)
    return body


class ResourcesExceedMaxError(ValueError):
    """build_pod was asked for a pod whose resources exceed the template maximum."""

    def __init__(self, refused: ResolvedResources) -> None:
        super().__init__(refused.violation_message)
        self.refused = refused


class ImageNotAllowedError(ValueError):
    """build_pod was asked for a pod whose image the template's imagePolicy refuses."""


def _allowed_image(sandbox: Sandbox, template: SandboxTemplate) -> str:
    refused = image_violation(sandbox.spec, template.spec)
    if refused is not None:
        raise ImageNotAllowedError(refused)
    return image_of(sandbox.spec, template.spec)


def _identity(sandbox: Sandbox) -> tuple[str, str, str]:
    metadata = sandbox.metadata
    if not metadata.name or not metadata.namespace or not metadata.uid:
        # Without a uid there is no ownerReference, and a child without an owner leaks.
        raise ValueError("the Sandbox needs metadata.name, namespace and uid (as read from the API server)")
    return metadata.name, metadata.namespace, metadata.uid


def sandbox_id(sandbox: Sandbox) -> str:
    """The sandbox's E2B ID: the one in its status, else the one derived from its uid."""
    name, namespace, uid = _identity(sandbox)
    return sandbox.status.sandbox_id or sandbox_id_for(namespace, name, uid)


def owner_reference(sandbox: Sandbox) -> dict[str, Any]:
    name, _, uid = _identity(sandbox)
    return {
        "apiVersion": API_VERSION,
        "kind": "Sandbox",
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(sandbox: Sandbox, child_name: str) -> dict[str, Any]:
    name, namespace, _ = _identity(sandbox)
    return {
        "name": child_name,
        "namespace": namespace,
        "labels": sandbox_labels(name, sandbox.spec.template, sandbox_id(sandbox)),
        "ownerReferences": [owner_reference(sandbox)],
    }


def _user_ports(sandbox: Sandbox, template: SandboxTemplate) -> list[int]:
    """Template ports then sandbox ports, without repeats, in a stable order."""
    ports = [*(template.spec.ports or ()), *(sandbox.spec.network.ports or ())]
    return list(dict.fromkeys(port for port in ports if port not in AGENT_PORTS))


def _all_ports(sandbox: Sandbox, template: SandboxTemplate) -> list[tuple[str, int]]:
    return _named_ports(_user_ports(sandbox, template))


def _named_ports(user_ports: Iterable[int]) -> list[tuple[str, int]]:
    """The agent's ports, then the user ports (not repeating an agent port), each with a port name."""
    named = [("envd", ENVD_PORT), ("interpreter", INTERPRETER_PORT)]
    return named + [(f"port-{port}", port) for port in dict.fromkeys(user_ports) if port not in AGENT_PORTS]


def _effective_resources(sandbox: Sandbox, template: SandboxTemplate) -> ResolvedResources:
    resolved = resolve_resources(sandbox.spec, template.spec)
    if resolved.violations:
        raise ResourcesExceedMaxError(resolved)
    return resolved


def _env(sandbox: Sandbox, template: SandboxTemplate, workdir: str, token: AgentToken | None) -> list[dict[str, str]]:
    execution = resolve_timeouts(sandbox.spec, template.spec).execution
    # The Sandbox's own env may not set the agent's settings or the loader's variables (the CRD
    # refuses them at admission; an object stored before that rule is filtered here). The
    # template's env, written by the cluster's operators, may tune the agent.
    tenant = {k: v for k, v in (sandbox.spec.env or {}).items() if not k.startswith(RESERVED_ENV_PREFIXES)}
    merged = {**(template.spec.env or {}), **tenant}
    reserved = {
        "SANDBOX_ID": sandbox_id(sandbox),
        "SANDBOX_EXECUTION_TIMEOUT": str(execution),  # seconds; 0 = no limit
        "SANDBOX_WORKDIR": workdir,
    }
    if token is not None:
        reserved[AGENT_TOKEN_ENV] = token.value
    # The operator's variables win: a user cannot pose as another sandbox.
    for key in (*reserved, AGENT_TOKEN_ENV):
        merged.pop(key, None)
    return [{"name": key, "value": value} for key, value in {**merged, **reserved}.items()]


def build_pod(sandbox: Sandbox, template: SandboxTemplate, token: AgentToken | None = None) -> dict[str, Any]:
    """The sandbox Pod, with its agent's access token when given (resources.tokens). Raises
    ResourcesExceedMaxError above the template maximum and ImageNotAllowedError for an image its
    imagePolicy refuses (the lifecycle never asks for such a pod; this keeps a bug from creating one)."""
    resources = _effective_resources(sandbox, template)
    image = _allowed_image(sandbox, template)
    template_spec = template.spec
    names = child_names(sandbox.metadata.name or "")
    security, persistence = template_spec.security, template_spec.persistence
    read_only_root = security.read_only_root_filesystem
    workdir = persistence.mount_path
    amounts = {"cpu": resources.cpu, "memory": resources.memory, "ephemeral-storage": resources.disk}

    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": image,
        "env": _env(sandbox, template, workdir, token),
        "ports": [
            {"name": port_name, "containerPort": port, "protocol": "TCP"}
            for port_name, port in _all_ports(sandbox, template)
        ],
        # requests == limits: Guaranteed QoS, the last class the kubelet evicts.
        "resources": {"requests": dict(amounts), "limits": dict(amounts)},
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": ENVD_PORT, "scheme": "HTTP"},
            "periodSeconds": 1,  # Running is reported on readiness: a long period is added latency
            "timeoutSeconds": 1,
            "failureThreshold": 3,
        },
        # restartPolicy is Never: a failed liveness probe ends the pod (PodFailed), which the
        # lifecycle retries within its budget on the same workspace.
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": ENVD_PORT, "scheme": "HTTP"},
            "initialDelaySeconds": LIVENESS_INITIAL_DELAY_SECONDS,
            "periodSeconds": LIVENESS_PERIOD_SECONDS,
            "timeoutSeconds": LIVENESS_TIMEOUT_SECONDS,
            "failureThreshold": LIVENESS_FAILURE_THRESHOLD,
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": security.run_as_user,
            "runAsGroup": security.run_as_group,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": read_only_root,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": WORKSPACE_VOLUME, "mountPath": workdir}],
        "workingDir": workdir,
    }
    if template_spec.image_pull_policy is not None:
        container["imagePullPolicy"] = str(template_spec.image_pull_policy)
    if template_spec.command:
        container["command"] = list(template_spec.command)
    if template_spec.args:
        container["args"] = list(template_spec.args)

    workspace: dict[str, Any] = (
        {"name": WORKSPACE_VOLUME, "persistentVolumeClaim": {"claimName": names.pvc}}
        if persistence.enabled
        else {"name": WORKSPACE_VOLUME, "emptyDir": {"sizeLimit": resources.disk}}
    )
    volumes = [workspace]
    if read_only_root:
        # Many tools need a writable /tmp; it counts against the ephemeral-storage limit.
        volumes.append({"name": TMP_VOLUME, "emptyDir": {}})
        container["volumeMounts"].append({"name": TMP_VOLUME, "mountPath": "/tmp"})

    pod_spec: dict[str, Any] = {
        "hostname": names.hostname,
        "restartPolicy": "Never",  # the lifecycle owns restarts (bounded, with a reason in status)
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": security.run_as_user,
            "runAsGroup": security.run_as_group,
            "fsGroup": security.fs_group,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if template_spec.runtime_class_name:
        pod_spec["runtimeClassName"] = template_spec.runtime_class_name
    if template_spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": secret} for secret in template_spec.image_pull_secrets]
    metadata = _metadata(sandbox, names.pod)
    # Selects the NetworkPolicy that governs the pod (a claim relabels a warm pod for its sandbox).
    metadata["labels"][EGRESS_CLASS_LABEL] = egress_class(sandbox.spec, template_spec).value
    if token is not None:
        metadata["annotations"] = {AGENT_TOKEN_ID_ANNOTATION: token.id}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


def build_pvc(sandbox: Sandbox, template: SandboxTemplate) -> dict[str, Any] | None:
    """The workspace PVC, or None when the template has no persistence (the workspace is an emptyDir).

    Its size is the effective disk; a disk above the template maximum raises ResourcesExceedMaxError.
    """
    persistence = template.spec.persistence
    if not persistence.enabled:
        return None
    resources = _effective_resources(sandbox, template)
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": resources.disk}},
    }
    if persistence.storage_class_name:
        spec["storageClassName"] = persistence.storage_class_name
    names = child_names(sandbox.metadata.name or "")
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(sandbox, names.pvc),
        "spec": spec,
    }


def build_service(sandbox: Sandbox, template: SandboxTemplate) -> dict[str, Any]:
    """A headless Service: a stable DNS name for the sandbox pod, no virtual IP to program."""
    name, _, _ = _identity(sandbox)
    return _hashed(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _metadata(sandbox, child_names(name).service),
            "spec": {
                "clusterIP": "None",
                "selector": selector_labels(name),
                "ports": [
                    {"name": port_name, "port": port, "targetPort": port, "protocol": "TCP"}
                    for port_name, port in _all_ports(sandbox, template)
                ],
            },
        }
    )


def _dns_rule(dns_namespace: str, dns_pod_labels: dict[str, str]) -> dict[str, Any]:
    return {
        "to": [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": dns_namespace}},
                "podSelector": {"matchLabels": dict(dns_pod_labels)},
            }
        ],
        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
    }


def _networks(cidrs: Iterable[str]) -> list[IPNetwork]:
    return [ipaddress.ip_network(cidr, strict=False) for cidr in cidrs]


def _excepting(target: IPNetwork, denied: list[IPNetwork]) -> dict[str, Any] | None:
    """An ipBlock for ``target`` with every denied range inside it excepted (an ipBlock's exceptions
    must lie within its CIDR); None when the target is wholly denied."""
    if any(target.version == net.version and target.subnet_of(net) for net in denied):  # type: ignore[arg-type]
        return None
    within = [net for net in denied if net.version == target.version and net.subnet_of(target)]  # type: ignore[arg-type]
    # A range inside another excepted one adds nothing (fd00:ec2::254/128 inside fd00::/8).
    inside = sorted({str(net) for net in within if not any(net != other and net.subnet_of(other) for other in within)})  # type: ignore[arg-type]
    block: dict[str, Any] = {"cidr": str(target)}
    if inside:
        block["except"] = inside
    return {"ipBlock": block}


def _anywhere_but(denied: list[IPNetwork]) -> list[dict[str, Any]]:
    everywhere = [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
    return [block for target in everywhere if (block := _excepting(target, denied)) is not None]


@dataclass(frozen=True)
class PolicySettings:
    """Where the cluster's gateway, operator and DNS run, and its own networks: what every sandbox
    NetworkPolicy admits or keeps out besides the sandbox's own egress."""

    gateway_namespace: str
    dns_namespace: str = DEFAULT_DNS_NAMESPACE
    dns_pod_labels: tuple[tuple[str, str], ...] = DEFAULT_DNS_POD_LABELS
    cluster_cidrs: tuple[str, ...] = tuple(DEFAULT_CLUSTER_CIDRS)


def build_network_policy(
    sandbox: Sandbox,
    template: SandboxTemplate,
    *,
    gateway_namespace: str,
    dns_namespace: str = DEFAULT_DNS_NAMESPACE,
    dns_pod_labels: dict[str, str] | None = None,
    cluster_cidrs: Iterable[str] = DEFAULT_CLUSTER_CIDRS,
) -> dict[str, Any]:
    """The sandbox's own NetworkPolicy (its class is ``own``, see api.egress_class): ingress only
    from the gateway; egress per spec.network, else the template's network (api.resolve_egress;
    always DNS and the gateway).

    - deny: DNS (to the cluster DNS pods) and the gateway only.
    - allow: anywhere except link-local and metadata ranges (ALWAYS_DENIED_CIDRS) and the cluster's
      own networks (``cluster_cidrs``), plus DNS and the gateway.
    - allowList: CIDR entries as ipBlocks (all ports) with the link-local and metadata ranges inside
      them excepted (an entry wholly inside one is dropped); ``host:port`` entries open that port to
      any address ``allow`` reaches, because NetworkPolicy cannot match host names. The hosts are
      listed in an annotation so that an FQDN-aware policy or egress proxy can enforce them.
    """
    settings = PolicySettings(
        gateway_namespace=gateway_namespace,
        dns_namespace=dns_namespace,
        dns_pod_labels=tuple(dns_pod_labels.items()) if dns_pod_labels else DEFAULT_DNS_POD_LABELS,
        cluster_cidrs=tuple(cluster_cidrs),
    )
    name, _, _ = _identity(sandbox)
    return _policy(
        _metadata(sandbox, child_names(name).network_policy),
        selector_labels(name),
        _all_ports(sandbox, template),
        resolve_egress(sandbox.spec, template.spec),
        settings,
    )


def shared_policy_name(template: str, egress: EgressClass) -> str:
    """The NetworkPolicy shared by a namespace's pods of `template` in class `egress`."""
    return bounded_name("sbx-net-", template, f"-{egress.value}")


def shared_policy_selector(template: str, egress: EgressClass) -> dict[str, str]:
    return {MANAGED_BY_LABEL: MANAGED_BY, TEMPLATE_LABEL: label_value(template), EGRESS_CLASS_LABEL: egress.value}


def build_shared_network_policy(
    namespace: str, template: SandboxTemplate, egress: EgressClass, settings: PolicySettings
) -> dict[str, Any]:
    """The NetworkPolicy every pod of `template` in class `egress` in `namespace` shares (sandbox
    pods and warm pool pods alike): the template's ports, and the egress of its class. It has no
    owner: it outlives any one sandbox (and the template, whose retired sandboxes keep running);
    deleting it makes the operator write it again."""
    if not egress.shared:
        raise ValueError("a sandbox of class own has a policy of its own (build_network_policy)")
    template_name = str(template.metadata.name)
    if egress is EgressClass.TEMPLATE:
        network = ResolvedEgress(
            EgressMode.ALLOW_LIST, tuple(template.spec.network.egress_allow or ()), from_template=True
        )
    else:
        network = ResolvedEgress(EgressMode(egress.value), (), from_template=True)
    ports = _named_ports(template.spec.ports or ())
    metadata: dict[str, Any] = {
        "name": shared_policy_name(template_name, egress),
        "namespace": namespace,
        "labels": {NAME_LABEL: "sandbox", **shared_policy_selector(template_name, egress)},
    }
    return _policy(metadata, shared_policy_selector(template_name, egress), ports, network, settings)


def governing_network_policy(
    sandbox: Sandbox, template: SandboxTemplate, settings: PolicySettings
) -> tuple[dict[str, Any], EgressClass]:
    """The NetworkPolicy that should select the sandbox's pod (shared or its own), and its class."""
    egress = egress_class(sandbox.spec, template.spec)
    if egress.shared:
        _, namespace, _ = _identity(sandbox)
        return build_shared_network_policy(namespace, template, egress, settings), egress
    own = build_network_policy(
        sandbox,
        template,
        gateway_namespace=settings.gateway_namespace,
        dns_namespace=settings.dns_namespace,
        dns_pod_labels=dict(settings.dns_pod_labels),
        cluster_cidrs=settings.cluster_cidrs,
    )
    return own, egress


def _policy(
    metadata: dict[str, Any],
    pod_selector: dict[str, str],
    ports: list[tuple[str, int]],
    network: ResolvedEgress,
    settings: PolicySettings,
) -> dict[str, Any]:
    gateway_peer = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": settings.gateway_namespace}},
        "podSelector": {"matchLabels": {COMPONENT_LABEL: GATEWAY_COMPONENT}},
    }
    # The operator scrapes the agent's usage metrics (envd port only).
    operator_peer = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": settings.gateway_namespace}},
        "podSelector": {"matchLabels": {COMPONENT_LABEL: OPERATOR_COMPONENT}},
    }
    ingress = [
        {"from": [gateway_peer], "ports": [{"protocol": "TCP", "port": port} for _, port in ports]},
        {"from": [operator_peer], "ports": [{"protocol": "TCP", "port": ENVD_PORT}]},
    ]
    egress: list[dict[str, Any]] = [
        _dns_rule(settings.dns_namespace, dict(settings.dns_pod_labels)),
        {"to": [gateway_peer]},
    ]
    always_denied = _networks(ALWAYS_DENIED_CIDRS)
    internet = _anywhere_but([*always_denied, *_networks(settings.cluster_cidrs)])
    if network.mode is EgressMode.ALLOW:
        egress.append({"to": internet})
    elif network.mode is EgressMode.ALLOW_LIST:
        targets = _networks(network.cidrs)
        blocks = [block for target in targets if (block := _excepting(target, always_denied)) is not None]
        if blocks:
            egress.append({"to": blocks})
        host_ports = sorted({int(host.rsplit(":", 1)[1]) for host in network.hosts})
        if host_ports:
            egress.append(
                {
                    "to": internet,
                    "ports": [{"protocol": "TCP", "port": port} for port in host_ports],
                }
            )
            metadata["annotations"] = {EGRESS_HOSTS_NOT_ENFORCED_ANNOTATION: ",".join(network.hosts)}
    return _hashed(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": metadata,
            "spec": {
                "podSelector": {"matchLabels": pod_selector},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": ingress,
                "egress": egress,
            },
        }
    )
