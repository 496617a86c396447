"""The floor, side by side: the operator against a minimal controller on the same control plane.

    python benchmarks/floor_bench.py            # 2 rounds each: 30 one at a time, bursts of 200 and 1,000
    python benchmarks/floor_bench.py --quick    # 1 round each: 10 one at a time, bursts of 50 and 100

One local control plane (`hack/cluster up`, kwok node), the CRDs and an emptyDir SandboxTemplate.
Then rounds alternate operator, floor, operator, floor (`--rounds` each); in a round only that
controller runs (`python -m sandbox_operator run --namespace NS`, default settings, or
benchmarks/floor_controller.py), on a fresh namespace, after a warm-up of 3 sandboxes:

1. `--sequential` sandboxes one at a time: POST sent → a watch sees status.phase Running (p50/p99);
2. each of `--bursts` (default 200 and 1,000) POSTed at once (`--burst-in-flight` in flight) →
   seconds until every one is Running; the sandboxes of each burst but the last are then deleted
   (untimed) before the next;
3. the last burst deleted (one DELETE per sandbox, as many in flight) → seconds until every child
   pod is gone (and every Sandbox).

Attribution of API writes: apiserver_request_total has no user-agent or user label, so each
controller runs as its own service account (cluster-admin) and the benchmark adds FlowSchemas (API
Priority and Fairness, exempt priority level: nothing is queued or limited) that match that account
per verb and resource class; the API server's apiserver_flowcontrol_dispatched_requests_total per
FlowSchema then counts every request each controller made, on the server's side. The controllers'
own counters (the operator's sandbox_operator_api_writes_total, the floor's exit log) are kept as a
cross-check. Writes from all clients come from apiserver_request_total deltas (POST, PUT, PATCH,
DELETE, APPLY, DELETECOLLECTION) and include the benchmark's own POST and DELETE per sandbox.

CPU seconds (utime+stime from /proc) of the controller and of each control-plane component (PIDs from
the hack/cluster state dir) over each scenario, from its start until its end condition; the busiest
is printed as the bottleneck, with whether the machine's cores were saturated. The controller's peak
RSS is its VmHWM. Prints a table (each controller's mean over rounds, the rounds, operator/floor)
and writes benchmarks/results/floor.json. Reports figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp

from benchlib import (
    cluster_down,
    cluster_up,
    control_plane_pids,
    cpu_seconds,
    log,
    machine_busy_seconds,
    mb,
    proc_status,
    run_facts,
    write_results,
)
from operator_bench import (
    GROUP_PATH,
    LOG_DIR,
    SANDBOX_LABEL,
    Api,
    ApiError,
    NodeMonitor,
    OperatorProcess,
    Tracker,
    Watch,
    install_crds,
    make_namespace,
    sandbox_body,
    seconds_summary,
    start_operator,
    template,
)
from sandbox_operator.kube import Credentials
from testlib import stop_process

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "floor.json"
FLOOR = REPO / "benchmarks" / "floor_controller.py"
CONTROLLERS = ("operator", "floor")
TEMPLATE = "floor-bench-ephemeral"
IDENTITY_NAMESPACE = "default"
FLOW_PREFIX = "floor-bench"
WARMUP = 3
# APF verbs -> the verbs apiserver_request_total names them by.
FLOW_VERBS = {
    "create": "POST",
    "update": "PUT",
    "patch": "PATCH",
    "delete": "DELETE",
    "deletecollection": "DELETECOLLECTION",
}
RESOURCE_CLASSES: dict[str, tuple[list[str], list[str]]] = {  # matched in this order
    "pods": ([""], ["pods"]),
    "sandboxes": (["sandbox.dev"], ["sandboxes", "sandboxes/status"]),
    "events": (["", "events.k8s.io"], ["events"]),
    "other": (["*"], ["*"]),
}
WRITE_VERBS = frozenset({"POST", "PUT", "PATCH", "DELETE", "APPLY", "DELETECOLLECTION"})
JSON = dict[str, Any]


# --- identities and server-side counts ----------------------------------------------------------


def account(controller: str) -> str:
    return f"{FLOW_PREFIX}-{controller}"


def flow_schemas(controller: str, base_precedence: int) -> list[JSON]:
    """One FlowSchema per (write verb, resource class) of the controller's service account, then one
    for everything else it asks (reads, watches, discovery); all on the exempt priority level."""
    subject = {
        "kind": "ServiceAccount",
        "serviceAccount": {"name": account(controller), "namespace": IDENTITY_NAMESPACE},
    }
    schemas: list[JSON] = []

    def schema(name: str, precedence: int, rule: JSON) -> JSON:
        return {
            "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
            "kind": "FlowSchema",
            "metadata": {"name": name},
            "spec": {
                "priorityLevelConfiguration": {"name": "exempt"},
                "matchingPrecedence": precedence,
                "rules": [{"subjects": [subject], **rule}],
            },
        }

    for class_index, (resource_class, (groups, resources)) in enumerate(RESOURCE_CLASSES.items()):
        for verb_index, verb in enumerate(FLOW_VERBS):
            rule = {
                "resourceRules": [
                    {
                        "verbs": [verb],
                        "apiGroups": groups,
                        "resources": resources,
                        "clusterScope": True,
                        "namespaces": ["*"],
                    }
                ]
            }
            precedence = base_precedence + class_index * 10 + verb_index
            schemas.append(schema(f"{account(controller)}-{verb}-{resource_class}", precedence, rule))
    everything = {
        "resourceRules": [
            {"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"], "clusterScope": True, "namespaces": ["*"]}
        ],
        "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
    }
    schemas.append(schema(f"{account(controller)}-rest", base_precedence + 90, everything))
    return schemas


async def make_identity(api: Api, controller: str, admin_kubeconfig: str, workdir: Path) -> str:
    """A cluster-admin service account for the controller, its FlowSchemas, and a kubeconfig with its token."""
    name = account(controller)
    await api.create(
        f"/api/v1/namespaces/{IDENTITY_NAMESPACE}/serviceaccounts",
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}},
    )
    await api.create(
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": IDENTITY_NAMESPACE}],
        },
    )
    base = 100 + 100 * CONTROLLERS.index(controller)
    for schema in flow_schemas(controller, base):
        await api.create("/apis/flowcontrol.apiserver.k8s.io/v1/flowschemas", schema)
    answer = await api.call(
        "POST",
        f"/api/v1/namespaces/{IDENTITY_NAMESPACE}/serviceaccounts/{name}/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 86400}},
    )
    config = json.loads(await asyncio.to_thread(Path(admin_kubeconfig).read_text))
    for user in config["users"]:
        user["user"] = {"token": answer["status"]["token"]}
    path = workdir / f"kubeconfig-{controller}"
    await asyncio.to_thread(path.write_text, json.dumps(config, indent=2))
    await asyncio.to_thread(path.chmod, 0o600)
    return str(path)


@dataclass
class ServerCounts:
    """Requests the API server served so far: by "VERB resource[/sub]" from everyone, and per FlowSchema."""

    requests: Counter[str] = field(default_factory=Counter)
    flows: Counter[str] = field(default_factory=Counter)


SAMPLE = re.compile(r"^(\w+)\{(.*)\} (\S+)$")


async def server_counts(api: Api) -> ServerCounts:
    text = str(await api.call("GET", "/metrics", attempts=3) or "")
    counts = ServerCounts()
    for line in text.splitlines():
        if not line.startswith(("apiserver_request_total{", "apiserver_flowcontrol_dispatched_requests_total{")):
            continue
        match = SAMPLE.match(line)
        if match is None:
            continue
        metric, labels, value = match.group(1), dict(re.findall(r'(\w+)="([^"]*)"', match.group(2))), match.group(3)
        if metric == "apiserver_request_total" and labels.get("verb") not in ("WATCH", "WATCHLIST", "CONNECT"):
            resource = labels.get("resource", "") + (f"/{labels['subresource']}" if labels.get("subresource") else "")
            counts.requests[f"{labels.get('verb')} {resource}"] += int(float(value))
        elif metric == "apiserver_flowcontrol_dispatched_requests_total":
            counts.flows[labels.get("flow_schema", "")] += int(float(value))
    return counts


def per_sandbox(counter: Counter[str], sandboxes: int) -> JSON:
    return {key: round(n / sandboxes, 2) for key, n in sorted(counter.items(), key=lambda kv: -kv[1]) if n}


def writes_report(before: ServerCounts, after: ServerCounts, controller: str, sandboxes: int) -> JSON:
    """The controller's writes (its FlowSchemas), and all clients' writes, per sandbox."""
    own: Counter[str] = Counter()
    prefix = account(controller) + "-"
    for name, count in after.flows.items():
        if not name.startswith(prefix) or name.endswith("-rest"):
            continue
        verb, _, resource_class = name.removeprefix(prefix).partition("-")
        own[f"{FLOW_VERBS[verb]} {resource_class}"] += count - before.flows.get(name, 0)
    other_requests = after.flows.get(prefix + "rest", 0) - before.flows.get(prefix + "rest", 0)
    everyone: Counter[str] = Counter(
        {key: n - before.requests.get(key, 0) for key, n in after.requests.items() if key.split()[0] in WRITE_VERBS}
    )
    by_verb: Counter[str] = Counter()
    for key, n in everyone.items():
        by_verb[key.split()[0]] += n
    return {
        "controller_writes_per_sandbox": round(sum(own.values()) / sandboxes, 2),
        "controller_writes_by_request": per_sandbox(own, sandboxes),
        "controller_writes_counted": {key: n for key, n in sorted(own.items()) if n},
        "controller_other_requests_per_sandbox": round(other_requests / sandboxes, 2),
        "all_clients_writes_per_sandbox": round(sum(everyone.values()) / sandboxes, 2),
        "all_clients_writes_by_verb": per_sandbox(by_verb, sandboxes),
        "all_clients_writes_by_request": dict(list(per_sandbox(everyone, sandboxes).items())[:15]),
    }


# --- CPU ----------------------------------------------------------------------------------------


def cpu_readings(pids: dict[str, int]) -> dict[str, float]:
    readings = {name: cpu_seconds(pid) for name, pid in pids.items()}
    readings["benchmark"] = cpu_seconds(os.getpid())
    readings["machine_busy"] = machine_busy_seconds()
    return readings


def cpu_report(before: dict[str, float], after: dict[str, float], wall: float) -> JSON:
    """CPU seconds per process over the scenario, the busiest one and whether the machine was saturated."""
    used = {key: round(after[key] - before.get(key, 0.0), 2) for key in after}
    cores = os.cpu_count() or 1
    processes = {key: value for key, value in used.items() if key not in ("machine_busy", "benchmark")}
    busiest = max(processes, key=lambda key: processes[key])
    machine_share = used["machine_busy"] / (wall * cores) if wall > 0 else 0.0
    others = used["machine_busy"] - sum(v for k, v in used.items() if k != "machine_busy")
    return {
        "cpu_s": used,
        "wall_s": round(wall, 2),
        "other_processes_s": round(others, 2),  # not ours: others' work on a shared machine
        "other_processes_share": round(others / (wall * cores), 2) if wall > 0 else None,
        "bottleneck": busiest,
        "bottleneck_cores": round(processes[busiest] / wall, 2) if wall > 0 else None,
        "machine_busy_share": round(machine_share, 2),
        "machine_saturated": machine_share >= 0.9,
    }


# --- the controllers ----------------------------------------------------------------------------


@dataclass
class Controller:
    kind: str
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    operator: OperatorProcess | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> JSON:
        """Stop it; its own write counts ({"VERB resource": n}) as it kept them."""
        own: dict[str, int] = {}
        if self.operator is not None:
            try:
                own = dict(self.operator.writes())
            except OSError:
                pass
            self.operator.stop()
            return own
        stop_process(self.process, grace=20)
        for line in self.log_path.read_text(errors="replace").splitlines():
            if " writes {" in line:
                own = json.loads(line.split(" writes ", 1)[1])
        return own


def start_floor(name: str, kubeconfig: str, namespace: str) -> Controller:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"{name}.log"
    argv = [sys.executable, str(FLOOR), "--kubeconfig", kubeconfig, "--namespace", namespace]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
    controller = Controller("floor", name, process, log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"floor controller exited with {process.returncode}; see {log_path}")
        if "ready:" in log_path.read_text(errors="replace"):
            return controller
        time.sleep(0.1)
    controller.stop()
    raise RuntimeError(f"floor controller not ready in 60 s; see {log_path}")


def start_controller(kind: str, name: str, kubeconfig: str, namespace: str, args: argparse.Namespace) -> Controller:
    if kind == "floor":
        return start_floor(name, kubeconfig, namespace)
    operator = start_operator(name, kubeconfig, [namespace], list(args.operator_arg), args.operator_path)
    return Controller("operator", name, operator.process, operator.log_path, operator)


async def cpu_quiet(pid: int, window: float = 1.0, limit: float = 20.0) -> None:
    """Until the process used < 2 % of a core over `window` (its trailing writes, e.g. Events, are done)."""
    deadline = time.monotonic() + limit
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(window)
        now = cpu_seconds(pid)
        if now - last < 0.02 * window:
            return
        last = now


# --- scenarios ----------------------------------------------------------------------------------


@dataclass
class Round:
    api: Api
    args: argparse.Namespace
    controller: Controller
    namespace: str
    pids: dict[str, int]  # control-plane components

    @property
    def sandboxes_path(self) -> str:
        return f"{GROUP_PATH}/namespaces/{self.namespace}/sandboxes"


class Census:
    """Names of the objects a watch currently sees; wait_empty() returns once none is left."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.emptied = asyncio.Event()

    def on_event(self, kind: str, obj: JSON, now: float) -> None:
        name = str(obj["metadata"]["name"])
        if kind == "DELETED":
            self.names.discard(name)
            if not self.names:
                self.emptied.set()
        else:
            self.names.add(name)

    async def wait_empty(self, within: float) -> bool:
        if not self.names:
            return True
        try:
            await asyncio.wait_for(self.emptied.wait(), within)
            return True
        except TimeoutError:
            return False


