"""The ``sandbox.dev/v1alpha1`` API: Sandbox, SandboxTemplate and SandboxPool.

These models are the one source of truth: ``crdgen`` turns them into ``crds/*.yaml`` (schemas,
defaults, CEL rules, printer columns) and the operator parses every object it reads through them.
Wire names are camelCase; Python attributes are snake_case (either is accepted on input).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import AliasGenerator, BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from ._schema import (
    CelRules,
    Duration,
    EgressTarget,
    EnvMap,
    ImagePattern,
    LabelMap,
    NamespaceName,
    Port,
    Quantity,
    ResourceName,
    TenantEnvMap,
    cel,
    cel_duration,
    cel_is_duration,
    cel_quantity,
    with_rules,
)
from .names import AGENT_PORTS, API_VERSION
from .quantity import parse_duration, parse_quantity

SANDBOX_NAME_MAX = 63
CATEGORIES = ("sandbox-operator",)
"""The CRDs' category: ``kubectl get sandbox-operator`` lists Sandboxes, SandboxPools and
SandboxTemplates. Not ``sandbox`` nor ``sandboxes``: kubectl expands a category before it resolves
a resource name, so ``kubectl get sandbox NAME`` would ask for all three kinds and fail."""


class _Model(BaseModel):
    """Spec-side models: camelCase on the wire, unknown fields refused (the API server does too)."""

    model_config = ConfigDict(
        alias_generator=AliasGenerator(alias=to_camel),
        populate_by_name=True,
        extra="forbid",
    )


class _StatusModel(BaseModel):
    """Status-side models: tolerant of fields a newer operator may have written."""

    model_config = ConfigDict(alias_generator=AliasGenerator(alias=to_camel), populate_by_name=True, extra="ignore")


# --- Enums ----------------------------------------------------------------------------------------


class Phase(enum.StrEnum):
    """Lifecycle phase of a Sandbox (docs/design.md §4)."""

    CREATING = "Creating"
    RUNNING = "Running"
    SUSPENDING = "Suspending"
    SUSPENDED = "Suspended"
    RESUMING = "Resuming"
    TERMINATING = "Terminating"
    TERMINATED = "Terminated"
    ERROR = "Error"


class OnIdle(enum.StrEnum):
    """What the idle timeout does: suspend keeps the workspace, terminate ends the sandbox."""

    SUSPEND = "suspend"
    TERMINATE = "terminate"


class EgressMode(enum.StrEnum):
    """Outbound network policy of a sandbox."""

    DENY = "deny"
    ALLOW = "allow"
    ALLOW_LIST = "allowList"


class ConditionStatus(enum.StrEnum):
    """Status of a condition, as in every Kubernetes condition."""

    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class ImagePolicyMode(enum.StrEnum):
    """Which images a template's sandboxes may run (spec.image)."""

    TEMPLATE = "Template"
    ALLOW_LIST = "AllowList"
    ANY = "Any"


class ImagePullPolicy(enum.StrEnum):
    """When the kubelet pulls the sandbox image."""

    ALWAYS = "Always"
    IF_NOT_PRESENT = "IfNotPresent"
    NEVER = "Never"


# --- Shared pieces --------------------------------------------------------------------------------


class SandboxResources(_Model):
    """Resource amounts of one sandbox, as Kubernetes quantities. Unset values come from the template."""

    cpu: Quantity | None = Field(
        default=None, description="CPU, e.g. 500m or 2. Becomes the container's CPU request and limit."
    )
    memory: Quantity | None = Field(
        default=None,
        description="Memory, e.g. 512Mi or 2Gi. Becomes the container's memory request and limit.",
    )
    disk: Quantity | None = Field(
        default=None,
        description="Size of the workspace volume mounted at the template's mount path, e.g. 1Gi or 10Gi.",
    )


def _duration_rules(subject: str) -> tuple[dict[str, str], ...]:
    """CEL rules every timeouts object shares: idle and execution fit within maxLifetime."""
    rules = []
    for name in ("idle", "execution"):
        both_valid = f"{cel_is_duration('self.' + name)} && {cel_is_duration('self.maxLifetime')}"
        rules.append(
            cel(
                f"!has(self.{name}) || !has(self.maxLifetime) || !({both_valid}) || "
                f"{cel_duration('self.maxLifetime')} == duration('0s') || "
                f"{cel_duration('self.' + name)} <= {cel_duration('self.maxLifetime')}",
                f"{subject}.{name} must not be longer than {subject}.maxLifetime (0 means no limit)",
                field_path=f".{name}",
                reason="FieldValueInvalid",
            )
        )
    return tuple(rules)


