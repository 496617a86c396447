"""Agent latency and memory through the unmodified E2B SDKs (prints figures, writes JSON, asserts nothing).

    python benchmarks/agent_bench.py [--iterations 300]

Starts `python -m sandbox_operator.agent` on loopback, talks to it with `sandbox_url` (no gateway in
between, so the figures are the agent's share of docs/design.md §7's gateway → agent targets) and reports
commands.run("echo hi") and run_code("1+1") p50/p99 plus the agent's RSS idle and after the run.

"agent start → /health answers" execs a fresh agent --start-runs times (default 10, after one start
that compiles the bytecode, as an image has it from pip) and takes, per start, the time from just before
the exec to the envd port accepting a TCP connection and to that connection's GET /health being
answered, and the agent's CPU time until then (medians; wall-clock figures move with the machine's
load, the CPU figure less); then, as after a create, the SDK's first commands.run("echo hi").
`--start-only` measures just that, without the latency and memory part (and writes
results/agent_start.json instead).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "agent.json"
START_RESULTS = REPO / "benchmarks" / "results" / "agent_start.json"  # --start-only: agent.json stays whole


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


def agent_command(envd_port: int, interpreter_port: int, workdir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sandbox_operator.agent",
        "--host=127.0.0.1",
        f"--envd-port={envd_port}",
        f"--interpreter-port={interpreter_port}",
        f"--workdir={workdir}",
    ]


def agent_env(pycache: Path | None = None) -> dict[str, str]:
    """The agent's environment; with `pycache`, bytecode is written and read there (like the image's
    install-time .pyc files) even where PYTHONDONTWRITEBYTECODE is set, and no checkout is written to."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SANDBOX_", "E2B_"))}
    env["PYTHONPATH"] = str(REPO / "operator")
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


HEALTH_REQUEST = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


def health_answered(sock: socket.socket) -> bool:
    """Send GET /health on a connected socket; True once a 2xx status line came back."""
    sock.sendall(HEALTH_REQUEST)
    head = b""
    while b"\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            return False
        head += chunk
    return head.split(b" ", 2)[1].startswith(b"2")


def main_thread_cpu_ms(pid: int) -> float:
    """CPU time of a process's main thread so far (schedstat: ns), where the agent does all it does
    before it answers /health; on a busy machine it says what the wall-clock figures cannot."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e6
    except (OSError, ValueError, IndexError):
        return float("nan")


@dataclass(frozen=True)
class Start:
    """One agent start, in ms from just before the exec."""

    tcp_accept: float
    health_answered: float
    cpu_until_health: float  # the agent's CPU ms by then
    first_command: float  # /health answered, then the SDK's first commands.run("echo hi") returned


def wait_for_health(
    port: int, started: float, agent: subprocess.Popen[bytes], deadline_s: float
) -> tuple[float, float]:
    """Connect at 1 ms intervals until the port accepts, then GET /health on that connection; the
    perf_counter readings at the accept and at the answer."""
    while True:
        if time.perf_counter() - started > deadline_s or agent.poll() is not None:
            raise SystemExit("agent did not answer /health")
        with socket.socket() as sock:
            sock.settimeout(deadline_s)
            try:
                sock.connect(("127.0.0.1", port))
            except ConnectionRefusedError:
                time.sleep(0.001)  # not bound yet
                continue
            accepted = time.perf_counter()
            try:
                if health_answered(sock):
                    return accepted, time.perf_counter()
            except OSError:
                continue


def one_start(workdir: Path, env: dict[str, str], deadline_s: float = 30.0) -> Start:
    """Exec an agent, wait for /health as the gateway does, then run the first command through the SDK."""
    from e2b import Sandbox

    envd_port, interpreter_port = free_port(), free_port()
    started = time.perf_counter()
    agent = subprocess.Popen(agent_command(envd_port, interpreter_port, workdir), env=env, stderr=subprocess.DEVNULL)
    try:
        accepted, answered = wait_for_health(envd_port, started, agent, deadline_s)
        cpu_ms = main_thread_cpu_ms(agent.pid)
        sandbox: Any = Sandbox.create(debug=True, sandbox_url=f"http://127.0.0.1:{envd_port}")
        sandbox.commands.run("echo hi")
        commanded = time.perf_counter()
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)
    return Start(
        tcp_accept=(accepted - started) * 1000,
        health_answered=(answered - started) * 1000,
        cpu_until_health=cpu_ms,
        first_command=(commanded - started) * 1000,
    )


def start_figures(runs: int) -> dict[str, Any]:
    """Median (and spread) of `runs` agent starts (a new process each; one start before them compiles
    the bytecode and warms the page cache, as an image's installed packages are)."""
    with tempfile.TemporaryDirectory(prefix="agent-bench-start-") as scratch:
        workdir = Path(scratch)
        env = agent_env(workdir / "pycache")
        one_start(workdir, env)
        starts = [one_start(workdir, env) for _ in range(runs)]
    answered = [start.health_answered for start in starts]
    return {
        "exec_to_tcp_accept": percentiles([start.tcp_accept for start in starts]),
        "exec_to_health_answered": percentiles(answered),
        "agent_cpu_until_health_answered": percentiles([start.cpu_until_health for start in starts]),
        "exec_to_first_command_returned": percentiles([start.first_command for start in starts]),
        "min_health_ms": round(min(answered), 3),
        "max_health_ms": round(max(answered), 3),
    }


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
    parser.add_argument("--start-runs", type=int, default=10, help="agent starts for the start figure")
    parser.add_argument("--start-only", action="store_true", help="measure only agent start → /health")
    args = parser.parse_args()

    start = start_figures(args.start_runs)
    start_line = (
        f"agent start → /health answers: p50 {start['exec_to_health_answered']['p50_ms']} ms "
        f"(TCP accept p50 {start['exec_to_tcp_accept']['p50_ms']} ms, agent CPU until then p50 "
        f"{start['agent_cpu_until_health_answered']['p50_ms']} ms, n={args.start_runs}); first "
        f"commands.run after it returned at p50 {start['exec_to_first_command_returned']['p50_ms']} ms"
    )
    print(start_line)
    if args.start_only:
        write_results({"agent_start_to_health": start, **run_facts()}, START_RESULTS)
        return

    from e2b_code_interpreter import Sandbox

    envd_port, interpreter_port = free_port(), free_port()
    workdir = Path(tempfile.mkdtemp(prefix="agent-bench-"))
    agent = subprocess.Popen(
        agent_command(envd_port, interpreter_port, workdir), env=agent_env(), stderr=subprocess.DEVNULL
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
        "agent_start_to_health": start,
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
        **run_facts(),
    }
    print(f"commands.run('echo hi'): p50 {commands['p50_ms']} ms, p99 {commands['p99_ms']} ms")
    print(f"run_code('1+1'):          p50 {run_code['p50_ms']} ms, p99 {run_code['p99_ms']} ms")
    print(f"first run_code (kernel start): {first_run_code_s:.2f} s")
    print(f"agent RSS: idle {results['agent_idle_rss_mb']} MB, after run {results['agent_rss_after_run_mb']} MB")
    write_results(results, RESULTS)


def run_facts() -> dict[str, Any]:
    return {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_1m": round(os.getloadavg()[0], 2),  # the start figures are wall-clock
        },
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_results(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
