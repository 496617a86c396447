"""api.resolve_egress and api.resolve_service: a Sandbox's own spec.network, else its template's
network, else deny and no Service."""

from __future__ import annotations

from typing import Any

import pytest

from sandbox_operator.api import EgressMode, SandboxSpec, SandboxTemplateSpec, resolve_egress, resolve_service

PACKAGE_INDEX = {"egress": "allowList", "egressAllow": ["pypi.org:443", "files.pythonhosted.org:443"]}


def _spec(**network: Any) -> SandboxSpec:
    return SandboxSpec.model_validate({"template": "t", "network": network} if network else {"template": "t"})


def _template(network: dict[str, Any] | None = None) -> SandboxTemplateSpec:
    return SandboxTemplateSpec.model_validate({"image": "x:1", **({"network": network} if network else {})})


def test_unset_everywhere_is_deny() -> None:
    resolved = resolve_egress(_spec(), _template())
    assert (resolved.mode, resolved.allow, resolved.from_template) == (EgressMode.DENY, (), True)


def test_the_template_default_applies_when_the_sandbox_sets_none() -> None:
    resolved = resolve_egress(_spec(ports=[8080]), _template(PACKAGE_INDEX))
    assert resolved.mode is EgressMode.ALLOW_LIST and resolved.from_template
    assert resolved.hosts == ("pypi.org:443", "files.pythonhosted.org:443") and resolved.cidrs == ()


@pytest.mark.parametrize(
    ("own", "mode", "allow"),
    [
        ({"egress": "deny"}, EgressMode.DENY, ()),
        ({"egress": "allow"}, EgressMode.ALLOW, ()),
        ({"egress": "allowList", "egressAllow": ["10.1.0.0/16"]}, EgressMode.ALLOW_LIST, ("10.1.0.0/16",)),
    ],
)
def test_the_sandboxs_own_egress_wins(own: dict[str, Any], mode: EgressMode, allow: tuple[str, ...]) -> None:
    resolved = resolve_egress(_spec(**own), _template(PACKAGE_INDEX))
    assert (resolved.mode, resolved.allow, resolved.from_template) == (mode, allow, False)


@pytest.mark.parametrize(
    ("network", "message"),
    [
        ({"egress": "allowList"}, "needs at least one egressAllow entry"),
        ({"egressAllow": ["pypi.org:443"]}, "only used when egress is allowList"),
        ({"egress": "deny", "egressAllow": ["pypi.org:443"]}, "only used when egress is allowList"),
        ({"egress": "allowList", "egressAllow": ["pypi.org"]}, "must be a CIDR"),
        ({"ports": [8080]}, "Extra inputs are not permitted"),  # a template's ports are spec.ports
    ],
)
def test_a_bad_template_network_is_refused(network: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _template(network)


@pytest.mark.parametrize(
    ("own", "default", "wanted"),
    [({}, None, False), ({}, {"service": True}, True), ({"service": False}, {"service": True}, False)],
)
def test_a_service_is_opt_in(own: dict[str, Any], default: dict[str, Any] | None, wanted: bool) -> None:
    assert resolve_service(_spec(**own), _template(default)) is wanted
