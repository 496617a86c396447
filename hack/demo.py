#!/usr/bin/env python3
"""The product's main job on the embedded default, end to end, with progress output.

1. a real local control plane (hack/cluster: etcd, kube-apiserver, controller-manager, scheduler)
   with the container node (hack/container_node.py: pods run as real containers under crun, from
   the images hack/build-images made), the CRDs and the `base` SandboxTemplate;
2. the operator (`sandbox-operator run`) and the gateway (`sandbox-operator gateway`: the E2B
   control-plane API and the data-plane proxy), with an API key Secret for the `demo` namespace;
3. the unmodified E2B code-interpreter SDK creating a sandbox through the gateway: a Sandbox object,
   reconciled to Running (pod, workspace claim, Service, NetworkPolicy); the sandbox agent runs in
   the pod's container (tini as PID 1, uid 1000, the pod's memory limit) on the pod's IP;
4. real work through the gateway: Python state across calls, a shell command, a file round trip,
   and what the container enforces: `id`, `pwd`, a refused write to /usr, a memory bomb answered
   cleanly;
5. the operator's /metrics for the sandbox, pause → Suspended and connect → Running on the same
   workspace, kill → every child removed.
Everything started is stopped at the end (no container, mount or cgroup left), unless KEEP=1.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from sandbox_operator.gateway.e2b import api_key_secret, new_api_key

REPO = Path(__file__).resolve().parent.parent

STATE = Path(os.environ.get("SANDBOX_DEMO_STATE", REPO / ".state" / "demo"))
NAMESPACE = "demo"


def step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def run(*argv: str, input: str | None = None, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(argv, input=input, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{result.stderr}{result.stdout}")
    return result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(what: str, check: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")


def main() -> int:
    processes: list[subprocess.Popen[bytes]] = []
    cluster_up = False
    stack = contextlib.ExitStack()
    try:
        step("starting the local control plane with the container node (hack/cluster up --node containers)")
        run(str(REPO / "hack" / "cluster"), "down", "--state-dir", str(STATE))
        started = time.monotonic()
        out = run(str(REPO / "hack" / "cluster"), "up", "--state-dir", str(STATE), "--node", "containers")
        cluster_up = True
        kubeconfig = out.strip().splitlines()[-1].removeprefix("KUBECONFIG=")
        # One token key for the operator and the gateway: agents' access tokens derive from it.
        env = {**os.environ, "KUBECONFIG": kubeconfig, "SANDBOX_GATEWAY_TOKEN_KEY": os.urandom(24).hex()}
        print(f"    ready in {time.monotonic() - started:.1f}s; KUBECONFIG={kubeconfig}")

        def kubectl(*args: str, input: str | None = None) -> str:
            return run("kubectl", *args, input=input, env=env)

        def sandbox(name: str) -> dict[str, Any]:
            return dict(json.loads(kubectl("get", "sandbox", name, "-n", NAMESPACE, "-o", "json")))

        step("installing the CRDs and the `base` SandboxTemplate")
        kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        for crd in ("sandboxes", "sandboxtemplates", "sandboxpools"):
            kubectl("wait", "--for=condition=Established", f"crd/{crd}.sandbox.dev", "--timeout=60s")
        wait_for(
            "the CRDs to serve",
            lambda: (
                subprocess.run(["kubectl", "get", "sandboxtemplates"], capture_output=True, env=env).returncode == 0
            ),
        )
        kubectl("apply", "-f", str(REPO / "examples" / "sandboxtemplate-base.yaml"))
        kubectl("create", "namespace", NAMESPACE)

        step("starting the operator")
        metrics_port, liveness_port = free_port(), free_port()
        log = open(STATE / "operator.log", "wb")  # noqa: SIM115 - the child owns it
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "sandbox_operator",
                    "run",
                    "--kubeconfig",
                    kubeconfig,
                    "--bind-address",
                    "127.0.0.1",
                    "--metrics-port",
                    str(metrics_port),
                    "--liveness-port",
                    str(liveness_port),
                    "--usage-interval",
                    "1",
                    "--usage-status-interval",
                    "2",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        )
        wait_for("the operator's liveness endpoint", lambda: _http_ok(f"http://127.0.0.1:{liveness_port}/healthz"))
        print(f"    metrics: http://127.0.0.1:{metrics_port}/metrics   log: {STATE / 'operator.log'}")

        step("starting the gateway (E2B control-plane API + data-plane proxy) and an API key for `demo`")
        gateway_port = free_port()
        gateway_url = f"http://127.0.0.1:{gateway_port}"
        api_key = new_api_key()
        kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps(api_key_secret("demo-key", api_key, keys_namespace=NAMESPACE, grants=NAMESPACE)),
        )
        gateway_log = open(STATE / "gateway.log", "wb")  # noqa: SIM115 - the child owns it
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "sandbox_operator",
                    "gateway",
                    "--kubeconfig",
                    kubeconfig,
                    "--bind-address",
                    "127.0.0.1",
                    "--port",
                    str(gateway_port),
                    "--metrics-port",
                    "0",
                    "--keys-namespace",
                    NAMESPACE,
                ],
                stdout=gateway_log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        )
        wait_for("the gateway's /health", lambda: _http_ok(f"{gateway_url}/health"))
        print(f"    E2B_API_URL={gateway_url} E2B_SANDBOX_URL={gateway_url} E2B_API_KEY={api_key[:8]}…")

        step("the unmodified e2b-code-interpreter SDK: Sandbox.create() through the gateway")
        from e2b_code_interpreter import Sandbox

        sdk = {"api_key": api_key, "api_url": gateway_url, "sandbox_url": gateway_url}
        created = time.monotonic()
        sbx = Sandbox.create(template="base", timeout=3600, metadata={"team": "demo"}, **sdk)
        print(f"    sandbox {sbx.sandbox_id} serving after {time.monotonic() - created:.2f}s")
        name = next(
            s["metadata"]["name"]
            for s in json.loads(kubectl("get", "sandboxes", "-n", NAMESPACE, "-o", "json"))["items"]
        )
        status = sandbox(name)["status"]
        print(
            f"    Sandbox {NAMESPACE}/{name}: phase={status['phase']} pod={status['podName']} podIP={status['podIP']}"
        )
        print("    " + kubectl("get", "sandbox,pod,pvc,service,networkpolicy", "-n", NAMESPACE).replace("\n", "\n    "))

        step("real work in the sandbox, through the gateway to the agent on the pod IP")
        sbx.run_code("import statistics\nsamples = [3, 1, 4, 1, 5, 9, 2, 6]")
        result = sbx.run_code("statistics.mean(samples), statistics.median(samples)")
        print(f"    run_code (state kept across calls): {result.text}")
        command = sbx.commands.run("echo hello from $(hostname) && uname -s")
        print(f"    commands.run: {command.stdout.strip()!r} (exit {command.exit_code})")
        sbx.files.write("notes/hello.txt", "written through the SDK\n")
        print(f"    files: {sbx.files.read('notes/hello.txt').strip()!r}")
        identity = sbx.commands.run("id && pwd")
        print(f"    inside the container: {identity.stdout.strip().replace(chr(10), '  |  ')}")
        refused = sbx.commands.run('touch /usr/demo 2>&1; echo "(exit $?)"', timeout=30)
        print(f"    write to /usr: {refused.stdout.strip()!r}")
        bomb = sbx.run_code('hog = []\nwhile True:\n    hog.append(b"x" * (64 * 1024 * 1024))', timeout=120)
        cause = bomb.error.value if bomb.error else "no error?"
        print(f"    memory bomb in run_code: {bomb.error.name if bomb.error else ''}: {cause}")
        after = sbx.run_code("1 + 1")
        print(f"    the next run_code, on a fresh kernel: {after.text}")
        info = sbx.get_info()
        print(
            f"    get_info: state={info.state.value} cpu={info.cpu_count} memoryMB={info.memory_mb} "
            f"ends {info.end_at:%H:%M:%S}"
        )

        step("the operator's metrics for this sandbox")
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        executions = f'sandbox_executions_total{{kind="code",namespace="demo",sandbox="{name}",template="base"}} '

        def counted() -> bool:
            lines = [line for line in _get(metrics_url).splitlines() if line.startswith(executions)]
            return bool(lines) and float(lines[0].rsplit(" ", 1)[1]) >= 2

        wait_for("the code executions in the operator's metrics", counted)
        for line in _get(metrics_url).splitlines():
            if line.startswith(
                (
                    "sandbox_up{",
                    "sandbox_memory_used_bytes{",
                    "sandbox_executions_total{",
                    "sandbox_operator_sandboxes{",
                )
            ):
                print(f"    {line}")

        step("pause (→ Suspended: pod deleted, workspace kept) and connect (→ Running on the same workspace)")
        sbx.pause()
        print(f"    paused: phase={sandbox(name)['status']['phase']}")
        resumed = Sandbox.connect(sbx.sandbox_id, **sdk)
        print(
            f"    resumed: phase={sandbox(name)['status']['phase']}; "
            f"notes/hello.txt = {resumed.files.read('notes/hello.txt').strip()!r}"
        )

        step("kill: the Sandbox and every child are removed")
        print(f"    kill() -> {resumed.kill()}")
        wait_for(
            "the sandbox's children to go",
            lambda: (
                not kubectl(
                    "get",
                    "pod,pvc,service,networkpolicy",
                    "-n",
                    NAMESPACE,
                    "-l",
                    f"sandbox.dev/sandbox={name}",
                    "-o",
                    "name",
                ).strip()
            ),
        )
        print("    " + (kubectl("get", "sandbox,pod,pvc", "-n", NAMESPACE).strip() or "nothing left"))
        step("done")
        return 0
    finally:
        stack.close()
        for process in reversed(processes):  # SIGTERM all, then wait: the gateway and operator stop together
            process.terminate()
        for process in reversed(processes):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if cluster_up and os.environ.get("KEEP") != "1":
            subprocess.run([str(REPO / "hack" / "cluster"), "down", "--state-dir", str(STATE)], check=False)
            print("    after hack/cluster down: " + _leftovers())
        elif cluster_up:
            print(
                f"cluster kept: export KUBECONFIG={STATE / 'kubeconfig'}; "
                f"stop with hack/cluster down --state-dir {STATE}"
            )


def _leftovers() -> str:
    """What a container node could leave behind: containers, mounts, cgroups."""
    containers = subprocess.run(
        ["crun", "--root", str(STATE / "node" / "crun"), "list", "-q"], capture_output=True, text=True
    ).stdout.split()
    mounts = [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if str(STATE) in line.split()[4]
    ]
    cgroups = list(Path("/sys/fs/cgroup/memory").glob("**/sandbox-node-*"))
    return f"containers={len(containers)} mounts={len(mounts)} cgroups={len(cgroups)}"


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(200 <= response.status < 300)
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
