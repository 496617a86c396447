"""Every name the project puts on the wire, defined once: API group, labels, annotations, the
finalizer, agent ports, status reasons, condition types and the REST paths of the resources it
reads and writes.

Pure constants and path arithmetic, no I/O: every component (operator, gateway, agent, tests)
imports them from here instead of spelling a string again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

__all__ = [
    "AGENT_PORTS",
    "AGENT_TOKEN_ENV",
    "AGENT_TOKEN_HEADER",
    "AGENT_TOKEN_ID_ANNOTATION",
    "ALWAYS_DENIED_CIDRS",
    "API_KEY_LABEL",
    "API_KEY_NAMESPACES_ANNOTATION",
    "API_VERSION",
    "AUTO_RESUME_ANNOTATION",
    "CLAIMED_FROM_POOL_ANNOTATION",
    "COMPONENT_LABEL",
    "CREATED_BY_ANNOTATION",
    "DEFAULT_CLUSTER_CIDRS",
    "DEFAULT_DNS_NAMESPACE",
    "DEFAULT_DNS_POD_LABELS",
    "EGRESS_CLASS_LABEL",
    "EGRESS_HOSTS_NOT_ENFORCED_ANNOTATION",
    "END_AT_ANNOTATION",
    "ENVD_PORT",
    "EVENTS",
    "EXECUTION_TIMEOUT_PREFIX",
    "FINALIZER",
    "GATEWAY_COMPONENT",
    "GATEWAY_FIELD_MANAGER",
    "GROUP",
    "INTERPRETER_PORT",
    "KOPF_ANNOTATION_PREFIX",
    "LEASES",
    "MANAGED_BY",
    "MANAGED_BY_LABEL",
    "NAME_LABEL",
    "NETWORK_POLICIES",
    "NODES",
    "OPERATOR_COMPONENT",
    "OPERATOR_FIELD_MANAGER",
    "PAUSED_ANNOTATION",
    "PERSISTENT_VOLUME_CLAIMS",
    "PODS",
    "POD_SIGNATURE_ANNOTATION",
    "POOL_LABEL",
    "PUBLIC_TRAFFIC_ANNOTATION",
    "RESERVED_ENV_PREFIXES",
    "RESUME_REQUEST_ANNOTATION",
    "SANDBOXES",
    "SANDBOX_ID_LABEL",
    "SANDBOX_LABEL",
    "SANDBOX_POOLS",
    "SANDBOX_TEMPLATES",
    "SECRETS",
    "SERVICES",
    "SESSION_LABEL",
    "SESSION_TYPE_ANNOTATION",
    "SIGNED_PATH_HEADER",
    "SPEC_HASH_ANNOTATION",
    "TEMPLATE_LABEL",
    "TOKEN_EPOCH_ANNOTATION",
    "TRAFFIC_TOKEN_HEADER",
    "VERSION",
    "ApiResource",
    "ConditionType",
    "PoolReason",
    "Reason",
]

# --- API group ------------------------------------------------------------------------------------

GROUP: Final = "sandbox.dev"
"""API group of Sandbox, SandboxTemplate and SandboxPool."""
VERSION: Final = "v1alpha1"
"""The one served (and stored) version of the group."""
API_VERSION: Final = "sandbox.dev/v1alpha1"
"""apiVersion of the project's objects: GROUP/VERSION (a literal, so that types can name it)."""

# --- labels ---------------------------------------------------------------------------------------

