"""Agent access tokens through the controller (a real Runtime on the in-memory API): every pod gets
its own, the Sandbox's status names its id, a resume gets a new one, a warm pod keeps its own when
claimed, and the operator presents it when it asks an agent."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fakeapi import JSON, Harness, format_time
from sandbox_operator.api.names import AGENT_TOKEN_ID_ANNOTATION, PODS, SANDBOX_POOLS, SANDBOX_TEMPLATES, SANDBOXES
from sandbox_operator.controller.config import OperatorConfig
from sandbox_operator.resources import child_names
from sandbox_operator.resources.tokens import agent_token

KEY_BYTES = b"controller-tests-token-key-32-b!"
NS, NAME = "team-a", "sb"
KEY = (NS, NAME)
POD = child_names(NAME).pod
POD_IP = "127.3.0.7"
TEMPLATE: JSON = {
    "apiVersion": "sandbox.dev/v1alpha1",
    "kind": "SandboxTemplate",
    "metadata": {"name": "base"},
    "spec": {"image": "img:1", "timeouts": {"idle": "10m"}},
}


@pytest.fixture
def harness() -> Harness:
    return Harness(config=OperatorConfig(agent_token_key=KEY_BYTES))


def sandbox(**spec: Any) -> JSON:
    return {
        "apiVersion": "sandbox.dev/v1alpha1",
        "kind": "Sandbox",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {"template": "base", **spec},
    }


def status(harness: Harness) -> JSON:
    return dict(harness.api.objects[SANDBOXES.path(NS, NAME)].get("status") or {})


def pod_token(pod: JSON) -> tuple[str, str]:
    """(token id on the pod, token in its env)."""
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    return pod["metadata"]["annotations"][AGENT_TOKEN_ID_ANNOTATION], str(env["SANDBOX_ACCESS_TOKEN"])


async def running(harness: Harness) -> None:
    harness.api.add(SANDBOX_TEMPLATES, TEMPLATE)
    harness.api.add(SANDBOXES, sandbox())
    await harness.sandbox_pass(KEY)
    harness.api.set_pod_status(NS, POD, "Running", True, pod_ip=POD_IP)
    await harness.sandbox_pass(KEY)
    assert status(harness)["phase"] == "Running"


async def test_each_pod_gets_a_token_the_status_names_and_a_resume_rotates_it(harness: Harness) -> None:
    api = harness.api
    await running(harness)
    first_id, first_token = pod_token(api.of_kind(PODS, NS)[POD])
    assert first_token == agent_token(KEY_BYTES, first_id)  # what the gateway derives from the status
    assert status(harness)["agentTokenId"] == first_id

    api.edit(SANDBOXES.path(NS, NAME), {"spec": {"suspended": True}})
    await harness.sandbox_pass(KEY)
    await harness.sandbox_pass(KEY)
    assert status(harness)["phase"] == "Suspended"
    assert status(harness).get("agentTokenId") is None  # no pod, no token
    api.edit(SANDBOXES.path(NS, NAME), {"spec": {"suspended": False}})
    await harness.sandbox_pass(KEY)
    api.set_pod_status(NS, POD, "Running", True, pod_ip=POD_IP)
    await harness.sandbox_pass(KEY)
    second_id, second_token = pod_token(api.of_kind(PODS, NS)[POD])
    assert second_id != first_id and second_token != first_token
    assert status(harness)["agentTokenId"] == second_id


async def test_without_a_key_agents_get_no_token() -> None:
    harness = Harness()
    await running(harness)
    pod = harness.api.of_kind(PODS, NS)[POD]
    assert AGENT_TOKEN_ID_ANNOTATION not in (pod["metadata"].get("annotations") or {})
    assert "SANDBOX_ACCESS_TOKEN" not in {e["name"] for e in pod["spec"]["containers"][0]["env"]}
    assert status(harness).get("agentTokenId") is None


async def test_a_claimed_warm_pod_keeps_its_token_and_the_status_names_it(harness: Harness) -> None:
    api = harness.api
    api.add(SANDBOX_TEMPLATES, TEMPLATE)
    api.add(
        SANDBOX_POOLS,
        {"apiVersion": "sandbox.dev/v1alpha1", "kind": "SandboxPool", "metadata": {"name": "warm", "namespace": NS}},
    )
    api.edit(SANDBOX_POOLS.path(NS, "warm"), {"spec": {"template": "base", "size": 1}})
    await harness.pool_pass((NS, "warm"))
    (warm,) = api.names(PODS, NS)
    warm_id, warm_token = pod_token(api.of_kind(PODS, NS)[warm])
    assert warm_token == agent_token(KEY_BYTES, warm_id)
    api.set_pod_status(NS, warm, "Running", True, pod_ip=POD_IP)
    api.add(SANDBOXES, sandbox())
    await harness.sandbox_pass(KEY)
    assert (status(harness)["podName"], status(harness)["agentTokenId"]) == (warm, warm_id)


async def test_the_idle_check_presents_the_pods_token(harness: Harness) -> None:
    api = harness.api
    await running(harness)
    token_id, token = pod_token(api.of_kind(PODS, NS)[POD])
    started = format_time(datetime.now(UTC) - timedelta(minutes=20))
    api.edit(SANDBOXES.path(NS, NAME, "status"), {"status": {"startedAt": started}})
    await harness.sandbox_pass(KEY)
    assert harness.rt.agents_asked == [POD_IP]
    assert harness.rt.tokens_presented == [token]
    assert harness.rt.config.agent_token(token_id) == token
