"""Effective resources of a sandbox: spec over template defaults, refused above the template maximum."""

from __future__ import annotations

from dataclasses import dataclass

from sandbox_operator.api import SandboxSpec, SandboxTemplateSpec, parse_bytes, parse_millicores
from sandbox_operator.api import resolve_resources as resolve_with_defaults

__all__ = ["EffectiveResources", "ResourceLimitViolation", "ResourcesExceedMax", "resolve_resources"]


@dataclass(frozen=True, slots=True)
class EffectiveResources:
    """Quantities as the user wrote them (the API server normalises them itself)."""

    cpu: str
    memory: str
    disk: str


@dataclass(frozen=True, slots=True)
class ResourceLimitViolation:
    field: str  # e.g. "spec.resources.memory"
    requested: str
    maximum: str

    @property
    def message(self) -> str:
        return f"{self.field} {self.requested} exceeds the template maximum {self.maximum}"


@dataclass(frozen=True, slots=True)
class ResourcesExceedMax:
    violations: tuple[ResourceLimitViolation, ...]

    @property
    def message(self) -> str:
        return "; ".join(violation.message for violation in self.violations)


def resolve_resources(
    spec: SandboxSpec, template: SandboxTemplateSpec
) -> EffectiveResources | ResourcesExceedMax:
    """The resources a pod of this sandbox gets, or every field that exceeds the template maximum."""
    resolved = resolve_with_defaults(spec, template)
    maximum = template.resources.max
    violations: list[ResourceLimitViolation] = []
    if maximum is not None:
        checks = (
            ("cpu", resolved.cpu, resolved.cpu_millicores, maximum.cpu, parse_millicores),
            ("memory", resolved.memory, resolved.memory_bytes, maximum.memory, parse_bytes),
            ("disk", resolved.disk, resolved.disk_bytes, maximum.disk, parse_bytes),
        )
        for name, requested, amount, limit, parse in checks:
            if limit is not None and amount > parse(limit):
                violations.append(ResourceLimitViolation(f"spec.resources.{name}", requested, limit))
    if violations:
        return ResourcesExceedMax(tuple(violations))
    return EffectiveResources(cpu=resolved.cpu, memory=resolved.memory, disk=resolved.disk)
