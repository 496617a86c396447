"""Conflicts: 20 writers patching the same Sandboxes at once (spec changes and spec.suspended with
kubectl, pause and resume through the gateway) converge to the last write, never to a state nobody
asked for.

Who decides what (docs/lifecycle.md, the Suspending step; docs/api.md, `suspendedBy`): spec
belongs to its author (kubectl here) and the gateway's pause and resume are requests on
annotations, so each keeps its own last write, and a sandbox runs only when neither asks for it
to be suspended. The writers race on every
field; then one known write per owner and sandbox is made, serialized, and each Sandbox must end
exactly there: the spec as last written, the phase and pods the two last writes add up to.
"""

from __future__ import annotations

import json
import random
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from chaoslib import Gateway
from e2b import Sandbox

from testlib import Cluster, ObjectWatch, OperatorProcess, wait_until

SANDBOXES = 4
WRITERS = 20
ROUNDS = 10  # operations per writer: 100 in all, most of them on a sandbox another writer moves too
TIMEOUT_S = 900  # the sandboxes' E2B timeout (maxLifetime): longer than the module
MEMORY = ("512Mi", "640Mi", "768Mi")  # the template has no maximum: every value is allowed
EXECUTION = ("4m", "5m", "6m")  # within maxLifetime, as the CRD requires
# What each gateway call may answer (docs/gateway.md): pause 204, or 409 already paused; connect and
# resume 200 (was running) or 201 (resumed), 409 when the spec suspends it or another client paused
# it meanwhile. Never a 5xx: a race between clients is not the gateway's failure.
ANSWERS = {"pause": {204, 409}, "connect": {200, 201, 409}, "resume": {200, 201, 409}}
GATEWAY_CALL_S = 90  # longer than the gateway's own --create-timeout (60 s): its answer is what is checked


@dataclass(frozen=True)
class Target:
    """A sandbox the writers share: its Kubernetes name and its E2B ID."""

    name: str
    sandbox_id: str


@dataclass(frozen=True)
class Outcome:
    writer: int
    op: str
    sandbox: str
    status: int | str  # an HTTP status, "ok" for a kubectl patch, or what went wrong
    detail: str = ""


def _patch_spec(cluster: Cluster, namespace: str, name: str, spec: dict[str, Any]) -> None:
    """A merge patch of spec, as a user's `kubectl patch` (no resourceVersion: it never conflicts)."""
    cluster.kubectl("patch", "sandbox", name, "-n", namespace, "--type=merge", "-p", json.dumps({"spec": spec}))


def _spec_change(token: str, rng: random.Random) -> dict[str, Any]:
    """Fields a user may change on a live sandbox; spec.metadata's token tells which write a reader saw."""
    return {
        "resources": {"memory": rng.choice(MEMORY)},
        "timeouts": {"execution": rng.choice(EXECUTION)},
        "metadata": {"write": token},
    }


def _writer(index: int, cluster: Cluster, gateway: Gateway, targets: list[Target], seed: int) -> list[Outcome]:
    rng = random.Random(seed * 1000 + index)
    outcomes: list[Outcome] = []
    for round_ in range(ROUNDS):
        target = rng.choice(targets)
        op = rng.choice(["suspend-spec", "resume-spec", "spec", "pause", "connect", "resume"])
        try:
            if op in ("suspend-spec", "resume-spec"):
                _patch_spec(cluster, gateway.namespace, target.name, {"suspended": op == "suspend-spec"})
                outcomes.append(Outcome(index, op, target.name, "ok"))
            elif op == "spec":
                _patch_spec(cluster, gateway.namespace, target.name, _spec_change(f"w{index}-r{round_}", rng))
                outcomes.append(Outcome(index, op, target.name, "ok"))
            else:
                body = None if op == "pause" else {"timeout": TIMEOUT_S}
                status, answer = gateway.call("POST", f"/sandboxes/{target.sandbox_id}/{op}", body, GATEWAY_CALL_S)
                outcomes.append(Outcome(index, op, target.name, status, json.dumps(answer)[:300]))
        except Exception as error:  # a refused kubectl patch, a gateway that did not answer: findings
            outcomes.append(Outcome(index, op, target.name, type(error).__name__, str(error)[:300]))
    return outcomes


def _sandbox_named(cluster: Cluster, namespace: str, sandbox_id: str) -> str:
    listing = cluster.get_json("sandboxes", "-n", namespace) or {}
    (name,) = [
        item["metadata"]["name"]
        for item in listing.get("items", [])
        if (item.get("status") or {}).get("sandboxID") == sandbox_id
    ]
    return str(name)


