"""Fault: the API server unreachable for 30 s (its process SIGSTOPped, then SIGCONTed).

A stopped kube-apiserver keeps its listening socket: connections are accepted by the kernel and
never answered, like a hung or partitioned server, the worst case for a client (a refused
connection at least fails fast). Meanwhile the operator and the gateway must stay up, answer their
probes honestly, refuse what needs the API server quickly and with a reason (503, not a hang),
keep serving what does not, and afterwards carry on without a restart.
"""

from __future__ import annotations

import time
import urllib.request
from typing import Any

import pytest
from chaoslib import APISERVER, Gateway, component_pid, process_state, stopped
from e2b import Sandbox

from testlib import Cluster, OperatorProcess, request_json, sandbox_manifest, wait_phase, wait_until

# Longer than the gateway's timeouts for an API write (15 s) and for its probe (5 s), so that the
# requests made during the outage run into them: a shorter pause would only show a slow API server.
OUTAGE_S = 30.0
# What a create may take to be refused while the API server does not answer: the gateway's own
# timeout for an API write (15 s) plus slack for a loaded machine, well under the SDK's 60 s.
REFUSED_WITHIN_S = 45.0


def _status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as response:
        return int(response.status)


def _ready(gateway: Gateway) -> tuple[int, Any]:
    return request_json("GET", gateway.url + "/ready", timeout=10)


def _alive(operator: OperatorProcess, gateway: Gateway) -> None:
    assert operator.process.poll() is None, f"the operator exited:\n{operator.log_tail()}"
    assert gateway.process.poll() is None, f"the gateway exited:\n{gateway.log_tail()}"


@pytest.mark.timeout(900)  # the private cluster's start-up is counted too; each wait below has its own deadline
def test_apiserver_stopped_for_30s(
    cluster: Cluster, operator: OperatorProcess, gateway: Gateway, namespace: str
) -> None:
    # Before: a sandbox running through the gateway, whose data plane needs no API server.
    sbx = Sandbox.create(template="base", timeout=600, **gateway.sdk())
    sbx.files.write("before.txt", "written before the outage\n")
    pids = operator.process.pid, gateway.process.pid
    apiserver = component_pid(cluster, APISERVER)

    with stopped(apiserver):
        outage_started = time.monotonic()
        _alive(operator, gateway)
        # The operator's probes answer: liveness (/healthz) is its event loop, which a restart would
        # not help (it cannot reach the API server either); readiness (/metrics in the chart) too.
        assert _status(operator.liveness_url) == 200
        assert "sandbox_operator_build_info" in operator.metrics_text()

        # The gateway is alive (/health). A create needs the API server: refused with 503 and the
        # reason, in bounded time.
        assert request_json("GET", gateway.url + "/health", timeout=10)[0] == 200
        started = time.monotonic()
        status, body = gateway.call("POST", "/v2/sandboxes", {"templateID": "base"}, timeout=REFUSED_WITHIN_S + 15)
        took = time.monotonic() - started
        assert status == 503, body
        assert "Kubernetes API server" in body["message"], body
        assert took < REFUSED_WITHIN_S, f"the refusal took {took:.1f}s"
        assert process_state(apiserver) == "T", "the API server was resumed before the create was refused"

        # Still ready to serve (/ready 200: its caches hold and the data plane works), and /ready
        # says what it cannot do now: reach the API server.
        status, ready = wait_until(
            lambda: (found := _ready(gateway))[1].get("kubernetesApi") == "unreachable" and found,
            timeout=OUTAGE_S,
            message="gateway /ready to report the API server unreachable",
        )
        assert status == 200 and ready["status"] == "ready", ready
        assert "Kubernetes API server" in ready["kubernetesApiError"], ready

        # What the gateway has cached needs no API server: reads and the running sandbox's data plane.
        status, info = gateway.call("GET", f"/sandboxes/{sbx.sandbox_id}", timeout=10)
        assert status == 200 and info["state"] == "running", info
        assert sbx.files.read("before.txt") == "written before the outage\n"
        assert sbx.commands.run("echo served during the outage").stdout == "served during the outage\n"

        # Up and probing for the rest of the window (a process that dies late is caught too).
        while time.monotonic() - outage_started < OUTAGE_S:
            _alive(operator, gateway)
            assert request_json("GET", gateway.url + "/health", timeout=10)[0] == 200
            assert _status(operator.liveness_url) == 200
            time.sleep(1)  # the probe interval; the window is the fault, not a wait for a condition

    # After: the same processes carry on.
    wait_until(
        lambda: _ready(gateway) == (200, {"status": "ready"}),
        timeout=120,
        message="gateway /ready to report the API server reachable again",
    )
    cluster.apply(sandbox_manifest("after-outage"), namespace)
    wait_phase(cluster, namespace, "after-outage", "Running", timeout=180)
    again = Sandbox.create(template="base", timeout=600, **gateway.sdk())
    assert again.commands.run("echo created after the outage").stdout == "created after the outage\n"
    assert sbx.files.read("before.txt") == "written before the outage\n"
    # The refused create left nothing behind: its request, read by the resumed API server, may have
    # created a Sandbox after all, which the gateway deletes again.
    wait_until(
        lambda: _sandbox_ids(cluster, gateway.namespace) == {sbx.sandbox_id, again.sandbox_id},
        timeout=180,
        message="no Sandbox but the two created before and after the outage",
    )
    _alive(operator, gateway)
    assert (operator.process.pid, gateway.process.pid) == pids
    assert again.kill() and sbx.kill()


def _sandbox_ids(cluster: Cluster, namespace: str) -> set[str | None]:
    listing = cluster.get_json("sandboxes", "-n", namespace) or {}
    return {(item.get("status") or {}).get("sandboxID") for item in listing.get("items", [])}
