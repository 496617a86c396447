"""The agent run the way a sandbox container runs it (docs/agent.md, "Running as a container").

PID 1 of its own pid namespace (with its own /proc), an unprivileged uid without a passwd entry, no
capabilities, no-new-privileges, and RLIMIT_NPROC as the pids limit; the network namespace stays the
host's and the agent binds loopback. Each test run uses a uid of its own: RLIMIT_NPROC counts the
processes of a uid machine-wide, so a shared uid would let concurrent runs (or other users of it) starve
each other.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from agentlib import (
    ACCESS_TOKEN,
    AgentProcess,
    FakeControlPlane,
    HostProcess,
    container_init,
    container_unsupported,
    container_wrapper,
    pid_children,
    processes_of,
    start_agent,
    stop_container_agent,
)
from e2b import PtySize, RateLimitException, Sandbox, TimeoutException

from testlib import wait_until

# Room for the agent (main thread, a few I/O threads) and the init, and for a fork bomb to fill.
NPROC_LIMIT = 64
BASE_UID = 400_000 + (os.getpid() % 100_000) * 4


@dataclass
class Container:
    agent: AgentProcess
    uid: int
    init: int  # host pid of the namespace's PID 1
    agent_pid: int  # host pid of the agent, the init's child
    root: Path

    def log(self) -> str:
        return self.agent.log_path.read_text(errors="replace")

    def live_processes(self) -> list[HostProcess]:
        """Everything of the sandbox that runs, besides the init and the agent (zombies left out)."""
        return [
            process
            for process in processes_of(self.uid)
            if process.pid not in (self.init, self.agent_pid) and process.state != "Z"
        ]


def start_container(uid: int) -> Container:
    root = Path(tempfile.mkdtemp(prefix="sandbox-container-"))
    root.chmod(0o755)
    (root / "home").mkdir()
    os.chown(root / "home", uid, uid)
    (root / "stage").mkdir()

    def limit_processes() -> None:
        resource.setrlimit(resource.RLIMIT_NPROC, (NPROC_LIMIT, NPROC_LIMIT))

    try:
        agent = start_agent(
            root,
            token=ACCESS_TOKEN,
            wrapper=container_wrapper(uid, root / "stage"),
            preexec_fn=limit_processes,
            extra_args=("--interpreter-port", "0"),
        )
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        init = container_init(agent)
        agent_pid = wait_until(lambda: pid_children(init), timeout=10, message="the agent under the init")[0]
    except BaseException:
        remove_container(Container(agent, uid, 0, 0, root))
        raise
    return Container(agent, uid, init, agent_pid, root)


def remove_container(container: Container) -> None:
    stop_container_agent(container.agent)
    shutil.rmtree(container.root, ignore_errors=True)


@pytest.fixture(scope="module")
def plane() -> Iterator[FakeControlPlane]:
    reason = container_unsupported()
    if reason:
        pytest.skip(f"cannot run the agent as in a container: {reason}")
    control_plane = FakeControlPlane(ACCESS_TOKEN)
    yield control_plane
    control_plane.close()


def sdk(plane: FakeControlPlane, container: Container) -> Any:
    return Sandbox.create(api_key="e2b_" + "0" * 40, api_url=plane.url, sandbox_url=container.agent.envd_url)


@pytest.fixture(scope="module")
def container(plane: FakeControlPlane) -> Iterator[Container]:
    started = start_container(BASE_UID)
    yield started
    remove_container(started)


@pytest.fixture(scope="module")
def sandbox(plane: FakeControlPlane, container: Container) -> Any:
    return sdk(plane, container)


def test_the_agent_runs_unprivileged_under_its_own_init(container: Container) -> None:
    assert {process.pid for process in processes_of(container.uid)} >= {container.init, container.agent_pid}
    status = Path(f"/proc/{container.agent_pid}/status").read_text()
    assert "CapEff:\t0000000000000000" in status
    assert "NoNewPrivs:\t1" in status
    assert f"NSpid:\t{container.agent_pid}\t" in status  # a pid in a namespace of its own
    assert f"NSpid:\t{container.init}\t1\n" in Path(f"/proc/{container.init}/status").read_text()


# -- the access token -----------------------------------------------------------------------------------

TOKEN_PROBE = """
import json, os, sys
token, agent = sys.argv[1].encode(), int(sys.argv[2])