async def in_parallel(items: list[str], in_flight: int, work: Callable[[str], Awaitable[None]]) -> list[str]:
    """work(item) for every item, `in_flight` at a time; the errors, as text."""
    queue = list(reversed(items))
    errors: list[str] = []

    async def worker() -> None:
        while queue:
            item = queue.pop()
            try:
                await work(item)
            except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                errors.append(f"{item}: {exc}")

    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return errors


def background_writes(counts: ServerCounts) -> int:
    """Writes from all clients, less the periodic ones (node heartbeats, leases)."""
    periodic = ("PUT leases", "PATCH nodes/status", "PATCH nodes")
    return sum(n for key, n in counts.requests.items() if key.split()[0] in WRITE_VERBS and key not in periodic)


async def cluster_quiet(api: Api, window: float = 0.5, limit: float = 15.0) -> None:
    """Until no client has written for `window` seconds: the last cleanup's trailing deletes (the
    garbage collector's, kwok's) belong to no scenario."""
    deadline = time.monotonic() + limit
    last = background_writes(await server_counts(api))
    while time.monotonic() < deadline:
        await asyncio.sleep(window)
        now = background_writes(await server_counts(api))
        if now == last:
            return
        last = now


async def measured(rnd: Round, sandboxes: int, scenario: Callable[[], Awaitable[JSON]]) -> JSON:
    """Run a scenario between readings of CPU (until its end condition) and API server counters
    (after the controller has gone quiet, so trailing writes count)."""
    pids = {**rnd.pids, "controller": rnd.controller.pid}
    await cluster_quiet(rnd.api)
    counts_before = await server_counts(rnd.api)
    cpu_before = cpu_readings(pids)
    started = time.perf_counter()
    result = await scenario()
    wall = time.perf_counter() - started
    cpu_after = cpu_readings(pids)
    counts_at_end = await server_counts(rnd.api)
    await cpu_quiet(rnd.controller.pid)
    counts_after = await server_counts(rnd.api)
    kind = rnd.controller.kind
    status = proc_status(rnd.controller.pid)
    return {
        "sandboxes": sandboxes,
        **result,
        "writes": writes_report(counts_before, counts_after, kind, sandboxes),
        "writes_at_end_condition": writes_report(counts_before, counts_at_end, kind, sandboxes),
        "cpu": cpu_report(cpu_before, cpu_after, wall),
        "controller_rss_mb": mb(status.get("VmRSS", 0)),
        "controller_peak_rss_mb": mb(status.get("VmHWM", 0)),
    }


