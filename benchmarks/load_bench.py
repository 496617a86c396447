"""Load benchmark: real sandbox containers under sustained executions and under create/kill churn.

    python benchmarks/load_bench.py                                   # both parts, the defaults (~15 min)
    python benchmarks/load_bench.py --part sustained --sandboxes 4 --rate 10 --duration 15
    python benchmarks/load_bench.py --part churn --clients 10 --churn-duration 30

Starts a fresh local control plane with the CONTAINER node (`hack/cluster up --node containers`,
the machine's CA bundle given to the containers as testlib.local_cluster does; pods on a loopback
range of their own), applies crds/, runs the operator and the gateway as subprocesses (testlib's
start_operator, chaoslib's gateway_on: a fresh namespace, its API key, the `code-interpreter`
template), and drives the gateway with the unmodified `e2b` / `e2b_code_interpreter` async SDKs
(`AsyncSandbox`, one asyncio loop in this process). Sandbox pods are real crun containers from the
project's images (hack/build-images): the agent, and in the code-interpreter image its kernel.

1. Sustained executions (`--part sustained`): `--sandboxes` code-interpreter sandboxes created one
   at a time (cold start: create → first successful `commands.run`, and → first `run_code`), a
   short sequential baseline of each call, then an OPEN-LOOP generator: requests are sent on a fixed
   schedule of `--rate` per second for `--duration` s whatever the answers do (latency counts from
   the scheduled time, so a stalled server cannot hide behind a slowed client), `--run-code-share`
   of them `run_code("1+1")`, the rest `commands.run("echo hi")`, round-robin over the sandboxes.
   Memory per sandbox is its container's memory cgroup (agent + kernel + their page cache), which
   hack/container_node.py nests under its own memory cgroup as
   `sandbox-node-<node>-<state digest>/<pod uid>-<container>`.
2. Churn (`--part churn`): `--clients` concurrent SDK clients, each looping for `--churn-duration`
   s: create a sandbox (`load-base`: the base image, emptyDir workspace, or `--churn-workspace pvc`),
   run a command, write and read a small file, kill. Every id a create returned is accounted for
   (killed by its client, killed at the end, or found gone); afterwards the namespace is watched
   until no Sandbox, pod, PVC, NetworkPolicy or Service is left (`--leak-deadline`), and the PVs of
   its claims and the node's container cgroups are counted too. Gateway and operator RSS are
   sampled every `--rss-interval` s.

Each part reports the CPU seconds of every process of ours (control plane, node, containers,
operator, gateway, this client) and of the rest of the machine, to show where the time went.
Everything runs on this machine's cores, so figures are end to end on a shared machine. The cluster,
operator, gateway and every container are stopped at the end, also on failure or Ctrl-C. Prints a
table of figure vs target, writes benchmarks/results/load.json, keeps logs in
benchmarks/results/load-logs/. It asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "load.json"
LOG_DIR = REPO / "benchmarks" / "results" / "load-logs"
sys.path.insert(0, str(REPO / "operator"))
sys.path.insert(0, str(REPO / "tests"))  # testlib: the cluster handle, CRDs, the operator
sys.path.insert(0, str(REPO / "tests" / "chaos"))  # chaoslib: a gateway with its key and namespace

from chaoslib import Gateway, gateway_on  # noqa: E402

from benchlib import (  # noqa: E402
    cluster_down,
    cluster_up,
    control_plane_pids,
    cpu_seconds,
    log,
    machine_busy_seconds,
    mb,
    percentile,
    print_rows,
    proc_status,
    run_facts,
    summary_ms,
    write_results,
)
from testlib import (  # noqa: E402
    CODE_INTERPRETER_TEMPLATE,
    MACHINE_CA_BUNDLE,
    Cluster,
    OperatorProcess,
    apply_crds_to,
    start_operator,
)

JSON = dict[str, Any]
SANDBOX_LABEL = "sandbox.dev/sandbox"
NAMESPACE_PREFIX = "load"  # the operator watches load-*
COMMANDS_RUN, RUN_CODE = "commands_run", "run_code"
CHURN_FILE = "/home/user/churn.txt"
TARGETS = {"req_per_s": 50, "cold_start_ms": 1000, "exec_ms": 100, "memory_mb_per_sandbox": 100, "lost": 0}

# The churn template: the base image, the base template's resources; the workspace kind is a flag.
CHURN_TEMPLATE = """
apiVersion: sandbox.dev/v1alpha1
kind: SandboxTemplate
metadata: {name: load-base}
spec:
  image: ghcr.io/sandbox-operator/sandbox-base:dev
  resources:
    default: {cpu: 250m, memory: 256Mi, disk: 1Gi}
  persistence: {enabled: %s}
  timeouts: {idle: 30m, maxLifetime: 1h, execution: 5m}