def try_read(path):
    try:
        with open(path, "rb") as handle:
            return "leaked" if token in handle.read() else "readable"
    except PermissionError:
        return "denied"
    except OSError as error:
        return "opened" if path.endswith("/mem") else repr(error)

found = []
for pid in os.listdir("/proc"):
    if pid.isdigit() and try_read(f"/proc/{pid}/environ") == "leaked":
        found.append(int(pid))
print(json.dumps({
    "in_env": any(token.decode() in value for value in os.environ.values()),
    "environ": {pid: try_read(f"/proc/{pid}/environ") for pid in (1, agent)},
    "mem": {pid: try_read(f"/proc/{pid}/mem") for pid in (1, agent)},
    "found": found,
}))
"""


def test_user_code_cannot_read_the_access_token(sandbox: Any) -> None:
    # $PPID of the command's shell is the agent; PID 1 is the init, which was started with the token too.
    result = sandbox.commands.run(
        f"{shlex.quote(sys.executable)} -c {shlex.quote(TOKEN_PROBE)} {shlex.quote(ACCESS_TOKEN)} $PPID"
    )
    probe = json.loads(result.stdout)
    assert probe["in_env"] is False
    assert len(probe["environ"]) == 2  # PID 1 and the agent
    assert set(probe["environ"].values()) == {"denied"}
    assert set(probe["mem"].values()) == {"denied"}
    assert probe["found"] == []


def test_the_agents_environment_is_closed_to_its_own_uid(container: Container) -> None:
    for pid in (container.init, container.agent_pid):
        # Same uid, from outside the sandbox: without PR_SET_DUMPABLE=0 this would print the token.
        read = subprocess.run(
            ["cat", f"/proc/{pid}/environ"],
            user=container.uid,
            group=container.uid,
            extra_groups=[],
            capture_output=True,
            timeout=10,
        )
        assert read.returncode != 0 and b"Permission denied" in read.stderr, (pid, read)
        # What root sees: the token was there at exec, so only dumpable=0 keeps it from the uid.
        assert ACCESS_TOKEN.encode() in Path(f"/proc/{pid}/environ").read_bytes()


# -- the process limit ----------------------------------------------------------------------------------

HOLDER = """
import os, sys, time
count = 0
while True:
    try:
        pid = os.fork()
    except BlockingIOError:
        break
    if pid == 0:
        time.sleep(600)
        os._exit(0)
    count += 1
with open(sys.argv[1], "w") as marker:
    marker.write(str(count))
