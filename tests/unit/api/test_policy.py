"""api.policy and the lifetime cap: which images and namespaces a template allows, and how long its
sandboxes may live."""

from __future__ import annotations

from typing import Any

import pytest

from sandbox_operator.api import (
    SandboxSpec,
    SandboxTemplateSpec,
    capped_lifetime,
    image_allowed,
    image_violation,
    namespace_allowed,
    namespace_violation,
    resolve_timeouts,
)
from sandbox_operator.api.policy import image_pattern_matches

TEMPLATE_IMAGE = "ghcr.io/example/agent:1"


def _template(**spec: Any) -> SandboxTemplateSpec:
    return SandboxTemplateSpec.model_validate({"image": TEMPLATE_IMAGE, **spec})


def _spec(**spec: Any) -> SandboxSpec:
    return SandboxSpec.model_validate({"template": "t", **spec})


ALLOW_LIST = _template(
    imagePolicy={
        "mode": "AllowList",
        "allow": ["registry.example.com/team/", "docker.io/library/python:3.*", "ghcr.io/acme/*", "busybox:1.3?"],
    }
)


def test_by_default_only_the_template_image_runs() -> None:
    template = _template()
    assert image_violation(_spec(), template) is None
    assert image_violation(_spec(image=TEMPLATE_IMAGE), template) is None
    refused = image_violation(_spec(image="evil/miner:1"), template)
    assert refused == (
        "spec.image evil/miner:1 is not allowed by the template's imagePolicy "
        f"(Template: only the template's image {TEMPLATE_IMAGE})"
    )


def test_any_allows_every_image() -> None:
    assert image_allowed("evil/miner:1", _template(imagePolicy={"mode": "Any"}))


@pytest.mark.parametrize(
    ("image", "allowed"),
    [
        (TEMPLATE_IMAGE, True),  # the template's own image is always allowed
        ("registry.example.com/team/py:3", True),
        ("registry.example.com/team/deep/er:1", True),  # a prefix covers everything below it
        ("registry.example.com/teamster/py:3", False),
        ("registry.example.com.evil.io/team/py:3", False),
        ("docker.io/library/python:3.12", True),
        ("docker.io/library/python:2.7", False),
        ("python:3.12", False),  # matched as written: no normalisation to docker.io/library
        ("ghcr.io/acme/tool:1", True),
        ("ghcr.io/acme/tool@sha256:abc", True),
        ("ghcr.io/acme/sub/tool:1", False),  # '*' does not cross '/'
        ("ghcr.io/acmeevil/tool:1", False),
        ("busybox:1.36", True),
        ("busybox:1.3/x", False),  # '?' does not match '/'
        ("busybox:1.361", False),  # the whole reference must match
    ],
)
def test_allow_list_prefixes_and_globs(image: str, allowed: bool) -> None:
    assert image_allowed(image, ALLOW_LIST) is allowed
    assert (image_violation(_spec(image=image), ALLOW_LIST) is None) is allowed


def test_allow_list_refusal_names_the_entries() -> None:
    refused = image_violation(_spec(image="evil/miner:1"), ALLOW_LIST)
    assert refused is not None
    assert "(AllowList: the template's image or one matching registry.example.com/team/, " in refused


def test_glob_metacharacters_other_than_star_and_question_mark_are_literal() -> None:
    assert image_pattern_matches("a.b/c:1", "a.b/c:1")
    assert not image_pattern_matches("a.b/c:1", "axb/c:1")


def test_allowed_namespaces() -> None:
    everywhere = _template()
    assert namespace_allowed("anything", everywhere)
    assert namespace_violation("anything", "t", everywhere) is None
    restricted = _template(allowedNamespaces=["team-a", "team-b"])
    assert namespace_allowed("team-a", restricted)
    refused = namespace_violation("team-c", "gpu", restricted)
    assert refused == "SandboxTemplate gpu may not be used in namespace team-c (see its allowedNamespaces)"
    assert "team-a" not in refused  # other tenants' namespaces are not told


@pytest.mark.parametrize(
    ("requested", "effective"),
    [(0, 86400), (90000, 86400), (86400, 86400), (3600, 3600)],
)
def test_lifetime_is_clamped_to_the_template_cap(requested: int, effective: int) -> None:
    template = _template(timeouts={"maxLifetimeLimit": "24h"})
    assert capped_lifetime(requested, template) == effective
    spec = _spec(timeouts={"maxLifetime": f"{requested}s"})
    assert resolve_timeouts(spec, template).max_lifetime == effective


def test_without_a_cap_zero_stays_unlimited() -> None:
    assert capped_lifetime(0, _template()) == 0
    assert resolve_timeouts(_spec(timeouts={"maxLifetime": "0"}), _template()).max_lifetime == 0


def test_the_templates_own_lifetime_is_clamped_too() -> None:
    template = _template(timeouts={"maxLifetime": "0", "maxLifetimeLimit": "2h"})
    assert resolve_timeouts(_spec(), template).max_lifetime == 7200
