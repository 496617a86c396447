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


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def cluster_up(state_dir: Path, pod_cidr: str) -> str:
    started = time.monotonic()
    # A pod range of our own: the usage collector scrapes pod IPs, and another local cluster's
    # tests may run real agents on the default range's addresses.
    env = {**os.environ, "SANDBOX_CLUSTER_POD_CIDR": pod_cidr}
    for attempt in (1, 2):  # a free port picked by `up` can be taken by another process meanwhile
        up = subprocess.run(
            [sys.executable, str(REPO / "hack" / "cluster"), "up", "--state-dir", str(state_dir)],
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
