"""The idle timeout asks a real agent at its deadline (controller.agents.AgentClient through the
Runtime): activity the status never heard of — the usage collector is off here, as with
`--usage-interval 0`, or slower than the idle timeout — keeps a busy sandbox Running.

Before this check the operator decided on status.lastActivityAt alone, which the usage collector
writes at most once per --usage-status-interval: a sandbox busy the whole time was suspended."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from agentlib import AgentProcess, free_port, start_agent

from fakeapi import JSON, FakeApi, format_time, parse_time
from sandbox_operator.api.names import PODS, SANDBOX_TEMPLATES, SANDBOXES
from sandbox_operator.controller.agents import AgentClient
from sandbox_operator.controller.config import OperatorConfig
from sandbox_operator.controller.reconcile import reconcile_sandbox
from sandbox_operator.controller.runtime import Runtime
from sandbox_operator.resources import child_names
from testlib import stop_process

NS, NAME = "team-a", "busy"
KEY = (NS, NAME)
AGENT_IP = "127.0.0.1"
TEMPLATE: JSON = {
    "apiVersion": "sandbox.dev/v1alpha1",
    "kind": "SandboxTemplate",
    "metadata": {"name": "base"},
    "spec": {"image": "img:1", "timeouts": {"idle": "10m"}, "persistence": {"enabled": False}},
}


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    process = start_agent(tmp_path_factory.mktemp("idle-agent"), token=None)
    try:
        yield process
    finally:
        stop_process(process.process)


async def _running(api: FakeApi, rt: Runtime) -> None:
    """The sandbox through its cold start; its pod's IP is the loopback agent's."""
    api.add(SANDBOX_TEMPLATES, TEMPLATE)
    api.add(
        SANDBOXES,
        {
            "apiVersion": "sandbox.dev/v1alpha1",
            "kind": "Sandbox",
            "metadata": {"name": NAME, "namespace": NS},
            "spec": {"template": "base"},
        },
    )
    api.deliver(rt)
    await reconcile_sandbox(rt, KEY)
    api.set_pod_status(NS, child_names(NAME).pod, "Running", True, pod_ip=AGENT_IP)
    api.deliver(rt)
    await reconcile_sandbox(rt, KEY)
    assert _status(api)["phase"] == "Running"


def _status(api: FakeApi) -> JSON:
    return dict(api.objects[SANDBOXES.path(NS, NAME)].get("status") or {})


def _idle_on_paper(api: FakeApi, rt: Runtime) -> None:
    """The status says the sandbox started 20 minutes ago and saw no activity since: past its 10 minute
    idle deadline, as a status the collector has not written for a while would say."""
    api.edit(
        SANDBOXES.path(NS, NAME, "status"),
        {"status": {"startedAt": format_time(datetime.now(UTC) - timedelta(minutes=20))}},
    )
    api.deliver(rt)


async def test_activity_only_the_agent_knows_keeps_the_sandbox_running(agent: AgentProcess) -> None:
    api = FakeApi()
    rt = Runtime(api, OperatorConfig(agent_port=agent.envd_port, usage_interval=0))
    try:
        await _running(api, rt)
        before_work = datetime.now(UTC).replace(microsecond=0)
        code, _, body = agent.request(
            "POST",
            "/execute",
            json.dumps({"code": "sum(range(10))"}).encode(),
            {"Content-Type": "application/json"},
            port=agent.interpreter_port,
        )
        assert code == 200, body
        _idle_on_paper(api, rt)
        await reconcile_sandbox(rt, KEY)
        status = _status(api)
        assert status["phase"] == "Running", status
        assert parse_time(status["lastActivityAt"]) >= before_work
        assert parse_time(status["idleDeadline"]) == parse_time(status["lastActivityAt"]) + timedelta(minutes=10)
        assert api.names(PODS, NS) == {child_names(NAME).pod}
        assert rt.metrics.registry.get_sample_value("sandbox_operator_timeouts_total", {"kind": "idle"}) is None
    finally:
        await rt.stop()


async def test_an_agent_that_does_not_answer_leaves_the_status_the_last_word(agent: AgentProcess) -> None:
    api = FakeApi()
    rt = Runtime(api, OperatorConfig(agent_port=free_port(), usage_interval=0))  # nobody listens there
    try:
        await _running(api, rt)
        _idle_on_paper(api, rt)
        await reconcile_sandbox(rt, KEY)
        assert (_status(api)["phase"], _status(api)["reason"]) == ("Suspending", "IdleTimeout")
        assert rt.metrics.registry.get_sample_value("sandbox_operator_timeouts_total", {"kind": "idle"}) == 1
    finally:
        await rt.stop()


async def test_the_agent_client_reads_the_agents_activity(agent: AgentProcess) -> None:
    client, not_metrics = AgentClient(agent.envd_port), AgentClient(agent.interpreter_port)
    try:
        activity = await client.last_activity(AGENT_IP, None)
        assert activity is not None and time.time() - 3600 < activity.timestamp() <= time.time() + 1
        # Not an agent's metrics (the interpreter port has no /agent/metrics): no activity, no error.
        assert await not_metrics.last_activity(AGENT_IP, None) is None
    finally:
        await client.close()
        await not_metrics.close()
