"""The SDK in debug mode: it always talks to localhost:49983 / :49999, so this needs those ports free."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentlib import AgentProcess, port_is_free, start_agent, stop_agent


@pytest.fixture(scope="module")
def debug_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    if not (port_is_free(49983) and port_is_free(49999)):
        pytest.skip("ports 49983/49999 are taken; debug mode cannot be exercised here")
    agent = start_agent(tmp_path_factory.mktemp("debug"), token=None, envd_port=49983, interpreter_port=49999)
    yield agent
    stop_agent(agent)


def test_debug_mode_reaches_the_default_ports(debug_agent: AgentProcess) -> None:
    from e2b_code_interpreter import Sandbox

    sandbox: Any = Sandbox.create(debug=True)
    assert sandbox.is_running()
    assert sandbox.commands.run("echo debug").stdout == "debug\n"
    sandbox.files.write("debug.txt", "d")
    assert Path(debug_agent.workdir / "debug.txt").read_text() == "d"
    # Port 49999 is the separate code-interpreter listener in debug mode.
    assert sandbox.run_code("20 + 22").text == "42"
