"""Agent latency and memory through the unmodified E2B SDKs (prints figures, writes JSON, asserts nothing).

    python benchmarks/agent_bench.py [--iterations 300]

Starts `python -m sandbox_operator.agent` on loopback, talks to it with `sandbox_url` (no gateway in
between, so the figures are the agent's share of docs/design.md §7's gateway → agent targets) and reports
commands.run("echo hi") and run_code("1+1") p50/p99 plus the agent's RSS idle and after the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "agent.json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def wait_healthy(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("agent did not become healthy")


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    return {
        "p50_ms": round(statistics.median(ordered), 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
        "mean_ms": round(statistics.fmean(ordered), 3),
        "n": len(ordered),
    }


def timed(call: Any, iterations: int, warmup: int = 10) -> list[float]:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(iterations):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=300)
    args = parser.parse_args()

    from e2b_code_interpreter import Sandbox

    envd_port, interpreter_port = free_port(), free_port()
    workdir = Path(tempfile.mkdtemp(prefix="agent-bench-"))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SANDBOX_", "E2B_"))}
    env["PYTHONPATH"] = str(REPO / "operator")
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sandbox_operator.agent",
            "--host=127.0.0.1",
            f"--envd-port={envd_port}",
            f"--interpreter-port={interpreter_port}",
            f"--workdir={workdir}",
        ],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_healthy(envd_port, time.monotonic() + 30)
        time.sleep(1.0)  # let startup allocations settle before reading idle memory
        idle_rss = rss_bytes(agent.pid)

        sandbox: Any = Sandbox.create(debug=True, sandbox_url=f"http://127.0.0.1:{envd_port}")
        started = time.perf_counter()
        sandbox.run_code("1")
        first_run_code_s = time.perf_counter() - started

        commands = percentiles(timed(lambda: sandbox.commands.run("echo hi"), args.iterations))
        run_code = percentiles(timed(lambda: sandbox.run_code("1+1"), args.iterations))
        busy_rss = rss_bytes(agent.pid)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)

    results = {
        "commands_run_echo_hi": commands,
        "run_code_1_plus_1": run_code,
        "first_run_code_with_kernel_start_s": round(first_run_code_s, 3),
        "agent_idle_rss_mb": round(idle_rss / 2**20, 1),
        "agent_rss_after_run_mb": round(busy_rss / 2**20, 1),
        "targets": {
            "commands_run_p50_ms": 10,
            "run_code_p50_ms": 8,
            "idle_rss_mb": 60,
            "note": "through gateway",
        },
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"commands.run('echo hi'): p50 {commands['p50_ms']} ms, p99 {commands['p99_ms']} ms")
    print(f"run_code('1+1'):          p50 {run_code['p50_ms']} ms, p99 {run_code['p99_ms']} ms")
    print(f"first run_code (kernel start): {first_run_code_s:.2f} s")
    print(f"agent RSS: idle {results['agent_idle_rss_mb']} MB, after run {results['agent_rss_after_run_mb']} MB")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