async def watch_running(rnd: Round) -> tuple[Tracker, Watch]:
    tracker = Tracker()
    watch = Watch(rnd.api, rnd.sandboxes_path, tracker.on_sandbox)
    await watch.start()
    return tracker, watch


async def sequential(rnd: Round, prefix: str, count: int) -> JSON:
    tracker, watch = await watch_running(rnd)
    timed_out = 0
    for index in range(count):
        name = f"{prefix}-{index:04d}"
        timeline = tracker.expect(name)
        timeline.sent = time.perf_counter()
        await rnd.api.create(rnd.sandboxes_path, sandbox_body(name, TEMPLATE))
        timeline.returned = time.perf_counter()
        if not await tracker.wait_running(name, rnd.args.sandbox_timeout):
            timed_out += 1
            if timed_out >= 3:
                break  # not making progress: do not wait out every remaining sandbox
    await watch.stop()
    done = [t for t in tracker.timelines.values() if t.running and t.sent]
    return {
        "reached_running": len(done),
        "latency_from_post_sent": seconds_summary(t.running - t.sent for t in done if t.running and t.sent),
        "latency_from_post_returned": seconds_summary(t.running - t.returned for t in done if t.running and t.returned),
    }


def last_moments(tracker: Tracker, started: float) -> JSON:
    """Seconds from the burst's start until the last pod was created, scheduled, Running, and the last
    Sandbox Running: a stage that ends long after the one before caps the burst."""
    result: JSON = {}
    for stage in ("pod_added", "pod_bound", "pod_running", "running"):
        moments = [getattr(t, stage) for t in tracker.timelines.values() if getattr(t, stage) is not None]
        result[f"last_{stage}_s"] = round(max(moments) - started, 2) if moments else None
        result[f"{stage}_seen"] = len(moments)
    return result


