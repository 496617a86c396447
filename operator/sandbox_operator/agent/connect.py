"""Connect protocol (v1) framing and errors for the JSON codec, as pure functions.

Hand-written rather than generated: the agent only needs the JSON codec, and building messages as
plain dicts keeps the hot path free of protobuf reflection (see docs/agent.md).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from typing import Any, Final

ENVELOPE_HEADER: Final = struct.Struct(">BI")
FLAG_COMPRESSED: Final = 0x01
FLAG_END_STREAM: Final = 0x02

UNARY_CONTENT_TYPE: Final = "application/json"
STREAM_CONTENT_TYPE: Final = "application/connect+json"

# Connect code → conventional HTTP status for unary error responses.
HTTP_STATUS_BY_CODE: Final[Mapping[str, int]] = {
    "canceled": 499,
    "unknown": 500,
    "invalid_argument": 400,
    "deadline_exceeded": 504,
    "not_found": 404,
    "already_exists": 409,
    "permission_denied": 403,
    "resource_exhausted": 429,
    "failed_precondition": 400,
    "aborted": 409,
    "out_of_range": 400,
    "unimplemented": 501,
    "internal": 500,
    "unavailable": 503,
    "data_loss": 500,
    "unauthenticated": 401,
}

JsonObject = dict[str, Any]

# Deeper JSON is refused before it is parsed: Python's decoder recurses per level and a body nested
# 100k deep would end in RecursionError. Every message the agent takes is a few levels deep.
MAX_JSON_DEPTH: Final = 64
# A JSON string (skipped whole: brackets inside it do not nest) or one bracket.
_JSON_NESTING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
# Connect-Timeout-Ms: "at most 10 digits" (the Connect protocol); longer is a protocol error.
MAX_TIMEOUT_DIGITS: Final = 10
# Keepalive-Ping-Interval (seconds) above this is refused: a day without a keepalive is no keepalive.
MAX_KEEPALIVE_SECONDS: Final = 86_400.0


class ConnectError(Exception):
    """An RPC failure carrying a Connect error code (the SDK maps codes to its exceptions)."""

    def __init__(self, code: str, message: str) -> None:
        if code not in HTTP_STATUS_BY_CODE:
            raise ValueError(f"unknown Connect code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS_BY_CODE[self.code]

    def to_json(self) -> JsonObject:
        return {"code": self.code, "message": self.message}


def encode_json(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()


def encode_envelope(payload: bytes, flags: int = 0) -> bytes:
    return ENVELOPE_HEADER.pack(flags, len(payload)) + payload


def encode_message_envelope(message: Mapping[str, Any]) -> bytes:
    return encode_envelope(encode_json(message))


def encode_end_stream(error: ConnectError | None = None) -> bytes:
    body: JsonObject = {} if error is None else {"error": error.to_json()}
    return encode_envelope(encode_json(body), FLAG_END_STREAM)


def parse_envelope_header(header: bytes, max_length: int) -> tuple[int, int]:
    """Return (flags, length) of an envelope prefix, refusing compressed or oversized messages."""
    if len(header) != ENVELOPE_HEADER.size:
        raise ConnectError("invalid_argument", "truncated envelope header")
    flags, length = ENVELOPE_HEADER.unpack(header)
    if flags & FLAG_COMPRESSED:
        raise ConnectError("internal", "compressed message received but no compression was negotiated")
    if length > max_length:
        raise ConnectError("resource_exhausted", f"message of {length} bytes exceeds the {max_length} limit")
    return flags, length


class EnvelopeDecoder:
    """Incremental decoder: feed arbitrary chunks, get back complete (flags, payload) envelopes."""

    def __init__(self, max_length: int) -> None:
        self._buffer = bytearray()
        self._max_length = max_length

    def feed(self, chunk: bytes) -> list[tuple[int, bytes]]:
        self._buffer.extend(chunk)
        envelopes: list[tuple[int, bytes]] = []
        size = ENVELOPE_HEADER.size
        while len(self._buffer) >= size:
            flags, length = parse_envelope_header(bytes(self._buffer[:size]), self._max_length)
            if len(self._buffer) < size + length:
                break
            envelopes.append((flags, bytes(self._buffer[size : size + length])))
            del self._buffer[: size + length]
        return envelopes

    @property
    def pending(self) -> int:
        """Bytes of an incomplete envelope still buffered (non-zero at EOF means truncation)."""
        return len(self._buffer)


class JsonTooDeep(ValueError):
    """A JSON document nested deeper than the limit (refused before parsing)."""


def json_depth_exceeds(payload: bytes, max_depth: int) -> bool:
    """True when `payload` nests arrays/objects deeper than `max_depth` (brackets in strings do not
    count). Linear, without recursion; malformed input may count high, and fails to parse anyway."""
    if payload.count(b"[") + payload.count(b"{") <= max_depth:
        return False
    depth = 0
    for match in _JSON_NESTING.finditer(payload):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                return True
        elif token in (b"]", b"}"):
            depth -= 1
    return False


def loads_json(payload: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """json.loads with the nesting checked first; ValueError (JsonTooDeep) for anything it refuses."""
    if json_depth_exceeds(payload, max_depth):
        raise JsonTooDeep(f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(payload)
    except RecursionError as error:  # cannot happen below the depth limit; never a 500 if it does
        raise JsonTooDeep("JSON nested too deep") from error


def decode_json_message(payload: bytes) -> JsonObject:
    try:
        message = loads_json(payload) if payload else {}
    except ValueError as error:
        raise ConnectError("invalid_argument", f"request is not valid JSON: {error}") from error
    if not isinstance(message, dict):
        raise ConnectError("invalid_argument", "request must be a JSON object")
    return message


def parse_timeout_ms(header: str | None) -> float | None:
    """Connect-Timeout-Ms (1 to 10 digits) → seconds; None when absent. Anything else (a sign, more
    digits, a float) is invalid_argument, as connect-go answers it."""
    if header is None:
        return None
    value = header.strip()
    if not value.isascii() or not value.isdigit() or len(value) > MAX_TIMEOUT_DIGITS:
        raise ConnectError(
            "invalid_argument", f"Connect-Timeout-Ms must be 1 to {MAX_TIMEOUT_DIGITS} digits, got {header[:32]!r}"
        )
    return int(value) / 1000.0


def parse_keepalive_seconds(header: str | None, default: float) -> float:
    """Keepalive-Ping-Interval (seconds, envd's header) → seconds; `default` when absent, empty or not
    positive; invalid_argument when it is not a finite number up to MAX_KEEPALIVE_SECONDS."""
    if header is None or not header.strip():
        return default
    try:
        value = float(header)
    except ValueError as error:
        message = f"Keepalive-Ping-Interval must be a number, got {header[:32]!r}"
        raise ConnectError("invalid_argument", message) from error
    if not math.isfinite(value) or value > MAX_KEEPALIVE_SECONDS:
        raise ConnectError(
            "invalid_argument", f"Keepalive-Ping-Interval must be at most {MAX_KEEPALIVE_SECONDS:g} seconds"
        )
    return value if value > 0 else default


def is_json_content_type(content_type: str, expected: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == expected
