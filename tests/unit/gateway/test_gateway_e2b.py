"""The E2B mapping of the gateway: requests → Sandbox objects, objects → E2B JSON, data-plane routes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse
from urllib.parse import quote as url_quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandbox_operator.api import Sandbox
from sandbox_operator.gateway import e2b

UID = "0b5a9d1e-3f3c-4b0e-9d8e-1f2a3b4c5d6e"
TEMPLATE = {
    "metadata": {"name": "base"},
    "spec": {"image": "i", "resources": {"default": {"cpu": "1500m", "memory": "768Mi", "disk": "2Gi"}}},
}


def cr(phase: str | None = "Running", **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "e2b-abc", "namespace": "team-a", "uid": UID, "creationTimestamp": "2026-12-01T10:00:00Z"},
        "spec": {"template": "base", **spec},
        "status": {"phase": phase, "startedAt": "2026-12-01T10:00:01Z", "expiresAt": "2026-12-01T10:05:00Z"}
        if phase
        else {},
    }


def test_create_maps_timeout_env_metadata_and_validates_as_a_sandbox() -> None:
    body = e2b.sandbox_from_request(
        {"templateID": "base", "timeout": 120, "metadata": {"team": "a"}, "envVars": {"FOO": "bar"}},
        namespace="team-a",
        template="base",
    )
    assert body["metadata"]["namespace"] == "team-a" and body["metadata"]["name"].startswith("e2b-")
    assert body["spec"] == {
        "template": "base",
        "timeouts": {"maxLifetime": "120s", "idle": "0"},
        "metadata": {"team": "a"},
        "env": {"FOO": "bar"},
    }
    Sandbox.model_validate({**body, "metadata": {**body["metadata"], "uid": UID}})  # the CRD's own model


def test_create_defaults_to_the_sdk_timeout() -> None:
    body = e2b.sandbox_from_request({"templateID": "base"}, namespace="n", template="base")
    assert body["spec"]["timeouts"]["maxLifetime"] == "300s"


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        ({"timeout": -1}, "timeout"),
        ({"timeout": "60"}, "timeout"),
        ({"timeout": True}, "timeout"),
        ({"metadata": {"a": 1}}, "metadata"),
        ({"envVars": ["A=1"]}, "envVars"),
        ({"autoPause": True}, "autoPause"),
        ({"network": {"rules": {}}}, "network.rules"),
        ({"network": {"denyOut": ["10.0.0.0/8"]}}, "denyOut"),
        ({"network": "none"}, "network"),
    ],
)
def test_bad_create_requests_say_what_is_wrong(request_body: dict[str, Any], message: str) -> None:
    with pytest.raises(e2b.BadRequest, match=message):
        e2b.sandbox_from_request({"templateID": "base", **request_body}, namespace="n", template="base")


@pytest.mark.parametrize(
    ("request_body", "network"),
    [
        ({"allow_internet_access": False}, {"egress": "deny"}),
        ({"allow_internet_access": True}, {"egress": "allow"}),
        ({"network": {"denyOut": ["0.0.0.0/0"]}}, {"egress": "deny"}),
        (
            {
                "network": {
                    "allowOut": ["1.1.1.1", "example.com", "10.0.0.0/8", "pypi.org:443"],
                    "denyOut": ["0.0.0.0/0"],
                }
            },
            {"egress": {"allow": ["1.1.1.1/32", "example.com:443", "10.0.0.0/8", "pypi.org:443"]}},
        ),
    ],
)
def test_network_requests_become_egress_modes(request_body: dict[str, Any], network: dict[str, Any]) -> None:
    body = e2b.sandbox_from_request({"templateID": "base", **request_body}, namespace="n", template="base")
    assert body["spec"]["network"] == network


def test_sandbox_id_is_the_operators_and_tokens_are_per_object() -> None:
    from sandbox_operator.resources import sandbox_id_for

    body = cr()
    assert e2b.sandbox_id_of(body) == sandbox_id_for("team-a", "e2b-abc", UID)
    assert e2b.sandbox_id_of({**body, "status": {"sandboxID": "given"}}) == "given"
    token = e2b.access_token(b"k" * 32, body)
    assert token == e2b.access_token(b"k" * 32, cr())
    assert token != e2b.access_token(b"x" * 32, body)
    recreated = {**body, "metadata": {**body["metadata"], "uid": "another"}}
    assert token != e2b.access_token(b"k" * 32, recreated)


def test_detail_has_every_required_field_and_the_effective_sizes() -> None:
    detail = e2b.sandbox_detail(cr(metadata={"team": "a"}), TEMPLATE, "tok")
    for field in (
        "templateID",
        "sandboxID",
        "clientID",
        "startedAt",
        "endAt",
        "envdVersion",
        "cpuCount",
        "memoryMB",
        "diskSizeMB",
        "state",
    ):
        assert field in detail
    assert (detail["cpuCount"], detail["memoryMB"], detail["diskSizeMB"]) == (2, 768, 2048)
    assert detail["state"] == "running" and detail["metadata"] == {"team": "a"}
    assert detail["endAt"] == "2026-12-01T10:05:00Z" and detail["envdAccessToken"] == "tok"


@pytest.mark.parametrize(
    ("phase", "state"),
    [
        (None, "running"),
        ("Creating", "running"),
        ("Running", "running"),
        ("Resuming", "running"),
        ("Suspending", "paused"),
        ("Suspended", "paused"),
        ("Terminating", None),
        ("Terminated", None),
        ("Error", None),
    ],
)
def test_phases_map_to_e2b_states(phase: str | None, state: str | None) -> None:
    assert e2b.state_of(cr(phase)) == state


def test_lifetime_for_a_timeout_counts_from_creation() -> None:
    created = datetime(2026, 12, 1, 10, 0, 0, tzinfo=UTC)
    assert e2b.lifetime_for_timeout(created, created + timedelta(seconds=90.2), 60) == "151s"


def test_metadata_filter_decodes_the_sdks_double_encoding() -> None:
    # The SDK quotes each key and value, urlencodes k=v, and the HTTP client encodes it once more.
    inner = urlencode({url_quote("team"): url_quote("a b"), url_quote("x&y"): url_quote("1=2")})
    url = "http://gw/v2/sandboxes?" + urlencode({"metadata": inner})
    received = parse_qs(urlparse(url).query)["metadata"][0]  # what the server framework hands over
    assert e2b.parse_metadata_filter(received) == {"team": "a b", "x&y": "1=2"}


def test_list_query_filters_and_pages() -> None:
    query = e2b.parse_list_query({"state": "paused", "metadata": "team=a", "limit": "2"})
    assert query.states == frozenset({"paused"}) and query.limit == 2
    assert e2b.matches(cr("Suspended", metadata={"team": "a"}), query)
    assert not e2b.matches(cr("Running", metadata={"team": "a"}), query)
    assert not e2b.matches(cr("Suspended", metadata={"team": "b"}), query)
    items = [{"sandboxID": f"s{i}"} for i in (3, 1, 2, 4)]
    first, token = e2b.page(items, query)
    assert [i["sandboxID"] for i in first] == ["s1", "s2"] and token == "s2"
    second, token = e2b.page(items, e2b.parse_list_query({"limit": "2", "nextToken": "s2"}))
    assert [i["sandboxID"] for i in second] == ["s3", "s4"] and token is None


@pytest.mark.parametrize("query", [{"state": "sleeping"}, {"limit": "0"}, {"limit": "101"}, {"limit": "x"}])
def test_bad_list_queries_are_refused(query: dict[str, str]) -> None:
    with pytest.raises(e2b.BadRequest):
        e2b.parse_list_query(query)


@pytest.mark.parametrize(
    ("headers", "host", "route"),
    [
        ({"E2b-Sandbox-Id": "abc123", "E2b-Sandbox-Port": "49983"}, "127.0.0.1:3000", e2b.Route("abc123", 49983)),
        ({}, "49999-abc123.sandbox.example.com", e2b.Route("abc123", 49999)),
        ({}, "8080-abc123.sandbox.example.com:443", e2b.Route("abc123", 8080)),
        ({}, "api.sandbox.example.com", None),
        ({}, "127.0.0.1:3000", None),
        ({"E2b-Sandbox-Id": "abc123"}, "127.0.0.1", "both E2b-Sandbox-Id and E2b-Sandbox-Port are required"),
        ({"E2b-Sandbox-Id": "a", "E2b-Sandbox-Port": "99999"}, "h", "invalid E2b-Sandbox-Port '99999'"),
    ],
)
def test_routes(headers: dict[str, str], host: str, route: e2b.Route | str | None) -> None:
    assert e2b.route_of(headers, host) == route


@given(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=30),
    st.integers(min_value=1, max_value=65535),
)
def test_host_routes_round_trip(sandbox_id: str, port: int) -> None:
    assert e2b.route_of({}, f"{port}-{sandbox_id}.sbx.example.com") == e2b.Route(sandbox_id, port)


def test_metric_from_the_agents_envd_metrics() -> None:
    metric = e2b.metric_from_agent(
        {
            "ts": 1764583200,
            "cpu_count": 2,
            "cpu_used_pct": 12.5,
            "mem_used": 10,
            "mem_total": 20,
            "mem_cache": 1,
            "disk_used": 5,
            "disk_total": 50,
        }
    )
    assert metric["timestamp"] == "2025-12-01T10:00:00Z" and metric["timestampUnix"] == 1764583200
    assert (metric["cpuCount"], metric["cpuUsedPct"], metric["diskTotal"]) == (2, 12.5, 50)


def test_new_api_keys_have_the_shape_old_sdks_check() -> None:
    key = e2b.new_api_key()
    assert key.startswith("e2b_") and len(key) == 44 and int(key[4:], 16) >= 0


def test_api_key_command_prints_an_applicable_secret(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from sandbox_operator.__main__ import main

    main(["api-key", "--grants", "team-a", "--keys-namespace", "gw"])
    captured = capsys.readouterr()
    secret = json.loads(captured.out)
    key = captured.err.strip().removeprefix("E2B_API_KEY=")
    assert secret["metadata"]["namespace"] == "gw" and secret["stringData"] == {"key": key}
    assert secret["metadata"]["annotations"] == {"sandbox.dev/namespace": "team-a"}
    assert secret["metadata"]["labels"] == {"sandbox.dev/api-key": "true"}