MANAGED_BY_LABEL: Final = "app.kubernetes.io/managed-by"
"""Recommended label: which tool manages the object (value MANAGED_BY)."""
MANAGED_BY: Final = "sandbox-operator"
"""Value of MANAGED_BY_LABEL on every child the operator makes; also its Event source."""
NAME_LABEL: Final = "app.kubernetes.io/name"
"""Recommended label: the application (``sandbox`` on children; the chart's name on its objects)."""
COMPONENT_LABEL: Final = "app.kubernetes.io/component"
"""Recommended label: which part of the application (GATEWAY_COMPONENT, OPERATOR_COMPONENT)."""
GATEWAY_COMPONENT: Final = "gateway"
"""COMPONENT_LABEL value of the gateway's pods (sandbox NetworkPolicies admit them)."""
OPERATOR_COMPONENT: Final = "operator"
"""COMPONENT_LABEL value of the operator's pods (they scrape agents)."""
OPERATOR_FIELD_MANAGER: Final = "sandbox-operator"
"""fieldManager of every write the operator makes (managedFields tell its fields from the user's)."""
GATEWAY_FIELD_MANAGER: Final = "sandbox-gateway"
"""fieldManager of every write the gateway makes."""
SANDBOX_LABEL: Final = "sandbox.dev/sandbox"
"""On a sandbox's children (and a claimed warm pod): the name of the Sandbox they belong to."""
TEMPLATE_LABEL: Final = "sandbox.dev/template"
"""On a sandbox's children: its SandboxTemplate's name (shortened to a label value)."""
SANDBOX_ID_LABEL: Final = "sandbox.dev/sandbox-id"
"""On a sandbox's children: its E2B sandbox ID."""
EGRESS_CLASS_LABEL: Final = "sandbox.dev/egress-class"
"""On a sandbox or warm pod (value: api.EgressClass) and on the NetworkPolicy shared by such pods of
one template and namespace; ``own`` pods are selected by their sandbox's own policy instead."""
POOL_LABEL: Final = "sandbox.dev/pool"
"""On a warm pod and its workspace claim: the SandboxPool that keeps it (removed by a claim)."""
SESSION_LABEL: Final = "sandbox.dev/session"
"""On a Sandbox created by the session API: the session it serves."""
API_KEY_LABEL: Final = "sandbox.dev/api-key"
"""On a Secret in the gateway's namespace (value ``true``): it holds an API key."""

# --- annotations ----------------------------------------------------------------------------------

API_KEY_NAMESPACES_ANNOTATION: Final = "sandbox.dev/namespace"
"""On an API key Secret: the namespace the key grants."""
CREATED_BY_ANNOTATION: Final = "sandbox.dev/created-by"
"""On a Sandbox the gateway created: the client that asked for it."""
SESSION_TYPE_ANNOTATION: Final = "sandbox.dev/session-type"
"""On a session's Sandbox: the sandbox_type its POST /start asked for (code_interpreter, custom)."""
SPEC_HASH_ANNOTATION: Final = "sandbox.dev/spec-hash"
"""On Services and NetworkPolicies: a digest of what the operator applied, to tell a current child."""
EGRESS_HOSTS_NOT_ENFORCED_ANNOTATION: Final = "sandbox.dev/egress-hosts-not-enforced"
"""On a NetworkPolicy: host names of egressAllow that a plain NetworkPolicy cannot enforce."""
POD_SIGNATURE_ANNOTATION: Final = "sandbox.dev/pod-signature"
"""On a warm pod: a digest of its spec, to match it with the pod a Sandbox would get."""
CLAIMED_FROM_POOL_ANNOTATION: Final = "sandbox.dev/claimed-from-pool"
"""On a pod (and claim) a Sandbox took from a pool: the pool's name, for its whole life."""
AGENT_TOKEN_ID_ANNOTATION: Final = "sandbox.dev/agent-token-id"
"""On a sandbox pod: the id its agent's access token derives from (resources.tokens)."""
PAUSED_ANNOTATION: Final = "sandbox.dev/paused"
"""On a Sandbox, set by an API client (the gateway's E2B pause, or kubectl annotate): ``true``
suspends it without a spec change (spec belongs to its author; a GitOps re-apply keeps the pause).
Removed, or any other value, by a resume."""
RESUME_REQUEST_ANNOTATION: Final = "sandbox.dev/resume-request"
"""On a Sandbox, set by an API client: a new value (any; the gateway writes a timestamp) resumes a
sandbox the idle timeout suspended. The operator records the value it saw when it suspended the
sandbox in status.resumeRequestSeen and holds the suspension until the value changes."""
END_AT_ANNOTATION: Final = "sandbox.dev/end-at"
"""On a Sandbox, set by an API client (E2B set_timeout, connect with a timeout): an RFC 3339 time
that replaces creation + maxLifetime as the sandbox's end, capped by the template's
maxLifetimeLimit. Not spec: the lifetime its author declared stays as written."""
TOKEN_EPOCH_ANNOTATION: Final = "sandbox.dev/token-epoch"
"""On a Sandbox, set by its owner: any new value revokes the access tokens the gateway handed out
for it (clients get the new one from connect)."""
AUTO_RESUME_ANNOTATION: Final = "sandbox.dev/auto-resume"
"""On a Sandbox (the gateway's E2B create with ``autoResume: {enabled: true}``, or its owner): ``true``
makes the gateway resume the sandbox, while it is paused, when traffic for it arrives, and hold that
request until the sandbox serves (docs/gateway.md, "Auto-pause and wake on traffic")."""
PUBLIC_TRAFFIC_ANNOTATION: Final = "sandbox.dev/public-traffic"
"""On a Sandbox (the gateway's E2B create with ``network.allowPublicTraffic: false``, or its owner):
``false`` makes its user ports private, reachable through the gateway only with the sandbox's traffic
access token in TRAFFIC_TOKEN_HEADER (else 403). Absent, or any other value: the gateway's default."""
KOPF_ANNOTATION_PREFIX: Final = GROUP
"""Prefix of kopf's own progress annotations: distinct, so another kopf operator never collides."""
FINALIZER: Final = "sandbox.dev/finalizer"
"""kopf's finalizer name, distinct from other kopf operators'; no handler needs one, so no object
carries it (deletion is the API server's, children go by ownerReference garbage collection)."""

