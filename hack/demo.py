#!/usr/bin/env python3
"""The product's main job on the embedded default, end to end, with progress output.

1. a real local control plane (hack/cluster: etcd, kube-apiserver, controller-manager, scheduler,
   kwok), the CRDs and the `base` SandboxTemplate;
2. the operator (`python -m sandbox_operator run`);
3. a Sandbox applied like any user would, reconciled to Running (pod, workspace claim, Service,
   NetworkPolicy);
4. the sandbox agent started on the pod's IP (there is no kubelet here, so this stands in for the
   container the kubelet would run), and the unmodified E2B code-interpreter SDK doing real work in
   it: Python state across calls, a shell command, a file round trip;
5. the operator's /metrics for that sandbox, then suspend → Suspended and resume → Running on the
   same workspace.
Everything started is stopped at the end, unless KEEP=1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

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
    try:
        step("starting the local control plane (hack/cluster up)")
        run(str(REPO / "hack" / "cluster"), "down", "--state-dir", str(STATE))
        started = time.monotonic()
        out = run(str(REPO / "hack" / "cluster"), "up", "--state-dir", str(STATE))
        cluster_up = True
        kubeconfig = out.strip().splitlines()[-1].removeprefix("KUBECONFIG=")
        env = {**os.environ, "KUBECONFIG": kubeconfig}
        print(f"    ready in {time.monotonic() - started:.1f}s; KUBECONFIG={kubeconfig}")

        def kubectl(*args: str, input: str | None = None) -> str:
            return run("kubectl", *args, input=input, env=env)

        def sandbox() -> dict[str, Any]:
            return dict(json.loads(kubectl("get", "sandbox", "hello", "-n", NAMESPACE, "-o", "json")))

        step("installing the CRDs and the `base` SandboxTemplate")
        kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        for crd in ("sandboxes", "sandboxtemplates", "sandboxpools"):
            kubectl("wait", "--for=condition=Established", f"crd/{crd}.sandbox.dev", "--timeout=60s")
        wait_for("the CRDs to serve", lambda: subprocess.run(
            ["kubectl", "get", "sandboxtemplates"], capture_output=True, env=env).returncode == 0)
        kubectl("apply", "-f", str(REPO / "examples" / "sandboxtemplate-base.yaml"))
        kubectl("create", "namespace", NAMESPACE)

        step("starting the operator")
        metrics_port, liveness_port = free_port(), free_port()
        log = open(STATE / "operator.log", "wb")  # noqa: SIM115 - the child owns it
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "sandbox_operator", "run", "--kubeconfig", kubeconfig,
             "--bind-address", "127.0.0.1", "--metrics-port", str(metrics_port),
             "--liveness-port", str(liveness_port), "--usage-interval", "1", "--usage-status-interval", "2"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        ))
        wait_for("the operator's liveness endpoint", lambda: _http_ok(f"http://127.0.0.1:{liveness_port}/healthz"))
        print(f"    metrics: http://127.0.0.1:{metrics_port}/metrics   log: {STATE / 'operator.log'}")

        step("kubectl apply: Sandbox `hello` (template base, 30m idle → suspend)")
        applied = time.monotonic()
        kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps({
            "apiVersion": "sandbox.dev/v1alpha1", "kind": "Sandbox", "metadata": {"name": "hello"},
            "spec": {"template": "base", "timeouts": {"idle": "30m", "maxLifetime": "1h", "execution": "5m"},
                     "metadata": {"team": "demo"}},
        }))
        body = wait_for("Sandbox hello Running",
                        lambda: (s := sandbox()).get("status", {}).get("phase") == "Running" and s)
        status = body["status"]
        print(f"    Running after {time.monotonic() - applied:.2f}s: sandboxID={status['sandboxID']} "
              f"pod={status['podName']} podIP={status['podIP']}")
        print("    " + kubectl("get", "sandbox,pod,pvc,service,networkpolicy", "-n", NAMESPACE).replace("\n", "\n    "))

        step(f"starting the sandbox agent on the pod IP {status['podIP']} (stands in for the container)")
        workdir = STATE / "workspace"
        workdir.mkdir(parents=True, exist_ok=True)
        agent_log = open(STATE / "agent.log", "wb")  # noqa: SIM115 - the child owns it
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "sandbox_operator.agent", "--host", status["podIP"], "--interpreter-port", "0",
             "--workdir", str(workdir)], stdout=agent_log, stderr=subprocess.STDOUT,
        ))
        url = f"http://{status['podIP']}:49983"
        wait_for("the agent's /health", lambda: _http_ok(f"{url}/health"))

        step("the unmodified e2b-code-interpreter SDK at work in the sandbox")
        from e2b_code_interpreter import Sandbox

        sbx = Sandbox.create(debug=True, sandbox_url=url)
        sbx.run_code("import statistics\nsamples = [3, 1, 4, 1, 5, 9, 2, 6]")
        result = sbx.run_code("statistics.mean(samples), statistics.median(samples)")
        print(f"    run_code (state kept across calls): {result.text}")
        command = sbx.commands.run("echo hello from $(hostname) && uname -s")
        print(f"    commands.run: {command.stdout.strip()!r} (exit {command.exit_code})")
        sbx.files.write("notes/hello.txt", "written through the SDK\n")
        print(f"    files: {sbx.files.read('notes/hello.txt').strip()!r}")

        step("the operator's metrics for this sandbox")
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        executions = 'sandbox_executions_total{kind="code",namespace="demo",sandbox="hello",template="base"} 2.0'
        wait_for("the two code executions in the operator's metrics", lambda: executions in _get(metrics_url))
        for line in _get(metrics_url).splitlines():
            if line.startswith(("sandbox_up{", "sandbox_memory_used_bytes{", "sandbox_executions_total{",
                                'sandbox_operator_sandboxes{')):
                print(f"    {line}")

        step("suspend (spec.suspended: true) and resume on the same workspace")
        kubectl("patch", "sandbox", "hello", "-n", NAMESPACE, "--type=merge", "-p", '{"spec":{"suspended":true}}')
        wait_for("Suspended", lambda: sandbox().get("status", {}).get("phase") == "Suspended")
        print("    Suspended: pod deleted, workspace claim and Service kept")
        kubectl("patch", "sandbox", "hello", "-n", NAMESPACE, "--type=merge", "-p", '{"spec":{"suspended":false}}')
        wait_for("Running again", lambda: sandbox().get("status", {}).get("phase") == "Running")
        print("    Running again")
        print("    " + kubectl("get", "sandbox", "-n", NAMESPACE, "-o", "wide").replace("\n", "\n    "))
        step("done")
        return 0
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
        if cluster_up and os.environ.get("KEEP") != "1":
            subprocess.run([str(REPO / "hack" / "cluster"), "down", "--state-dir", str(STATE)], check=False)
        elif cluster_up:
            print(f"cluster kept: export KUBECONFIG={STATE / 'kubeconfig'}; "
                  f"stop with hack/cluster down --state-dir {STATE}")


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
