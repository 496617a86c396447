"""Connect protocol (v1) framing and errors for the JSON codec, as pure functions.

Hand-written rather than generated: the agent only needs the JSON codec, and building messages as
plain dicts keeps the hot path free of protobuf reflection (see docs/agent.md).
"""

from __future__ import annotations

import json
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


def decode_json_message(payload: bytes) -> JsonObject:
    try:
        message = json.loads(payload) if payload else {}
    except ValueError as error:
        raise ConnectError("invalid_argument", f"request is not valid JSON: {error}") from error
    if not isinstance(message, dict):
        raise ConnectError("invalid_argument", "request must be a JSON object")
    return message


def parse_timeout_ms(header: str | None) -> float | None:
    """Connect-Timeout-Ms (up to 10 digits) → seconds; None when absent or malformed."""
    if not header:
        return None
    header = header.strip()
    if not header.isdigit() or len(header) > 10:
        return None
    return int(header) / 1000.0


def is_json_content_type(content_type: str, expected: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == expected