# --- headers and environment of the agent -------------------------------------------------------

AGENT_TOKEN_HEADER: Final = "X-Access-Token"
"""The header the agent reads its access token from (E2B's envd header)."""
TRAFFIC_TOKEN_HEADER: Final = "E2B-Traffic-Access-Token"
"""The header E2B clients send a sandbox's trafficAccessToken in (to its ports through the gateway)."""
SIGNED_PATH_HEADER: Final = "X-Sandbox-Signed-Path"
"""Set by the gateway (never by a client) on a /files request it admitted by a signed URL: the one
path the request may read or write."""
AGENT_TOKEN_ENV: Final = "SANDBOX_ACCESS_TOKEN"
"""The agent's access token in its environment (never passed on to the processes it starts)."""
RESERVED_ENV_PREFIXES: Final = ("SANDBOX_", "LD_")
"""Environment names a Sandbox's own env may not set: the agent's settings (the operator's) and the
dynamic loader's variables (a preloaded library would run in the agent too)."""
EXECUTION_TIMEOUT_PREFIX: Final = "Execution timed out after"
"""How the value of the interpreter's own `TimeoutError` line starts (it interrupted the execution)."""

# --- egress ---------------------------------------------------------------------------------------

ALWAYS_DENIED_CIDRS: Final = ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128")
"""Never reachable from a sandbox, whatever its egress: link-local (cloud metadata, which hands out
node credentials) and AWS's IPv6 metadata endpoint."""
DEFAULT_CLUSTER_CIDRS: Final = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fd00::/8")
"""The cluster's own networks that `allow` egress keeps sandboxes off unless --egress-cluster-cidr
says otherwise: pod and service ranges are not discoverable through the API, so every private range."""
DEFAULT_DNS_NAMESPACE: Final = "kube-system"
"""Namespace of the cluster DNS pods that sandbox egress always reaches (--dns-namespace)."""
DEFAULT_DNS_POD_LABELS: Final = (("k8s-app", "kube-dns"),)
"""Labels of the cluster DNS pods that sandbox egress always reaches (--dns-pod-label)."""

# --- agent ports ----------------------------------------------------------------------------------

ENVD_PORT: Final = 49983
"""The agent's envd API (processes, files, /health, /agent/metrics)."""
INTERPRETER_PORT: Final = 49999
"""The agent's code interpreter (/execute, /contexts)."""
AGENT_PORTS: Final = (ENVD_PORT, INTERPRETER_PORT)
"""Ports of the in-sandbox agent; user ports must not shadow them."""


# --- reasons and conditions -----------------------------------------------------------------------


