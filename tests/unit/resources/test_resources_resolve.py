"""Effective resources: spec over template defaults, refused above the template maximum
(api.resolve_resources, the one resolver the builders, the lifecycle and the gateway share)."""

from __future__ import annotations

from resources_factories import sandbox, template

from sandbox_operator.api import ResourceLimitViolation, resolve_resources


def test_template_defaults_apply() -> None:
    resolved = resolve_resources(sandbox().spec, template().spec)
    assert (resolved.cpu, resolved.memory, resolved.disk) == ("1", "512Mi", "1Gi")
    assert resolved.violations == ()
    assert resolved.violation_message is None


def test_spec_overrides_defaults_field_by_field() -> None:
    tpl = template(resources={"default": {"cpu": "500m", "memory": "1Gi", "disk": "2Gi"}})
    resolved = resolve_resources(sandbox(resources={"memory": "2Gi"}).spec, tpl.spec)
    assert (resolved.cpu, resolved.memory, resolved.disk) == ("500m", "2Gi", "2Gi")
    assert (resolved.cpu_millicores, resolved.memory_bytes, resolved.disk_bytes) == (500, 2 << 30, 2 << 30)


def test_equal_to_the_maximum_is_fine() -> None:
    tpl = template(resources={"max": {"cpu": "2", "memory": "2Gi"}})
    assert resolve_resources(sandbox(resources={"cpu": "2000m", "memory": "2Gi"}).spec, tpl.spec).violations == ()


def test_over_the_maximum_names_each_field() -> None:
    tpl = template(resources={"max": {"cpu": "2", "memory": "2Gi", "disk": "5Gi"}})
    refused = resolve_resources(sandbox(resources={"cpu": "2001m", "disk": "10Gi"}).spec, tpl.spec)
    assert refused.violations == (
        ResourceLimitViolation("spec.resources.cpu", "2001m", "2"),
        ResourceLimitViolation("spec.resources.disk", "10Gi", "5Gi"),
    )
    assert refused.violation_message == (
        "spec.resources.cpu 2001m exceeds the template maximum 2; "
        "spec.resources.disk 10Gi exceeds the template maximum 5Gi"
    )


def test_unset_maximum_is_uncapped() -> None:
    tpl = template(resources={"max": {"cpu": "1"}})
    assert resolve_resources(sandbox(resources={"memory": "512Gi"}).spec, tpl.spec).violations == ()
