"""The E2B mapping of the gateway: requests → Sandbox objects, objects → E2B JSON, data-plane routes."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import parse_qs, urlencode, urlparse
from urllib.parse import quote as url_quote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from sandbox_operator.agent.signing import compute_signature
from sandbox_operator.api import Sandbox, SandboxSpec, SandboxTemplate
from sandbox_operator.api.names import (
    AGENT_TOKEN_HEADER,
    AUTO_RESUME_ANNOTATION,
    END_AT_ANNOTATION,
    ENVD_PORT,
    INTERPRETER_PORT,
    PAUSED_ANNOTATION,
    RESUME_REQUEST_ANNOTATION,
    SESSION_TYPE_ANNOTATION,
    SIGNED_PATH_HEADER,
    TOKEN_EPOCH_ANNOTATION,
)
from sandbox_operator.gateway import e2b
from sandbox_operator.lifecycle import Observed, decide, desired_from, status_patch

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
        ({"autoPause": "yes"}, "autoPause must be a boolean"),
        ({"autoResume": {"enabled": True}}, "autoResume needs autoPause"),
        ({"autoPause": True, "autoResume": True}, "autoResume must be an object"),
        ({"autoPause": True, "autoPauseMemory": False, "autoResume": {"enabled": True}}, "filesystem-only"),
        ({"network": {"rules": {}}}, "network.rules"),
        ({"network": {"denyOut": ["10.0.0.0/8"]}}, "denyOut"),
        ({"network": "none"}, "network"),
    ],
)
def test_bad_create_requests_say_what_is_wrong(request_body: dict[str, Any], message: str) -> None:
    with pytest.raises(e2b.BadRequest, match=message):
        e2b.sandbox_from_request({"templateID": "base", **request_body}, namespace="n", template="base")


def test_auto_pause_and_resume_map_to_the_lifetime_end_and_an_annotation() -> None:
    body = e2b.sandbox_from_request(
        {"templateID": "base", "timeout": 60, "autoPause": True, "autoResume": {"enabled": True}},
        namespace="n",
        template="base",
    )
    assert body["spec"]["onLifetimeEnd"] == "suspend" and body["spec"]["timeouts"]["maxLifetime"] == "60s"
    assert body["metadata"]["annotations"][AUTO_RESUME_ANNOTATION] == "true"
    Sandbox.model_validate({**body, "metadata": {**body["metadata"], "uid": UID}})  # the CRD's own model
    assert e2b.lifecycle_detail(body) == {"autoResume": True, "onTimeout": "pause"}
    assert e2b.own_timeout(body) == 60
    plain = e2b.sandbox_from_request({"templateID": "base", "autoPause": False}, namespace="n", template="base")
    assert "onLifetimeEnd" not in plain["spec"] and AUTO_RESUME_ANNOTATION not in plain["metadata"]["annotations"]
    assert e2b.lifecycle_detail(plain) == {"autoResume": False, "onTimeout": "kill"}
    # A pause that keeps only the filesystem is what every pause is here: accepted without auto-resume.
    e2b.sandbox_from_request(
        {"templateID": "base", "autoPause": True, "autoPauseMemory": False}, namespace="n", template="base"
    )


@pytest.mark.parametrize(
    ("phase", "annotations", "spec", "wakes"),
    [
        ("Suspended", {AUTO_RESUME_ANNOTATION: "true"}, {}, True),
        ("Suspending", {AUTO_RESUME_ANNOTATION: "true"}, {}, True),
        ("Resuming", {AUTO_RESUME_ANNOTATION: "true"}, {}, True),
        ("Suspended", {}, {}, False),  # no auto-resume: a paused sandbox is not running (502)
        ("Suspended", {AUTO_RESUME_ANNOTATION: "true"}, {"suspended": True}, False),  # its author holds it
        ("Terminated", {AUTO_RESUME_ANNOTATION: "true"}, {}, False),
        ("Error", {AUTO_RESUME_ANNOTATION: "true"}, {}, False),
    ],
)
def test_what_wakes_on_traffic(phase: str, annotations: dict[str, str], spec: dict[str, Any], wakes: bool) -> None:
    body = {"metadata": {"annotations": annotations}, "spec": {"template": "base", **spec}, "status": {"phase": phase}}
    assert e2b.wakes_on_traffic(body) is wakes


def test_a_resume_moves_the_end_in_the_same_patch() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    patch = e2b.resume_patch(now, now + timedelta(seconds=300))
    annotations = patch["metadata"]["annotations"]
    assert annotations[END_AT_ANNOTATION] == "2026-01-01T00:05:00Z" and annotations[PAUSED_ANNOTATION] is None
    assert RESUME_REQUEST_ANNOTATION in annotations
    assert END_AT_ANNOTATION not in e2b.resume_patch(now)["metadata"]["annotations"]


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
            {"egress": "allowList", "egressAllow": ["1.1.1.1/32", "example.com:443", "10.0.0.0/8", "pypi.org:443"]},
        ),
    ],
)
def test_network_requests_become_egress_modes(request_body: dict[str, Any], network: dict[str, Any]) -> None:
    body = e2b.sandbox_from_request({"templateID": "base", **request_body}, namespace="n", template="base")
    assert body["spec"]["network"] == network
    # A shape the CRD refuses made every such create a 400: the spec must be a valid Sandbox spec.
    assert SandboxSpec.model_validate(body["spec"]).network.egress == network["egress"]


def test_a_create_without_network_leaves_egress_to_the_template() -> None:
    body = e2b.sandbox_from_request({"templateID": "base"}, namespace="n", template="base")
    assert "network" not in body["spec"]
    assert SandboxSpec.model_validate(body["spec"]).network.egress is None


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


def test_a_new_token_epoch_revokes_the_access_token() -> None:
    body = cr()
    token = e2b.access_token(b"k" * 32, body)
    rotated = {**body, "metadata": {**body["metadata"], "annotations": {"sandbox.dev/token-epoch": "2"}}}
    assert e2b.access_token(b"k" * 32, rotated) != token
    again = {**body, "metadata": {**body["metadata"], "annotations": {"sandbox.dev/token-epoch": "3"}}}
    assert e2b.access_token(b"k" * 32, again) not in (token, e2b.access_token(b"k" * 32, rotated))


def test_the_gateways_cache_keeps_the_annotations_it_reads() -> None:
    # The token epoch revokes tokens only if the watched copy the gateway derives them from has it.
    from sandbox_operator.gateway.cache import Cache

    cache = Cache(client=None, keys_namespace="sandbox-system")  # type: ignore[arg-type]  # no watches here
    body = cr()
    body["metadata"]["resourceVersion"] = "2"
    body["metadata"]["annotations"] = {
        TOKEN_EPOCH_ANNOTATION: "7",
        SESSION_TYPE_ANNOTATION: "custom",
        "example.com/large": "x" * 10_000,
    }
    cache.observe(body)
    kept = cache.sandbox(("team-a", "e2b-abc"))
    assert kept is not None
    assert kept["metadata"]["annotations"] == {TOKEN_EPOCH_ANNOTATION: "7", SESSION_TYPE_ANNOTATION: "custom"}
    assert e2b.access_token(b"k" * 32, kept) == e2b.access_token(b"k" * 32, body) != e2b.access_token(b"k" * 32, cr())


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

    # Pages, newest first (the walk across pages and states: test_gateway_conformance.py).
    def created_at(second: int) -> dict[str, Any]:
        body = cr()
        body["metadata"]["creationTimestamp"] = f"2026-12-01T10:00:0{second}Z"
        body["status"] = {"phase": "Running", "sandboxID": f"s{second}"}
        return body

    bodies = [created_at(second) for second in (3, 1, 2, 4)]
    first, token = e2b.page(e2b.ordered(bodies), query)
    assert [e2b.sandbox_id_of(b) for b in first] == ["s4", "s3"] and token is not None
    second, token = e2b.page(e2b.ordered(bodies), e2b.parse_list_query({"limit": "2", "nextToken": token}))
    assert [e2b.sandbox_id_of(b) for b in second] == ["s2", "s1"] and token is None


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


# --- decisions the control-plane handlers take -----------------------------------------------------


def gone(body: dict[str, Any]) -> dict[str, Any]:
    return {**body, "metadata": {**body["metadata"], "deletionTimestamp": "2026-12-01T10:01:00Z"}}


@pytest.mark.parametrize(
    ("wanted", "available", "chosen"),
    [
        ("base", {"base"}, "base"),
        ("code-interpreter-v1", {"code-interpreter"}, "code-interpreter"),
        ("code-interpreter-v1", {"code-interpreter-v1", "code-interpreter"}, "code-interpreter-v1"),
        ("missing", {"base"}, None),
    ],
)
def test_template_for_prefers_the_exact_name_then_the_alias(wanted: str, available: set[str], chosen: str) -> None:
    assert e2b.template_for(wanted, available) == chosen


def _templates(*names: str, **spec: Any) -> dict[str, dict[str, Any]]:
    """The gateway cache's templates: name -> object."""
    return {name: {"metadata": {"name": name}, "spec": {"image": "i", **spec}} for name in names}


