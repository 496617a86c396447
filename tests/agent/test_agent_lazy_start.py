"""The agent listens first and loads the rest after (issue "Lean footprint"): /health and envd answer
before the code interpreter (and jupyter_client) is imported.
A request for the interpreter while it loads waits for it rather than failing."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
from pathlib import Path
from typing import Any

import pytest
from agentlib import ACCESS_TOKEN, REPO_ROOT, start_agent, stop_agent

from sandbox_operator.agent.lazy import Deferred, NotLoaded
from testlib import wait_until

READY_LINE = "sandbox-agent ready"
# Imported only once the agent listens: the interpreter's modules.
LOADED_AFTER_LISTENING = ("jupyter_client", "sandbox_operator.agent.interpreter")
INTERPRETER_HEADERS = {"X-Access-Token": ACCESS_TOKEN}

# A stand-in for jupyter_client, first on the agent's path: its import waits until the test opens the
# gate (a FIFO), then the real package takes its place. Until then the code interpreter cannot load
# (with --prewarm-kernel it imports jupyter_client as it loads). The gate is gone after its first
# opening: the kernel started later imports jupyter_client at once.
GATED_JUPYTER_CLIENT = """
import os, sys
gate = os.environ["AGENT_TEST_GATE"]
if os.path.exists(gate):
    with open(gate, "rb") as fifo:
        fifo.read()
    os.unlink(gate)
shadow = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != shadow]
del sys.modules["jupyter_client"]
import jupyter_client
"""


def imported_modules(importtime_log: str) -> set[str]:
    """Module names of the `-X importtime` lines in a log."""
    names = set()
    for line in importtime_log.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def test_listens_before_the_interpreter_is_imported(tmp_path: Path) -> None:
    agent = start_agent(tmp_path, token=ACCESS_TOKEN, env={"PYTHONPROFILEIMPORTTIME": "1"})
    try:
        # The interpreter is loaded by now or on this request, which waits for it.
        status, _, body = agent.request("GET", "/contexts", headers=INTERPRETER_HEADERS, port=agent.interpreter_port)
    finally:
        stop_agent(agent)
    assert status == 200, body
    assert [context["language"] for context in json.loads(body)] == ["python"]
    log = agent.log_path.read_text()
    assert READY_LINE in log, log[-2000:]
    before, _, after = log.partition(READY_LINE)
    listening_with = imported_modules(before)
    assert {"aiohttp.web", "sandbox_operator.agent.envd"} <= listening_with  # the marker works
    early = listening_with & set(LOADED_AFTER_LISTENING)
    assert not early, f"imported before the agent listened: {sorted(early)}"
    assert "sandbox_operator.agent.interpreter" in imported_modules(after)


def _open_gate(gate: Path) -> tuple[int] | None:
    """A writer on the FIFO (closing it lets the agent's import go on) once the agent's import holds it
    open for reading, else None."""
    try:
        return (os.open(gate, os.O_WRONLY | os.O_NONBLOCK),)
    except OSError:  # ENXIO: no reader yet
        return None


def test_envd_serves_while_the_interpreter_loads_and_its_requests_wait_for_it(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    (shadow / "jupyter_client").mkdir(parents=True)
    (shadow / "jupyter_client" / "__init__.py").write_text(GATED_JUPYTER_CLIENT)
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    env = {
        "PYTHONPATH": os.pathsep.join([str(shadow), str(REPO_ROOT / "operator")]),
        "AGENT_TEST_GATE": str(gate),
    }
    # start_agent returns once /health answers; the interpreter's load starts then and is held at the gate.
    agent = start_agent(tmp_path, token=None, env=env, extra_args=("--prewarm-kernel",))
    writer: int | None = None
    try:
        (writer,) = wait_until(lambda: _open_gate(gate), timeout=30, message="the agent importing jupyter_client")
        from e2b import Sandbox

        sandbox: Any = Sandbox.create(debug=True, sandbox_url=agent.envd_url)
        result = sandbox.commands.run("echo served")
        assert result.stdout == "served\n"
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            listing = pool.submit(agent.request, "GET", "/contexts", port=agent.interpreter_port)
            # The interpreter cannot have loaded: its jupyter_client import still waits at the gate.
            assert not listing.done()
            os.close(writer)
            writer = None
            status, _, body = listing.result(timeout=60)
        assert status == 200, body
        assert [context["language"] for context in json.loads(body)] == ["python"]
    finally:
        if writer is not None:
            os.close(writer)
        elif (late := _open_gate(gate)) is not None:
            os.close(late[0])  # a failed test: let the agent's import go on, so that it can stop
        stop_agent(agent)


async def test_deferred_waits_for_its_load_then_gives_the_part() -> None:
    release = asyncio.Event()

    async def load() -> str:
        await release.wait()
        return "part"

    part = Deferred("part", load)
    waiting = asyncio.ensure_future(part.get())
    await asyncio.sleep(0)
    assert not waiting.done() and part.loaded is None
    release.set()
    assert await waiting == "part"
    assert part.loaded == "part"
    assert await part.close() == "part"


async def test_deferred_refuses_after_its_wait_and_keeps_a_load_error() -> None:
    never = asyncio.Event()

    async def stuck() -> str:
        await never.wait()
        return "never"

    slow = Deferred("slow part", stuck, wait_seconds=0.01)
    with pytest.raises(NotLoaded, match="slow part is still loading"):
        await slow.get()
    assert await slow.close() is None  # the load still running is cancelled

    attempts = []

    async def broken() -> str:
        attempts.append(1)
        raise ImportError("no such module")

    failing = Deferred("broken part", broken)
    for _ in range(2):
        with pytest.raises(ImportError, match="no such module"):
            await failing.get()
    assert attempts == [1]
    assert await failing.close() is None
