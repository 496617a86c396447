"""Pure parsing of Kubernetes quantities and of sandbox durations.

Both grammars are the ones the API server enforces for the CRDs (see ``crdgen``), so a value the
server accepted always parses here, and a value refused here is refused by the server too.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

__all__ = [
    "DURATION_HINT",
    "DURATION_PATTERN",
    "QUANTITY_PATTERN",
    "format_duration",
    "is_duration",
    "is_quantity",
    "parse_bytes",
    "parse_duration",
    "parse_millicores",
    "parse_quantity",
]

# The grammar of k8s.io/apimachinery resource.ParseQuantity: a signed decimal number followed by a
# binary-SI suffix (Ki..Ei), a decimal-SI suffix (n, u, m, "", k, M, G, T, P, E) or an integer
# decimal exponent (e3, E-2). Same as the pattern apimachinery publishes in its OpenAPI.
QUANTITY_PATTERN = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
_QUANTITY_RE = re.compile(
    r"(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?:(?P<binary>Ki|Mi|Gi|Ti|Pi|Ei)|(?P<decimal>[numkMGTPE])|[eE](?P<exponent>[+-]?[0-9]+))?"
)
_BINARY_SUFFIX = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL_SUFFIX = {"n": -9, "u": -6, "m": -3, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}

# Durations: a Go-duration subset that CEL's duration() parses, so CRD rules can compare them.
# Units h, m, s in that order, integers only, or the literal "0" meaning "no timeout". Days are not
# supported by Go durations (write 24h). Digit counts are capped so that no value overflows Go's
# int64 nanoseconds inside CEL (99999h + 9999999m + 999999999s is about 445,000 hours).
DURATION_PATTERN = r"^(0|[0-9]{1,5}h([0-9]{1,7}m)?([0-9]{1,9}s)?|[0-9]{1,7}m([0-9]{1,9}s)?|[0-9]{1,9}s)$"
_DURATION_RE = re.compile(r"(?:(?P<zero>0)|(?:(?P<h>[0-9]{1,5})h)?(?:(?P<m>[0-9]{1,7})m)?(?:(?P<s>[0-9]{1,9})s)?)")
DURATION_HINT = "a duration such as 300s, 30m or 1h30m (units h, m, s), or 0 for none"


def parse_quantity(value: str | int) -> Decimal:
    """Return the exact value of a Kubernetes quantity (``"500m"`` → ``Decimal("0.5")``).

    Raises ValueError for anything ``resource.ParseQuantity`` would refuse.
    """
    if isinstance(value, bool):  # bool is an int subclass; True is not a quantity
        raise ValueError(f"{value!r} is not a Kubernetes quantity")
    if isinstance(value, int):
        return Decimal(value)
    match = _QUANTITY_RE.fullmatch(value)
    if match is None:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 500m, 1, 512Mi, 10Gi)")
    try:
        number = Decimal(match["number"])
    except InvalidOperation as error:  # unreachable given the regex; kept for a clear failure
        raise ValueError(f"{value!r} is not a Kubernetes quantity") from error
    if match["binary"]:
        return number * Decimal(1024) ** _BINARY_SUFFIX[match["binary"]]
    if match["decimal"]:
        return number.scaleb(_DECIMAL_SUFFIX[match["decimal"]])
    if match["exponent"]:
        return number.scaleb(int(match["exponent"]))
    return number


def is_quantity(value: object) -> bool:
    """True when ``value`` is a string or int the Kubernetes quantity grammar accepts."""
    if not isinstance(value, str | int) or isinstance(value, bool):
        return False
    try:
        parse_quantity(value)
    except ValueError:
        return False
    return True


def parse_millicores(value: str | int) -> int:
    """CPU quantity → millicores, rounded up like ``Quantity.MilliValue()`` (``"1.5"`` → 1500)."""
    return math.ceil(parse_quantity(value) * 1000)


def parse_bytes(value: str | int) -> int:
    """Memory/disk quantity → bytes, rounded up like ``Quantity.Value()`` (``"1Gi"`` → 1073741824)."""
    return math.ceil(parse_quantity(value))


def parse_duration(value: str) -> int:
    """Return the number of seconds of a sandbox duration; 0 means "no timeout".

    Accepts exactly the CRD grammar: ``"0"``, ``"300s"``, ``"30m"``, ``"1h"``, ``"1h30m"``,
    ``"1h0m30s"``. Raises ValueError otherwise (``"1d"``, ``"1.5h"``, ``"30"``, ``""``, ``"-1m"``).
    """
    match = _DURATION_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None or not any(match.group("zero", "h", "m", "s")):
        raise ValueError(f"{value!r} is not {DURATION_HINT}")
    if match["zero"]:
        return 0
    hours, minutes, seconds = (int(match[unit] or 0) for unit in ("h", "m", "s"))
    return hours * 3600 + minutes * 60 + seconds


def is_duration(value: object) -> bool:
    """True when ``value`` is a string in the sandbox duration grammar."""
    if not isinstance(value, str):
        return False
    try:
        parse_duration(value)
    except ValueError:
        return False
    return True


def format_duration(seconds: int) -> str:
    """Canonical duration string for a number of seconds: 0 → ``"0"``, 5400 → ``"1h30m"``.

    ``parse_duration(format_duration(n)) == n`` for every 0 ≤ n < 100,000 hours.
    """
    if seconds < 0:
        raise ValueError(f"durations cannot be negative: {seconds}")
    if seconds == 0:
        return "0"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours > 99999:
        raise ValueError(f"{seconds}s is longer than the longest supported duration (99999h)")
    return "".join(f"{amount}{unit}" for amount, unit in ((hours, "h"), (minutes, "m"), (secs, "s")) if amount)