def test_create_resolves_the_template_or_refuses_with_400() -> None:
    body = e2b.sandbox_for_create(
        {"templateID": "code-interpreter-v1"}, namespace="n", templates=_templates("code-interpreter")
    )
    assert body["spec"]["template"] == "code-interpreter" and body["metadata"]["namespace"] == "n"
    with pytest.raises(e2b.Refused, match="template 'nope' not found") as refused:
        e2b.sandbox_for_create({"templateID": "nope"}, namespace="n", templates=_templates("base"))
    assert refused.value.status == 400
    with pytest.raises(e2b.BadRequest, match="templateID"):
        e2b.sandbox_for_create({}, namespace="n", templates=_templates("base"))


def test_create_refuses_a_template_the_keys_namespace_may_not_use() -> None:
    templates = _templates("gpu", allowedNamespaces=["ml"])
    assert e2b.sandbox_for_create({"templateID": "gpu"}, namespace="ml", templates=templates)
    with pytest.raises(e2b.Refused, match="template 'gpu' may not be used in namespace 'team-a'") as refused:
        e2b.sandbox_for_create({"templateID": "gpu"}, namespace="team-a", templates=templates)
    assert refused.value.status == 403
    assert "ml" not in str(refused.value).replace("'gpu'", "")  # other tenants' namespaces are not told


