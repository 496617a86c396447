"""Effective resources of a sandbox: spec over template defaults, refused above the template maximum."""

from __future__ import annotations

from dataclasses import dataclass

from sandbox_operator.api import SandboxSpec, SandboxTemplateSpec
from sandbox_operator.api import resolve_resources as resolve_with_defaults
from sandbox_operator.api.resolve import ResourceLimitViolation

__all__ = ["EffectiveResources", "ResourceLimitViolation", "ResourcesExceedMax", "resolve_resources"]


@dataclass(frozen=True, slots=True)
class EffectiveResources:
    """Quantities as the user wrote them (the API server normalises them itself)."""

    cpu: str
    memory: str
    disk: str


@dataclass(frozen=True, slots=True)
class ResourcesExceedMax:
    violations: tuple[ResourceLimitViolation, ...]

    @property
    def message(self) -> str:
        return "; ".join(violation.message for violation in self.violations)


def resolve_resources(spec: SandboxSpec, template: SandboxTemplateSpec) -> EffectiveResources | ResourcesExceedMax:
    """The resources a pod of this sandbox gets, or every field that exceeds the template maximum."""
    resolved = resolve_with_defaults(spec, template)
    if resolved.violations:
        return ResourcesExceedMax(resolved.violations)
    return EffectiveResources(cpu=resolved.cpu, memory=resolved.memory, disk=resolved.disk)
