"""Fixtures: real agent processes on loopback and a fake control plane, driven by the unmodified E2B SDKs."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import site
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from sandbox_operator.agent import ENVD_COMPATIBLE_VERSION
from testlib import stop_process, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
ACCESS_TOKEN = "test-access-token-0123456789"
STARTUP_DEADLINE = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like the agent: connections in TIME_WAIT from an earlier run do not make the port busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class AgentProcess:
    process: subprocess.Popen[bytes]
    envd_port: int
    interpreter_port: int
    workdir: Path
    token: str | None
    log_path: Path

    @property
    def envd_url(self) -> str:
        return f"http://127.0.0.1:{self.envd_port}"

    @property
    def interpreter_url(self) -> str:
        return f"http://127.0.0.1:{self.interpreter_port}"

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        port: int | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        url = f"http://127.0.0.1:{port or self.envd_port}{path}"
        request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    def metric(self, prefix: str) -> float:
        """Sum of the agent's Prometheus samples whose line starts with `prefix` (0 when none)."""
        headers = {"X-Access-Token": self.token} if self.token else {}
        text = self.request("GET", "/agent/metrics", headers=headers)[2].decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
            return bool(response.status == 204)
    except OSError:
        return False


def start_agent(
    tmp_root: Path,
    *,
    token: str | None,
    env: dict[str, str] | None = None,
    envd_port: int | None = None,
    interpreter_port: int | None = None,
    extra_args: tuple[str, ...] = (),
    wrapper: Sequence[str] = (),
    preexec_fn: Callable[[], None] | None = None,
) -> AgentProcess:
    """Start an agent on loopback; `wrapper` is put before its command line (see container_wrapper)."""
    workdir = tmp_root / "home"
    workdir.mkdir(parents=True, exist_ok=True)
    envd_port = envd_port or free_port()
    interpreter_port = interpreter_port or free_port()
    child_env = {key: value for key, value in os.environ.items() if not key.startswith(("SANDBOX_", "E2B_"))}
    child_env["PYTHONPATH"] = str(REPO_ROOT / "operator")
    if token:
        child_env["SANDBOX_ACCESS_TOKEN"] = token
    child_env.update(env or {})
    log_path = tmp_root / "agent.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                *wrapper,
                sys.executable,
                "-m",
                "sandbox_operator.agent",
                "--host",
                "127.0.0.1",
                "--envd-port",
                str(envd_port),
                "--interpreter-port",
                str(interpreter_port),
                "--workdir",
                str(workdir),
                *extra_args,
            ],
            env=child_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,
        )
    agent = AgentProcess(process, envd_port, interpreter_port, workdir, token, log_path)
    try:
        wait_until(
            lambda: process.poll() is not None or _healthy(envd_port),
            timeout=STARTUP_DEADLINE,
            message="agent /health",
        )
    except AssertionError:
        stop_agent(agent)
        raise
    if process.poll() is not None:
        raise AssertionError(f"agent exited with {process.returncode}: {log_path.read_text()}")
    return agent


def stop_agent(agent: AgentProcess) -> None:
    stop_process(agent.process, grace=15)


# -- the agent as in a container: own pid namespace (PID 1), unprivileged uid, no capabilities ------------


def container_unsupported() -> str | None:
    """Why the agent cannot be run as in a container here (needs root, unshare and setpriv), or None."""
    if os.geteuid() != 0:
        return "needs root (unshare --pid, an unprivileged uid to switch to)"
    for tool in ("unshare", "setpriv", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc", "true"],
        capture_output=True,
        timeout=30,
    )
    if probe.returncode != 0:
        return f"unshare --pid does not work here: {probe.stderr.decode(errors='replace').strip()}"
    return None


def _hidden_python_dirs() -> dict[Path, set[Path]]:
    """Directories other users cannot traverse (e.g. /root around a pyenv Python) → the subtrees below
    them the agent's Python needs."""
    needed = {Path(sys.base_prefix), Path(sys.prefix), Path(sys.executable), REPO_ROOT / "operator"}
    needed.update(Path(path) for path in site.getsitepackages())
    hidden: dict[Path, set[Path]] = {}
    for path in needed:
        parts = path.resolve().parts
        for depth in range(1, len(parts)):
            ancestor = Path(*parts[:depth])
            if not ancestor.stat().st_mode & 0o001:
                hidden.setdefault(ancestor, set()).add(Path(*parts[: depth + 1]))
                break
    return hidden


