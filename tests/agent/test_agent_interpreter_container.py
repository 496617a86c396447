"""The code interpreter under a container's limits: a process limit (RLIMIT_NPROC, non-root) and a
memory cgroup. The agent runs as in a sandbox pod: unprivileged, limited, with its cgroup to read."""

from __future__ import annotations

import json
import os
import pwd
import resource
import secrets
import shutil
import signal
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentlib import STARTUP_DEADLINE, AgentProcess, start_agent, stop_agent

from testlib import wait_until

# Room for the agent and two or three kernels (~10 tasks each: threads count), so that a few
# contexts start and then one cannot.
NPROC_LIMIT = 40
MEMORY_LIMIT = 300 * 1024 * 1024
PROCESS_LIMIT_TEXT = "cannot start a kernel: the sandbox's process limit is reached"
# Unprivileged system accounts the test may borrow; one with no process at all is used (RLIMIT_NPROC
# counts every task of the uid on the machine).
CANDIDATE_USERS = ("irc", "list", "gnats", "news", "uucp", "proxy", "backup", "games", "lp", "man")


def request(
    agent: AgentProcess, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 150
) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    url = agent.interpreter_url + path
    sent = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(sent, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def run_code(agent: AgentProcess, code: str, context_id: str | None = None) -> list[dict[str, Any]]:
    status, body = request(agent, "POST", "/execute", {"code": code, "context_id": context_id})
    assert status == 200, body
    return [json.loads(line) for line in body.splitlines() if line.strip()]


def main_text(lines: list[dict[str, Any]]) -> str | None:
    return next((line.get("text") for line in lines if line["type"] == "result" and line["is_main_result"]), None)


def healthy(agent: AgentProcess) -> bool:
    try:
        with urllib.request.urlopen(agent.interpreter_url + "/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def tasks(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def spawn_agent(
    root: Path, *, env: dict[str, str], argv_prefix: tuple[str, ...] = (), preexec: Any = None
) -> AgentProcess:
    """agentlib.start_agent behind `argv_prefix` (e.g. setpriv) with HOME at its workdir, once its
    code interpreter answers too."""
    agent = start_agent(
        root, token=None, env={"HOME": str(root / "home"), **env}, wrapper=argv_prefix, preexec_fn=preexec
    )
    try:
        wait_until(
            lambda: agent.process.poll() is not None or healthy(agent), timeout=STARTUP_DEADLINE, message="agent"
        )
    except AssertionError:
        stop_agent(agent)
        raise
    if agent.process.poll() is not None:
        raise AssertionError(f"agent exited with {agent.process.returncode}: {agent.log_path.read_text()}")
    return agent


def agent_pid(agent: AgentProcess) -> int:
    """The agent's own pid (behind setpriv, which execs it, the Popen pid is the agent's)."""
    return agent.process.pid


# -- the process limit --------------------------------------------------------------------------


def uids_in_use() -> set[int]:
    uids = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                for line in Path("/proc", name, "status").read_text().splitlines():
                    if line.startswith("Uid:"):
                        uids.add(int(line.split()[1]))
            except OSError:
                continue
    return uids


def idle_unprivileged_user() -> pwd.struct_passwd | None:
    busy = uids_in_use()
    for name in CANDIDATE_USERS:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid != 0 and entry.pw_uid not in busy:
            return entry
    return None


@pytest.fixture()
def nproc_agent() -> Iterator[AgentProcess]:
    if os.geteuid() != 0:
        pytest.skip("switching to an unprivileged uid needs root")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    user = idle_unprivileged_user()
    if user is None:
        pytest.skip(f"none of the accounts {', '.join(CANDIDATE_USERS)} exists without running processes")
    # Not under pytest's tmp_path: its parents are private to root.
    root = Path(tempfile.mkdtemp(prefix="agent-nproc-"))
    root.chmod(0o755)
    workdir = root / "home"
    workdir.mkdir()
    os.chown(workdir, user.pw_uid, user.pw_gid)

    def limit() -> None:
        # RLIMIT_NPROC binds every process but root's; it stands in for the container's pids limit.
        resource.setrlimit(resource.RLIMIT_NPROC, (NPROC_LIMIT, NPROC_LIMIT))

    # The ambient CAP_DAC_READ_SEARCH only lets the unprivileged agent read this machine's Python
    # under /root; RLIMIT_NPROC is waived only for CAP_SYS_RESOURCE/CAP_SYS_ADMIN.
    prefix = (
        setpriv,
        f"--reuid={user.pw_uid}",
        f"--regid={user.pw_gid}",
        "--clear-groups",
        "--inh-caps=+dac_read_search",
        "--ambient-caps=+dac_read_search",
        "--",
    )
    agent = spawn_agent(root, env={}, argv_prefix=prefix, preexec=limit)
    try:
        yield agent
    finally:
        stop_agent(agent)
        log = (root / "agent.log").read_text(errors="replace")
        shutil.rmtree(root, ignore_errors=True)
        print(log[-4000:])


def test_a_kernel_start_refused_by_the_process_limit_is_a_clear_503_and_the_agent_lives(
    nproc_agent: AgentProcess,
) -> None:
    agent = nproc_agent
    status_lines = Path(f"/proc/{agent_pid(agent)}/status").read_text().splitlines()
    assert next(line for line in status_lines if line.startswith("Uid:")).split()[1] != "0"
    status, body = request(agent, "POST", "/contexts", {})
    assert status == 200, body
    first = json.loads(body)["id"]
    assert main_text(run_code(agent, "x = 41\nx", first)) == "41"
    threads = tasks(agent_pid(agent))

    contexts = [first]
    refusal: tuple[int, bytes] | None = None
    for _ in range(8):  # each kernel takes ~10 of the 40 tasks
        status, body = request(agent, "POST", "/contexts", {})
        if status != 200:
            refusal = (status, body)
            break
        contexts.append(json.loads(body)["id"])
        # A kernel start costs the agent no thread: one shared zmq context, no heartbeat thread.
        assert tasks(agent_pid(agent)) == threads
    assert refusal is not None, f"{len(contexts)} kernels started under RLIMIT_NPROC={NPROC_LIMIT}"
    status, body = refusal
    assert status == 503, body
    error = json.loads(body)
    assert error["code"] == 503 and PROCESS_LIMIT_TEXT in error["message"], error

    # The agent lives, answers, and the kernels it has keep working.
    assert agent.process.poll() is None
    assert healthy(agent)
    assert main_text(run_code(agent, "x + 1", first)) == "42"
    assert tasks(agent_pid(agent)) == threads
    # run_code in a new default context: the same error, as the SDK shows it.
    from e2b import SandboxException
    from e2b_code_interpreter import Sandbox

    sandbox = Sandbox.create(debug=True, sandbox_url=agent.envd_url)
    with pytest.raises(SandboxException, match=r"503.*process limit is reached"):
        sandbox.run_code("1")

    # Freeing a kernel's share of the limit lets a new one start: nothing of the failures is left over.
    status, _ = request(agent, "DELETE", f"/contexts/{contexts.pop()}")
    assert status == 204
    status, body = request(agent, "POST", "/contexts", {})
    assert status == 200, body
    assert main_text(run_code(agent, "'fresh'", json.loads(body)["id"])) == "fresh"


# -- the memory cgroup --------------------------------------------------------------------------


def own_memory_cgroup() -> Path | None:
    """This process's memory cgroup directory (v1 `memory` hierarchy or the v2 unified one)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return Path("/sys/fs/cgroup") / line[3:].lstrip("/")
    return None


def kill_members(cgroup: Path) -> None:
    for pid in (cgroup / "cgroup.procs").read_text().split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture()
def memory_cgroup() -> Iterator[Path]:
    """A child memory cgroup of this process's own, limited to MEMORY_LIMIT; removed afterwards."""
    parent = own_memory_cgroup()
    if parent is None or not parent.is_dir():
        pytest.skip("this process is in no memory cgroup")
    child = parent / f"agent-test-{secrets.token_hex(4)}"
    try:
        child.mkdir()
    except OSError as error:
        pytest.skip(f"cannot create a memory cgroup under {parent}: {error}")
    try:
        v1 = (child / "memory.limit_in_bytes").exists()
        try:
            if v1:
                (child / "memory.limit_in_bytes").write_text(str(MEMORY_LIMIT))
                if (child / "memory.memsw.limit_in_bytes").exists():  # no swapping instead of the OOM kill
                    (child / "memory.memsw.limit_in_bytes").write_text(str(MEMORY_LIMIT))
            else:
                (child / "memory.max").write_text(str(MEMORY_LIMIT))
                (child / "memory.swap.max").write_text("0")
        except OSError as error:
            pytest.skip(f"cannot limit the memory cgroup {child}: {error}")
        yield child
    finally:
        # Every process in it is one this test started (the agent and its kernels).
        deadline = time.monotonic() + 20
        while (child / "cgroup.procs").read_text().split() and time.monotonic() < deadline:
            kill_members(child)
            time.sleep(0.1)
        for pid in (child / "cgroup.procs").read_text().split():
            with open(parent / "cgroup.procs", "w") as procs:  # a straggler: out of the way
                procs.write(pid)
        for _ in range(50):
            try:
                child.rmdir()
                break
            except OSError:
                time.sleep(0.1)
        assert not child.exists(), f"could not remove the test cgroup {child}"


@pytest.fixture()
def memory_agent(memory_cgroup: Path, tmp_path: Path) -> Iterator[AgentProcess]:
    procs = str(memory_cgroup / "cgroup.procs")

    def join_cgroup() -> None:
        with open(procs, "w") as members:
            members.write(str(os.getpid()))

    workdir = tmp_path / "home"
    workdir.mkdir()
    agent = spawn_agent(tmp_path, env={"SANDBOX_CGROUP_ROOT": str(memory_cgroup)}, preexec=join_cgroup)
    try:
        assert str(agent.process.pid) in (memory_cgroup / "cgroup.procs").read_text().split()
        yield agent
    finally:
        stop_agent(agent)


def test_a_kernel_killed_for_memory_says_out_of_memory_and_the_next_run_works(memory_agent: AgentProcess) -> None:
    assert main_text(run_code(memory_agent, "state = 1\n'ready'")) == "ready"
    started = time.monotonic()
    lines = run_code(
        memory_agent,
        "chunks = []\nwhile True:\n    chunks.append(b'x' * (50 * 1024 * 1024))  # written, so resident",
    )
    elapsed = time.monotonic() - started
    print(f"\nOOM kill: the execution ended {elapsed:.3f}s after it was sent")
    errors = [line for line in lines if line["type"] == "error"]
    assert len(errors) == 1, lines
    assert errors[0]["name"] == "ContextRestarting"
    assert errors[0]["value"].startswith("the kernel died: out of memory (memory limit 300 MiB)"), errors[0]
    assert elapsed < 20
    assert memory_agent.process.poll() is None
    assert healthy(memory_agent)
    after = run_code(memory_agent, "'state' in dir()")
    assert [line for line in after if line["type"] == "error"] == []
    assert main_text(after) == "False"