@pytest.mark.parametrize(("timeout", "lifetime"), [(0, "86400s"), (90000, "86400s"), (120, "120s"), (None, "300s")])
def test_create_clamps_the_timeout_to_the_templates_cap(timeout: int | None, lifetime: str) -> None:
    templates = _templates("base", timeouts={"maxLifetimeLimit": "24h"})
    payload: dict[str, Any] = {"templateID": "base"} if timeout is None else {"templateID": "base", "timeout": timeout}
    body = e2b.sandbox_for_create(payload, namespace="n", templates=templates)
    assert body["spec"]["timeouts"] == {"maxLifetime": lifetime, "idle": "0"}


def test_create_with_timeout_0_and_no_cap_never_ends() -> None:
    body = e2b.sandbox_for_create({"templateID": "base", "timeout": 0}, namespace="n", templates=_templates("base"))
    assert body["spec"]["timeouts"]["maxLifetime"] == "0s"


def test_create_with_timeout_0_reports_the_real_end() -> None:
    # timeout 0 on a capped template: the status the operator writes for the created object ends it at
    # the cap, and that is the endAt get_info and list report (not a never-ending sandbox's distant one).
    templates = _templates("base", timeouts={"maxLifetimeLimit": "1h"})
    manifest = e2b.sandbox_for_create({"templateID": "base", "timeout": 0}, namespace="n", templates=templates)
    manifest["metadata"].update({"uid": UID, "creationTimestamp": "2026-12-01T10:00:00Z"})
    created = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    wanted = desired_from(Sandbox.from_body(manifest), SandboxTemplate.from_body(templates["base"]))
    status = status_patch(decide(wanted, Observed(created_at=created), created), {}, created)
    assert status["expiresAt"] == "2026-12-01T11:00:00Z"
    assert e2b.sandbox_detail({**manifest, "status": status}, templates["base"], None)["endAt"] == status["expiresAt"]