def _check_within_lifetime(idle: str | None, execution: str | None, max_lifetime: str | None, subject: str) -> None:
    if max_lifetime is None or parse_duration(max_lifetime) == 0:
        return
    limit = parse_duration(max_lifetime)
    for name, value in (("idle", idle), ("execution", execution)):
        if value is not None and parse_duration(value) > limit:
            raise ValueError(f"{subject}.{name} must not be longer than {subject}.maxLifetime (0 means no limit)")


_IDLE_DESCRIPTION = (
    "How long the sandbox may go without activity (API calls, commands, code runs) before onIdle applies. "
    "A duration such as 300s, 30m or 1h30m; 0 disables it."
)
_LIFETIME_DESCRIPTION = (
    "How long the sandbox may exist in total, counted from creation, before it is terminated. "
    "A duration such as 1h or 24h; 0 disables it."
)
_EXECUTION_DESCRIPTION = (
    "Longest a single command or code execution may run before it is interrupted. "
    "A duration such as 300s or 5m; 0 disables it."
)


class SandboxTimeouts(_Model):
    """Timeouts of one sandbox. Unset values come from the template's timeouts."""

    model_config = ConfigDict(json_schema_extra=with_rules(*_duration_rules("timeouts")))

    idle: Duration | None = Field(default=None, description=_IDLE_DESCRIPTION)
    max_lifetime: Duration | None = Field(default=None, description=_LIFETIME_DESCRIPTION)
    execution: Duration | None = Field(default=None, description=_EXECUTION_DESCRIPTION)

    @model_validator(mode="after")
    def _within_lifetime(self) -> Self:
        _check_within_lifetime(self.idle, self.execution, self.max_lifetime, "timeouts")
        return self


_EGRESS_RULES = (
    cel(
        "(has(self.egress) && self.egress == 'allowList') || !has(self.egressAllow) || size(self.egressAllow) == 0",
        "egressAllow is only used when egress is allowList",
        field_path=".egressAllow",
        reason="FieldValueForbidden",
    ),
    cel(
        "!has(self.egress) || self.egress != 'allowList' || (has(self.egressAllow) && size(self.egressAllow) > 0)",
        "egress allowList needs at least one egressAllow entry",
        field_path=".egressAllow",
        reason="FieldValueRequired",
    ),
)


class TemplateNetwork(_Model):
    """Network settings of a template's sandboxes (egress, a Service); a Sandbox's own win."""

    model_config = ConfigDict(json_schema_extra=with_rules(*_EGRESS_RULES))

    egress: EgressMode | None = Field(
        default=None,
        description=(
            "Outbound traffic: deny (only DNS and the gateway), allow (anything), "
            "or allowList (only the destinations in egressAllow). Unset on a Sandbox: its "
            "template's network (egress and egressAllow); unset there too: deny."
        ),
    )
    egress_allow: list[EgressTarget] | None = Field(
        default=None,
        max_length=64,
        description=(
            "Destinations reachable when egress is allowList: CIDRs (10.0.0.0/8, fd00::/8) "
            "or host:port entries (pypi.org:443)."
        ),
    )

    service: bool | None = Field(
        default=None,
        description=(
            "A headless Service per sandbox (DNS name sbx-<name>.<namespace>.svc for in-cluster clients). "
            "Unset on a Sandbox: its template's; unset there too: none. The gateway reaches sandboxes by "
            "pod IP either way (status.endpoint), so a Service is only for other in-cluster clients."
        ),
    )

    @model_validator(mode="after")
    def _egress_consistent(self) -> Self:
        if self.egress is not EgressMode.ALLOW_LIST and self.egress_allow:
            raise ValueError("egressAllow is only used when egress is allowList")
        if self.egress is EgressMode.ALLOW_LIST and not self.egress_allow:
            raise ValueError("egress allowList needs at least one egressAllow entry")
        return self


class NetworkSpec(TemplateNetwork):
    """Network access of a sandbox."""

    model_config = ConfigDict(
        json_schema_extra=with_rules(
            *_EGRESS_RULES,
            cel(
                "!has(self.ports) || self.ports.all(port, " + " && ".join(f"port != {p}" for p in AGENT_PORTS) + ")",
                f"ports {' and '.join(map(str, AGENT_PORTS))} are reserved for the sandbox agent",
                field_path=".ports",
                reason="FieldValueForbidden",
            ),
        )
    )

    ports: list[Port] | None = Field(
        default=None,
        max_length=16,
        description="TCP ports inside the sandbox that the gateway exposes as {port}-{sandboxID}.{domain}.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )

    @model_validator(mode="after")
    def _ports_free(self) -> Self:
        if self.ports and set(self.ports) & set(AGENT_PORTS):
            raise ValueError(f"ports {' and '.join(map(str, AGENT_PORTS))} are reserved for the sandbox agent")
        if self.ports and len(set(self.ports)) != len(self.ports):
            raise ValueError("ports must not repeat")
        return self


# metav1.Condition's validation (k8s.io/apimachinery/pkg/apis/meta/v1/types.go), verbatim.
CONDITION_TYPE_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
)
CONDITION_REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"


