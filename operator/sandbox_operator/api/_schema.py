"""Building blocks shared by the models: CEL rules and checked scalar types.

A checked type validates in Python *and* carries the equivalent CEL rule into the generated CRD, so
the gateway (which builds specs in Python) and the API server (which validates ``kubectl apply``)
refuse the same values with the same message.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from .names import RESERVED_ENV_PREFIXES
from .quantity import DURATION_HINT, DURATION_PATTERN, is_duration, parse_quantity

__all__ = [
    "CelRule",
    "CelRules",
    "Duration",
    "EgressTarget",
    "EnvMap",
    "ImagePattern",
    "LabelMap",
    "NamespaceName",
    "Port",
    "Quantity",
    "ResourceName",
    "TenantEnvMap",
    "cel",
    "cel_duration",
    "cel_is_duration",
    "cel_quantity",
    "with_rules",
]

CelRule = dict[str, str]


def cel(rule: str, message: str, *, field_path: str | None = None, reason: str | None = None) -> CelRule:
    """One ``x-kubernetes-validations`` entry; ``field_path`` makes the error point at that field."""
    entry: CelRule = {"rule": rule, "message": message}
    if field_path is not None:
        entry["fieldPath"] = field_path
    if reason is not None:
        entry["reason"] = reason
    return entry


def with_rules(*rules: CelRule) -> dict[str, Any]:
    """``json_schema_extra`` for a model or field carrying CEL rules."""
    return {"x-kubernetes-validations": list(rules)}


def _cel_string(value: str) -> str:
    # CEL raw strings keep regex backslashes literal; our patterns never contain a quote.
    assert "'" not in value, value
    return f"r'{value}'"


def cel_is_duration(expr: str) -> str:
    """CEL: ``expr`` (a string) is in the sandbox duration grammar."""
    return f"{expr}.matches({_cel_string(DURATION_PATTERN)})"


def cel_duration(expr: str) -> str:
    """CEL: ``expr`` (a duration string, already checked) as a CEL duration; "0" is zero."""
    return f"({expr} == '0' ? duration('0s') : duration({expr}))"


def cel_quantity(expr: str) -> str:
    """CEL: an int-or-string quantity field as a CEL Quantity."""
    return f"quantity(string({expr}))"


@dataclass(frozen=True, eq=False)  # identity hash: typing caches Annotated metadata, dicts are unhashable
class CelRules:
    """Annotated marker: append CEL rules to the schema node of the annotated type.

    ``Annotated[ResourceName, CelRules((cel(...),))]`` adds to the type's own rules, where a field's
    ``json_schema_extra`` would replace them.
    """

    rules: tuple[CelRule, ...]

    def __get_pydantic_json_schema__(self, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler(core_schema)
        schema.setdefault("x-kubernetes-validations", []).extend(self.rules)
        return schema


@dataclass(frozen=True)
class _IntOrString:
    """Annotated marker: the schema node is ``x-kubernetes-int-or-string`` (like core quantities)."""

    def __get_pydantic_json_schema__(self, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler(core_schema)
        schema.pop("type", None)
        schema.pop("maxLength", None)  # not allowed to bound the integer branch; CEL cost stays small
        schema.update({"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]})
        return schema


def _checker(predicate: Callable[[str], bool], message: str) -> AfterValidator:
    def check(value: str) -> str:
        if not predicate(value):
            raise ValueError(message)
        return value

    return AfterValidator(check)


def _matches(pattern: str) -> Callable[[str], bool]:
    """Python twin of CEL ``matches`` for an anchored pattern (fullmatch: ``$`` would allow a newline)."""
    compiled = re.compile(pattern.removeprefix("^").removesuffix("$"))
    return lambda value: compiled.fullmatch(value) is not None


# --- Quantities -----------------------------------------------------------------------------------

QUANTITY_MESSAGE = "must be a Kubernetes quantity such as 500m, 2, 512Mi or 10Gi"
POSITIVE_MESSAGE = "must be greater than zero"


def _quantity_to_str(value: object) -> object:
    # YAML `cpu: 2` arrives as an int; keep the wire form a string like the API server would echo.
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _positive_quantity(value: str) -> str:
    try:
        amount = parse_quantity(value)
    except ValueError:
        raise ValueError(QUANTITY_MESSAGE) from None
    if amount <= 0:
        raise ValueError(POSITIVE_MESSAGE)
    return value


Quantity = Annotated[
    str,
    BeforeValidator(_quantity_to_str),
    AfterValidator(_positive_quantity),
    _IntOrString(),
    CelRules(
        (
            cel("isQuantity(string(self))", QUANTITY_MESSAGE, reason="FieldValueInvalid"),
            cel(
                f"!isQuantity(string(self)) || {cel_quantity('self')}.isGreaterThan(quantity('0'))",
                POSITIVE_MESSAGE,
                reason="FieldValueInvalid",
            ),
        )
    ),
]
"""A positive Kubernetes quantity (``500m``, ``2``, ``512Mi``); ints are accepted and kept as strings."""

# --- Durations ------------------------------------------------------------------------------------

DURATION_MESSAGE = f"must be {DURATION_HINT}; days are not supported, write 24h"

Duration = Annotated[
    str,
    Field(max_length=32),
    _checker(is_duration, DURATION_MESSAGE),
    CelRules((cel(cel_is_duration("self"), DURATION_MESSAGE, reason="FieldValueInvalid"),)),
]
"""A duration string in the Go-compatible subset: ``0`` (none), ``300s``, ``30m``, ``1h30m``."""

# --- Names, ports, env, labels --------------------------------------------------------------------

DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS_SUBDOMAIN_MESSAGE = (
    "must be a DNS subdomain: lowercase letters, digits, '-' and '.', starting and ending alphanumeric"
)
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

ResourceName = Annotated[
    str,
    Field(min_length=1, max_length=253),
    _checker(_matches(DNS_SUBDOMAIN_PATTERN), DNS_SUBDOMAIN_MESSAGE),
    CelRules((cel(f"self.matches({_cel_string(DNS_SUBDOMAIN_PATTERN)})", DNS_SUBDOMAIN_MESSAGE),)),
]
"""The name of another Kubernetes object (a SandboxTemplate, a StorageClass, a RuntimeClass)."""

NAMESPACE_NAME_MESSAGE = "must be a namespace name: a DNS label of lowercase letters, digits and '-'"

NamespaceName = Annotated[
    str,
    Field(min_length=1, max_length=63),
    _checker(_matches(DNS_LABEL_PATTERN), NAMESPACE_NAME_MESSAGE),
    CelRules((cel(f"self.matches({_cel_string(DNS_LABEL_PATTERN)})", NAMESPACE_NAME_MESSAGE),)),
]
"""The name of a namespace (a DNS label)."""

# Image references are ASCII without spaces; '*' and '?' are the pattern's wildcards.
IMAGE_PATTERN_PATTERN = r"^[A-Za-z0-9._:/@*?-]+$"
IMAGE_PATTERN_MESSAGE = (
    "each allow entry must be an image reference, a prefix ending in '/' or a glob with '*' and '?' "
    "(letters, digits and . _ : / @ - * ? only)"
)

ImagePattern = Annotated[
    str,
    Field(min_length=1, max_length=512),
    _checker(_matches(IMAGE_PATTERN_PATTERN), IMAGE_PATTERN_MESSAGE),
    CelRules(
        (cel(f"self.matches({_cel_string(IMAGE_PATTERN_PATTERN)})", IMAGE_PATTERN_MESSAGE, reason="FieldValueInvalid"),)
    ),
]
"""An entry of a template's image allow-list: ``registry.example.com/team/`` (a prefix: ends in
``/``), ``docker.io/library/python:3.*`` (a glob; ``*`` and ``?`` never match ``/``) or an exact
reference."""

Port = Annotated[int, Field(ge=1, le=65535)]

ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
ENV_NAME_MAX = 128
ENV_NAME_MESSAGE = (
    f"env names must be C identifiers (letters, digits and '_', not starting with a digit) "
    f"of at most {ENV_NAME_MAX} characters"
)


_env_name = _matches(ENV_NAME_PATTERN)


def _env_names_valid(env: dict[str, str]) -> dict[str, str]:
    for name in env:
        if len(name) > ENV_NAME_MAX or not _env_name(name):
            raise ValueError(f"{ENV_NAME_MESSAGE}: {name!r}")
    return env


EnvMap = Annotated[
    dict[str, Annotated[str, Field(max_length=32768)]],
    Field(max_length=256),
    AfterValidator(_env_names_valid),
    CelRules(
        (
            cel(
                f"self.all(name, size(name) <= {ENV_NAME_MAX} && name.matches({_cel_string(ENV_NAME_PATTERN)}))",
                ENV_NAME_MESSAGE,
                reason="FieldValueInvalid",
            ),
        )
    ),
]
"""Environment variables: C-identifier names, values up to 32 KiB, at most 256 entries."""

RESERVED_ENV_MESSAGE = "env names starting with SANDBOX_ or LD_ are reserved for the operator and the loader"


TenantEnvMap = Annotated[
    EnvMap,
    # Admission only (CEL): an object stored before the rule still parses, and the pod builder drops
    # reserved names whatever the object says.
    CelRules(
        (
            cel(
                "self.all(name, "
                + " && ".join(f"!name.startsWith({_cel_string(p)})" for p in RESERVED_ENV_PREFIXES)
                + ")",
                RESERVED_ENV_MESSAGE,
                reason="FieldValueForbidden",
            ),
        )
    ),
]
"""A Sandbox's own environment variables: EnvMap without the reserved names (a template, written by
the cluster's operators, may set them)."""