@pytest.mark.parametrize(
    ("body", "shown"),
    [(None, False), (cr(), True), (cr("Suspended"), True), (cr("Terminated"), False), (gone(cr()), False)],
)
def test_the_api_shows_live_sandboxes_only(body: dict[str, Any] | None, shown: bool) -> None:
    assert e2b.visible(body) is shown
    if shown:
        assert e2b.require_visible(body, "sid") is body
    else:
        with pytest.raises(e2b.Refused, match="sandbox sid not found") as refused:
            e2b.require_visible(body, "sid")
        assert refused.value.status == 404


def with_status(phase: str, **status: Any) -> dict[str, Any]:
    return {**cr(), "status": {"phase": phase, **status}}


@pytest.mark.parametrize(
    ("body", "settled"),
    [
        (None, True),
        (with_status("Creating"), False),
        (with_status("Running"), False),  # no pod IP yet: nothing to talk to
        (with_status("Running", podIP="10.0.0.7"), True),
        (with_status("Error"), True),
        (with_status("Terminated"), True),
        (with_status("Suspended"), False),  # a resume under way: the operator has not started it yet
        ({**with_status("Suspended"), "spec": {"template": "base", "suspended": True}}, True),  # suspended again
        (
            {**with_status("Resuming"), "metadata": {**cr()["metadata"], "annotations": {PAUSED_ANNOTATION: "true"}}},
            True,
        ),
    ],
)
def test_a_start_settles_on_running_with_an_ip_or_an_end(body: dict[str, Any] | None, settled: bool) -> None:
    assert e2b.settled(body) is settled


def test_a_settled_start_is_served_or_refused() -> None:
    running = with_status("Running", podIP="10.0.0.7")
    assert e2b.started(running) is running
    with pytest.raises(e2b.Refused, match="deleted while it was starting") as deleted:
        e2b.started(None)
    assert deleted.value.status == 409
    with pytest.raises(e2b.Refused, match="failed to start: ImageError: no such image") as failed:
        e2b.started(with_status("Error", reason="ImageError", message="no such image"))
    assert failed.value.status == 500
    with pytest.raises(e2b.Refused, match="failed to start: Terminated: None"):
        e2b.started(with_status("Terminated"))
    # Another client paused it while this start waited: theirs is the later word (409, not a 504).
    paused = {**with_status("Resuming"), "metadata": {**cr()["metadata"], "annotations": {PAUSED_ANNOTATION: "true"}}}
    with pytest.raises(e2b.Refused, match="paused while it was starting") as repaused:
        e2b.started(paused)
    assert repaused.value.status == 409


async def test_a_start_waiting_on_the_cache_is_refused_when_another_client_pauses() -> None:
    # Connect and create wait on the gateway's watched copy, which keeps only the annotations it
    # reads: without sandbox.dev/paused among them, a pause by another client left the wait to run
    # into the create timeout (504) instead of the documented 409.
    from sandbox_operator.gateway.cache import Cache

    cache = Cache(client=None, keys_namespace="sandbox-system")  # type: ignore[arg-type]  # no watches here
    resuming = with_status("Resuming")
    resuming["metadata"]["resourceVersion"] = "2"
    cache.observe(resuming)
    waiting = asyncio.create_task(cache.wait_for(("team-a", "e2b-abc"), e2b.settled, 5))
    await asyncio.sleep(0)
    assert not waiting.done()
    paused = {
        **with_status("Suspending"),
        "metadata": {**resuming["metadata"], "resourceVersion": "3", "annotations": {PAUSED_ANNOTATION: "true"}},
    }
    cache._on_sandbox("MODIFIED", paused)  # what the watch loop does with an event, then wakes the waiters
    await cache._notify()
    body = await waiting
    assert body is not None and body["metadata"]["annotations"] == {PAUSED_ANNOTATION: "true"}
    with pytest.raises(e2b.Refused, match="paused while it was starting") as refused:
        e2b.started(body)
    assert refused.value.status == 409