class Condition(_StatusModel):
    """A kstatus-style condition, as strict as metav1.Condition (Ready, Reconciling, Stalled, ...)."""

    type: str = Field(
        max_length=316,
        pattern=CONDITION_TYPE_PATTERN,
        description="Condition type in CamelCase, e.g. Ready or Suspended (optionally prefixed by a DNS subdomain/).",
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    # metav1.Condition requires reason, message and lastTransitionTime; every writer of the operator
    # (lifecycle.status.merge_conditions, lifecycle.pool.pool_status_patch) always writes all three.
    reason: str = Field(
        min_length=1,
        max_length=1024,
        pattern=CONDITION_REASON_PATTERN,
        description="Machine-readable CamelCase reason for the last transition.",
    )
    message: str = Field(max_length=32768, description="Human-readable details of the last transition.")
    last_transition_time: datetime = Field(description="When the condition last changed status (RFC 3339).")
    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation the condition was computed from."
    )


_CONDITIONS_EXTRA: dict[str, Any] = {
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
}


class ObjectMeta(BaseModel):
    """The parts of Kubernetes object metadata the operator reads; everything else is kept as is."""

    model_config = ConfigDict(alias_generator=AliasGenerator(alias=to_camel), populate_by_name=True, extra="allow")

    name: str | None = None
    generate_name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    resource_version: str | None = None
    generation: int | None = None
    creation_timestamp: datetime | None = None
    deletion_timestamp: datetime | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    finalizers: list[str] = Field(default_factory=list)
    owner_references: list[dict[str, Any]] = Field(default_factory=list)