async def burst(rnd: Round, prefix: str, count: int) -> JSON:
    tracker, watch = await watch_running(rnd)
    pod_watch = None
    if rnd.args.pod_stages:
        params = {"labelSelector": SANDBOX_LABEL}
        pod_watch = Watch(rnd.api, f"/api/v1/namespaces/{rnd.namespace}/pods", tracker.on_pod, params)
        await pod_watch.start()
    names = [f"{prefix}-{index:05d}" for index in range(count)]
    for name in names:
        tracker.expect(name)

    async def post(name: str) -> None:
        tracker.timelines[name].sent = time.perf_counter()
        await rnd.api.create(rnd.sandboxes_path, sandbox_body(name, TEMPLATE))

    started = time.perf_counter()
    errors = await in_parallel(names, rnd.args.burst_in_flight, post)
    posted_s = time.perf_counter() - started
    all_running = await tracker.wait_count(count, rnd.args.burst_timeout)
    all_running_s = time.perf_counter() - started
    await watch.stop()
    if pod_watch is not None:
        await pod_watch.stop()
    moments = sorted(t - started for t in tracker.running_at)
    return {
        "pod_stages": last_moments(tracker, started) if pod_watch is not None else None,
        "post_errors": errors[:10],
        "all_posted_s": round(posted_s, 2),
        "all_running": all_running,
        "reached_running": tracker.running_count,
        "all_running_s": round(all_running_s, 2) if all_running else None,
        "running_50pct_s": round(moments[len(moments) // 2], 2) if moments else None,
        "latency_from_post_sent": seconds_summary(
            t.running - t.sent for t in tracker.timelines.values() if t.running and t.sent
        ),
    }


async def delete_all(rnd: Round) -> JSON:
    """DELETE every Sandbox in the namespace; seconds until their pods, then the Sandboxes, are gone."""
    pods, sandboxes = Census(), Census()
    pod_watch = Watch(
        rnd.api, f"/api/v1/namespaces/{rnd.namespace}/pods", pods.on_event, {"labelSelector": SANDBOX_LABEL}
    )
    sandbox_watch = Watch(rnd.api, rnd.sandboxes_path, sandboxes.on_event)
    await pod_watch.start()
    await sandbox_watch.start()
    names, pod_count = sorted(sandboxes.names), len(pods.names)

    async def delete(name: str) -> None:
        try:
            await rnd.api.call("DELETE", f"{rnd.sandboxes_path}/{name}")
        except ApiError as exc:
            if exc.status != 404:
                raise

    started = time.perf_counter()
    errors = await in_parallel(names, rnd.args.burst_in_flight, delete)
    sent_s = time.perf_counter() - started
    pods_gone = await pods.wait_empty(rnd.args.burst_timeout)
    pods_gone_s = time.perf_counter() - started
    sandboxes_gone = await sandboxes.wait_empty(rnd.args.burst_timeout)
    sandboxes_gone_s = time.perf_counter() - started
    await pod_watch.stop()
    await sandbox_watch.stop()
    return {
        "pods": pod_count,
        "delete_errors": errors[:10],
        "all_deletes_sent_s": round(sent_s, 2),
        "pods_gone_s": round(pods_gone_s, 2) if pods_gone else None,
        "pods_left": len(pods.names),
        "sandboxes_gone_s": round(sandboxes_gone_s, 2) if sandboxes_gone else None,
        "sandboxes_left": len(sandboxes.names),
    }


async def one_round(
    api: Api,
    args: argparse.Namespace,
    kind: str,
    number: int,
    kubeconfig: str,
    pids: dict[str, int],
    started: list[Controller],
) -> JSON:
    namespace = f"floor-{kind}-r{number}"
    await make_namespace(api, namespace)
    name = f"floor-bench-{kind}-r{number}"
    log(f"{name}: starting {kind} on {namespace}")
    counts_at_start = await server_counts(api)
    controller = await asyncio.to_thread(start_controller, kind, name, kubeconfig, namespace, args)
    started.append(controller)
    rnd = Round(api, args, controller, namespace, pids)
    result: JSON = {"controller": kind, "round": number, "namespace": namespace, "scenarios": {}}
    try:
        await asyncio.sleep(args.idle_settle)
        result["idle_rss_mb"] = mb(proc_status(controller.pid).get("VmRSS", 0))
        await sequential(rnd, "warmup", WARMUP)  # first-use costs (template cache, connections)
        await delete_all(rnd)
        scenarios = result["scenarios"]
        scenarios["sequential"] = await measured(rnd, args.sequential, lambda: sequential(rnd, "seq", args.sequential))
        log(f"{name}: sequential p50 {scenarios['sequential']['latency_from_post_sent'].get('p50_ms')} ms")
        await delete_all(rnd)
        for index, size in enumerate(args.bursts):
            key = f"burst_{size}"
            scenarios[key] = await measured(rnd, size, functools.partial(burst, rnd, f"b{size}", size))
            log(f"{name}: {key} all Running {scenarios[key]['all_running_s']} s")
            if index < len(args.bursts) - 1:
                await delete_all(rnd)
        last = args.bursts[-1]
        scenarios[f"delete_{last}"] = await measured(rnd, last, lambda: delete_all(rnd))
        log(f"{name}: delete_{last} pods gone {scenarios[f'delete_{last}']['pods_gone_s']} s")
        result["peak_rss_mb"] = mb(proc_status(controller.pid).get("VmHWM", 0))
        result["cpu_s_total"] = round(cpu_seconds(controller.pid), 2)
    finally:
        result["own_write_counts_whole_round"] = await asyncio.to_thread(controller.stop)
    # The server's count over the same span, to check the controllers' own counters against.
    sandboxes = WARMUP + args.sequential + sum(args.bursts)
    whole_round = writes_report(counts_at_start, await server_counts(api), kind, sandboxes)
    result["server_write_counts_whole_round"] = whole_round["controller_writes_counted"]
    await api.call("DELETE", f"/api/v1/namespaces/{namespace}")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if await api.get(f"/api/v1/namespaces/{namespace}") is None:
            break
        await asyncio.sleep(0.2)
    return result


async def gc_ready(api: Api) -> float:
    """Seconds until the garbage collector follows owner references to Sandboxes: it learns about a
    CRD on its next discovery pass (up to ~30 s after the CRDs are applied), and the floor relies on it."""
    started = time.monotonic()
    path = f"{GROUP_PATH}/namespaces/{IDENTITY_NAMESPACE}/sandboxes"
    owner = await api.call("POST", path, sandbox_body("gc-probe", TEMPLATE))
    reference = {"apiVersion": "sandbox.dev/v1alpha1", "kind": "Sandbox", "name": "gc-probe"}
    reference["uid"] = owner["metadata"]["uid"]
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "gc-probe", "ownerReferences": [reference]},
    }
    await api.call("POST", f"/api/v1/namespaces/{IDENTITY_NAMESPACE}/configmaps", configmap)
    await api.call("DELETE", f"{path}/gc-probe")
    while await api.get(f"/api/v1/namespaces/{IDENTITY_NAMESPACE}/configmaps/gc-probe") is not None:
        if time.monotonic() - started > 120:
            raise TimeoutError("the garbage collector did not pick up Sandboxes in 120 s")
        await asyncio.sleep(0.5)
    return round(time.monotonic() - started, 1)