NOW = datetime(2026, 12, 1, 10, 1, 30, tzinfo=UTC)  # 90 s after cr()'s creation, 210 s before its end


def test_a_requested_end_counts_from_now() -> None:
    assert e2b.requested_end(cr(), 60, NOW, only_longer=False) == NOW + timedelta(seconds=60)
    # set_timeout may shorten; connect only lengthens.
    assert e2b.requested_end(cr(), 60, NOW, only_longer=True) is None
    assert e2b.requested_end(cr(), 600, NOW, only_longer=True) == NOW + timedelta(seconds=600)
    assert e2b.requested_end(cr("Creating") | {"status": {}}, 60, NOW, only_longer=True) == NOW + timedelta(seconds=60)
    # whole seconds, rounded up: the sandbox never ends before the asked-for time
    assert e2b.requested_end(cr(), 60, NOW + timedelta(microseconds=200), only_longer=False) == NOW + timedelta(
        seconds=61
    )


def test_timeouts_pause_and_resume_are_annotations_never_spec() -> None:
    end = NOW + timedelta(seconds=60)
    for patch in (e2b.end_patch(end), e2b.pause_patch(), e2b.resume_patch(NOW)):
        assert set(patch) == {"metadata"}, patch
    assert e2b.end_patch(end)["metadata"]["annotations"] == {"sandbox.dev/end-at": "2026-12-01T10:02:30Z"}
    assert e2b.pause_patch()["metadata"]["annotations"] == {"sandbox.dev/paused": "true"}
    resume = e2b.resume_patch(NOW)["metadata"]["annotations"]
    assert resume["sandbox.dev/paused"] is None  # a merge patch's null removes the pause request
    assert (
        resume["sandbox.dev/resume-request"]
        != e2b.resume_patch(NOW + timedelta(microseconds=1))["metadata"]["annotations"]["sandbox.dev/resume-request"]
    )


def test_a_requested_end_is_in_effect_once_expires_at_moved() -> None:
    end = NOW + timedelta(seconds=60)
    before = "2026-12-01T10:05:00Z"
    assert e2b.end_in_effect(None, end, before)
    assert not e2b.end_in_effect(with_status("Running", expiresAt=before), end, before)
    assert e2b.end_in_effect(with_status("Running", expiresAt="2026-12-01T10:02:30Z"), end, before)
    assert e2b.end_in_effect(with_status("Running", expiresAt="2026-12-01T10:02:00Z"), end, before)  # capped
    assert not e2b.end_in_effect(with_status("Running"), end, None)


def test_a_sandbox_suspended_by_its_spec_is_not_resumed_by_the_api() -> None:
    with pytest.raises(e2b.Refused, match="suspended by its spec") as refused:
        e2b.ensure_resumable({"spec": {"suspended": True}}, "abc")
    assert refused.value.status == 409
    e2b.ensure_resumable({"spec": {"suspended": False}}, "abc")


def test_pausing_refuses_a_paused_sandbox_and_ends_at_suspended() -> None:
    e2b.ensure_pausable(cr(), "sid")
    with pytest.raises(e2b.Refused, match="sandbox sid is already paused") as refused:
        e2b.ensure_pausable(cr("Suspending"), "sid")
    assert refused.value.status == 409
    assert e2b.suspended_or_gone(None) and e2b.suspended_or_gone(cr("Suspended"))
    assert not e2b.suspended_or_gone(cr("Suspending"))


@pytest.mark.parametrize(
    ("body", "proxied", "metrics"),
    [
        (with_status("Running", podIP="10.0.0.7"), "10.0.0.7", "10.0.0.7"),
        (with_status("Creating", podIP="10.0.0.7"), None, "10.0.0.7"),  # E2B calls it running already
        (with_status("Running"), None, None),
        (with_status("Suspended", podIP="10.0.0.7"), None, None),
    ],
)
def test_traffic_needs_running_metrics_need_an_e2b_running_state(
    body: dict[str, Any], proxied: str | None, metrics: str | None
) -> None:
    assert e2b.running_pod_ip(body) == proxied
    assert e2b.metrics_pod_ip(body) == metrics