def _create(gateway: Gateway) -> str:
    status, answer = gateway.call("POST", "/v2/sandboxes", {"templateID": "base", "timeout": TIMEOUT_S})
    assert status == 201, (status, answer)
    return str(answer["sandboxID"])


def _get(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    body = cluster.get_json("sandbox", name, "-n", namespace)
    assert body is not None, f"sandbox {name} is gone"
    return dict(body)


def _pods(cluster: Cluster, namespace: str, name: str) -> list[dict[str, Any]]:
    listing = cluster.get_json("pods", "-n", namespace, "-l", f"sandbox.dev/sandbox={name}") or {}
    return list(listing.get("items", []))


def _gateway_saw(gateway: Gateway, target: Target, token: str) -> Callable[[], bool]:
    """The gateway's cache has the spec write carrying `token` (get_info's metadata is spec.metadata)."""

    def seen() -> bool:
        status, info = gateway.call("GET", f"/sandboxes/{target.sandbox_id}", timeout=10)
        return status == 200 and (info.get("metadata") or {}).get("write") == token

    return seen


def _acted_on(cluster: Cluster, namespace: str, name: str) -> Callable[[], dict[str, Any] | None]:
    """The operator has decided on the Sandbox's latest spec (status.observedGeneration)."""

    def acted() -> dict[str, Any] | None:
        body = _get(cluster, namespace, name)
        status = body.get("status") or {}
        return body if status.get("observedGeneration") == body["metadata"]["generation"] else None

    return acted


def _most_live_pods(events: list[tuple[str, dict[str, Any]]]) -> dict[str, int]:
    """The most pods each sandbox had alive at once (not deleted, not being deleted, not finished),
    replaying the pod watch in the API server's order."""
    live: dict[str, set[str]] = defaultdict(set)
    most: Counter[str] = Counter()
    for kind, pod in events:
        meta, phase = pod["metadata"], (pod.get("status") or {}).get("phase")
        sandbox = (meta.get("labels") or {}).get("sandbox.dev/sandbox")
        if sandbox is None:
            continue
        if kind == "DELETED" or meta.get("deletionTimestamp") or phase in ("Succeeded", "Failed"):
            live[sandbox].discard(meta["uid"])
        else:
            live[sandbox].add(meta["uid"])
        most[sandbox] = max(most[sandbox], len(live[sandbox]))
    return dict(most)


def _tracebacks(text: str) -> list[str]:
    lines = text.splitlines()
    return ["\n".join(lines[max(0, i - 2) : i + 12]) for i, line in enumerate(lines) if "Traceback" in line]


@pytest.mark.timeout(600)  # the private cluster's start-up is counted too; each wait has its own deadline
def test_concurrent_writers_converge_to_the_last_write(
    cluster: Cluster, operator: OperatorProcess, gateway: Gateway
) -> None:
    namespace = gateway.namespace
    pods = ObjectWatch(cluster, namespace, "pods", api="/api/v1")
    try:
        with ThreadPoolExecutor(SANDBOXES) as pool:
            ids = list(pool.map(lambda _: _create(gateway), range(SANDBOXES)))
        targets = [Target(_sandbox_named(cluster, namespace, sandbox_id), sandbox_id) for sandbox_id in ids]

        seed = secrets.randbelow(1_000_000)
        print(f"conflict writers: seed {seed}")
        started = time.monotonic()
        with ThreadPoolExecutor(WRITERS) as pool:
            runs = list(pool.map(lambda i: _writer(i, cluster, gateway, targets, seed), range(WRITERS)))
        outcomes = [outcome for run in runs for outcome in run]
        tally = Counter((o.op, o.status) for o in outcomes)
        print(f"{len(outcomes)} writes in {time.monotonic() - started:.1f}s: {tally}")

        refused = [o for o in outcomes if o.status != "ok" and o.status not in ANSWERS.get(o.op, ())]
        assert not refused, "answers nobody documented:\n" + "\n".join(map(str, refused))
        # The run raced what it is meant to: the API's pauses or resumes took effect, and pods were
        # replaced (suspensions and resumes happened while the writers ran).
        statuses = Counter(o.status for o in outcomes)
        assert statuses[204] + statuses[201] > 0 and statuses["ok"], statuses
        assert len({pod["metadata"]["uid"] for _, pod in pods.events}) > SANDBOXES, "no pod was ever replaced"

        final = _final_writes(cluster, gateway, targets)
        _assert_converged(cluster, gateway, targets, final)
    finally:
        pods.close()

    most = _most_live_pods(pods.events)
    assert set(most) == {t.name for t in targets}, f"the pod watch saw pods of {sorted(most)}"
    assert all(count == 1 for count in most.values()), f"a sandbox had two live pods at once: {most}"
    assert not _tracebacks(gateway.log.read_text(errors="replace")), _tracebacks(gateway.log.read_text())
    assert not _tracebacks(operator.log_path.read_text(errors="replace")), _tracebacks(operator.log_path.read_text())


@dataclass(frozen=True)
class Final:
    """What the last writes of both owners ask of one sandbox."""

    spec: dict[str, Any]  # the last kubectl write, as sent
    phase: str
    suspended_by: str | None  # status.suspendedBy: Spec, Request, or None while running


def _final_writes(cluster: Cluster, gateway: Gateway, targets: list[Target]) -> dict[str, Final]:
    """One known write per owner and sandbox, in order, each made once the gateway has seen the spec
    write before it (its cache is what its checks read)."""
    namespace = gateway.namespace
    rng = random.Random(0)
    final: dict[str, Final] = {}

    def spec_write(target: Target, suspended: bool) -> dict[str, Any]:
        token = f"final-{secrets.token_hex(4)}"
        spec = {"suspended": suspended, **_spec_change(token, rng)}
        _patch_spec(cluster, namespace, target.name, spec)
        wait_until(_gateway_saw(gateway, target, token), timeout=30, message=f"the gateway to see {token}")
        return spec

    def call(target: Target, op: str, expected: set[int]) -> None:
        body = None if op == "pause" else {"timeout": TIMEOUT_S}
        status, answer = gateway.call("POST", f"/sandboxes/{target.sandbox_id}/{op}", body, GATEWAY_CALL_S)
        assert status in expected, f"{op} of {target.name}: {status} {answer}"

    running, by_spec, by_request, request_outlives_spec = targets
    # Running: the spec does not suspend it and the API resumes it.
    spec = spec_write(running, suspended=False)
    call(running, "connect", {200, 201})
    final[running.name] = Final(spec, "Running", None)
    # Suspended by its spec: the API cannot resume it (409), whatever it asked before.
    spec = spec_write(by_spec, suspended=True)
    call(by_spec, "connect", {409})
    final[by_spec.name] = Final(spec, "Suspended", "Spec")
    # Suspended by the API's pause, the spec not suspending it.
    spec = spec_write(by_request, suspended=False)
    call(by_request, "connect", {200, 201})
    call(by_request, "pause", {204})
    final[by_request.name] = Final(spec, "Suspended", "Request")
    # The API's pause, then a spec write with suspended: false: the spec's false is not a resume (the
    # pause is the API's request, lifted by the API's resume), so it stays suspended by the request.
    spec_write(request_outlives_spec, suspended=False)
    call(request_outlives_spec, "connect", {200, 201})
    call(request_outlives_spec, "pause", {204})
    spec = spec_write(request_outlives_spec, suspended=False)
    final[request_outlives_spec.name] = Final(spec, "Suspended", "Request")
    return final


def _assert_converged(cluster: Cluster, gateway: Gateway, targets: list[Target], final: dict[str, Final]) -> None:
    namespace = gateway.namespace
    for target in targets:
        want = final[target.name]

        def settled(target: Target = target, want: Final = want) -> dict[str, Any] | None:
            body = _acted_on(cluster, namespace, target.name)()
            if body is None or body["status"].get("phase") != want.phase:
                return None
            pods = [p for p in _pods(cluster, namespace, target.name) if not p["metadata"].get("deletionTimestamp")]
            if want.phase == "Running":
                ready = {c["type"]: c["status"] for c in body["status"].get("conditions") or ()}.get("Ready")
                return body if ready == "True" and len(pods) == 1 and body["status"].get("podIP") else None
            return body if not _pods(cluster, namespace, target.name) else None

        body = wait_until(settled, timeout=90, message=f"{target.name} to settle {want.phase}")
        spec, status = body["spec"], body["status"]
        assert spec["suspended"] is want.spec["suspended"], spec
        assert spec["resources"]["memory"] == want.spec["resources"]["memory"], spec
        assert spec["timeouts"]["execution"] == want.spec["timeouts"]["execution"], spec
        assert spec["metadata"]["write"] == want.spec["metadata"]["write"], spec
        assert status.get("suspendedBy") == want.suspended_by, status
        if want.phase == "Running":
            (pod,) = _pods(cluster, namespace, target.name)
            assert pod["status"]["podIP"] == status["podIP"], (pod["status"], status)
            sbx = Sandbox.connect(target.sandbox_id, **gateway.sdk())
            assert sbx.commands.run("echo answered").stdout == "answered\n"
    # Still so once all have settled: no late write of a writer, no decision nobody asked for.
    for target in targets:
        body = _get(cluster, namespace, target.name)
        assert body["status"]["phase"] == final[target.name].phase, (target.name, body["status"])
