"""Resolve a Sandbox's effective resources, timeouts and egress from its spec and its template.

The CRD leaves ``spec.resources``, ``spec.timeouts`` and ``spec.network.egress`` unset when the user
does (the API server cannot see the template), so the operator fills them in here: spec value, else
template default.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .quantity import parse_bytes, parse_duration, parse_millicores
from .v1alpha1 import EgressMode, SandboxSpec, SandboxTemplateSpec

__all__ = [
    "ResolvedEgress",
    "ResolvedResources",
    "ResolvedTimeouts",
    "ResourceLimitViolation",
    "capped_lifetime",
    "resolve_egress",
    "resolve_resources",
    "resolve_service",
    "resolve_timeouts",
]


@dataclass(frozen=True, slots=True)
class ResourceLimitViolation:
    """One requested resource above the template's maximum."""

    field: str  # e.g. "spec.resources.memory"
    requested: str
    maximum: str

    @property
    def message(self) -> str:
        return f"{self.field} {self.requested} exceeds the template maximum {self.maximum}"


@dataclass(frozen=True)
class ResolvedResources:
    """Effective resources of a sandbox, with the quantities kept for building pod specs."""

    cpu: str
    memory: str
    disk: str
    cpu_millicores: int
    memory_bytes: int
    disk_bytes: int
    violations: tuple[ResourceLimitViolation, ...]
    """Every field above the template's resources.max (empty when it fits)."""

    @property
    def violation_message(self) -> str | None:
        """Every violation in one human message, or None when the resources fit."""
        return "; ".join(violation.message for violation in self.violations) or None


@dataclass(frozen=True)
class ResolvedTimeouts:
    """Effective timeouts of a sandbox in seconds; 0 means "no timeout"."""

    idle: int
    max_lifetime: int
    execution: int


def resolve_resources(spec: SandboxSpec, template: SandboxTemplateSpec) -> ResolvedResources:
    """Spec resources over template defaults, checked against the template's maximum."""
    requested = spec.resources
    defaults = template.resources.default
    cpu = (requested.cpu if requested else None) or defaults.cpu
    memory = (requested.memory if requested else None) or defaults.memory
    disk = (requested.disk if requested else None) or defaults.disk
    amounts = {"cpu": parse_millicores(cpu), "memory": parse_bytes(memory), "disk": parse_bytes(disk)}
    violations: list[ResourceLimitViolation] = []
    maximum = template.resources.max
    if maximum is not None:
        for name, value, limit in (
            ("cpu", cpu, maximum.cpu),
            ("memory", memory, maximum.memory),
            ("disk", disk, maximum.disk),
        ):
            if limit is None:
                continue
            limit_amount = parse_millicores(limit) if name == "cpu" else parse_bytes(limit)
            if amounts[name] > limit_amount:
                violations.append(ResourceLimitViolation(f"spec.resources.{name}", value, limit))
    return ResolvedResources(
        cpu=cpu,
        memory=memory,
        disk=disk,
        cpu_millicores=amounts["cpu"],
        memory_bytes=amounts["memory"],
        disk_bytes=amounts["disk"],
        violations=tuple(violations),
    )


def capped_lifetime(seconds: int, template: SandboxTemplateSpec) -> int:
    """A maxLifetime in seconds within the template's maxLifetimeLimit: clamped, not refused, as E2B
    clients expect; 0 (no limit) becomes the limit."""
    limit = template.timeouts.max_lifetime_limit
    if limit is None:
        return seconds
    cap = parse_duration(limit)
    return cap if seconds == 0 or seconds > cap else seconds


def resolve_timeouts(spec: SandboxSpec, template: SandboxTemplateSpec) -> ResolvedTimeouts:
    """Spec timeouts over the template's timeouts, in seconds; maxLifetime within the template's cap."""
    own = spec.timeouts
    fallback = template.timeouts
    lifetime = parse_duration((own.max_lifetime if own else None) or fallback.max_lifetime)
    return ResolvedTimeouts(
        idle=parse_duration((own.idle if own else None) or fallback.idle),
        max_lifetime=capped_lifetime(lifetime, template),
        execution=parse_duration((own.execution if own else None) or fallback.execution),
    )


@dataclass(frozen=True)
class ResolvedEgress:
    """Effective outbound traffic of a sandbox."""

    mode: EgressMode
    allow: tuple[str, ...]  # CIDRs and host:port entries, when mode is allowList
    from_template: bool  # the Sandbox left spec.network.egress unset

    @property
    def hosts(self) -> tuple[str, ...]:
        """The host:port entries of an allow-list, which a NetworkPolicy can only enforce by port."""
        return tuple(target for target in self.allow if "/" not in target)

    @property
    def cidrs(self) -> tuple[str, ...]:
        return tuple(target for target in self.allow if "/" in target)


def resolve_egress(spec: SandboxSpec, template: SandboxTemplateSpec) -> ResolvedEgress:
    """The Sandbox's spec.network.egress (with its egressAllow) when set, else its template's
    network, else deny. The two are never mixed: a Sandbox's allow-list replaces the template's."""
    own = spec.network
    if own.egress is not None:
        return ResolvedEgress(own.egress, tuple(own.egress_allow or ()), from_template=False)
    default = template.network
    return ResolvedEgress(default.egress or EgressMode.DENY, tuple(default.egress_allow or ()), from_template=True)


class EgressClass(enum.StrEnum):
    """Which NetworkPolicy governs a sandbox's pod. Pods of one template and namespace in a shared
    class share one policy (one write per namespace, not per sandbox); ``own`` is a policy per
    sandbox, for a Sandbox with an allow-list or ports of its own."""

    DENY = "deny"
    ALLOW = "allow"
    TEMPLATE = "template"  # the template's own allow-list
    OWN = "own"

    @property
    def shared(self) -> bool:
        return self is not EgressClass.OWN


def egress_class(spec: SandboxSpec, template: SandboxTemplateSpec) -> EgressClass:
    """The policy class of a sandbox: its ingress ports and egress are its template's (shared), or
    not (own)."""
    template_ports = set(template.ports or ())
    if any(port not in template_ports for port in spec.network.ports or ()):
        return EgressClass.OWN
    network = resolve_egress(spec, template)
    if network.mode is EgressMode.ALLOW_LIST:
        return EgressClass.TEMPLATE if network.from_template else EgressClass.OWN
    return EgressClass.ALLOW if network.mode is EgressMode.ALLOW else EgressClass.DENY


def resolve_service(spec: SandboxSpec, template: SandboxTemplateSpec) -> bool:
    """Whether the sandbox gets a headless Service: its spec.network.service, else its template's,
    else not (the gateway reaches sandboxes by pod IP; a Service per sandbox costs the API server
    the Service, its EndpointSlice and the endpoints controllers' work)."""
    if spec.network.service is not None:
        return spec.network.service
    return bool(template.network.service)