def test_running_pod_ip_of_no_sandbox_is_none() -> None:
    assert e2b.running_pod_ip(None) is None


def test_listing_skips_ended_and_deleted_sandboxes_and_pages_v2_only() -> None:
    def named(name: str, body: dict[str, Any]) -> dict[str, Any]:
        return {**body, "metadata": {**body["metadata"], "name": name}}

    bodies = [named(f"s{i}", cr()) for i in range(3)] + [named("ended", cr("Error")), named("going", gone(cr()))]
    query = e2b.parse_list_query({"limit": "2"})
    everything, token = e2b.list_sandboxes(bodies, {"base": TEMPLATE}, query, paginated=False)
    ids = [item["sandboxID"] for item in everything]
    # One creation time: newest first falls back to the sandbox ID (descending too).
    assert len(ids) == 3 and ids == sorted(ids, reverse=True) and token is None
    assert everything[0]["cpuCount"] == 2  # sized from the template
    first, token = e2b.list_sandboxes(bodies, {}, query, paginated=True)
    assert [item["sandboxID"] for item in first] == ids[:2] and token is not None
    assert "envdAccessToken" not in first[0] and "trafficAccessToken" not in first[0]


@pytest.mark.parametrize(
    ("status", "body", "answered", "message"),
    [
        (422, {"message": "spec.timeouts: invalid"}, 400, "kubernetes: spec.timeouts: invalid"),
        (409, {"message": "exists"}, 409, "kubernetes: exists"),
        (403, {"message": "forbidden"}, 403, "kubernetes: forbidden"),
        (500, {"message": "etcd"}, 502, "kubernetes: etcd"),
        (503, "unavailable", 502, "kubernetes: unavailable"),
    ],
)
def test_kubernetes_errors_in_e2b_shape(status: int, body: Any, answered: int, message: str) -> None:
    assert e2b.kubernetes_error(status, body) == (answered, {"code": answered, "message": message})


# --- admission of data-plane requests --------------------------------------------------------------

ENVD = e2b.Route("sid", ENVD_PORT)


def admit(route: e2b.Route = ENVD, *, method: str = "GET", path: str = "/process", **given: Any) -> Any:
    """The admission, or the refusal as (status, message)."""
    try:
        return e2b.proxy_admission(
            route,
            method=method,
            path=path,
            headers=given.get("headers", {}),
            query=given.get("query", {}),
            token="tok",
            now=1000.0,
        )
    except e2b.Refused as refused:
        return refused.status, str(refused)


def test_the_access_token_admits_a_request_in_either_header() -> None:
    assert admit(headers={"X-Access-Token": "tok"}) == e2b.Admission()
    assert admit(headers={"E2B-Traffic-Access-Token": "tok"}) == e2b.Admission()
    assert admit(e2b.Route("sid", 8080), headers={"X-Access-Token": "tok"}) == e2b.Admission()
    assert admit(headers={"X-Access-Token": "wrong"}) == (
        401,
        "missing or invalid access token (X-Access-Token or E2B-Traffic-Access-Token)",
    )


def test_internal_envd_paths_are_never_proxied_even_with_a_token() -> None:
    assert admit(path="/init", headers={"X-Access-Token": "tok"}) == (403, "/init is internal to the sandbox")
    assert admit(e2b.Route("sid", 8080), path="/init", headers={"X-Access-Token": "tok"}) == e2b.Admission()


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ("/init", "/init"),
        ("/./init", "/init"),
        ("/a/../init", "/init"),
        ("//init", "/init"),
        ("///a//b/", "/a/b/"),
        ("/%2e/init", "/init"),
        ("/%2E%2e/init", "/init"),
        ("/.%2e/init", "/init"),
        ("/a/b/%2E%2E/%2e%2E/init", "/init"),
        ("/../../init", "/init"),
        ("/%69nit", "/init"),
        ("/files/%63ompose", "/files/compose"),
        ("/a/b/..", "/a/"),
        ("/a/.", "/a/"),
        ("/..", "/"),
        ("", "/"),
        ("/init#x", "/init"),
        # Reserved and other characters stay escaped (one spelling: upper-case hex).
        ("/files%2fcompose", "/files%2Fcompose"),
        ("/a%20b/%7e", "/a%20b/~"),
        ("/a/..%2Finit", "/a/..%2Finit"),
        ("/%00", "/%00"),
    ],
)
def test_proxied_paths_are_normalised_as_the_client_and_the_agent_would(raw: str, path: str) -> None:
    assert e2b.proxy_path(raw) == path


