"""Fault: the agent of a running sandbox dies (SIGKILLed from the host; the sandbox's own code cannot
kill it: it is PID 1 of the container's PID namespace, which ignores a SIGKILL sent from inside).

The pod has restartPolicy Never, so the pod fails; the operator replaces it within its retry budget
while the sandbox stays Running (docs/lifecycle.md, "Failures"). A user sees the command that was
running fail at once, the Sandbox say why (a Warning Event with the exit code, Ready False with the
reason, status.recreateAttempts), the workspace's files still there, and the SDK carry on.

Unlike the rest of tests/chaos, this module needs sandboxes that really run: its fixtures replace
the chaos conftest's kwok cluster with a private one on the container node (hack/container_node.py).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from agentcrashlib import agent_pid, gateway_on, kill_agent
from chaoslib import Gateway, private_container_cluster
from e2b import CommandResult, Sandbox, SandboxException

from testlib import (
    Cluster,
    ObjectWatch,
    OperatorProcess,
    wait_until,
)

TEMPLATE = "crash-base"


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if request.config.getoption("--kubeconfig"):
        pytest.skip("the agent is killed from the host: the test needs the container node the fixtures start")
    with private_container_cluster(tmp_path_factory) as started:
        yield started


@pytest.fixture(scope="module")
def gateway(cluster: Cluster, operator: OperatorProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with gateway_on(cluster, tmp_path_factory.mktemp("gateway-crash"), TEMPLATE) as handle:
        yield handle


def _sandbox_named_by(cluster: Cluster, namespace: str, sandbox_id: str) -> dict[str, Any]:
    listing = cluster.get_json("sandboxes", "-n", namespace)
    (body,) = [s for s in listing["items"] if (s.get("status") or {}).get("sandboxID") == sandbox_id]
    return dict(body)


def _warnings(cluster: Cluster, namespace: str, name: str) -> dict[str, str]:
    """The Warning Events on the Sandbox: reason → message."""
    listing = cluster.get_json("events", "-n", namespace, "--field-selector", f"involvedObject.name={name}")
    return {e["reason"]: e["message"] for e in (listing or {}).get("items", []) if e.get("type") == "Warning"}


def _conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status.get("conditions") or ()}


class InFlight:
    """A foreground `commands.run` in a thread, started once the command is running in the sandbox."""

    def __init__(self, sbx: Sandbox) -> None:
        self.running = threading.Event()
        self.outcome: CommandResult | BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(sbx,), daemon=True)
        self._thread.start()
        assert self.running.wait(60), f"the command never started: {self.outcome!r}"

    def _run(self, sbx: Sandbox) -> None:
        try:
            self.outcome = sbx.commands.run(
                "echo started; sleep 600", timeout=900, on_stdout=lambda _line: self.running.set()
            )
        except BaseException as error:  # what the SDK raised is the finding
            self.outcome = error

    def ended_within(self, seconds: float) -> bool:
        self._thread.join(seconds)
        return not self._thread.is_alive()


@pytest.mark.timeout(600)  # the private cluster's start-up is counted too; each wait below has its own deadline
def test_a_killed_agent_is_replaced_and_the_workspace_and_the_sdk_carry_on(
    cluster: Cluster, operator: OperatorProcess, gateway: Gateway
) -> None:
    sbx = Sandbox.create(template=TEMPLATE, timeout=600, **gateway.sdk())
    body = _sandbox_named_by(cluster, gateway.namespace, sbx.sandbox_id)
    name, status = body["metadata"]["name"], body["status"]
    assert _conditions(status)["Ready"][0] == "True" and status.get("recreateAttempts", 0) == 0
    pod = cluster.get_json("pod", status["podName"], "-n", gateway.namespace)
    (claim,) = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
    claim_uid = cluster.get_json("pvc", claim, "-n", gateway.namespace)["metadata"]["uid"]
    sbx.files.write("before.txt", "written before the crash\n")
    sbx.commands.run("echo scratch > /tmp/outside-the-workspace")
    # The sandbox's own code cannot kill its agent: PID 1 of a PID namespace ignores it from inside.
    pid = agent_pid(cluster, pod)
    assert sbx.commands.run("kill -9 1; echo sent").stdout.strip() == "sent"
    assert agent_pid(cluster, pod) == pid

    watch = ObjectWatch(cluster, gateway.namespace, "sandboxes", name=name)
    try:
        in_flight = InFlight(sbx)
        kill_agent(cluster, pod)

        # The command in flight fails at once with the SDK's own error for a stream cut short.
        assert in_flight.ended_within(60), "commands.run still hangs a minute after the agent died"
        error = in_flight.outcome
        assert isinstance(error, Exception), f"commands.run returned {error!r} from a killed sandbox"
        assert isinstance(error, SandboxException) or "without an end event" in str(error), repr(error)

        # The Sandbox reports it: Running throughout, Ready False with the failure as the reason, and
        # a Warning Event with the exit code.
        def reported() -> dict[str, Any] | None:
            found = [s for s in (o.get("status") or {} for o in list(watch.objects)) if s.get("reason") == "PodFailed"]
            return found[0] if found else None

        try:
            crashed = wait_until(reported, timeout=60, message="the sandbox reporting the failed pod")
        except AssertionError as missed:  # say what it reported instead, and what the pod says
            seen = [(s.get("phase"), s.get("reason")) for s in (o.get("status") or {} for o in list(watch.objects))]
            now = cluster.get_json("pod", pod["metadata"]["name"], "-n", gateway.namespace) or {}
            raise AssertionError(f"{missed}; the Sandbox went {seen}; the pod: {now.get('status')}") from None
        assert crashed["phase"] == "Running" and _conditions(crashed)["Ready"] == ("False", "PodFailed")
        assert _conditions(crashed)["Stalled"][0] == "False"  # healing itself: kstatus InProgress, not Failed
        assert "exit code 137: killed by SIGKILL" in crashed["message"]
        assert not crashed.get("podIP"), "clients must not be sent to the dead agent"

        def recovered() -> dict[str, Any] | None:
            now = _sandbox_named_by(cluster, gateway.namespace, sbx.sandbox_id)["status"]
            replaced = now.get("podIP") and _conditions(now)["Ready"][0] == "True"
            return now if replaced and now.get("recreateAttempts") == 1 else None

        after = wait_until(recovered, timeout=120, message="a new pod, ready, one recreate attempt counted")
        assert {str(s.get("phase")) for s in (o.get("status") or {} for o in list(watch.objects))} == {"Running"}
        new_pod = cluster.get_json("pod", after["podName"], "-n", gateway.namespace)
        assert new_pod["metadata"]["uid"] != pod["metadata"]["uid"]
        warnings = wait_until(
            lambda: (
                (found := _warnings(cluster, gateway.namespace, name)).keys() >= {"PodFailed", "PodRecreated"} and found
            ),
            timeout=30,
            message="the PodFailed and PodRecreated Warning Events",
        )
        assert "exit code 137: killed by SIGKILL" in warnings["PodFailed"]
        assert warnings["PodRecreated"] == "the sandbox pod failed (PodFailed); recreating it (attempt 1 of 3)"
    finally:
        watch.close()

    # The workspace is the same claim with the same files; what lived outside it went with the pod.
    assert cluster.get_json("pvc", claim, "-n", gateway.namespace)["metadata"]["uid"] == claim_uid
    again = Sandbox.connect(sbx.sandbox_id, **gateway.sdk())
    assert again.commands.run("cat before.txt").stdout == "written before the crash\n"
    assert again.commands.run("test -e /tmp/outside-the-workspace || echo gone").stdout.strip() == "gone"
    assert sbx.commands.run("echo the old handle works too").exit_code == 0  # same object, same tokens
    assert again.get_info().state.value == "running"
    again.kill()
