"""/health is what the pod's liveness probe asks (2 s timeout): it must answer at once, whatever runs."""

from __future__ import annotations

import threading
import time
import urllib.request
from typing import Any

from agentlib import AgentProcess

# Far below the probe's 2 s timeout; loose enough for a loaded 2-core test machine.
HEALTH_BUDGET_SECONDS = 1.0


def health_latency(agent: AgentProcess) -> float:
    started = time.monotonic()
    with urllib.request.urlopen(f"{agent.envd_url}/health", timeout=5) as response:
        assert response.status == 204
    return time.monotonic() - started


def test_health_answers_at_once_while_code_and_commands_run(
    agent: AgentProcess, sandbox: Any, code_sandbox: Any
) -> None:
    running = [
        # A busy kernel: its context's execution lock is held for the whole run.
        threading.Thread(target=code_sandbox.run_code, args=("import time\ntime.sleep(3)",)),
        # A command flooding the agent with output (read and dropped past the output cap).
        threading.Thread(target=sandbox.commands.run, args=("timeout 3 cat /dev/zero || true",)),
        # A command that waits.
        threading.Thread(target=sandbox.commands.run, args=("sleep 3",)),
    ]
    for thread in running:
        thread.start()
    latencies: list[float] = []
    try:
        time.sleep(0.5)  # let them get going
        while any(thread.is_alive() for thread in running) and len(latencies) < 20:
            latencies.append(health_latency(agent))
            time.sleep(0.1)
    finally:
        for thread in running:
            thread.join(timeout=30)
    assert len(latencies) >= 5
    assert max(latencies) < HEALTH_BUDGET_SECONDS, latencies