LABEL_KEY_PATTERN = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
LABEL_KEY_MAX = 63
LABEL_KEY_MESSAGE = (
    f"metadata keys must be at most {LABEL_KEY_MAX} characters of letters, digits, '-', '_' and '.', "
    "starting and ending alphanumeric"
)


_label_key = _matches(LABEL_KEY_PATTERN)


def _label_keys_valid(labels: dict[str, str]) -> dict[str, str]:
    for key in labels:
        if len(key) > LABEL_KEY_MAX or not _label_key(key):
            raise ValueError(f"{LABEL_KEY_MESSAGE}: {key!r}")
    return labels


LabelMap = Annotated[
    dict[str, Annotated[str, Field(max_length=1024)]],
    Field(max_length=64),
    AfterValidator(_label_keys_valid),
    CelRules(
        (
            cel(
                f"self.all(key, size(key) <= {LABEL_KEY_MAX} && key.matches({_cel_string(LABEL_KEY_PATTERN)}))",
                LABEL_KEY_MESSAGE,
                reason="FieldValueInvalid",
            ),
        )
    ),
]
"""Free-form metadata: label-like keys (≤ 63 chars), values up to 1 KiB, at most 64 entries."""

# --- Egress targets -------------------------------------------------------------------------------

_PORT_RE = r"([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
HOST_PORT_PATTERN = rf"^[a-z0-9]([-a-z0-9]{{0,61}}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{{0,61}}[a-z0-9])?)*:{_PORT_RE}$"
EGRESS_TARGET_MESSAGE = (
    "each egressAllow entry must be a CIDR (10.0.0.0/8, fd00::/8) or a lowercase host:port with a port "
    "from 1 to 65535 (pypi.org:443)"
)


def _is_cidr(value: str) -> bool:
    # CEL's isCIDR() needs an explicit prefix length; Python's ip_network would read "10.0.0.1" as /32.
    if "/" not in value:
        return False
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return True


_host_port = _matches(HOST_PORT_PATTERN)


def _is_egress_target(value: str) -> bool:
    return _is_cidr(value) or _host_port(value)


EgressTarget = Annotated[
    str,
    Field(min_length=1, max_length=260),
    _checker(_is_egress_target, EGRESS_TARGET_MESSAGE),
    CelRules(
        (
            cel(
                f"isCIDR(self) || self.matches({_cel_string(HOST_PORT_PATTERN)})",
                EGRESS_TARGET_MESSAGE,
                reason="FieldValueInvalid",
            ),
        )
    ),
]
"""A CIDR (``10.0.0.0/8``) or ``host:port`` (``pypi.org:443``) that sandbox egress may reach."""