def container_wrapper(uid: int, stage: Path) -> list[str]:
    """A command prefix that runs the agent the way a sandbox container does: first process (PID 1) of a
    new pid namespace with its own /proc, as `uid` (no passwd entry needed), no capabilities (also no
    bounding set), no-new-privileges. The network namespace stays the host's (the agent binds loopback).

    Where the test machine's Python lives under a directory only root may enter (/root/.pyenv), a tmpfs
    over that directory inside the private mount namespace shows the agent just the subtrees it needs.
    `stage` is an empty directory for the bind mounts (they vanish with the namespace).
    """
    lines = ["set -e"]
    for index, (hidden, subtrees) in enumerate(sorted(_hidden_python_dirs().items())):
        moves = []
        for number, subtree in enumerate(sorted(subtrees)):
            staged = shlex.quote(str(stage / f"{index}-{number}"))
            lines += [f"mkdir -p {staged}", f"mount --bind {shlex.quote(str(subtree))} {staged}"]
            moves += [f"mkdir -p {shlex.quote(str(subtree))}", f"mount --move {staged} {shlex.quote(str(subtree))}"]
        lines += [f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(str(hidden))}", *moves]
    # --pdeathsig keep: the credential change would clear the SIGKILL --kill-child asks for, and with it
    # the guarantee that nothing of the namespace outlives unshare (a test killed midway).
    lines.append(
        f"exec setpriv --reuid={uid} --regid={uid} --clear-groups --bounding-set=-all --no-new-privs"
        ' --pdeathsig keep -- "$@"'
    )
    return [
        "unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child", "--mount-proc",
        "--", "sh", "-c", "\n".join(lines), "sh",
    ]  # fmt: skip


def container_init(agent: AgentProcess) -> int:
    """Host pid of the agent's PID 1 (the init) under container_wrapper's unshare."""
    children = wait_until(lambda: pid_children(agent.process.pid), timeout=10, message="unshare's child")
    return children[0]


def stop_container_agent(agent: AgentProcess) -> int | None:
    """Stop a container_wrapper agent the way a runtime does (SIGTERM to PID 1 from outside); its exit code."""
    children = pid_children(agent.process.pid)
    if children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(children[0], signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            return agent.process.wait(timeout=15)
    stop_process(agent.process, grace=1)  # unshare --kill-child takes the namespace with it
    return None


def pid_children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


@dataclass(frozen=True)
class HostProcess:
    pid: int
    ppid: int
    state: str
    name: str


def processes_of(uid: int) -> list[HostProcess]:
    """Processes (host pids) whose real uid is `uid`, zombies included."""
    found: list[HostProcess] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = dict(
                line.split(":\t", 1) for line in Path(f"/proc/{entry}/status").read_text().splitlines() if ":\t" in line
            )
        except OSError:
            continue
        if int(fields["Uid"].split()[0]) == uid:
            found.append(HostProcess(int(entry), int(fields["PPid"]), fields["State"][:1], fields["Name"]))
    return found


class FakeControlPlane:
    """Answers the SDK's create/connect/kill with a Sandbox that carries the agent's access token.

    Like the real control plane it returns the token as `envdAccessToken` and as
    `trafficAccessToken` (the code-interpreter SDK sends only the latter on /contexts).
    """

    def __init__(self, token: str, *, traffic_token: bool = True) -> None:
        self.token = token
        self.traffic_token = traffic_token
        self.created = 0
        handler = self._handler()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def sandbox(self, template: str) -> dict[str, Any]:
        sandbox = {
            "templateID": template,
            "sandboxID": "agenttestsandbox",
            "clientID": "local",
            "envdVersion": ENVD_COMPATIBLE_VERSION,
            "envdAccessToken": self.token,
        }
        if self.traffic_token:
            sandbox["trafficAccessToken"] = self.token
        return sandbox

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        plane = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: Any = None) -> None:
                payload = b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = json.loads(self.rfile.read(length) or b"{}")
                if self.path.rstrip("/").endswith("/sandboxes"):
                    plane.created += 1
                    self._reply(201, plane.sandbox(request.get("templateID", "base")))
                elif self.path.endswith("/connect"):
                    self._reply(200, plane.sandbox("base"))
                else:
                    self._reply(404, {"code": 404, "message": "not found"})

            def do_DELETE(self) -> None:
                self._reply(204)

        return Handler

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
