"""Pure pieces of the agent's defences (the behaviour over HTTP is in test_agent_security.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import BodyPartReader
from multidict import CIMultiDict

from sandbox_operator.agent.config import parse_config, without_secrets
from sandbox_operator.agent.connect import (
    MAX_JSON_DEPTH,
    ConnectError,
    JsonTooDeep,
    json_depth_exceeds,
    loads_json,
    parse_keepalive_seconds,
)
from sandbox_operator.agent.envd import _BadUpload, env_var_refusal, part_destination, part_filename
from sandbox_operator.agent.guard import canonical_path, is_open_route
from sandbox_operator.agent.protojson import uint_field
from sandbox_operator.agent.signing import tokens_equal, verify_signature
from sandbox_operator.agent.users import PathError, UserContext, check_path_text
from sandbox_operator.api.names import AGENT_TOKEN_ENV


@pytest.mark.parametrize(
    ("path", "canonical"),
    [
        ("/init", "/init"),
        ("/./init", "/init"),
        ("/a/../init", "/init"),
        ("/../../init", "/init"),
        ("//init", "/init"),
        ("/init/", "/init"),
        ("/a/./b/../c", "/a/c"),
        ("/", "/"),
        ("", "/"),
        ("/..", "/"),
        ("/contexts/x/restart", "/contexts/x/restart"),
    ],
)
def test_canonical_path(path: str, canonical: str) -> None:
    assert canonical_path(path) == canonical


def test_only_get_health_is_open() -> None:
    assert is_open_route("GET", "/health") and is_open_route("HEAD", "/health")
    assert not is_open_route("POST", "/health") and not is_open_route("GET", "/agent/metrics")


def test_json_depth_is_checked_before_parsing() -> None:
    assert loads_json(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH) is not None
    with pytest.raises(JsonTooDeep):
        loads_json(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1))
    with pytest.raises(JsonTooDeep):
        loads_json(b"[" * 1_000_000)  # never reaches json (which would raise RecursionError)
    # Brackets inside strings, escaped quotes included, do not nest.
    text = b'{"code": "' + b"[{" * 10_000 + b'\\" ]]" }'
    assert not json_depth_exceeds(text, MAX_JSON_DEPTH)
    assert loads_json(text)["code"].startswith("[{")
    assert isinstance(JsonTooDeep("x"), ValueError)  # callers answer ValueError with 400


def test_keepalive_header() -> None:
    assert parse_keepalive_seconds(None, 90) == 90
    assert parse_keepalive_seconds("", 90) == 90
    assert parse_keepalive_seconds("0", 90) == 90
    assert parse_keepalive_seconds("15", 90) == 15
    for bad in ("1e10", "inf", "nan", "-inf", "soon"):
        with pytest.raises(ConnectError):
            parse_keepalive_seconds(bad, 90)


def test_uint_fields_have_a_maximum() -> None:
    assert uint_field({"cols": 65535}, "cols", maximum=65535) == 65535
    for value in (65536, "65536", 10**10, "9" * 100):
        with pytest.raises(ConnectError) as error:
            uint_field({"cols": value}, "cols", maximum=65535)
        assert error.value.code == "invalid_argument"


def test_paths_no_file_can_have_are_refused() -> None:
    assert check_path_text("ok/name") == "ok/name"
    for bad in ("a\x00b", "\udcff\ud800", "x" * 256, "a/" * 2100):
        with pytest.raises(PathError):
            check_path_text(bad)


def test_environment_checks() -> None:
    assert env_var_refusal({"A": "b", "PATH": "/bin"}) is None
    for bad in ({"": "x"}, {"A=B": "x"}, {"A\x00": "x"}, {"A": "b\x00"}):
        assert env_var_refusal(bad) is not None, bad
    assert without_secrets({AGENT_TOKEN_ENV: "t", "A": "b"}) == {"A": "b"}


def test_token_comparison_never_raises() -> None:
    assert tokens_equal("token", "token")
    assert not tokens_equal(None, "token") and not tokens_equal("tokem", "token")
    assert not tokens_equal("\ud800", "token")  # a lone surrogate: no bytes to compare
    assert tokens_equal("t\udcffken", "t\udcffken")  # a header's undecodable byte, on both sides
    refusal = verify_signature(
        signature="v1_\ud800", expiration=None, path="\ud800", operation="read", username="", access_token="t", now=0
    )
    assert refusal == "invalid signature"


def test_part_filenames_resolve_as_a_path_would(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "sub").mkdir(parents=True)
    user = UserContext("user", 1000, 1000, home, switch=False)
    assert part_destination(user, "a.txt") == home / "a.txt"
    assert part_destination(user, "sub/../b.txt") == home / "b.txt"
    assert part_destination(user, "/tmp/c.txt") == Path("/tmp/c.txt")  # absolute stays absolute (the SDKs')
    assert part_destination(user, "~/d.txt") == home / "d.txt"
    for bad in ("", None, "a\x00b"):
        with pytest.raises((_BadUpload, PathError)):
            part_destination(user, bad)


@pytest.mark.parametrize(
    ("disposition", "filename"),
    [
        ('form-data; name="file"; filename="/0/multi_test_file0.txt"', "/0/multi_test_file0.txt"),
        ("form-data; name=\"file\"; filename*=UTF-8''%2Ftmp%2F%C3%A9.txt", "/tmp/é.txt"),
        ('form-data; name="file"; filename="relative/x.txt"', "relative/x.txt"),
        ('form-data; name="file"', None),
    ],
)
def test_part_filenames_are_read_as_sent(disposition: str, filename: str | None) -> None:
    # aiohttp's own parser drops the leading "/": a write to /tmp/a.txt landed in ~/tmp/a.txt.
    part = BodyPartReader(b"--boundary", CIMultiDict({"Content-Disposition": disposition}), None)  # type: ignore[arg-type]
    assert part_filename(part) == filename


def test_slow_client_limits_are_configurable() -> None:
    config = parse_config(
        [], {"SANDBOX_HEADER_TIMEOUT": "1.5", "SANDBOX_KEEPALIVE_TIMEOUT": "30", "SANDBOX_BODY_TIMEOUT": "2"}
    )
    assert (config.header_timeout, config.keepalive_timeout, config.body_timeout) == (1.5, 30.0, 2.0)
    defaults = parse_config([], {})
    assert (defaults.header_timeout, defaults.keepalive_timeout, defaults.body_timeout) == (10.0, 75.0, 60.0)
    # A keep-alive timeout of 0 would mean none at all in aiohttp: the default stays.
    assert parse_config(["--keepalive-timeout", "0"], {}).keepalive_timeout == 75.0