@given(st.text(alphabet="/.%2eEfF0a~", max_size=24))
def test_normalised_paths_are_fixed_points_without_dot_segments(raw: str) -> None:
    path = e2b.proxy_path(raw)
    assert path.startswith("/") and "//" not in path
    assert not {".", ".."} & set(path.split("/"))
    assert e2b.proxy_path(path) == path


@pytest.mark.parametrize(
    "raw", ["/./init", "/a/../init", "//init", "/%2e/init", "/%69nit", "/files%2Fcompose", "/a/..%2Finit", "//freeze"]
)
def test_internal_paths_are_refused_however_they_are_spelled(raw: str) -> None:
    refused = admit(path=e2b.proxy_path(raw), method="POST", headers={"X-Access-Token": "tok"})
    assert refused[0] == 403


def test_health_is_open_on_envd_only() -> None:
    assert admit(path="/health") == e2b.Admission()
    assert admit(e2b.Route("sid", 8080), path="/health") != e2b.Admission()


def signed(operation: Literal["read", "write"], expiration: int, path: str = "/a.txt") -> dict[str, str]:
    signature = compute_signature(path, operation, "user", "tok", expiration)
    return {"path": path, "username": "user", "signature": signature, "signature_expiration": str(expiration)}


def test_signed_file_urls_stand_in_for_the_token_for_their_path_only() -> None:
    assert admit(path="/files", query=signed("read", 2000)) == e2b.Admission(signed_path="/a.txt")
    assert admit(method="POST", path="/files", query=signed("write", 2000)) == e2b.Admission(signed_path="/a.txt")
    refused = admit(method="POST", path="/files", query=signed("read", 2000))
    assert refused[0] == 401 and refused[1].startswith("file URL refused: ")
    assert admit(path="/files", query=signed("read", 999)) == (401, "file URL refused: signature has expired")
    # With the token, the request is the token's (any path), signature or not.
    assert admit(path="/files", query=signed("read", 2000), headers={"X-Access-Token": "tok"}) == e2b.Admission()
    # A path no header can carry is refused, though signed.
    assert admit(path="/files", query=signed("read", 2000, "/a\nb"))[0] == 400


def test_only_the_agents_ports_and_declared_ones_are_proxied() -> None:
    body = {"spec": {"template": "web", "network": {"ports": [9000]}}}
    template = {"spec": {"ports": [8080]}}
    assert all(e2b.declared_port(port, body, template) for port in (ENVD_PORT, INTERPRETER_PORT, 8080, 9000))
    assert not any(e2b.declared_port(port, body, template) for port in (22, 8081, 2375))
    assert e2b.declared_port(9000, body, None) and not e2b.declared_port(8080, body, None)  # template gone
    assert not e2b.declared_port(8080, {"spec": {}}, {"spec": {}})


def forwarded(headers: dict[str, str], port: int = ENVD_PORT, admission: e2b.Admission | None = None) -> dict[str, str]:
    return e2b.forwarded_headers(
        CIMultiDict(headers),
        None,
        port=port,
        agent_headers={AGENT_TOKEN_HEADER: "agent-tok"},
        admission=admission or e2b.Admission(),
    )