def _plain(value: Any) -> Any:
    """Deep-copy Mapping/sequence views (e.g. kopf bodies) into plain dicts and lists."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


@dataclass(frozen=True)
class PrinterColumn:
    """One ``additionalPrinterColumns`` entry of a CRD."""

    name: str
    json_path: str
    type: str = "string"
    priority: int = 0
    description: str = ""


@dataclass(frozen=True)
class CrdInfo:
    """What the CRD of a kind needs besides the schema."""

    plural: str
    singular: str
    scope: Literal["Namespaced", "Cluster"]
    description: str
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    printer_columns: tuple[PrinterColumn, ...] = ()
    status_subresource: bool = True
    scale: Mapping[str, str] | None = None
    root_rules: tuple[dict[str, str], ...] = ()


class _Resource(BaseModel):
    """A whole object: apiVersion, kind, metadata, spec (and status)."""

    model_config = ConfigDict(alias_generator=AliasGenerator(alias=to_camel), populate_by_name=True, extra="ignore")

    crd: ClassVar[CrdInfo]

    api_version: Literal["sandbox.dev/v1alpha1"] = API_VERSION
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Self:
        """Parse an object as the API server (or kopf) hands it over."""
        return cls.model_validate(_plain(body))

    def to_body(self) -> dict[str, Any]:
        """The object as JSON-ready camelCase dict, without unset optional fields."""
        body: dict[str, Any] = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return body


# --- Sandbox --------------------------------------------------------------------------------------


class SandboxSpec(_Model):
    """Desired state of a sandbox."""

    template: Annotated[
        ResourceName,
        CelRules(
            (
                cel(
                    "self == oldSelf",
                    "template is immutable: create a new Sandbox instead",
                    reason="FieldValueForbidden",
                ),
            )
        ),
    ] = Field(description="Name of the cluster-scoped SandboxTemplate this sandbox is made from. Immutable.")
    image: str | None = Field(
        default=None,
        min_length=1,
        max_length=512,
        description="Container image overriding the template's image, e.g. registry.example.com/python:3.12.",
    )
    resources: SandboxResources | None = Field(
        default=None,
        description=(
            "CPU, memory and workspace disk. Unset values come from the template's resources.default; "
            "values above the template's resources.max put the sandbox in phase Error."
        ),
    )
    network: NetworkSpec = Field(
        default_factory=NetworkSpec,
        description="Egress policy and exposed ports; egress unset follows the template's network.",
        json_schema_extra={"default": {}},
    )
    timeouts: SandboxTimeouts | None = Field(
        default=None,
        description="Idle, lifetime and execution timeouts. Unset values come from the template's timeouts.",
    )
    on_idle: OnIdle = Field(
        default=OnIdle.SUSPEND,
        description="What the idle timeout does: suspend (delete the pod, keep the workspace) or terminate.",
    )
    on_lifetime_end: OnIdle = Field(
        default=OnIdle.TERMINATE,
        description=(
            "What the end of the lifetime (timeouts.maxLifetime, or the sandbox.dev/end-at an API client "
            "set) does: terminate, or suspend (delete the pod, keep the workspace; E2B's autoPause). "
            "A suspension by it is held until the sandbox.dev/resume-request annotation changes, and a "
            "resume needs a later end (sandbox.dev/end-at or a longer maxLifetime)."
        ),
    )
    suspended: bool = Field(
        default=False,
        description="Desired state: true suspends the sandbox (pod deleted, workspace kept), false runs it.",
    )
    env: TenantEnvMap | None = Field(
        default=None,
        description=(
            "Environment variables added to (and overriding) the template's env; names starting with "
            "SANDBOX_ or LD_ are reserved."
        ),
    )
    metadata: LabelMap | None = Field(
        default=None,
        description=("Free-form key/value metadata, returned by the E2B API; allow-listed keys become metric labels."),
    )
    ttl_after_terminated: Duration | None = Field(
        default=None,
        description=(
            "How long a Terminated sandbox object is kept before the operator deletes it. "
            "Unset keeps it until deleted; 0 deletes it right away."
        ),
    )


class ResourceUsage(_StatusModel):
    """Latest resource usage sample of the sandbox."""

    cpu_cores: float | None = Field(default=None, ge=0, description="CPU in use, in cores (0.25 = 250m).")
    memory_bytes: int | None = Field(default=None, ge=0, description="Memory working set in bytes.")
    disk_bytes: int | None = Field(default=None, ge=0, description="Bytes used on the workspace volume.")
    rx_bytes: int | None = Field(default=None, ge=0, description="Bytes received since the pod started.")
    tx_bytes: int | None = Field(default=None, ge=0, description="Bytes sent since the pod started.")
    processes: int | None = Field(default=None, ge=0, description="Number of processes in the sandbox.")
    collected_at: datetime | None = Field(default=None, description="When this sample was taken (RFC 3339).")


class SuspendCause(enum.StrEnum):
    """Why a sandbox is suspended (status.suspendedBy)."""

    SPEC = "Spec"  # spec.suspended: true
    REQUEST = "Request"  # the sandbox.dev/paused annotation (E2B pause)
    IDLE_TIMEOUT = "IdleTimeout"  # held until a new sandbox.dev/resume-request
    MAX_LIFETIME = "MaxLifetime"  # onLifetimeEnd: suspend; held until a new sandbox.dev/resume-request


class SandboxStatus(_StatusModel):
    """Observed state of a sandbox, written by the operator."""

    phase: Phase | None = Field(
        default=None,
        description="Lifecycle phase: Creating, Running, Suspending, Suspended, Resuming, Terminating, "
        "Terminated or Error.",
    )
    sandbox_id: str | None = Field(
        default=None,
        alias="sandboxID",
        max_length=64,
        pattern=r"^[a-z0-9]+$",
        description="E2B sandbox ID: lowercase letters and digits only, unique in the cluster.",
    )
    pod_name: str | None = Field(default=None, max_length=253, description="Name of the sandbox's pod.")
    pod_ip: str | None = Field(
        default=None, alias="podIP", max_length=64, description="IP address of the sandbox's pod."
    )
    endpoint: str | None = Field(
        default=None,
        max_length=512,
        description="Address of the sandbox's agent (envd) as the gateway reaches it.",
    )
    agent_token_id: str | None = Field(
        default=None,
        max_length=64,
        description=(
            "Id of the current pod's agent access token; the token derives from it and a key only the "
            "operator and the gateway hold (the id alone grants nothing)."
        ),
    )
    started_at: datetime | None = Field(default=None, description="When the sandbox first became Running.")
    last_activity_at: datetime | None = Field(
        default=None, description="Last recorded activity; the idle timeout counts from here."
    )
    expires_at: datetime | None = Field(
        default=None, description="When maxLifetime ends the sandbox; unset when there is no limit."
    )
    idle_deadline: datetime | None = Field(
        default=None, description="When the idle timeout fires if there is no further activity."
    )
    terminated_at: datetime | None = Field(
        default=None, description="When the sandbox reached Terminated; ttlAfterTerminated counts from here."
    )
    recreate_attempts: int | None = Field(
        default=None,
        ge=0,
        le=1000,
        description="Pods recreated after being lost or failing since the sandbox last ran stably.",
    )
    last_recreate_at: datetime | None = Field(
        default=None, description="When the operator last recreated the sandbox's pod."
    )
    suspended_by: SuspendCause | None = Field(
        default=None,
        description=(
            "Why the sandbox is suspended, while Suspending or Suspended: Spec (spec.suspended), Request "
            "(the sandbox.dev/paused annotation), IdleTimeout or MaxLifetime (the operator's decision, held "
            "until the sandbox.dev/resume-request annotation changes; spec is never written)."
        ),
    )
    resume_request_seen: str | None = Field(
        default=None,
        max_length=256,
        description=(
            "The sandbox.dev/resume-request annotation (first 256 characters) when the idle timeout "
            "suspended the sandbox: a different value resumes it."
        ),
    )
    conditions: list[Condition] | None = Field(
        default=None,
        max_length=16,
        description="Current conditions, one per type: Ready, and for a Sandbox Suspended and Terminated.",
        json_schema_extra=_CONDITIONS_EXTRA,
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation of the spec this status reflects."
    )
    reason: str | None = Field(
        default=None,
        max_length=1024,
        description="Why the sandbox is in Error or terminated, in CamelCase (IdleTimeout, OOMKilled, ...).",
    )
    message: str | None = Field(default=None, max_length=32768, description="Human-readable details of reason.")
    usage: ResourceUsage | None = Field(default=None, description="Latest resource usage sample.")

    def condition(self, condition_type: str) -> Condition | None:
        """The condition of that type, if present."""
        return next((c for c in self.conditions or () if c.type == condition_type), None)


class Sandbox(_Resource):
    """An isolated code-execution environment made from a SandboxTemplate."""

    crd: ClassVar[CrdInfo] = CrdInfo(
        plural="sandboxes",
        singular="sandbox",
        scope="Namespaced",
        short_names=("sbx",),
        categories=CATEGORIES,
        description="An isolated code-execution environment (an E2B sandbox) made from a SandboxTemplate.",
        printer_columns=(
            PrinterColumn("Phase", ".status.phase", description="Lifecycle phase."),
            PrinterColumn("Ready", '.status.conditions[?(@.type=="Ready")].status', description="Ready condition."),
            PrinterColumn("Reason", ".status.reason", description="Why it is in its phase (CamelCase)."),
            PrinterColumn("Template", ".spec.template", description="SandboxTemplate name."),
            PrinterColumn("Age", ".metadata.creationTimestamp", "date", description="Time since creation."),
            # A string, not a date: kubectl renders future dates as "<invalid>".
            PrinterColumn("Expires", ".status.expiresAt", description="When maxLifetime ends it (RFC 3339)."),
            PrinterColumn("ID", ".status.sandboxID", priority=1, description="E2B sandbox ID."),
            PrinterColumn("Pod", ".status.podName", priority=1, description="Pod name."),
            PrinterColumn("IP", ".status.podIP", priority=1, description="Pod IP."),
        ),
        # No fieldPath: the API server takes only a path the schema declares, and metadata declares
        # nothing (crdgen.build_crd); the messages name the field instead.
        root_rules=(
            cel(
                f"size(self.metadata.name) <= {SANDBOX_NAME_MAX}",
                f"metadata.name: Sandbox names must be at most {SANDBOX_NAME_MAX} characters: pod, service and "
                "volume names are derived from them",
                reason="FieldValueInvalid",
            ),
            cel(
                r"self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')",
                "metadata.name: Sandbox names must be DNS labels: lowercase letters, digits and '-', no '.'",
                reason="FieldValueInvalid",
            ),
        ),
    )

    kind: Literal["Sandbox"] = "Sandbox"
    spec: SandboxSpec
    status: SandboxStatus = Field(default_factory=SandboxStatus)


# --- SandboxTemplate ------------------------------------------------------------------------------


def _default_within_max_rules() -> tuple[dict[str, str], ...]:
    rules = []
    for name in ("cpu", "memory", "disk"):
        default, maximum = f"self.default.{name}", f"self.max.{name}"
        rules.append(
            cel(
                f"!has(self.max) || !has(self.max.{name}) || !has(self.default.{name}) || "
                f"!isQuantity(string({default})) || !isQuantity(string({maximum})) || "
                f"{cel_quantity(default)}.compareTo({cel_quantity(maximum)}) <= 0",
                f"resources.default.{name} must not be more than resources.max.{name}",
                field_path=f".default.{name}",
                reason="FieldValueInvalid",
            )
        )
    return tuple(rules)


class TemplateResourceDefaults(_Model):
    """Resources a sandbox gets when its spec does not set them."""

    cpu: Quantity = Field(default="1", description="Default CPU, e.g. 500m or 2.")
    memory: Quantity = Field(default="512Mi", description="Default memory, e.g. 512Mi or 2Gi.")
    disk: Quantity = Field(default="1Gi", description="Default workspace volume size, e.g. 1Gi.")


class TemplateResources(_Model):
    """Default and maximum resources of sandboxes made from the template."""

    model_config = ConfigDict(json_schema_extra=with_rules(*_default_within_max_rules()))

    default: TemplateResourceDefaults = Field(
        default_factory=TemplateResourceDefaults,
        description="Resources used when a Sandbox does not set them.",
        json_schema_extra={"default": {}},
    )
    max: SandboxResources | None = Field(
        default=None,
        description="Largest resources a Sandbox may ask for; unset values are not capped.",
    )

    @model_validator(mode="after")
    def _default_within_max(self) -> Self:
        if self.max is None:
            return self
        for name in ("cpu", "memory", "disk"):
            limit = getattr(self.max, name)
            if limit is not None and parse_quantity(getattr(self.default, name)) > parse_quantity(limit):
                raise ValueError(f"resources.default.{name} must not be more than resources.max.{name}")
        return self


_LIFETIME_LIMIT_MESSAGE = "timeouts.maxLifetimeLimit must be longer than 0 (leave it unset for no cap)"


class TemplateTimeouts(_Model):
    """Timeouts a sandbox gets when its spec does not set them, and the cap on its lifetime."""

    model_config = ConfigDict(
        json_schema_extra=with_rules(
            *_duration_rules("timeouts"),
            cel(
                f"!has(self.maxLifetimeLimit) || !{cel_is_duration('self.maxLifetimeLimit')} || "
                f"{cel_duration('self.maxLifetimeLimit')} > duration('0s')",
                _LIFETIME_LIMIT_MESSAGE,
                field_path=".maxLifetimeLimit",
                reason="FieldValueInvalid",
            ),
        )
    )

    idle: Duration = Field(default="30m", description=_IDLE_DESCRIPTION)
    max_lifetime: Duration = Field(default="1h", description=_LIFETIME_DESCRIPTION)
    execution: Duration = Field(default="5m", description=_EXECUTION_DESCRIPTION)
    max_lifetime_limit: Duration | None = Field(
        default=None,
        description=(
            "Longest maxLifetime any sandbox of this template gets, e.g. 24h: a longer one, or 0 (no limit), "
            "is clamped to it (so is the template's own maxLifetime). Unset: no cap."
        ),
    )

    @model_validator(mode="after")
    def _within_lifetime(self) -> Self:
        _check_within_lifetime(self.idle, self.execution, self.max_lifetime, "timeouts")
        if self.max_lifetime_limit is not None and parse_duration(self.max_lifetime_limit) == 0:
            raise ValueError(_LIFETIME_LIMIT_MESSAGE)
        return self


class ImagePolicy(_Model):
    """Which images a Sandbox of the template may ask for in spec.image. The operator enforces it (the
    API server cannot: the template is another object): a refused image gets no pod."""

    model_config = ConfigDict(
        json_schema_extra=with_rules(
            cel(
                "self.mode == 'AllowList' || !has(self.allow) || size(self.allow) == 0",
                "imagePolicy.allow is only used when mode is AllowList",
                field_path=".allow",
                reason="FieldValueForbidden",
            ),
            cel(
                "self.mode != 'AllowList' || (has(self.allow) && size(self.allow) > 0)",
                "imagePolicy mode AllowList needs at least one allow entry",
                field_path=".allow",
                reason="FieldValueRequired",
            ),
        )
    )

    mode: ImagePolicyMode = Field(
        default=ImagePolicyMode.TEMPLATE,
        description=(
            "Template: only the template's image; AllowList: the template's image or one matching an allow "
            "entry; Any: any image (only for templates every tenant may run anything with)."
        ),
    )
    allow: list[ImagePattern] | None = Field(
        default=None,
        max_length=64,
        description=(
            "Images allowed with mode AllowList: a prefix ending in '/' (registry.example.com/team/ allows "
            "everything below it), a glob whose * and ? never match '/' (docker.io/library/python:3.*), or "
            "an exact reference. Matched against spec.image as written (python:3.12 is not "
            "docker.io/library/python:3.12)."
        ),
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )

    @model_validator(mode="after")
    def _allow_consistent(self) -> Self:
        if self.mode is not ImagePolicyMode.ALLOW_LIST and self.allow:
            raise ValueError("imagePolicy.allow is only used when mode is AllowList")
        if self.mode is ImagePolicyMode.ALLOW_LIST and not self.allow:
            raise ValueError("imagePolicy mode AllowList needs at least one allow entry")
        if self.allow and len(set(self.allow)) != len(self.allow):
            raise ValueError("imagePolicy.allow entries must not repeat")
        return self


class Persistence(_Model):
    """The workspace volume. Its size is resources.disk (template default, capped by resources.max)."""

    enabled: bool = Field(
        default=True,
        description="Give each sandbox a PersistentVolumeClaim that survives suspend/resume; "
        "false uses an emptyDir that is lost on suspend.",
    )
    storage_class_name: ResourceName | None = Field(
        default=None, description="StorageClass of the workspace claims; unset uses the cluster default."
    )
    mount_path: str = Field(
        default="/home/user",
        min_length=1,
        max_length=1024,
        pattern=r"^/",
        description="Absolute path where the workspace is mounted in the sandbox (E2B uses /home/user).",
    )


class SecuritySettings(_Model):
    """Pod security of sandboxes. Privilege escalation, capabilities and the service-account token
    are always off and seccomp is always RuntimeDefault; these are the choices a template may make."""

    run_as_user: int = Field(default=1000, ge=1, le=2147483647, description="UID of the sandbox processes; never 0.")
    run_as_group: int = Field(default=1000, ge=1, le=2147483647, description="GID of the sandbox processes.")
    fs_group: int = Field(default=1000, ge=1, le=2147483647, description="Group that owns the workspace volume.")
    read_only_root_filesystem: bool = Field(
        default=False,
        description="Mount the image's root filesystem read-only (the workspace and /tmp stay writable).",
    )


class SandboxTemplateSpec(_Model):
    """How sandboxes of this template are built."""

    image: str = Field(
        min_length=1,
        max_length=512,
        description="Container image that runs the sandbox agent, e.g. ghcr.io/x/y:1.",
    )
    image_pull_policy: ImagePullPolicy | None = Field(
        default=None, description="Always, IfNotPresent or Never; unset follows the Kubernetes default."
    )
    image_policy: ImagePolicy = Field(
        default_factory=ImagePolicy,
        description="Which images a Sandbox may ask for in spec.image; by default only this template's image.",
        json_schema_extra={"default": {"mode": "Template"}},
    )
    allowed_namespaces: list[NamespaceName] | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description=(
            "Namespaces whose Sandboxes may use this template; a Sandbox elsewhere goes to Error "
            "(TemplateNotAllowed). Unset: every namespace."
        ),
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    command: list[Annotated[str, Field(max_length=4096)]] | None = Field(
        default=None,
        max_length=64,
        description="Entrypoint override (the image's ENTRYPOINT when unset). Must start the sandbox agent.",
    )
    args: list[Annotated[str, Field(max_length=4096)]] | None = Field(
        default=None, max_length=256, description="Arguments to the entrypoint (the image's CMD when unset)."
    )
    env: EnvMap | None = Field(default=None, description="Environment variables of every sandbox of this template.")
    resources: TemplateResources = Field(
        default_factory=TemplateResources,
        description="Default and maximum resources.",
        json_schema_extra={"default": {}},
    )
    runtime_class_name: ResourceName | None = Field(
        default=None, description="RuntimeClass for stronger isolation, e.g. gvisor or kata; unset uses runc."
    )
    image_pull_secrets: list[ResourceName] | None = Field(
        default=None,
        max_length=16,
        description=(
            "Secrets (docker-registry type) in each sandbox's namespace that the kubelet uses to pull the "
            "image from a private registry; the pod's imagePullSecrets."
        ),
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    timeouts: TemplateTimeouts = Field(
        default_factory=TemplateTimeouts,
        description="Timeouts used when a Sandbox does not set them.",
        json_schema_extra={"default": {}},
    )
    persistence: Persistence = Field(
        default_factory=Persistence,
        description="The workspace volume.",
        json_schema_extra={"default": {}},
    )
    security: SecuritySettings = Field(
        default_factory=SecuritySettings,
        description="User, group and root-filesystem settings of the sandbox pod.",
        json_schema_extra={"default": {}},
    )
    network: TemplateNetwork = Field(
        default_factory=TemplateNetwork,
        description=(
            "Default egress of this template's sandboxes (a Sandbox's own spec.network.egress wins), "
            "e.g. allowList to the package index for a code interpreter. Unset: deny."
        ),
        json_schema_extra={"default": {}},
    )
    ports: (
        Annotated[
            list[Port],
            CelRules(
                (
                    cel(
                        "self.all(port, " + " && ".join(f"port != {p}" for p in AGENT_PORTS) + ")",
                        f"ports {' and '.join(map(str, AGENT_PORTS))} are reserved for the sandbox agent",
                        reason="FieldValueForbidden",
                    ),
                )
            ),
        ]
        | None
    ) = Field(
        default=None,
        max_length=16,
        description="TCP ports every sandbox of this template exposes through the gateway.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )

    @model_validator(mode="after")
    def _ports_free(self) -> Self:
        if self.ports and set(self.ports) & set(AGENT_PORTS):
            raise ValueError(f"ports {' and '.join(map(str, AGENT_PORTS))} are reserved for the sandbox agent")
        if self.allowed_namespaces and len(set(self.allowed_namespaces)) != len(self.allowed_namespaces):
            raise ValueError("allowedNamespaces must not repeat")
        return self


class SandboxTemplate(_Resource):
    """A cluster-wide recipe for sandboxes (like a StorageClass for volumes)."""

    crd: ClassVar[CrdInfo] = CrdInfo(
        plural="sandboxtemplates",
        singular="sandboxtemplate",
        scope="Cluster",
        short_names=("sbxt",),
        categories=CATEGORIES,
        description="A cluster-wide recipe for sandboxes: image, resources, timeouts, persistence, security.",
        printer_columns=(
            PrinterColumn("Image", ".spec.image", description="Sandbox image."),
            PrinterColumn("Runtime", ".spec.runtimeClassName", description="RuntimeClass."),
            PrinterColumn("Age", ".metadata.creationTimestamp", "date", description="Time since creation."),
        ),
        status_subresource=False,
    )

    kind: Literal["SandboxTemplate"] = "SandboxTemplate"
    spec: SandboxTemplateSpec


# --- SandboxPool ----------------------------------------------------------------------------------


class SandboxPoolSpec(_Model):
    """A pool of warm, unassigned sandbox pods of one template in this namespace."""

    template: ResourceName = Field(description="Name of the SandboxTemplate whose pods are kept warm.")
    size: int = Field(ge=0, le=1000, description="Number of warm pods to keep ready (0 to 1000).")


class SandboxPoolStatus(_StatusModel):
    """Observed state of a pool."""

    ready: int | None = Field(default=None, ge=0, description="Warm pods ready to be claimed.")
    claimed: int | None = Field(
        default=None, ge=0, description="Sandboxes running now on a pod they claimed from this pool."
    )
    selector: str | None = Field(
        default=None,
        max_length=1024,
        description=(
            "Label selector (string form) of the pool's warm pods; the scale subresource's selector, "
            "which a HorizontalPodAutoscaler averages pod metrics over."
        ),
    )
    conditions: list[Condition] | None = Field(
        default=None,
        max_length=16,
        description="Current conditions (Ready, ...), one per type.",
        json_schema_extra=_CONDITIONS_EXTRA,
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation of the spec this status reflects."
    )


class SandboxPool(_Resource):
    """Keeps warm pods so new Sandboxes of the template start without a cold start."""

    crd: ClassVar[CrdInfo] = CrdInfo(
        plural="sandboxpools",
        singular="sandboxpool",
        scope="Namespaced",
        short_names=("sbxp",),
        categories=CATEGORIES,
        description="Keeps warm pods of a SandboxTemplate so new Sandboxes in this namespace start fast.",
        printer_columns=(
            PrinterColumn("Template", ".spec.template", description="SandboxTemplate name."),
            PrinterColumn("Size", ".spec.size", "integer", description="Desired warm pods."),
            PrinterColumn("Ready", ".status.ready", "integer", description="Warm pods ready."),
            PrinterColumn("Age", ".metadata.creationTimestamp", "date", description="Time since creation."),
        ),
        scale={
            "specReplicasPath": ".spec.size",
            "statusReplicasPath": ".status.ready",
            # An HPA reads the pods to average metrics over from the Scale object's status.selector.
            "labelSelectorPath": ".status.selector",
        },
    )

    kind: Literal["SandboxPool"] = "SandboxPool"
    spec: SandboxPoolSpec
    status: SandboxPoolStatus = Field(default_factory=SandboxPoolStatus)


KINDS: tuple[type[Sandbox] | type[SandboxTemplate] | type[SandboxPool], ...] = (
    Sandbox,
    SandboxTemplate,
    SandboxPool,
)