class Reason(enum.StrEnum):
    """Stable, CamelCase reasons of a Sandbox's status.reason, its conditions and its Events."""

    # Creating / Running
    CREATING = "Creating"
    TEMPLATE_NOT_FOUND = "TemplateNotFound"
    POD_PENDING = "PodPending"
    IMAGE_PULL_BACK_OFF = "ImagePullBackOff"
    STARTED = "Started"
    RESUMED = "Resumed"
    POD_NOT_READY = "PodNotReady"
    POD_TERMINATING = "PodTerminating"
    POD_RECREATED = "PodRecreated"
    RECREATE_BACKOFF = "RecreateBackoff"
    NODE_LOST = "NodeLost"
    """The node of the sandbox's pod stopped reporting (its Ready condition is not True): the pod
    waits for it until Kubernetes evicts it, then it is replaced."""
    NODE_RECOVERED = "NodeRecovered"
    """A Normal Event: the pod's node reports again and the same pod serves."""
    # Suspend / resume
    SUSPEND_REQUESTED = "SuspendRequested"
    RESUME_REQUESTED = "ResumeRequested"
    # Termination
    MAX_LIFETIME = "MaxLifetime"
    IDLE_TIMEOUT = "IdleTimeout"
    DELETED = "Deleted"
    TTL_EXPIRED = "TTLExpired"
    # Errors
    POD_FAILED = "PodFailed"
    POD_SUCCEEDED = "PodSucceeded"
    OOM_KILLED = "OOMKilled"
    EVICTED = "Evicted"
    IMAGE_ERROR = "ImageError"
    CONTAINER_CONFIG_ERROR = "ContainerConfigError"
    RECREATE_BUDGET_EXHAUSTED = "RecreateBudgetExhausted"
    RESOURCES_EXCEED_TEMPLATE_MAX = "ResourcesExceedTemplateMax"
    IMAGE_NOT_ALLOWED = "ImageNotAllowed"
    """spec.image is neither the template's image nor allowed by its imagePolicy: no pod is made."""
    TEMPLATE_NOT_ALLOWED = "TemplateNotAllowed"
    """The template's allowedNamespaces do not include the Sandbox's namespace: nothing is made."""
    WORKSPACE_LOST = "WorkspaceLost"
    # Error → Creating
    RETRYING = "Retrying"
    SPEC_CHANGED = "SpecChanged"


class PoolReason(enum.StrEnum):
    """Reasons of a SandboxPool's Ready, Reconciling and Stalled conditions."""

    FILLED = "Filled"
    FILLING = "Filling"
    DRAINING = "Draining"
    """More ready warm pods than spec.size: the surplus is being deleted."""
    TEMPLATE_NOT_FOUND = "TemplateNotFound"
    TEMPLATE_NOT_ALLOWED = "TemplateNotAllowed"  # the template's allowedNamespaces exclude the pool's


class ConditionType(enum.StrEnum):
    """Condition types the operator writes."""

    READY = "Ready"
    SUSPENDED = "Suspended"
    TERMINATED = "Terminated"
    RECONCILING = "Reconciling"
    """kstatus's abnormal-true condition: True only while the operator converges on the spec."""
    STALLED = "Stalled"
    """kstatus's abnormal-true condition: True when the spec cannot be reached without a change
    (Error, a refused resume, a missing or refused template); its reason says why."""


# --- REST paths -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApiResource:
    """A namespaced resource of the Kubernetes API and the paths to it."""

    group: str  # "" for the core group
    version: str
    plural: str

    @property
    def prefix(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    def collection(self, namespace: str | None = None) -> str:
        """The collection in one namespace, or across all of them (for list and watch)."""
        if namespace is None:
            return f"{self.prefix}/{self.plural}"
        return f"{self.prefix}/namespaces/{namespace}/{self.plural}"

    def path(self, namespace: str | None, name: str, subresource: str = "") -> str:
        """One object (namespace None: a cluster-scoped one), or one of its subresources (``status``,
        ``scale``)."""
        base = f"{self.collection(namespace)}/{name}"
        return f"{base}/{subresource}" if subresource else base


SANDBOXES: Final = ApiResource(GROUP, VERSION, "sandboxes")
SANDBOX_TEMPLATES: Final = ApiResource(GROUP, VERSION, "sandboxtemplates")
"""Cluster-scoped: its paths take no namespace."""
SANDBOX_POOLS: Final = ApiResource(GROUP, VERSION, "sandboxpools")
PODS: Final = ApiResource("", "v1", "pods")
PERSISTENT_VOLUME_CLAIMS: Final = ApiResource("", "v1", "persistentvolumeclaims")
SERVICES: Final = ApiResource("", "v1", "services")
SECRETS: Final = ApiResource("", "v1", "secrets")
EVENTS: Final = ApiResource("", "v1", "events")
NETWORK_POLICIES: Final = ApiResource("networking.k8s.io", "v1", "networkpolicies")
NODES: Final = ApiResource("", "v1", "nodes")
"""Cluster-scoped: read (get only) when a sandbox pod's node may be lost."""
LEASES: Final = ApiResource("coordination.k8s.io", "v1", "leases")
"""The operator's leader election Lease (controller.leader)."""