async def run(
    args: argparse.Namespace, admin_kubeconfig: str, state_dir: Path, workdir: Path, started: list[Controller]
) -> JSON:
    api = Api(await asyncio.to_thread(Credentials.load, admin_kubeconfig))
    nodes = NodeMonitor()
    rounds: list[JSON] = []
    try:
        node_watch = Watch(api, "/api/v1/nodes", nodes.on_node)
        await node_watch.start()
        await install_crds(api, admin_kubeconfig)
        await api.create(f"{GROUP_PATH}/sandboxtemplates", template(TEMPLATE, persistent=False))
        kubeconfigs = {kind: await make_identity(api, kind, admin_kubeconfig, workdir) for kind in args.controllers}
        log(f"garbage collector follows Sandboxes after {await gc_ready(api)} s")
        pids = control_plane_pids(state_dir)
        for number in range(1, args.rounds + 1):
            for kind in args.controllers:
                nodes.scenario = f"{kind}-r{number}"
                result = await one_round(api, args, kind, number, kubeconfigs[kind], pids, started)
                result["node_not_ready"] = nodes.not_ready_in(nodes.scenario)
                rounds.append(result)
        await node_watch.stop()
    finally:
        await api.close()
    return {"rounds": rounds, "node_ready_changes": nodes.changes}


