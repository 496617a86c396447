"""proto3 canonical JSON helpers (field names camelCase on output, snake_case also accepted on input)."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from .connect import ConnectError

_CAMEL_BOUNDARY = re.compile(r"_([a-z])")
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1


def camel(name: str) -> str:
    return _CAMEL_BOUNDARY.sub(lambda match: match.group(1).upper(), name)


def field(message: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """Read a field by its proto name, accepting the JSON (camelCase) or the original spelling."""
    json_name = camel(name)
    if json_name in message:
        return message[json_name]
    return message.get(name, default)


def message_field(message: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = field(message, name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConnectError("invalid_argument", f"field {name!r} must be an object")
    return value


def string_field(message: Mapping[str, Any], name: str, default: str = "") -> str:
    value = field(message, name, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ConnectError("invalid_argument", f"field {name!r} must be a string")
    return value


def bool_field(message: Mapping[str, Any], name: str, default: bool = False) -> bool:
    value = field(message, name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConnectError("invalid_argument", f"field {name!r} must be a boolean")
    return value


def uint_field(message: Mapping[str, Any], name: str, default: int = 0, maximum: int = UINT64_MAX) -> int:
    """uint32/int64 fields: JSON numbers or decimal strings, at most `maximum` (invalid_argument above:
    a huge number is bad input, not an overflow deeper down)."""
    value = field(message, name, default)
    if value is None:
        return default
    if isinstance(value, bool):
        raise ConnectError("invalid_argument", f"field {name!r} must be an integer")
    if isinstance(value, str):
        text = value.strip()
        if not text.isascii() or not text.isdigit() or len(text) > len(str(maximum)):
            raise ConnectError("invalid_argument", f"field {name!r} must be an integer up to {maximum}")
        value = int(text)
    if not isinstance(value, int) or value < 0:
        raise ConnectError("invalid_argument", f"field {name!r} must be a non-negative integer")
    if value > maximum:
        raise ConnectError("invalid_argument", f"field {name!r} must be at most {maximum}")
    return value


def enum_field(message: Mapping[str, Any], name: str, values: Mapping[str, int]) -> int:
    """Enums arrive as names or numbers."""
    value = field(message, name, 0)
    if isinstance(value, str):
        if value not in values:
            raise ConnectError("invalid_argument", f"unknown value {value!r} for {name!r}")
        return values[value]
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ConnectError("invalid_argument", f"field {name!r} must be an enum name or number")


def string_map_field(message: Mapping[str, Any], name: str) -> dict[str, str]:
    value = field(message, name)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(key, str) and isinstance(item, str) for key, item in value.items()
    ):
        raise ConnectError("invalid_argument", f"field {name!r} must be a map of strings")
    return value


def string_list_field(message: Mapping[str, Any], name: str) -> list[str]:
    value = field(message, name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConnectError("invalid_argument", f"field {name!r} must be a list of strings")
    return value


def encode_bytes(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_bytes(value: Any, name: str) -> bytes:
    """bytes fields: standard or URL-safe base64, padding optional (proto3 JSON accepts both)."""
    if not isinstance(value, str):
        raise ConnectError("invalid_argument", f"field {name!r} must be base64 text")
    padded = value + "=" * (-len(value) % 4)
    try:
        if "-" in value or "_" in value:
            return base64.urlsafe_b64decode(padded)
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ConnectError("invalid_argument", f"field {name!r} is not valid base64") from error


def format_timestamp(epoch_ns: int) -> str:
    """google.protobuf.Timestamp JSON: RFC 3339 in UTC with 0, 3, 6 or 9 fractional digits."""
    seconds, nanos = divmod(epoch_ns, 1_000_000_000)
    base = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if nanos == 0:
        return base + "Z"
    if nanos % 1_000_000 == 0:
        return f"{base}.{nanos // 1_000_000:03d}Z"
    if nanos % 1_000 == 0:
        return f"{base}.{nanos // 1_000:06d}Z"
    return f"{base}.{nanos:09d}Z"


def selector(message: Mapping[str, Any]) -> tuple[str, int | str]:
    """ProcessSelector oneof → ("pid", n) or ("tag", s)."""
    process = message_field(message, "process")
    if "pid" in process:
        return "pid", uint_field(process, "pid", maximum=UINT32_MAX)
    if "tag" in process:
        return "tag", string_field(process, "tag")
    raise ConnectError("invalid_argument", "process selector needs a pid or a tag")
