"""Plain HTTP endpoints and protocol-level bad input, via raw requests and the SDK."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from agentlib import ACCESS_TOKEN, AgentProcess, FakeControlPlane
from e2b import AuthenticationException, Sandbox, SandboxException

AUTH = {"X-Access-Token": ACCESS_TOKEN}
TRAFFIC_AUTH = {"E2B-Traffic-Access-Token": ACCESS_TOKEN}
JSON = {"Content-Type": "application/json"}


def code_sandbox_via(plane: FakeControlPlane, url: str) -> Any:
    """An unmodified code-interpreter SDK whose data-plane requests all go to `url`."""
    from e2b_code_interpreter import Sandbox as CodeSandbox

    return CodeSandbox.create(api_key="e2b_" + "0" * 40, api_url=plane.url, sandbox_url=url)


@pytest.fixture(scope="module")
def wrong_token_plane() -> Iterator[FakeControlPlane]:
    plane = FakeControlPlane("not-the-sandbox-token")
    yield plane
    plane.close()


@pytest.fixture(scope="module")
def envd_token_only_plane() -> Iterator[FakeControlPlane]:
    """A control plane that returns the right envdAccessToken but no trafficAccessToken."""
    plane = FakeControlPlane(ACCESS_TOKEN, traffic_token=False)
    yield plane
    plane.close()


def test_health_needs_no_token(agent: Any) -> None:
    assert agent.request("GET", "/health")[0] == 204


def test_wrong_token_raises_authentication_exception(agent: Any) -> None:
    # A sandbox object whose token is wrong: debug mode plus a forged header.
    sandbox = Sandbox.create(debug=True, sandbox_url=agent.envd_url)
    with pytest.raises(AuthenticationException):
        sandbox.commands.run("true")
    with pytest.raises(AuthenticationException):
        sandbox.files.list(".")
    with pytest.raises(AuthenticationException):
        sandbox.files.read("anything.txt")


def test_execute_without_token_is_refused(agent: Any) -> None:
    body = json.dumps({"code": "1"}).encode()
    status, _, _ = agent.request(
        "POST",
        "/execute",
        body=body,
        headers={"Content-Type": "application/json"},
        port=agent.interpreter_port,
    )
    assert status == 401


@pytest.mark.parametrize("listener", ["envd", "interpreter"])
def test_wrong_token_is_refused_on_run_code_and_contexts(
    agent: AgentProcess, wrong_token_plane: FakeControlPlane, listener: str
) -> None:
    url = agent.envd_url if listener == "envd" else agent.interpreter_url
    sandbox = code_sandbox_via(wrong_token_plane, url)
    refused = r"401 Unauthorized.*missing or invalid access token"
    with pytest.raises(SandboxException, match=refused):
        sandbox.run_code("1 + 1")
    with pytest.raises(SandboxException, match=refused):
        sandbox.create_code_context()
    with pytest.raises(SandboxException, match=refused):
        sandbox.list_code_contexts()
    with pytest.raises(SandboxException, match=refused):
        sandbox.restart_code_context("any-context")
    with pytest.raises(SandboxException, match=refused):
        sandbox.remove_code_context("any-context")


def test_contexts_need_the_traffic_token_the_sdk_sends(
    agent: AgentProcess, envd_token_only_plane: FakeControlPlane
) -> None:
    # Without trafficAccessToken the SDK sends no token on /contexts (only /execute has X-Access-Token).
    sandbox = code_sandbox_via(envd_token_only_plane, agent.envd_url)
    assert sandbox.run_code("6 * 7").text == "42"
    with pytest.raises(SandboxException, match="401 Unauthorized"):
        sandbox.list_code_contexts()


@pytest.mark.parametrize("listener", ["envd", "interpreter"])
def test_contexts_without_token_are_refused_with_a_clear_message(agent: AgentProcess, listener: str) -> None:
    port = agent.envd_port if listener == "envd" else agent.interpreter_port
    for method, path in (
        ("GET", "/contexts"),
        ("POST", "/contexts"),
        ("POST", "/contexts/x/restart"),
        ("DELETE", "/contexts/x"),
    ):
        body = b"{}" if method == "POST" else None
        status, _, reply = agent.request(method, path, body=body, headers=JSON, port=port)
        assert (status, json.loads(reply)["code"]) == (401, 401), (method, path)
        assert "E2B-Traffic-Access-Token" in json.loads(reply)["message"]
    # Either header carries the token.
    for auth in (TRAFFIC_AUTH, AUTH):
        status, _, reply = agent.request("GET", "/contexts", headers={**JSON, **auth}, port=port)
        assert status == 200 and isinstance(json.loads(reply), list)


def test_metrics_json_has_the_envd_shape(agent: Any) -> None:
    status, _, body = agent.request("GET", "/metrics", headers=AUTH)
    metrics = json.loads(body)
    assert status == 200
    for key in (
        "ts",
        "cpu_count",
        "cpu_used_pct",
        "mem_total",
        "mem_used",
        "mem_cache",
        "disk_used",
        "disk_total",
    ):
        assert isinstance(metrics[key], int | float), key
    assert metrics["mem_total"] >= metrics["mem_used"] > 0
    assert metrics["disk_total"] >= metrics["disk_used"] > 0
    assert metrics["last_activity_ts"] > 0


def test_prometheus_metrics_count_executions(sandbox: Any, agent: Any) -> None:
    sandbox.commands.run("true")
    status, headers, body = agent.request("GET", "/metrics?format=prometheus", headers=AUTH)
    text = body.decode()
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    command_total = next(
        line for line in text.splitlines() if line.startswith('sandbox_agent_executions_total{kind="command"')
    )
    assert float(command_total.rsplit(" ", 1)[1]) >= 1
    assert "sandbox_agent_last_activity_timestamp_seconds" in text
    assert agent.request("GET", "/agent/metrics", headers=AUTH)[2].decode().startswith("# HELP")


def test_metrics_require_the_token(agent: Any) -> None:
    assert agent.request("GET", "/metrics")[0] == 401


def test_init_sets_env_vars_visible_to_commands_and_envs(sandbox: Any, agent: Any) -> None:
    body = json.dumps({"envVars": {"FROM_INIT": "init-value"}}).encode()
    status, _, _ = agent.request("POST", "/init", body=body, headers={**AUTH, "Content-Type": "application/json"})
    assert status == 204
    assert json.loads(agent.request("GET", "/envs", headers=AUTH)[2])["FROM_INIT"] == "init-value"
    assert sandbox.commands.run("echo $FROM_INIT").stdout == "init-value\n"


def test_init_without_token_is_refused(agent: Any) -> None:
    body = json.dumps({"accessToken": "hijack"}).encode()
    assert agent.request("POST", "/init", body=body, headers={"Content-Type": "application/json"})[0] == 401


def test_malformed_unary_request_is_invalid_argument(agent: Any) -> None:
    status, _, body = agent.request(
        "POST",
        "/filesystem.Filesystem/Stat",
        body=b"{oops",
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert status == 400
    assert json.loads(body)["code"] == "invalid_argument"


def test_wrong_codec_and_unknown_method(agent: Any) -> None:
    status, _, _ = agent.request(
        "POST",
        "/filesystem.Filesystem/Stat",
        body=b"\x0a\x01a",
        headers={**AUTH, "Content-Type": "application/proto"},
    )
    assert status == 415
    status, _, body = agent.request(
        "POST", "/process.Process/Nope", body=b"{}", headers={**AUTH, "Content-Type": "application/json"}
    )
    assert (status, json.loads(body)["code"]) == (501, "unimplemented")


def test_stream_error_arrives_in_the_end_stream_envelope(agent: Any) -> None:
    message = json.dumps({"process": {"pid": 999999}}).encode()
    status, _, body = agent.request(
        "POST",
        "/process.Process/Connect",
        body=struct.pack(">BI", 0, len(message)) + message,
        headers={**AUTH, "Content-Type": "application/connect+json"},
    )
    flags, length = struct.unpack(">BI", body[:5])
    assert (status, flags) == (200, 2)
    assert json.loads(body[5 : 5 + length])["error"]["code"] == "not_found"


def test_interpreter_bad_input(agent: Any) -> None:
    def execute(payload: bytes) -> tuple[int, bytes]:
        status, _, body = agent.request(
            "POST", "/execute", body=payload, headers={**AUTH, "Content-Type": "application/json"}
        )
        return status, body

    assert execute(b"not json")[0] == 400
    assert execute(json.dumps({"code": 1}).encode())[0] == 400
    assert execute(json.dumps({"code": "1", "language": "python", "context_id": "x"}).encode())[0] == 400
    assert execute(json.dumps({"code": "1", "context_id": "missing"}).encode())[0] == 404