time.sleep(600)
"""


def test_a_full_process_table_is_resource_exhausted_not_a_bad_request(sandbox: Any, container: Container) -> None:
    marker = container.root / "home" / "process-table-full"
    holder = sandbox.commands.run(
        f"{shlex.quote(sys.executable)} -c {shlex.quote(HOLDER)} {shlex.quote(str(marker))}",
        background=True,
        timeout=0,
    )
    try:
        wait_until(marker.exists, timeout=30, message="the holder to fill the process table")
        with pytest.raises(RateLimitException, match=r"process limit is reached \(EAGAIN\)"):
            sandbox.commands.run("true")
        with pytest.raises(RateLimitException, match=r"process limit is reached \(EAGAIN\)"):
            sandbox.pty.create(PtySize(rows=24, cols=80))
        # Liveness does not depend on spawning anything.
        assert container.agent.request("GET", "/health")[0] == 204
    finally:
        assert sandbox.commands.kill(holder.pid) is True
    assert container.live_processes() == []
    wait_until(lambda: sandbox.commands.run("echo free").stdout == "free\n", timeout=10, message="a free table")


# -- killing process trees ------------------------------------------------------------------------------


def test_kill_ends_a_fork_bomb_that_outlived_its_first_shell(sandbox: Any, container: Container) -> None:
    # Output to /dev/null: a bomb writing "fork: retry" to the command's stderr would die of SIGPIPE
    # once the agent reports the command's end and closes its pipes.
    bomb = sandbox.commands.run(":(){ :|:& };: >/dev/null 2>&1", background=True, timeout=0)
    wait_until(lambda: len(container.live_processes()) >= 30, timeout=30, message="the fork bomb to spread")
    # The first shell returned at once: the command has ended, what it started has not.
    wait_until(
        lambda: bomb.pid not in [process.pid for process in sandbox.commands.list()],
        timeout=10,
        message="the bomb's first shell to be reported as ended",
    )
    assert sandbox.commands.kill(bomb.pid) is True
    # commands.kill answers once the whole tree is gone.
    assert container.live_processes() == []
    assert sandbox.commands.kill(bomb.pid) is False
    wait_until(lambda: sandbox.commands.run("echo usable").stdout == "usable\n", timeout=10, message="usable")


def test_kill_and_timeout_end_the_whole_tree_of_a_running_command(sandbox: Any, container: Container) -> None:
    # A background job, an orphan re-parented to PID 1, and a process in a process group of its own
    # (what a job-control shell makes): all in the command's session.
    python = shlex.quote(sys.executable)
    tree = f"sleep 300 & (sleep 300 &); {python} -c 'import os, time; os.setpgid(0, 0); time.sleep(300)' & wait"
    handle = sandbox.commands.run(tree, background=True, timeout=0)
    wait_until(lambda: len(container.live_processes()) >= 4, timeout=10, message="the tree to start")
    assert sandbox.commands.kill(handle.pid) is True
    assert container.live_processes() == []

    with pytest.raises(TimeoutException):
        sandbox.commands.run(f"{tree} # then time out", timeout=2)
    wait_until(lambda: container.live_processes() == [], timeout=10, message="the timed-out tree to be gone")


# -- PID 1 ----------------------------------------------------------------------------------------------


def test_orphans_are_reaped_by_pid_1(sandbox: Any, container: Container) -> None:
    sandbox.commands.run("for i in $(seq 20); do (sleep 1 >/dev/null 2>&1 &); done")
    orphans = [process for process in container.live_processes() if process.name == "sleep"]
    assert orphans and all(process.ppid == container.init for process in orphans)

    def no_zombies() -> bool:
        return not [process for process in processes_of(container.uid) if process.state == "Z"]

    wait_until(lambda: not container.live_processes() and no_zombies(), timeout=15, message="the orphans reaped")


def test_a_stopped_agent_is_resumed(sandbox: Any, container: Container) -> None:
    # The command stops the agent that runs it; only the init's SIGCONT lets the output reach us.
    result = sandbox.commands.run("kill -STOP $PPID; sleep 0.3; echo after", timeout=30)
    assert result.stdout == "after\n"
    assert "the agent was stopped by SIGSTOP; resuming it" in container.log()


def test_signals_to_pid_1_from_inside_are_ignored(sandbox: Any, container: Container) -> None:
    sandbox.commands.run("for s in TERM INT HUP QUIT USR1 USR2; do kill -$s 1; done; sleep 0.5")
    assert sandbox.commands.run("echo alive").stdout == "alive\n"
    assert "ignored SIGTERM from pid" in container.log()
    assert container.agent.process.poll() is None


def test_sigterm_from_outside_stops_the_sandbox_cleanly(plane: FakeControlPlane) -> None:
    stopped = start_container(BASE_UID + 1)
    try:
        sdk(plane, stopped).commands.run("sleep 300", background=True, timeout=0)
        wait_until(stopped.live_processes, timeout=10, message="the background command")
        os.kill(stopped.init, signal.SIGTERM)  # from outside the namespace, like the runtime
        assert stopped.agent.process.wait(timeout=20) == 0
        assert "sandbox-agent stopping" in stopped.log()
        wait_until(lambda: not processes_of(stopped.uid), timeout=10, message="nothing of the sandbox left")
    finally:
        remove_container(stopped)


def test_pid_1_exits_with_the_agents_status_and_takes_the_rest_along(plane: FakeControlPlane) -> None:
    crashed = start_container(BASE_UID + 2)
    try:
        sdk(plane, crashed).commands.run("sleep 300", background=True, timeout=0)
        wait_until(crashed.live_processes, timeout=10, message="the background command")
        os.kill(crashed.agent_pid, signal.SIGKILL)
        assert crashed.agent.process.wait(timeout=20) == 128 + signal.SIGKILL
        wait_until(lambda: not processes_of(crashed.uid), timeout=10, message="nothing of the sandbox left")
    finally:
        remove_container(crashed)
