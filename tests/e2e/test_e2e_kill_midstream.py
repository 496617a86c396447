"""A sandbox killed while a call streams: the SDK raises instead of reading a clean end (E2B's VM
stops and its connections drop; here the agent cuts its streams when it stops and the gateway
cuts the client's connection when the sandbox's is cut)."""

from __future__ import annotations

import threading

import pytest
from e2b import Sandbox, TimeoutException
from e2b_code_interpreter import Sandbox as CodeSandbox
from e2elib import Gateway

from testlib import wait_until


def _kill_once_started(sandbox: Sandbox, started: threading.Event) -> threading.Thread:
    def kill() -> None:
        if started.wait(60):
            sandbox.kill()

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def test_run_code_raises_when_the_sandbox_is_killed_during_it(gateway: Gateway) -> None:
    sbx = CodeSandbox.create(**gateway.sdk())
    started = threading.Event()
    killer = _kill_once_started(sbx, started)
    try:
        with pytest.raises(TimeoutException, match="sandbox was killed while the request was in progress"):
            sbx.run_code(
                "print('started', flush=True)\nimport time\ntime.sleep(300)",
                on_stdout=lambda _: started.set(),
                timeout=300,
            )
    finally:
        killer.join(timeout=60)
        sbx.kill()
    assert started.is_set()


def test_commands_run_raises_when_the_sandbox_is_killed_during_it(gateway: Gateway) -> None:
    sbx = Sandbox.create(template="base", **gateway.sdk())
    started = threading.Event()
    killer = _kill_once_started(sbx, started)
    try:
        with pytest.raises(Exception) as raised:
            sbx.commands.run("echo started; sleep 300", on_stdout=lambda _: started.set(), timeout=300)
    finally:
        killer.join(timeout=60)
        sbx.kill()
    assert started.is_set()
    assert not isinstance(raised.value, AssertionError)
    wait_until(lambda: not sbx.is_running(), timeout=60, message="the killed sandbox to be gone")
