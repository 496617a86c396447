"""Fixtures: real agent processes on loopback and a fake control plane, driven by the unmodified E2B SDKs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from agentlib import (
    ACCESS_TOKEN,
    AgentProcess,
    FakeControlPlane,
    start_agent,
    stop_agent,
)


@pytest.fixture(scope="session")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """The main agent: access token set, default Python kernel pre-warmed (kernel start is slow)."""
    process = start_agent(tmp_path_factory.mktemp("agent"), token=ACCESS_TOKEN, extra_args=("--prewarm-kernel",))
    yield process
    stop_agent(process)


@pytest.fixture(scope="session")
def limited_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """An agent with tight limits: execution timeout, output cap and concurrency limit."""
    process = start_agent(
        tmp_path_factory.mktemp("limited"),
        token=None,
        env={
            "SANDBOX_EXECUTION_TIMEOUT": "1.5",
            "SANDBOX_MAX_OUTPUT_BYTES": "2000",
            "SANDBOX_MAX_CONCURRENT_EXECUTIONS": "2",
        },
    )
    yield process
    stop_agent(process)


@pytest.fixture(scope="session")
def control_plane() -> Iterator[FakeControlPlane]:
    plane = FakeControlPlane(ACCESS_TOKEN)
    yield plane
    plane.close()


@pytest.fixture(scope="session")
def sdk_options(agent: AgentProcess, control_plane: FakeControlPlane) -> dict[str, Any]:
    """SDK options that reach the agent through `sandbox_url` (envd and the interpreter on one URL)."""
    return {"api_key": "e2b_" + "0" * 40, "api_url": control_plane.url, "sandbox_url": agent.envd_url}


@pytest.fixture(scope="session")
def sandbox(sdk_options: dict[str, Any]) -> Any:
    from e2b import Sandbox

    return Sandbox.create(**sdk_options)


@pytest.fixture(scope="session")
def code_sandbox(sdk_options: dict[str, Any]) -> Any:
    from e2b_code_interpreter import Sandbox

    return Sandbox.create(**sdk_options)


@pytest.fixture(scope="session")
def limited_sandbox(limited_agent: AgentProcess) -> Any:
    """Debug mode (no control plane, no token) pointed at the limited agent through sandbox_url."""
    from e2b_code_interpreter import Sandbox

    return Sandbox.create(debug=True, sandbox_url=limited_agent.envd_url)