"""


class WrongOutput(Exception):
    """A call answered, but not with what it was asked to produce."""


def error_kind(step: str, exc: BaseException) -> str:
    return f"{step}: {type(exc).__name__}"


def error_text(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def p95_summary(values_ms: list[float]) -> JSON:
    """summary_ms plus p95 (the sustained part's targets are about tails)."""
    if not values_ms:
        return {"n": 0}
    return {**summary_ms(values_ms, 1), "p95_ms": round(percentile(values_ms, 95), 1)}


def fmt_ms(summary: JSON, *keys: str) -> str:
    if not summary.get("n"):
        return "-"
    return " / ".join(str(summary.get(f"{key}_ms", "-")) for key in keys) + " ms"


# --- the stack: control plane with the container node, operator, gateway -----------------------


@dataclass
class Stack:
    cluster: Cluster
    state_dir: Path
    operator: OperatorProcess
    gateway: Gateway
    pids: dict[str, int]  # the processes of ours, by name
    node_pid: int

    @property
    def namespace(self) -> str:
        return self.gateway.namespace

    def sdk(self) -> JSON:
        return self.gateway.sdk()

    def node_cgroups(self) -> Path:
        """The container node's own memory cgroup directory for its containers: container_node.py
        writes where it is to `cgroup-root` in its state dir (hack/cluster's `<state>/node`)."""
        return Path((self.state_dir / "node" / "cgroup-root").read_text().strip())

    def container_cgroups(self) -> list[Path]:
        with contextlib.suppress(OSError, ValueError):
            return [path for path in self.node_cgroups().iterdir() if path.is_dir()]
        return []

    def container_pids(self) -> list[int]:
        pids: list[int] = []
        for cgroup in self.container_cgroups():
            with contextlib.suppress(OSError):
                pids += [int(pid) for pid in (cgroup / "cgroup.procs").read_text().split()]
        return pids


@contextlib.contextmanager
def stack_up(args: argparse.Namespace, workdir: Path) -> Iterator[Stack]:
    """The whole stack; torn down in reverse order however the block ends."""
    with contextlib.ExitStack() as exits:
        state_dir = workdir / "state"
        exits.callback(cluster_down, state_dir)
        ca_bundle = MACHINE_CA_BUNDLE if MACHINE_CA_BUNDLE.is_file() else None
        kubeconfig = cluster_up(state_dir, args.pod_cidr, node="containers", ca_bundle=ca_bundle)
        cluster = Cluster(kubeconfig=kubeconfig, state_dir=state_dir, node="containers")
        apply_crds_to(cluster)
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        for name in ("operator.log", "gateway.log"):
            (LOG_DIR / name).write_bytes(b"")  # both helpers append
        operator = start_operator(cluster, LOG_DIR / "operator.log", f"{NAMESPACE_PREFIX}-*")
        exits.callback(operator.kill)
        gateway = exits.enter_context(
            gateway_on(cluster, LOG_DIR, CODE_INTERPRETER_TEMPLATE % "code-interpreter", NAMESPACE_PREFIX)
        )
        persistence = "true" if args.churn_workspace == "pvc" else "false"
        cluster.apply(CHURN_TEMPLATE % persistence)
        pids = control_plane_pids(state_dir)
        pids.update(operator=operator.process.pid, gateway=gateway.process.pid)
        log(f"operator, gateway ({gateway.url}) up; namespace {gateway.namespace}")
        yield Stack(cluster, state_dir, operator, gateway, pids, pids["container-node"])


# --- readings: CPU, memory, RSS -----------------------------------------------------------------


class CpuMeter:
    """CPU seconds each process of ours spent between start and `stop()`, with the containers (their
    cgroups' processes, plus what the node reaped from ended ones: crun, mkfs, containers), this
    client's kubectl calls, the machine's busy time and what other processes took of it."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.before = self._read()

    def _read(self) -> dict[str, float]:
        values = {name: cpu_seconds(pid) for name, pid in self.stack.pids.items()}
        node = self.stack.node_pid
        values["containers (agents, kernels, crun, mkfs)"] = (
            sum(cpu_seconds(pid, children=True) for pid in self.stack.container_pids())
            + cpu_seconds(node, children=True)
            - cpu_seconds(node)
        )
        me = os.getpid()
        values["load client (this process)"] = cpu_seconds(me)
        values["load client's kubectl calls"] = cpu_seconds(me, children=True) - cpu_seconds(me)
        values["machine busy"] = machine_busy_seconds()
        values["wall"] = time.monotonic()
        return values

    def stop(self) -> JSON:
        after = self._read()
        delta = {name: round(after[name] - self.before[name], 2) for name in after}
        wall = delta.pop("wall")
        busy = delta.pop("machine busy")
        ours = sum(delta.values())
        processes = dict(sorted(delta.items(), key=lambda item: -item[1]))
        return {
            "wall_s": round(wall, 1),
            "cpu_s": processes,
            "ours_s": round(ours, 1),
            "machine_busy_s": round(busy, 1),
            "other_processes_s": round(busy - ours, 1),
            "machine_capacity_s": round(wall * (os.cpu_count() or 1), 1),
            "machine_busy_share": round(busy / (wall * (os.cpu_count() or 1)), 2) if wall else None,
        }


def read_cgroup_memory(cgroup: Path) -> JSON:
    """Usage (memory.current / usage_in_bytes: agent + kernel + page cache charged to it), the peak
    since the container started (memory.peak / max_usage_in_bytes) and the anonymous memory."""
    v2 = (cgroup / "memory.current").exists()
    current = "memory.current" if v2 else "memory.usage_in_bytes"
    peak = "memory.peak" if v2 else "memory.max_usage_in_bytes"
    values: JSON = {"cgroup": cgroup.name}
    for key, name in (("current", current), ("peak", peak)):
        with contextlib.suppress(OSError, ValueError):
            values[f"{key}_mb"] = mb(int((cgroup / name).read_text()))
    with contextlib.suppress(OSError, ValueError):
        stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines())
        anon, file = ("anon", "file") if v2 else ("total_rss", "total_cache")
        values["anon_mb"], values["page_cache_mb"] = mb(int(stat[anon])), mb(int(stat[file]))
    return values


def sandbox_memory(stack: Stack) -> JSON:
    """Each Running sandbox pod's container memory cgroup, and p50/max over them."""
    pods = stack.cluster.get_json("pods", "-n", stack.namespace, "-l", SANDBOX_LABEL) or {"items": []}
    root = stack.node_cgroups()
    per_sandbox: list[JSON] = []
    for pod in pods["items"]:
        if (pod.get("status") or {}).get("phase") != "Running" or pod["metadata"].get("deletionTimestamp"):
            continue
        for cgroup in root.glob(f"{pod['metadata']['uid']}-*"):
            per_sandbox.append({"pod": pod["metadata"]["name"], **read_cgroup_memory(cgroup)})
    result: JSON = {"sandboxes": len(per_sandbox), "per_sandbox": per_sandbox}
    for key in ("current_mb", "peak_mb", "anon_mb", "page_cache_mb"):
        values = [entry[key] for entry in per_sandbox if key in entry]
        if values:
            result[key] = {"p50": round(statistics.median(values), 1), "max": max(values), "min": min(values)}
    return result


class RssSampler(threading.Thread):
    """Gateway and operator RSS (and live containers) every `interval` s while a part runs."""

    def __init__(self, stack: Stack, interval: float) -> None:
        super().__init__(name="rss sampler", daemon=True)
        self.stack, self.interval = stack, interval
        self.stop_event = threading.Event()
        self.series: list[JSON] = []
        self.started = time.monotonic()

    def sample(self) -> None:
        self.series.append(
            {
                "t_s": round(time.monotonic() - self.started, 1),
                "gateway_rss_mb": mb(proc_status(self.stack.pids["gateway"]).get("VmRSS", 0)),
                "operator_rss_mb": mb(proc_status(self.stack.pids["operator"]).get("VmRSS", 0)),
                "containers_live": len(self.stack.container_cgroups()),
            }
        )

    def run(self) -> None:
        self.sample()
        while not self.stop_event.wait(self.interval):
            self.sample()

    def finish(self) -> JSON:
        self.stop_event.set()
        self.join(timeout=5)
        self.sample()
        result: JSON = {"interval_s": self.interval, "series": self.series}
        for key in ("gateway_rss_mb", "operator_rss_mb", "containers_live"):
            values = [entry[key] for entry in self.series]
            result[key] = {"min": min(values), "max": max(values)}
        return result


# --- 1. sustained executions --------------------------------------------------------------------


@dataclass
class Call:
    kind: str
    scheduled: float
    started: float
    done: float
    error_kind: str | None = None
    error: str | None = None


async def execute(kind: str, sandbox: Any, limit_s: float) -> None:
    """One call of `kind`, checked: an answer with the wrong output is an error too."""
    if kind == COMMANDS_RUN:
        result = await sandbox.commands.run("echo hi", timeout=limit_s, request_timeout=limit_s)
        if result.stdout != "hi\n":
            raise WrongOutput(f"stdout {result.stdout!r}")
    else:
        execution = await sandbox.run_code("1+1", timeout=limit_s, request_timeout=limit_s)
        if execution.error is not None or execution.text != "2":
            raise WrongOutput(f"text {execution.text!r}, error {execution.error}")


async def timed_call(kind: str, sandbox: Any, scheduled: float, limit_s: float, calls: list[Call]) -> None:
    started, kind_of_error, error = time.perf_counter(), None, None
    try:
        await execute(kind, sandbox, limit_s)
    except Exception as exc:
        kind_of_error, error = error_kind(kind, exc), error_text(exc)
    calls.append(Call(kind, scheduled, started, time.perf_counter(), kind_of_error, error))


async def cold_start(sdk: JSON, index: int) -> tuple[Any, JSON]:
    """Create a code-interpreter sandbox; time until it returned, until the first `commands.run`
    that succeeds (retried for up to 60 s), and until the first `run_code` after that."""
    from e2b_code_interpreter import AsyncSandbox

    sent_at, started = time.time(), time.perf_counter()
    sandbox = await AsyncSandbox.create(timeout=3600, request_timeout=120, metadata={"load": str(index)}, **sdk)
    returned = time.perf_counter()
    failures: list[str] = []
    while True:
        try:
            await execute(COMMANDS_RUN, sandbox, 30)
            break
        except Exception as exc:
            failures.append(f"{error_kind(COMMANDS_RUN, exc)}: {error_text(exc)}")
            if time.perf_counter() - returned > 60:
                raise
            await asyncio.sleep(0.05)
    first_command = time.perf_counter()
    await execute(RUN_CODE, sandbox, 60)
    first_run_code = time.perf_counter()
    sample = {
        "sandbox_id": sandbox.sandbox_id,
        "sent_at": sent_at,
        "create_returned_ms": round((returned - started) * 1000, 1),
        "first_command_ms": round((first_command - started) * 1000, 1),
        "first_run_code_ms": round((first_run_code - started) * 1000, 1),
        "failed_first_commands": failures,
    }
    return sandbox, sample


NODE_STAMP = ("%H:%M:%S.%f", 12)  # container_node.log: 18:59:12.123 (a time of day, ms)
AGENT_STAMP = ("%Y-%m-%d %H:%M:%S,%f", 23)  # logging's asctime: 2026-12-03 18:59:12,123


def stamp_of(line: str, stamp: tuple[str, int]) -> float | None:
    """The wall-clock time a log line begins with (local time; a format and its width), or None."""
    pattern, width = stamp
    with contextlib.suppress(ValueError):
        parsed = datetime.strptime(line[:width], pattern)
        if parsed.year == 1900:  # the node's stamps are a time of day: today's
            parsed = datetime.combine(datetime.now().date(), parsed.time())
        return parsed.timestamp()
    return None


def add_start_stages(stack: Stack, samples: list[JSON]) -> None:
    """Where each cold start went, from the logs with ms stamps: the container node's "started"
    line (pod bound, volumes, overlay, crun) and the agent's "sandbox-agent ready" (it serves)."""
    sandboxes = stack.cluster.get_json("sandboxes.sandbox.dev", "-n", stack.namespace) or {"items": []}
    names = {(item.get("status") or {}).get("sandboxID"): item["metadata"]["name"] for item in sandboxes["items"]}
    pods = stack.cluster.get_json("pods", "-n", stack.namespace, "-l", SANDBOX_LABEL) or {"items": []}
    pod_of = {pod["metadata"]["labels"][SANDBOX_LABEL]: pod["metadata"] for pod in pods["items"]}
    node_log = (stack.state_dir / "logs" / "container-node.log").read_text(errors="replace").splitlines()
    for sample in samples:
        pod = pod_of.get(names.get(sample["sandbox_id"]), {"name": "-", "uid": "-"})
        marker = f"/{pod['name']}: started "
        started = next((stamp_of(line, NODE_STAMP) for line in node_log if marker in line), None)
        ready = None
        for output in (stack.state_dir / "node" / "pods" / pod["uid"] / "containers").glob("*/output.log"):
            for line in output.read_text(errors="replace").splitlines():
                if "sandbox-agent ready" in line:
                    ready = stamp_of(line, AGENT_STAMP)
                    break
        for key, at in (("container_started_ms", started), ("agent_ready_ms", ready)):
            sample[key] = round((at - sample["sent_at"]) * 1000, 1) if at else None


async def baseline(sandboxes: list[Any], per_kind: int) -> JSON:
    """Each call `per_kind` times one after another, round-robin over the sandboxes: exec latency
    without load, to set the loaded figures against."""
    result: JSON = {}
    for kind in (COMMANDS_RUN, RUN_CODE):
        samples: list[float] = []
        errors: Counter[str] = Counter()
        for index in range(per_kind):
            started = time.perf_counter()
            try:
                await execute(kind, sandboxes[index % len(sandboxes)], 30)
            except Exception as exc:
                errors[error_kind(kind, exc)] += 1
                continue
            samples.append((time.perf_counter() - started) * 1000)
        result[kind] = {**p95_summary(samples), "errors": dict(errors)}
    return result


async def open_loop(sandboxes: list[Any], args: argparse.Namespace) -> JSON:
    """Requests on a fixed schedule of `args.rate` per second, sent whether or not earlier ones
    answered (at most `args.max_in_flight` at once: beyond that a request is shed and counted)."""
    rng = random.Random(args.seed)
    total = int(args.rate * args.duration)
    calls: list[Call] = []
    in_flight: set[asyncio.Task[None]] = set()
    shed, most_in_flight = 0, 0
    begin = time.perf_counter() + 0.2
    for index in range(total):
        scheduled = begin + index / args.rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(in_flight) >= args.max_in_flight:
            shed += 1
            continue
        kind = RUN_CODE if rng.random() < args.run_code_share else COMMANDS_RUN
        task = asyncio.create_task(
            timed_call(kind, sandboxes[index % len(sandboxes)], scheduled, args.call_timeout, calls)
        )
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        most_in_flight = max(most_in_flight, len(in_flight))
    sent_for = time.perf_counter() - begin
    unfinished = 0
    if in_flight:
        _, pending = await asyncio.wait(set(in_flight), timeout=args.call_timeout + 15)
        unfinished = len(pending)
        for task in pending:
            task.cancel()
    last_done = max((call.done for call in calls), default=begin)
    window = max(args.duration, last_done - begin)
    result: JSON = {
        "offered_req_per_s": args.rate,
        "scheduled": total,
        "sent": total - shed,
        "shed_client_side": shed,
        "unfinished_at_end": unfinished,
        "send_window_s": round(sent_for, 1),
        "window_to_last_answer_s": round(window, 1),
        "most_in_flight": most_in_flight,
        "send_lag_ms": p95_summary([(call.started - call.scheduled) * 1000 for call in calls]),
    }
    ok = [call for call in calls if call.error_kind is None]
    result["ok"] = len(ok)
    result["achieved_req_per_s"] = round(len(ok) / window, 1)
    result["errors"] = dict(Counter(call.error_kind for call in calls if call.error_kind))
    result["error_samples"] = sorted({f"{call.error_kind}: {call.error}" for call in calls if call.error_kind})[:10]
    for kind in (COMMANDS_RUN, RUN_CODE):
        mine = [call for call in ok if call.kind == kind]
        result[kind] = {
            "from_scheduled": p95_summary([(call.done - call.scheduled) * 1000 for call in mine]),
            "from_sent": p95_summary([(call.done - call.started) * 1000 for call in mine]),
            "errors": sum(1 for call in calls if call.kind == kind and call.error_kind),
        }
    return result


async def kill_all(sandboxes: list[Any]) -> JSON:
    async def kill(sandbox: Any) -> float:
        started = time.perf_counter()
        await sandbox.kill(request_timeout=60)
        return (time.perf_counter() - started) * 1000

    answers = await asyncio.gather(*(kill(sandbox) for sandbox in sandboxes), return_exceptions=True)
    times = [answer for answer in answers if isinstance(answer, float)]
    errors = Counter(error_kind("kill", a) for a in answers if isinstance(a, BaseException))
    return {"latency": summary_ms(times, 1), "errors": dict(errors)}


async def sustained_async(stack: Stack, args: argparse.Namespace) -> JSON:
    sdk = stack.sdk()
    sandboxes: list[Any] = []
    result: JSON = {"sandboxes": args.sandboxes, "template": "code-interpreter (PVC workspace, prewarmed kernel)"}
    try:
        log(f"1. {args.sandboxes} code-interpreter sandboxes, one at a time (cold start)")
        meter = CpuMeter(stack)
        samples: list[JSON] = []
        for index in range(args.sandboxes):
            sandbox, sample = await cold_start(sdk, index)
            sandboxes.append(sandbox)
            samples.append(sample)
            log(f"   {index + 1}/{args.sandboxes}: first command at {sample['first_command_ms']} ms")
        add_start_stages(stack, samples)
        result["cold_start"] = {
            key: summary_ms([sample[key] for sample in samples if sample.get(key) is not None], 1)
            for key in (
                "container_started_ms",
                "agent_ready_ms",
                "create_returned_ms",
                "first_command_ms",
                "first_run_code_ms",
            )
        }
        result["cold_start"]["samples"] = samples
        result["cold_start"]["cpu"] = meter.stop()
        result["memory_idle"] = sandbox_memory(stack)
        log(f"   baseline: {args.baseline} sequential calls of each kind")
        result["baseline"] = await baseline(sandboxes, args.baseline)
        log(f"   open loop: {args.rate} req/s for {args.duration} s over {len(sandboxes)} sandboxes")
        meter = CpuMeter(stack)
        result["load"] = await open_loop(sandboxes, args)
        result["load"]["cpu"] = meter.stop()
        load = result["load"]
        log(
            f"   achieved {load['achieved_req_per_s']} req/s, errors {load['errors']}; "
            f"commands.run p50 {load[COMMANDS_RUN]['from_scheduled'].get('p50_ms')} ms, "
            f"run_code p50 {load[RUN_CODE]['from_scheduled'].get('p50_ms')} ms"
        )
        result["memory_after_load"] = sandbox_memory(stack)
    finally:
        if sandboxes:
            result["kill"] = await kill_all(sandboxes)
    return result


def wait_namespace_empty(stack: Stack, deadline_s: float) -> JSON:
    """Poll until nothing of a sandbox is left in the namespace (or the deadline); the counts."""
    started = time.monotonic()
    while True:
        counts = leftovers(stack)
        empty = not any(count for kind, count in counts.items() if kind != SHARED)
        if empty or time.monotonic() - started > deadline_s:
            return {
                "counts": counts,
                "waited_s": round(time.monotonic() - started, 1),
                "empty": empty,
            }
        time.sleep(2)


def run_sustained(stack: Stack, args: argparse.Namespace) -> JSON:
    sampler = RssSampler(stack, args.rss_interval)
    sampler.start()
    try:
        result = asyncio.run(sustained_async(stack, args))
    finally:
        rss = sampler.finish()
    result["rss"] = rss
    result["cleanup"] = wait_namespace_empty(stack, args.leak_deadline)
    return result


# --- 2. churn -----------------------------------------------------------------------------------


@dataclass
class Ledger:
    """Every sandbox id a create returned, and what became of it."""

    created: set[str] = field(default_factory=set)
    killed: set[str] = field(default_factory=set)
    kill_not_found: set[str] = field(default_factory=set)  # kill answered "not found": gone already


@dataclass
class ChurnStats:
    cycles: int = 0
    attempts: int = 0
    latencies: dict[str, list[float]] = field(
        default_factory=lambda: {step: [] for step in ("create", "command", "write", "read", "kill", "cycle")}
    )
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: dict[str, str] = field(default_factory=dict)

    def error(self, step: str, exc: BaseException) -> None:
        kind = error_kind(step, exc)
        self.errors[kind] += 1
        self.error_samples.setdefault(kind, error_text(exc))


async def kill_sandbox(sandbox: Any, ledger: Ledger, stats: ChurnStats, step: str) -> bool:
    """Whether the kill answered (found or not): a failed one leaves the id for the end."""
    started = time.perf_counter()
    try:
        found = await sandbox.kill(request_timeout=60)
    except Exception as exc:
        stats.error(step, exc)
        return False
    stats.latencies["kill"].append((time.perf_counter() - started) * 1000)
    (ledger.killed if found else ledger.kill_not_found).add(sandbox.sandbox_id)
    return True


async def churn_client(index: int, sdk: JSON, stop_at: float, ledger: Ledger, stats: ChurnStats) -> None:
    from e2b import AsyncSandbox

    while time.monotonic() < stop_at:
        stats.attempts += 1
        cycle_started = time.perf_counter()
        step, sandbox = "create", None
        try:
            sandbox = await AsyncSandbox.create(template="load-base", timeout=900, request_timeout=90, **sdk)
            ledger.created.add(sandbox.sandbox_id)
            stats.latencies["create"].append((time.perf_counter() - cycle_started) * 1000)
            step, started = "command", time.perf_counter()
            result = await sandbox.commands.run("echo hi", timeout=30, request_timeout=30)
            if result.stdout != "hi\n":
                raise WrongOutput(f"stdout {result.stdout!r}")
            stats.latencies["command"].append((time.perf_counter() - started) * 1000)
            content = f"client {index} cycle {stats.attempts} {secrets.token_hex(8)}\n"
            step, started = "write", time.perf_counter()
            await sandbox.files.write(CHURN_FILE, content, request_timeout=30)
            stats.latencies["write"].append((time.perf_counter() - started) * 1000)
            step, started = "read", time.perf_counter()
            read = await sandbox.files.read(CHURN_FILE, request_timeout=30)
            if read != content:
                raise WrongOutput(f"read {read!r}")
            stats.latencies["read"].append((time.perf_counter() - started) * 1000)
        except Exception as exc:
            stats.error(step, exc)
            if sandbox is not None:
                await kill_sandbox(sandbox, ledger, stats, "kill after error")
            await asyncio.sleep(1.0)  # a failing gateway is not hammered by a tight loop
            continue
        if await kill_sandbox(sandbox, ledger, stats, "kill"):
            stats.cycles += 1
            stats.latencies["cycle"].append((time.perf_counter() - cycle_started) * 1000)


async def churn_async(stack: Stack, args: argparse.Namespace) -> JSON:
    from e2b import AsyncSandbox

    sdk = stack.sdk()
    ledger, stats = Ledger(), ChurnStats()
    started = time.monotonic()
    stop_at = started + args.churn_duration
    clients = [asyncio.create_task(churn_client(i, sdk, stop_at, ledger, stats)) for i in range(args.clients)]
    # Each cycle is bounded by its calls' timeouts (create 90 s, three calls of 30 s, kill 60 s);
    # past that grace a client is cancelled, and its sandbox, if it had one, is killed below.
    _, pending = await asyncio.wait(clients, timeout=args.churn_duration + 300)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    ran_for = time.monotonic() - started
    log(f"   clients done after {ran_for:.0f} s: {stats.cycles} cycles, errors {dict(stats.errors)}")

    left = ledger.created - ledger.killed - ledger.kill_not_found
    killed_at_end: set[str] = set()
    gone_at_end: set[str] = set()
    lost: set[str] = set()
    for sandbox_id in sorted(left):
        try:
            found = await AsyncSandbox.kill(sandbox_id, request_timeout=60, **sdk)
        except Exception as exc:
            stats.error("kill at end", exc)
            lost.add(sandbox_id)
            continue
        (killed_at_end if found else gone_at_end).add(sandbox_id)
    return {
        "clients": args.clients,
        "duration_s": args.churn_duration,
        "ran_for_s": round(ran_for, 1),
        "clients_cancelled": len(pending),
        "template": f"load-base ({args.churn_workspace} workspace)",
        "attempts": stats.attempts,
        "cycles_completed": stats.cycles,
        "cycles_per_s": round(stats.cycles / ran_for, 2),
        "errors": dict(stats.errors),
        "error_samples": stats.error_samples,
        "latency": {step: summary_ms(values, 1) for step, values in stats.latencies.items()},
        "sandboxes": {
            "created": len(ledger.created),
            "killed_by_client": len(ledger.killed),
            "kill_said_not_found": len(ledger.kill_not_found),
            "killed_at_end": len(killed_at_end),
            "gone_at_end": len(gone_at_end),
            "lost": len(lost),
            "lost_ids": sorted(lost),
        },
        "_created_ids": ledger.created,
    }


SHARED = "shared NetworkPolicy"


def leftovers(stack: Stack) -> dict[str, int]:
    """What is left in the namespace of the sandboxes' objects, the PVs of its claims, and the
    container cgroups on the node (every container, of any namespace: there are no others here).
    The NetworkPolicies a namespace's sandboxes of one template and egress class share (no owner,
    builders.build_shared_network_policy) stay on purpose, so they are counted apart (SHARED)."""
    listing = stack.cluster.get_json(
        "sandboxes.sandbox.dev,pods,persistentvolumeclaims,networkpolicies,services", "-n", stack.namespace
    ) or {"items": []}
    short = {"PersistentVolumeClaim": "PVC"}
    counts = {kind: 0 for kind in ("Sandbox", "Pod", "PVC", "NetworkPolicy", "Service", SHARED)}
    for item in listing["items"]:
        # A shared policy has no owner: the operator keeps it for the template's next sandbox.
        shared = item["kind"] == "NetworkPolicy" and not item["metadata"].get("ownerReferences")
        kind = SHARED if shared else short.get(item["kind"], item["kind"])
        counts[kind] = counts.get(kind, 0) + 1
    volumes = stack.cluster.get_json("persistentvolumes") or {"items": []}
    counts["PV"] = sum(
        1
        for pv in volumes["items"]
        if ((pv.get("spec") or {}).get("claimRef") or {}).get("namespace") == stack.namespace
    )
    counts["node cgroups"] = len(stack.container_cgroups())
    return counts


def run_churn(stack: Stack, args: argparse.Namespace) -> JSON:
    before = leftovers(stack)
    log(f"2. churn: {args.clients} clients for {args.churn_duration} s (namespace before: {before})")
    sampler = RssSampler(stack, args.rss_interval)
    meter = CpuMeter(stack)
    sampler.start()
    try:
        result = asyncio.run(churn_async(stack, args))
        created: set[str] = result.pop("_created_ids")
        log(f"   waiting up to {args.leak_deadline} s for the namespace to empty")
        result["leak_check"] = wait_namespace_empty(stack, args.leak_deadline)
        result["leak_check"]["before"] = before
        remaining = stack.cluster.get_json("sandboxes.sandbox.dev", "-n", stack.namespace) or {"items": []}
        ids = [str((item.get("status") or {}).get("sandboxID")) for item in remaining["items"]]
        result["leak_check"]["sandboxes_left"] = {
            "ours": sorted(i for i in ids if i in created),
            "from_failed_creates": sorted(i for i in ids if i not in created),
        }
    finally:
        rss = sampler.finish()
        cpu = meter.stop()
    result["rss"], result["cpu"] = rss, cpu
    return result


# --- the report ---------------------------------------------------------------------------------


def top_cpu(cpu: JSON, count: int = 4) -> str:
    top = list(cpu["cpu_s"].items())[:count]
    return ", ".join(f"{name} {seconds}" for name, seconds in top) + f"; others {cpu['other_processes_s']}"


def sustained_rows(part: JSON) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    if "error" in part:
        return [("sustained part FAILED", part["error"][:120], "")]
    cold = part["cold_start"]
    rows.append(
        (
            f"cold start: create -> first commands.run OK, p50 / p99 (n={cold['first_command_ms']['n']}, sequential)",
            fmt_ms(cold["first_command_ms"], "p50", "p99"),
            f"< {TARGETS['cold_start_ms']} ms",
        )
    )
    rows.append(
        (
            "  p50 from POST: container started / agent ready / create returned",
            " / ".join(
                str(cold[key].get("p50_ms", "-"))
                for key in ("container_started_ms", "agent_ready_ms", "create_returned_ms")
            )
            + " ms",
            "",
        )
    )
    rows.append(("  create returned, p50 / p99", fmt_ms(cold["create_returned_ms"], "p50", "p99"), ""))
    rows.append(("  create -> first run_code OK, p50 / p99", fmt_ms(cold["first_run_code_ms"], "p50", "p99"), ""))
    load = part["load"]
    rows.append(
        (
            f"open loop over {part['sandboxes']} sandboxes: offered / achieved",
            f"{load['offered_req_per_s']} / {load['achieved_req_per_s']} req/s "
            f"({load['ok']} OK of {load['sent']} sent)",
            f">= {TARGETS['req_per_s']} req/s",
        )
    )
    for kind, label in ((COMMANDS_RUN, "commands.run('echo hi')"), (RUN_CODE, "run_code('1+1')")):
        loaded = load[kind]["from_scheduled"]
        rows.append(
            (
                f"{label} under load p50 / p95 / p99 (n={loaded.get('n')})",
                fmt_ms(loaded, "p50", "p95", "p99"),
                f"< {TARGETS['exec_ms']} ms",
            )
        )
        rows.append(("  unloaded, one at a time, p50 / p99", fmt_ms(part["baseline"][kind], "p50", "p99"), ""))
    rows.append(
        (
            "errors under load; shed; client send lag p99",
            f"{sum(load['errors'].values())} {load['errors'] or ''}; {load['shed_client_side']}; "
            f"{load['send_lag_ms'].get('p99_ms')} ms",
            "0 errors",
        )
    )
    for key, label in (("memory_idle", "after creates"), ("memory_after_load", "after the load")):
        memory = part.get(key) or {}
        if "current_mb" in memory:
            rows.append(
                (
                    f"memory per sandbox (cgroup usage) {label}: p50 / max; anon p50 / max",
                    f"{memory['current_mb']['p50']} / {memory['current_mb']['max']} MB; "
                    f"{memory.get('anon_mb', {}).get('p50')} / {memory.get('anon_mb', {}).get('max')} MB",
                    f"< {TARGETS['memory_mb_per_sandbox']} MB",
                )
            )
    memory = part.get("memory_after_load") or {}
    if "peak_mb" in memory:
        rows.append(
            (
                "  peak since container start: p50 / max",
                f"{memory['peak_mb']['p50']} / {memory['peak_mb']['max']} MB",
                "",
            )
        )
    rows.append(("CPU s during the load (top) of " + str(load["cpu"]["machine_capacity_s"]), top_cpu(load["cpu"]), ""))
    rows.append(("CPU s during the creates (top)", top_cpu(cold["cpu"]), ""))
    rss = part["rss"]
    rows.append(
        (
            "gateway / operator RSS min-max",
            f"{rss['gateway_rss_mb']['min']}-{rss['gateway_rss_mb']['max']} / "
            f"{rss['operator_rss_mb']['min']}-{rss['operator_rss_mb']['max']} MB",
            "",
        )
    )
    return rows


def churn_rows(part: JSON) -> list[tuple[str, str, str]]:
    if "error" in part:
        return [("churn part FAILED", part["error"][:120], "")]
    rows: list[tuple[str, str, str]] = []
    rows.append(
        (
            f"churn: {part['clients']} clients x {part['duration_s']} s, {part['template']}: cycles completed",
            f"{part['cycles_completed']} of {part['attempts']} ({part['cycles_per_s']}/s)",
            "",
        )
    )
    errors = part["errors"]
    rows.append(("  errors by kind", f"{sum(errors.values())} {errors or ''}", "0"))
    latency = part["latency"]
    for step in ("create", "kill", "cycle"):
        rows.append((f"  {step} p50 / p99 (n={latency[step].get('n')})", fmt_ms(latency[step], "p50", "p99"), ""))
    rows.append(
        (
            "  command / write / read p50",
            " / ".join(str(latency[step].get("p50_ms", "-")) for step in ("command", "write", "read")) + " ms",
            "",
        )
    )
    accounts = part["sandboxes"]
    rows.append(
        (
            "  sandboxes created / killed by client / killed at end / gone / LOST",
            f"{accounts['created']} / {accounts['killed_by_client']} / {accounts['killed_at_end']} / "
            f"{accounts['kill_said_not_found'] + accounts['gone_at_end']} / {accounts['lost']}",
            "0 lost",
        )
    )
    leak = part["leak_check"]
    rows.append(
        (
            f"  left after the end (waited {leak['waited_s']} s)",
            ", ".join(f"{kind} {count}" for kind, count in leak["counts"].items() if kind != SHARED)
            + f" (+ {leak['counts'].get(SHARED)} shared policies, kept by design)",
            "all 0",
        )
    )
    rss = part["rss"]
    rows.append(
        (
            f"  gateway / operator RSS min-max (every {rss['interval_s']} s)",
            f"{rss['gateway_rss_mb']['min']}-{rss['gateway_rss_mb']['max']} / "
            f"{rss['operator_rss_mb']['min']}-{rss['operator_rss_mb']['max']} MB",
            "",
        )
    )
    rows.append(("  live containers min-max", f"{rss['containers_live']['min']}-{rss['containers_live']['max']}", ""))
    rows.append((f"  CPU s (top) of {part['cpu']['machine_capacity_s']}", top_cpu(part["cpu"]), ""))
    return rows


def run_part(name: str, run: Callable[[], JSON]) -> JSON:
    """A part's figures, or its error: one part failing still leaves the other's figures."""
    try:
        return run()
    except Exception as exc:
        log(f"part {name} failed: {exc!r}\n{traceback.format_exc()}")
        return {"error": repr(exc)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("sustained", "churn", "both"), default="both")
    parser.add_argument("--sandboxes", type=int, default=20, help="code-interpreter sandboxes under sustained load")
    parser.add_argument("--rate", type=float, default=50.0, help="offered requests per second (open loop)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of sustained load")
    parser.add_argument("--run-code-share", type=float, default=0.5, help="share of run_code among the requests")
    parser.add_argument("--baseline", type=int, default=20, help="sequential calls of each kind before the load")
    parser.add_argument("--max-in-flight", type=int, default=500, help="requests in flight before shedding")
    parser.add_argument("--call-timeout", type=float, default=30.0, help="seconds per call")
    parser.add_argument("--seed", type=int, default=1, help="of the request mix")
    parser.add_argument("--clients", type=int, default=200, help="concurrent churn clients")
    parser.add_argument("--churn-duration", type=float, default=300.0, help="seconds each churn client loops")
    parser.add_argument("--churn-workspace", choices=("emptydir", "pvc"), default="emptydir")
    parser.add_argument("--leak-deadline", type=float, default=300.0, help="seconds to wait for deletions")
    parser.add_argument("--rss-interval", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument(
        "--pod-cidr", default="127.216.0.0/16", help="loopback range the container node gives pod IPs from"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON output path")
    args = parser.parse_args()

    # SIGTERM unwinds like Ctrl-C, so every exit below stops what was started.
    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="load-bench-"))
    load_before = os.getloadavg()
    started = time.monotonic()
    measured_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    parts: JSON = {}
    try:
        with stack_up(args, workdir) as stack:
            if args.part in ("sustained", "both"):
                parts["sustained"] = run_part("sustained", lambda: run_sustained(stack, args))
            if args.part in ("churn", "both"):
                parts["churn"] = run_part("churn", lambda: run_churn(stack, args))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        log(f"cluster down; total {time.monotonic() - started:.0f} s")

    rows = (sustained_rows(parts["sustained"]) if "sustained" in parts else []) + (
        churn_rows(parts["churn"]) if "churn" in parts else []
    )
    results: JSON = {
        "parts": parts,
        "targets": TARGETS,
        "table": rows,
        "logs": str(LOG_DIR.relative_to(REPO)),
        **run_facts(args, load_before, started, measured_at),
    }
    print_rows(rows)
    write_results(results, args.output)


if __name__ == "__main__":
    main()
