"""E2B's auto-pause and auto-resume through the real gateway, operator and agents (docs/gateway.md,
"Auto-pause and wake on traffic"): a sandbox created with `lifecycle={"on_timeout": "pause"}` is
paused at its timeout with its workspace kept; with `auto_resume` the next SDK call wakes it and is
answered; without, the SDK sees it not running until `connect()` resumes it."""

from __future__ import annotations

import urllib.request
from datetime import UTC, datetime

import pytest
from e2b import Sandbox
from e2b.exceptions import SandboxException
from e2elib import Gateway
from prometheus_client.parser import text_string_to_metric_families

from testlib import Cluster, wait_until

TIMEOUT_S = 5  # short, so the pause comes within the test


def state(gateway: Gateway, sandbox_id: str) -> str:
    return str(Sandbox.get_info(sandbox_id, **gateway.sdk()).state)


def wakeups(gateway: Gateway, trigger: str) -> float:
    with urllib.request.urlopen(gateway.metrics_url, timeout=10) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "sandbox_gateway_wakeups_total" and sample.labels == {"trigger": trigger, "outcome": "served"}
    )


def test_traffic_wakes_a_sandbox_its_timeout_paused(cluster: Cluster, gateway: Gateway) -> None:
    sbx = Sandbox.create(
        template="base", timeout=TIMEOUT_S, lifecycle={"on_timeout": "pause", "auto_resume": True}, **gateway.sdk()
    )
    try:
        sbx.files.write("kept.txt", "from before the pause\n")
        info = Sandbox.get_info(sbx.sandbox_id, **gateway.sdk())
        assert info.lifecycle is not None and info.lifecycle["on_timeout"] == "pause", info.lifecycle
        assert info.lifecycle["auto_resume"] is True

        wait_until(lambda: state(gateway, sbx.sandbox_id) == "paused", timeout=90, message="the timeout to pause it")
        before = wakeups(gateway, "traffic")
        # The next call wakes it: answered, on the same workspace, with a new timeout from now.
        result = sbx.commands.run("cat kept.txt", timeout=120)
        assert result.stdout == "from before the pause\n"
        woken = Sandbox.get_info(sbx.sandbox_id, **gateway.sdk())
        assert woken.state == "running" and woken.end_at > datetime.now(UTC)
        assert wakeups(gateway, "traffic") == before + 1

        # And again: its timeout pauses it once more (the wake gave it its own timeout, not forever).
        wait_until(lambda: state(gateway, sbx.sandbox_id) == "paused", timeout=90, message="the second pause")
        assert sbx.files.read("kept.txt") == "from before the pause\n"  # a file read wakes it too
    finally:
        sbx.kill()


def test_without_auto_resume_a_paused_sandbox_waits_for_connect(gateway: Gateway) -> None:
    sbx = Sandbox.create(template="base", timeout=TIMEOUT_S, lifecycle={"on_timeout": "pause"}, **gateway.sdk())
    try:
        sbx.files.write("kept.txt", "kept\n")
        wait_until(lambda: state(gateway, sbx.sandbox_id) == "paused", timeout=90, message="the timeout to pause it")
        with pytest.raises(SandboxException):
            sbx.commands.run("true", timeout=30)  # not woken: not running
        assert state(gateway, sbx.sandbox_id) == "paused"
        before = wakeups(gateway, "connect")
        resumed = Sandbox.connect(sbx.sandbox_id, **gateway.sdk())
        assert resumed.files.read("kept.txt") == "kept\n"
        assert wakeups(gateway, "connect") == before + 1
        # The resume gave it E2B's default timeout from now: not paused again at once.
        assert (Sandbox.get_info(sbx.sandbox_id, **gateway.sdk()).end_at - datetime.now(UTC)).total_seconds() > 200
    finally:
        sbx.kill()
