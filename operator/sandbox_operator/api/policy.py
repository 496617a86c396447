"""What a SandboxTemplate allows: the images its sandboxes may run and the namespaces that may use it.

The API server cannot check either when a Sandbox is written (the template is another object), so
the operator's lifecycle does before any child is made, the pod builder refuses once more, and the
gateway refuses an E2B create early. Pure functions of the spec and the template.
"""

from __future__ import annotations

import functools
import re

from .v1alpha1 import ImagePolicyMode, SandboxSpec, SandboxTemplateSpec

__all__ = [
    "image_allowed",
    "image_of",
    "image_pattern_matches",
    "image_violation",
    "namespace_allowed",
    "namespace_violation",
]


def image_of(spec: SandboxSpec, template: SandboxTemplateSpec) -> str:
    """The image the sandbox's pod runs: spec.image, else the template's."""
    return spec.image or template.image


@functools.lru_cache(maxsize=1024)
def _glob(pattern: str) -> re.Pattern[str]:
    # '*' and '?' stay within one path segment: "ghcr.io/acme/*" is not "ghcr.io/acme/x/y", and
    # "ghcr.io/acme*" never reaches another registry's path.
    parts = ("[^/]*" if char == "*" else "[^/]" if char == "?" else re.escape(char) for char in pattern)
    return re.compile("".join(parts))


def image_pattern_matches(pattern: str, image: str) -> bool:
    """One allow entry: a prefix when it ends in '/', else a glob (or an exact reference) over the
    whole image reference, as written."""
    if pattern.endswith("/"):
        return image.startswith(pattern) and len(image) > len(pattern)
    return _glob(pattern).fullmatch(image) is not None


def image_allowed(image: str, template: SandboxTemplateSpec) -> bool:
    """The template's image policy lets its sandboxes run ``image``."""
    policy = template.image_policy
    if image == template.image or policy.mode is ImagePolicyMode.ANY:
        return True
    if policy.mode is ImagePolicyMode.ALLOW_LIST:
        return any(image_pattern_matches(pattern, image) for pattern in policy.allow or ())
    return False


def image_violation(spec: SandboxSpec, template: SandboxTemplateSpec) -> str | None:
    """Why the sandbox may not run its image, or None when it may."""
    image = image_of(spec, template)
    if image_allowed(image, template):
        return None
    policy = template.image_policy
    if policy.mode is ImagePolicyMode.ALLOW_LIST:
        allowed = f"the template's image or one matching {', '.join(policy.allow or ())}"
    else:
        allowed = f"only the template's image {template.image}"
    return f"spec.image {image} is not allowed by the template's imagePolicy ({policy.mode}: {allowed})"


def namespace_allowed(namespace: str, template: SandboxTemplateSpec) -> bool:
    """Sandboxes in ``namespace`` may use the template."""
    allowed = template.allowed_namespaces
    return allowed is None or namespace in allowed


def namespace_violation(namespace: str, template_name: str, template: SandboxTemplateSpec) -> str | None:
    """Why a Sandbox in ``namespace`` may not use the template, or None when it may. The message does
    not list the namespaces that may: those are other tenants' names."""
    if namespace_allowed(namespace, template):
        return None
    return f"SandboxTemplate {template_name} may not be used in namespace {namespace} (see its allowedNamespaces)"
