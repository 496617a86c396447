"""Quantity and duration parsing: exact values, refusals, and round trips."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandbox_operator.api import (
    DURATION_PATTERN,
    QUANTITY_PATTERN,
    format_duration,
    is_duration,
    is_quantity,
    parse_bytes,
    parse_duration,
    parse_millicores,
    parse_quantity,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", Decimal(1)),
        (2, Decimal(2)),
        ("500m", Decimal("0.5")),
        ("0.5", Decimal("0.5")),
        (".5", Decimal("0.5")),
        ("1.", Decimal(1)),
        ("1k", Decimal(1000)),
        ("1Ki", Decimal(1024)),
        ("512Mi", Decimal(512 * 2**20)),
        ("10Gi", Decimal(10 * 2**30)),
        ("1Ti", Decimal(2**40)),
        ("2E", Decimal(2 * 10**18)),
        ("1e3", Decimal(1000)),
        ("1E-3", Decimal("0.001")),
        ("100n", Decimal("1E-7")),
        ("3u", Decimal("3E-6")),
        ("-1", Decimal(-1)),
        ("+1M", Decimal(10**6)),
    ],
)
def test_parse_quantity_exact(text: str | int, expected: Decimal) -> None:
    assert parse_quantity(text) == expected
    assert is_quantity(text)


@pytest.mark.parametrize(
    "text", ["", "Gi", "1GB", "1g", "1 Gi", "one", "1.5.5", "1e", "1e1.5", "1Gi ", "1Gi\n", "0x10", "1KiB"]
)
def test_parse_quantity_refuses_malformed(text: str) -> None:
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        parse_quantity(text)
    assert not is_quantity(text)


def test_is_quantity_refuses_non_strings() -> None:
    assert not is_quantity(True)
    assert not is_quantity(1.5)
    assert not is_quantity(None)


@pytest.mark.parametrize(
    ("text", "millicores"), [("1", 1000), ("500m", 500), ("1.5", 1500), ("0.0001", 1), (2, 2000), ("100u", 1)]
)
def test_parse_millicores_rounds_up(text: str | int, millicores: int) -> None:
    assert parse_millicores(text) == millicores


@pytest.mark.parametrize(("text", "size"), [("1Gi", 2**30), ("1G", 10**9), ("1500m", 2), ("128974848", 128974848)])
def test_parse_bytes_rounds_up(text: str, size: int) -> None:
    assert parse_bytes(text) == size


_SUFFIXES = ["", "m", "k", "M", "G", "T", "Ki", "Mi", "Gi", "Ti", "n", "u"]


@given(
    number=st.decimals(min_value=0, max_value=10**6, places=3, allow_nan=False, allow_infinity=False),
    suffix=st.sampled_from(_SUFFIXES),
)
def test_quantity_python_and_schema_grammar_agree(number: Decimal, suffix: str) -> None:
    text = f"{number}{suffix}"
    assert is_quantity(text)
    assert re.fullmatch(QUANTITY_PATTERN, text)


@given(st.text(alphabet="0123456789.+-eEkKMGiTPmnu ", max_size=8))
def test_quantity_parser_matches_published_pattern(text: str) -> None:
    # QUANTITY_PATTERN is apimachinery's published pattern narrowed to integer exponents, as
    # resource.ParseQuantity (and so CEL isQuantity) only accepts those.
    pattern_accepts = re.fullmatch(QUANTITY_PATTERN.removeprefix("^").removesuffix("$"), text) is not None
    assert is_quantity(text) == pattern_accepts


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0),
        ("0s", 0),
        ("300s", 300),
        ("30m", 1800),
        ("1h", 3600),
        ("1h30m", 5400),
        ("1h0m30s", 3630),
        ("2m5s", 125),
        ("24h", 86400),
        ("90m", 5400),
        ("99999h", 99999 * 3600),
    ],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds
    assert is_duration(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "30",
        "1d",
        "1.5h",
        "-1m",
        "+1m",
        "1h 30m",
        "30m1h",
        "1s1m",
        "1ms",
        "1H",
        "h",
        "00",
        "1h\n",
        "100000h",
        " 1h",
    ],
)
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="duration such as"):
        parse_duration(text)
    assert not is_duration(text)


@given(st.integers(min_value=0, max_value=99999 * 3600 + 3599))
def test_format_duration_round_trips(seconds: int) -> None:
    text = format_duration(seconds)
    assert parse_duration(text) == seconds
    assert re.fullmatch(DURATION_PATTERN, text)


@given(st.text(alphabet="0123456789hms.d -", max_size=12))
def test_duration_parser_matches_schema_pattern(text: str) -> None:
    # The CRD validates with DURATION_PATTERN (RE2); the operator parses with parse_duration.
    schema_accepts = re.fullmatch(DURATION_PATTERN.removeprefix("^").removesuffix("$"), text) is not None
    assert is_duration(text) == schema_accepts


def test_format_duration_refuses_negative_and_too_long() -> None:
    with pytest.raises(ValueError, match="negative"):
        format_duration(-1)
    with pytest.raises(ValueError, match="longest"):
        format_duration(100000 * 3600)