# --- the report ---------------------------------------------------------------------------------


def dig(data: Any, path: str) -> Any:
    for key in path.split("."):
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def figures(rounds: list[JSON], kind: str, path: str) -> list[float]:
    values = [dig(r, path) for r in rounds if r["controller"] == kind]
    return [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    text = f"{mean:.3g}" if abs(mean) < 1000 else f"{mean:.0f}"
    return text if len(values) == 1 else f"{text} ({', '.join(f'{v:.3g}' for v in values)})"


def ratio(operator: list[float], floor: list[float]) -> str:
    if not operator or not floor or statistics.fmean(floor) == 0:
        return "-"
    return f"{statistics.fmean(operator) / statistics.fmean(floor):.2f}"


def table(results: JSON, args: argparse.Namespace) -> list[list[str]]:
    """[measure, operator, floor, operator/floor] rows."""
    rounds = results["rounds"]
    last = args.bursts[-1]
    rows: list[tuple[str, str]] = [
        (
            f"sequential {args.sequential}: create -> Running p50 ms",
            "scenarios.sequential.latency_from_post_sent.p50_ms",
        ),
        (
            f"sequential {args.sequential}: create -> Running p99 ms",
            "scenarios.sequential.latency_from_post_sent.p99_ms",
        ),
    ]
    rows += [(f"burst {size}: all Running s", f"scenarios.burst_{size}.all_running_s") for size in args.bursts]
    rows += [
        (f"delete {last}: all child pods gone s", f"scenarios.delete_{last}.pods_gone_s"),
        (f"delete {last}: all Sandboxes gone s", f"scenarios.delete_{last}.sandboxes_gone_s"),
    ]
    keys = ["sequential", *(f"burst_{size}" for size in args.bursts), f"delete_{last}"]
    rows += [
        (f"controller's writes/sandbox, {key}", f"scenarios.{key}.writes.controller_writes_per_sandbox") for key in keys
    ]
    rows += [
        (f"all clients' writes/sandbox, {key}", f"scenarios.{key}.writes.all_clients_writes_per_sandbox")
        for key in keys
    ]
    rows += [(f"controller CPU s, {key}", f"scenarios.{key}.cpu.cpu_s.controller") for key in keys]
    rows += [("controller CPU s, whole round", "cpu_s_total"), ("controller RSS idle MB", "idle_rss_mb")]
    rows += [("controller peak RSS (VmHWM) MB", "peak_rss_mb")]
    for key in keys[1:]:
        for component in ("kube-apiserver", "etcd", "kube-controller-manager", "kube-scheduler", "kwok"):
            rows.append((f"{component} CPU s, {key}", f"scenarios.{key}.cpu.cpu_s.{component}"))
        rows.append((f"machine busy share, {key}", f"scenarios.{key}.cpu.machine_busy_share"))
        rows.append((f"  of it other processes', {key}", f"scenarios.{key}.cpu.other_processes_share"))
    table_rows = []
    for label, path in rows:
        operator, floor = figures(rounds, "operator", path), figures(rounds, "floor", path)
        table_rows.append([label, cell(operator), cell(floor), ratio(operator, floor)])
    return table_rows


def bottlenecks(results: JSON) -> list[str]:
    lines = []
    for rnd in results["rounds"]:
        for key, scenario in rnd["scenarios"].items():
            if key == "sequential":
                continue
            cpu = scenario["cpu"]
            lines.append(
                f"{rnd['controller']} r{rnd['round']} {key}: bottleneck {cpu['bottleneck']} "
                f"({cpu['cpu_s'][cpu['bottleneck']]} CPU s = {cpu['bottleneck_cores']} cores over {cpu['wall_s']} s); "
                f"machine {round(100 * cpu['machine_busy_share'])}% busy "
                f"(other processes {round(100 * (cpu['other_processes_share'] or 0))}%)"
                + (" - saturated" if cpu["machine_saturated"] else " - not saturated")
            )
    return lines


def print_report(results: JSON) -> None:
    rows = results["table"]
    header = ["measure", "operator", "floor", "operator/floor"]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(4)]
    print()
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(value).ljust(width) for value, width in zip(row, widths, strict=True)))
    print("\n(figures: mean over rounds, each round in parentheses)")
    print()
    for line in results["bottlenecks"]:
        print(line)
    print()
    last_burst = f"burst_{results['args']['bursts'][-1]}"
    for rnd in results["rounds"]:
        writes = dig(rnd, f"scenarios.{last_burst}.writes") or {}
        who = f"{rnd['controller']} r{rnd['round']}"
        print(
            f"{who} {last_burst}, controller's writes/sandbox by request: {writes.get('controller_writes_by_request')}"
        )
        print(f"{who} {last_burst}, all clients' writes/sandbox by verb: {writes.get('all_clients_writes_by_verb')}")
        print(f"{who} own write counters, whole round: {rnd['own_write_counts_whole_round']}")
        print(f"{who} API server's count of its writes, whole round: {rnd['server_write_counts_whole_round']}")
        for key, scenario in rnd["scenarios"].items():
            if scenario.get("pod_stages"):
                print(f"{who} {key}, seconds to the last pod created, scheduled, Running: {scenario['pod_stages']}")