def test_forwarded_headers_drop_hop_by_hop_ones_and_the_gateways_credentials() -> None:
    given = CIMultiDict(
        {
            "X-Access-Token": "tok",
            "X-API-KEY": "key",
            "Connection": "keep-alive",
            "Host": "49983-sid.example.com",
            "Content-Length": "5",
            "Content-Type": "text/plain",
        }
    )
    assert e2b.forwarded_headers(given, 5, port=8080, agent_headers={}, admission=e2b.Admission()) == {
        "Content-Type": "text/plain",
        "Content-Length": "5",
        "Accept-Encoding": "identity",  # nothing the client did not ask for
    }
    assert forwarded({"Accept-Encoding": "gzip"}, port=8080) == {"Accept-Encoding": "gzip"}


def test_the_agent_gets_its_own_token_and_a_user_port_none() -> None:
    client = {"X-Access-Token": "client-tok", "E2B-Traffic-Access-Token": "client-tok"}
    for port in (ENVD_PORT, INTERPRETER_PORT):
        assert forwarded(client, port) == {AGENT_TOKEN_HEADER: "agent-tok", "Accept-Encoding": "identity"}
    assert forwarded(client, 8080) == {"Accept-Encoding": "identity"}  # a tenant's server never sees it
    # A pod without a token (started before tokens): nothing in its place.
    assert e2b.forwarded_headers(
        CIMultiDict(client), None, port=ENVD_PORT, agent_headers={}, admission=e2b.Admission()
    ) == {"Accept-Encoding": "identity"}


def test_the_signed_path_is_the_gateways_to_set() -> None:
    claimed = {SIGNED_PATH_HEADER: "/etc/shadow", SIGNED_PATH_HEADER.lower(): "/x"}
    assert SIGNED_PATH_HEADER not in forwarded(claimed)  # a client's claim never passes
    assert forwarded(claimed, admission=e2b.Admission(signed_path="/a.txt"))[SIGNED_PATH_HEADER] == "/a.txt"
    assert SIGNED_PATH_HEADER not in forwarded({}, 8080, e2b.Admission(signed_path="/a.txt"))


def test_returned_headers_keep_repeated_ones() -> None:
    upstream = CIMultiDict([("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("Transfer-Encoding", "chunked")])
    assert e2b.returned_headers(upstream) == [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]


@pytest.mark.parametrize(
    ("cookie", "host_only"),
    [
        ("a=1; Domain=example.com; Path=/", "a=1; Path=/"),
        ("a=1; domain=.example.com", "a=1"),
        ("a=1;DOMAIN = example.com;Secure", "a=1;Secure"),
        ("a=1; Path=/; Domain=8080-sid.example.com; HttpOnly", "a=1; Path=/; HttpOnly"),
        ("a=1; Path=/domain=x", "a=1; Path=/domain=x"),
        ("domain=1; Path=/", "domain=1; Path=/"),  # a cookie named domain keeps its name
    ],
)
def test_cookies_from_a_sandbox_are_host_only(cookie: str, host_only: str) -> None:
    assert e2b.returned_headers(CIMultiDict([("Set-Cookie", cookie)])) == [("Set-Cookie", host_only)]


def test_proxy_error_bodies_name_the_sandbox() -> None:
    assert e2b.sandbox_gone_body("sid") == {"sandboxId": "sid", "message": "The sandbox was not found", "code": 502}
    assert e2b.port_not_open_body(e2b.Route("sid", 8080))["port"] == 8080


def test_metrics_keep_to_the_asked_window() -> None:
    sample = e2b.metric_from_agent({"ts": 1_000_000})
    assert e2b.metrics_window({}) == (None, None)
    assert e2b.in_window(sample, *e2b.metrics_window({}))
    assert e2b.in_window(sample, *e2b.metrics_window({"start": "999000", "end": "1000000"}))
    assert e2b.in_window(sample, 999_000, 999_998)  # an end of "now", taken a moment before the sample
    assert not e2b.in_window(sample, 990_000, 996_400)  # an hour ago: no history is kept
    assert not e2b.in_window(sample, 1_000_100, None)  # starts later
    for bad in ({"start": "yesterday"}, {"end": "1.5"}, {"start": "10", "end": "5"}):
        with pytest.raises(e2b.BadRequest):
            e2b.metrics_window(bad)
