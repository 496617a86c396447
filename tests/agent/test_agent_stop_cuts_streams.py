"""The agent stopping (SIGTERM: its sandbox is killed or paused) cuts the streams still in flight,
as a stopped VM's connections drop: a client reading an /execute stream gets a broken response,
never a clean end it would take for the code's own (the SDKs then raise "sandbox was killed")."""

from __future__ import annotations

import http.client
import json
import signal
from pathlib import Path

import pytest
from agentlib import start_agent, stop_agent


def test_stopping_cuts_an_execution_stream(tmp_path: Path) -> None:
    agent = start_agent(tmp_path, token=None)
    try:
        connection = http.client.HTTPConnection("127.0.0.1", agent.interpreter_port, timeout=120)
        body = json.dumps({"code": "print('started', flush=True)\nimport time\ntime.sleep(300)"})
        connection.request("POST", "/execute", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200, response.status
        assert response.getheader("Transfer-Encoding") == "chunked", response.getheaders()
        while b"started" not in response.readline():  # bounded by the connection's timeout
            pass
        agent.process.send_signal(signal.SIGTERM)
        # read() raises on a chunked body cut short (readline would return b"" either way); a clean
        # end returns the rest: the UnexpectedEndOfExecution line and end_of_execution.
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            rest = response.read()
            raise AssertionError(f"the stream ended cleanly: {rest[-500:]!r}")
        assert agent.process.wait(timeout=30) == 0
    finally:
        stop_agent(agent)
