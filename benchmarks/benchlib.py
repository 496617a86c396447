"""Helpers the benchmarks share: process and machine readings, percentiles, the local cluster."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
JSON = dict[str, Any]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes; empty when it is gone."""
    values: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return values
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def cpu_seconds(pid: int, children: bool = False) -> float:
    """user + system CPU time of a process so far; with `children`, also that of the children it has
    waited for (a container node's crun processes and the containers that ended under them)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time all cores spent not idle since boot (from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def mb(value: int | float) -> float:
    return round(value / 2**20, 1)


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (p99 of 100 samples is the 99th smallest, not the maximum)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def summary_ms(values_ms: list[float], digits: int = 2) -> JSON:
    if not values_ms:
        return {"n": 0}
    return {
        "n": len(values_ms),
        "p50_ms": round(statistics.median(values_ms), digits),
        "p90_ms": round(percentile(values_ms, 90), digits),
        "p99_ms": round(percentile(values_ms, 99), digits),
        "mean_ms": round(statistics.fmean(values_ms), digits),
        "min_ms": round(min(values_ms), digits),
        "max_ms": round(max(values_ms), digits),
    }


def machine() -> JSON:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_total = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_total = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(mem_total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def cluster_up(state_dir: Path, pod_cidr: str, node: str = "kwok", ca_bundle: Path | None = None) -> str:
    """`hack/cluster up --node NODE` (kwok or containers; `ca_bundle` for the container node's
    containers, see docs/container-node.md); the kubeconfig path."""
    started = time.monotonic()
    # A pod range of our own: the usage collector scrapes pod IPs, and another local cluster's
    # tests may run real agents on the default range's addresses.
    cidr_env = "SANDBOX_CLUSTER_CONTAINER_POD_CIDR" if node == "containers" else "SANDBOX_CLUSTER_POD_CIDR"
    env = {**os.environ, cidr_env: pod_cidr}
    argv = [sys.executable, str(REPO / "hack" / "cluster"), "up", "--state-dir", str(state_dir), "--node", node]
    argv += ["--ca-bundle", str(ca_bundle)] if ca_bundle else []
    for attempt in (1, 2):  # a free port picked by `up` can be taken by another process meanwhile
        up = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        if up.returncode == 0:
            break
        if attempt == 2:
            raise RuntimeError(f"hack/cluster up failed:\n{up.stderr}{up.stdout}")
        log(f"hack/cluster up failed, retrying once: {up.stderr.strip().splitlines()[-1:]}")
    kubeconfig = up.stdout.strip().splitlines()[-1].removeprefix("KUBECONFIG=")
    log(f"cluster up in {time.monotonic() - started:.1f} s ({kubeconfig})")
    return kubeconfig


def cluster_down(state_dir: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "hack" / "cluster"), "down", "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def control_plane_pids(state_dir: Path) -> dict[str, int]:
    """PIDs of the components `hack/cluster up` started from `state_dir` (its state.json), by name:
    etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok."""
    state = json.loads((state_dir / "state.json").read_text())
    return {name: int(process["pid"]) for name, process in state.get("processes", {}).items()}


def run_facts(args: Any, load_before: tuple[float, float, float], started: float, measured_at: str) -> JSON:
    """What every result file records about its run: the arguments, the machine, its load average
    before and after (contention), how long it took and when."""
    return {
        "args": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
        "machine": machine(),
        "contention": {
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "duration_s": round(time.monotonic() - started, 1),
        "measured_at": measured_at,
    }


def write_results(results: JSON, path: Path, default: Any = None) -> None:
    """The run's JSON (`default` serializes what json cannot, as json.dumps takes it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=default) + "\n")
    print(f"\nwrote {path}")


def print_rows(rows: list[tuple[str, str, str]]) -> None:
    """The measure / figure / target table a benchmark prints at its end."""
    width = max(len(row[0]) for row in rows)
    figure_width = max(len(row[1]) for row in rows)
    print()
    print(f"{'measure':<{width}}  {'figure':<{figure_width}}  target")
    print("-" * (width + figure_width + 12))
    for measure, figure, target in rows:
        print(f"{measure:<{width}}  {figure:<{figure_width}}  {target}")
