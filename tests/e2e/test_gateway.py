"""The gateway with the unmodified E2B SDKs: control plane → Sandbox objects → the operator → a real
agent on the pod IP, and the data plane proxied to it. Real API server, real operator, real agents."""

from __future__ import annotations

from typing import Any

import pytest
from e2b import AuthenticationException, Sandbox, SandboxException, SandboxNotFoundException
from e2b_code_interpreter import Sandbox as CodeSandbox
from e2elib import Gateway

from testlib import (
    Cluster,
    request_json,
)


def request(
    gw: Gateway, method: str, path: str, body: object = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    return request_json(method, gw.url + path, body, headers)


def sandboxes_in(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    return list((cluster.get_json("sandboxes", "-n", namespace) or {}).get("items", []))


def test_sdk_lifecycle_through_the_gateway(cluster: Cluster, gateway: Gateway) -> None:
    sbx = Sandbox.create(
        template="base", timeout=120, metadata={"team": "gw"}, envs={"GREETING": "hi"}, **gateway.sdk()
    )
    try:
        (body,) = [
            s for s in sandboxes_in(cluster, gateway.namespace) if s["status"].get("sandboxID") == sbx.sandbox_id
        ]
        assert body["spec"]["timeouts"]["maxLifetime"] == "120s"
        run = sbx.commands.run("echo $GREETING from $(pwd)")
        assert run.exit_code == 0 and run.stdout.startswith("hi from ")
        sbx.files.write("notes/a.txt", "through the gateway\n")
        assert sbx.files.read("notes/a.txt") == "through the gateway\n"
        assert sbx.is_running()

        info = sbx.get_info()
        assert info.state.value == "running" and info.metadata == {"team": "gw"}
        assert info.cpu_count == 1 and info.memory_mb == 512
        listed = Sandbox.list(**{k: v for k, v in gateway.sdk().items() if k != "sandbox_url"}).next_items()
        assert sbx.sandbox_id in [item.sandbox_id for item in listed]

        sbx.set_timeout(600)
        assert (sbx.get_info().end_at - info.end_at).total_seconds() > 300

        name = body["metadata"]["name"]
        # The gateway asks through annotations: the spec stays as it was created (its author's).
        extended = cluster.get_json("sandbox", name, "-n", gateway.namespace)
        assert extended["spec"]["timeouts"] == body["spec"]["timeouts"]
        assert "sandbox.dev/end-at" in extended["metadata"]["annotations"]

        assert sbx.pause() is True
        paused = cluster.get_json("sandbox", name, "-n", gateway.namespace)
        assert (paused["status"]["phase"], paused["status"]["suspendedBy"]) == ("Suspended", "Request")
        assert (
            paused["spec"]["suspended"] is False and paused["metadata"]["annotations"]["sandbox.dev/paused"] == "true"
        )
        assert sbx.get_info().state.value == "paused"
        assert sbx.pause() is False  # already paused: 409

        resumed = Sandbox.connect(sbx.sandbox_id, **gateway.sdk())
        assert resumed.commands.run("cat notes/a.txt").stdout == "through the gateway\n"  # same workspace
    finally:
        killed = sbx.kill()
    assert killed is True
    assert Sandbox.kill(sbx.sandbox_id, **gateway.sdk()) is False
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sbx.sandbox_id, **gateway.sdk())
    assert not sbx.is_running()  # the proxy answers 502 "was not found"


def test_code_interpreter_through_the_gateway(gateway: Gateway) -> None:
    sbx = CodeSandbox.create(**gateway.sdk())  # the SDK's default template, code-interpreter-v1
    try:
        sbx.run_code("x = 20")
        execution = sbx.run_code("x + 22")
        assert execution.text == "42"
        failed = sbx.run_code("1 / 0")
        assert failed.error is not None and failed.error.name == "ZeroDivisionError"
    finally:
        sbx.kill()


def test_keys_and_tokens_are_enforced(cluster: Cluster, gateway: Gateway) -> None:
    with pytest.raises(AuthenticationException):
        Sandbox.create(template="base", **gateway.sdk(api_key="e2b_" + "0" * 40))
    sbx = Sandbox.create(template="base", **gateway.sdk())
    try:
        # A key of another namespace does not see it, let alone reach it.
        with pytest.raises(SandboxNotFoundException):
            Sandbox.get_info(sbx.sandbox_id, **gateway.sdk(api_key=gateway.other_key))
        assert Sandbox.kill(sbx.sandbox_id, **gateway.sdk(api_key=gateway.other_key)) is False
        route = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983"}
        status, body = request(gateway, "GET", "/envs", headers={**route, "X-Access-Token": "wrong"})
        assert status == 401 and "access token" in body["message"]
        status, _ = request(gateway, "GET", "/health", headers=route)
        assert status == 204  # open, as the SDK probes it without a token
        status, body = request(
            gateway,
            "POST",
            "/init",
            {"accessToken": "x"},
            headers={**route, "X-Access-Token": sbx._envd_access_token or ""},
        )
        assert status == 403  # orchestrator-only endpoints never pass
        status, body = request(gateway, "GET", "/health", headers={**route, "E2b-Sandbox-Id": "nosuchsandbox"})
        assert status == 502 and "was not found" in body["message"]
    finally:
        sbx.kill()


def test_bad_requests_are_refused_and_leave_nothing(cluster: Cluster, gateway: Gateway) -> None:
    before = len(sandboxes_in(cluster, gateway.namespace))
    with pytest.raises(SandboxException, match="template 'no-such-template' not found"):
        Sandbox.create(template="no-such-template", **gateway.sdk())
    headers = {"X-API-KEY": gateway.api_key}
    status, body = request(gateway, "POST", "/v2/sandboxes", {"templateID": "base", "timeout": -5}, headers)
    assert status == 400 and "timeout" in body["message"]
    auto_resume_only = {"templateID": "base", "autoResume": {"enabled": True}}
    status, body = request(gateway, "POST", "/v2/sandboxes", auto_resume_only, headers)
    assert status == 400 and "autoResume needs autoPause" in body["message"]
    status, body = request(gateway, "POST", "/v2/sandboxes", {"templateID": "base", "envVars": {"1BAD": "x"}}, headers)
    assert status == 400 and "env" in body["message"]  # refused by the CRD's own rule
    status, body = request(gateway, "GET", "/v2/sandboxes?state=sleeping", headers=headers)
    assert status == 400 and "state" in body["message"]
    status, body = request(gateway, "GET", "/no/such/route", headers=headers)
    assert status == 404 and body["code"] == 404
    assert len(sandboxes_in(cluster, gateway.namespace)) == before