def parse_sizes(text: str) -> list[int]:
    sizes = [int(x) for x in text.split(",") if x]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive sizes")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="sequential 10, bursts 50 and 100, 1 round each")
    parser.add_argument("--sequential", type=int, default=None, help="sandboxes one at a time (default 30)")
    parser.add_argument(
        "--bursts", type=parse_sizes, default=None, help="burst sizes; the last is also deleted (default 200,1000)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds per controller, alternating (default 2)")
    parser.add_argument(
        "--controllers",
        type=lambda text: [x for x in text.split(",") if x],
        default=list(CONTROLLERS),
        help="comma-separated subset of operator,floor (default both)",
    )
    parser.add_argument("--burst-in-flight", type=int, default=48, help="POSTs (and DELETEs) in flight in a burst")
    parser.add_argument("--sandbox-timeout", type=float, default=30.0, help="seconds to wait for one Running")
    parser.add_argument("--burst-timeout", type=float, default=0.0, help="seconds per burst (default max(120, n/5))")
    parser.add_argument("--idle-settle", type=float, default=2.0, help="seconds after start-up before the idle RSS")
    parser.add_argument(
        "--pod-stages",
        action="store_true",
        help="also watch the bursts' pods: when the last was created, scheduled, Running (costs benchmark CPU)",
    )
    parser.add_argument("--pod-cidr", default="127.215.0.0/16", help="loopback range kwok gives pod IPs from")
    parser.add_argument("--operator-arg", action="append", default=[], help="extra `sandbox_operator run` argument")
    parser.add_argument("--operator-path", type=Path, default=REPO / "operator", help="source root of the operator")
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON output path")
    args = parser.parse_args()
    quick = {"sequential": 10, "bursts": [50, 100], "rounds": 1}
    full = {"sequential": 30, "bursts": [200, 1000], "rounds": 2}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if set(args.controllers) - set(CONTROLLERS) or not args.controllers:
        parser.error("--controllers: operator and/or floor")
    if not args.burst_timeout:
        args.burst_timeout = max(120.0, max(args.bursts) / 5)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # unwinds through the finally below

    signal.signal(signal.SIGTERM, on_sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="floor-bench-"))
    state_dir = workdir / "state"
    load_before = os.getloadavg()
    started = time.monotonic()
    measured_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    controllers: list[Controller] = []
    try:
        kubeconfig = cluster_up(state_dir, args.pod_cidr)
        results = asyncio.run(run(args, kubeconfig, state_dir, workdir, controllers))
    finally:
        for controller in controllers:  # stopped already unless interrupted; stopping again is a no-op
            controller.stop()
        cluster_down(state_dir)
        shutil.rmtree(workdir, ignore_errors=True)
        log(f"cluster down; total {time.monotonic() - started:.0f} s")
    results["table"] = table(results, args)
    results["bottlenecks"] = bottlenecks(results)
    results.update(
        {
            "attribution": "controller writes: apiserver_flowcontrol_dispatched_requests_total of per-controller "
            "FlowSchemas (own service account); all clients: apiserver_request_total deltas",
            **run_facts(args, load_before, started, measured_at),
        }
    )
    print_report(results)
    write_results(results, args.output)


if __name__ == "__main__":
    main()
