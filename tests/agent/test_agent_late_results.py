"""A kernel that publishes a result after its request's idle status and after its execute_reply
(Deno's does so now and then; tests/agent/late_result_kernel.py always does, 0.3 s late): the agent's
execution still returns it, every time, because it waits for a probe request's idle status, which
the kernel can only publish after the result (docs/agent.md, "Languages")."""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentlib import AgentProcess, start_agent, stop_agent

KERNEL = Path(__file__).with_name("late_result_kernel.py")


@pytest.fixture(scope="module")
def late_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    jupyter = tmp_path_factory.mktemp("jupyter")
    spec = jupyter / "kernels" / "deno"
    spec.mkdir(parents=True)
    argv = [sys.executable, str(KERNEL), "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "late", "language": "typescript"}))
    process = start_agent(tmp_path_factory.mktemp("late"), token=None, env={"JUPYTER_PATH": str(jupyter)})
    yield process
    stop_agent(process)


def execute(agent: AgentProcess, code: str) -> list[dict[str, Any]]:
    request = urllib.request.Request(
        agent.interpreter_url + "/execute",
        data=json.dumps({"code": code, "language": "js"}).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return [json.loads(line) for line in response.read().decode().splitlines() if line.strip()]


def test_a_result_published_after_the_reply_is_returned_every_time(late_agent: AgentProcess) -> None:
    for count in range(1, 6):
        lines = execute(late_agent, f"{count}")
        results = [line for line in lines if line["type"] == "result"]
        assert [result.get("text") for result in results] == [f"late {count}"], lines
        assert lines[-1]["type"] == "end_of_execution"  # the result comes before the end, not after
