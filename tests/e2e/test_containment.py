"""Containment: what user code can do to its own sandbox, on the container node (real containers:
the pod's memory cgroup, process limit, read-only root, non-root user), through the unmodified SDKs.

Each test ends with the sandbox usable again (or proves it never stopped being usable)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from e2b import CommandExitException, NotEnoughSpaceException, RateLimitException
from e2b_code_interpreter import Sandbox
from e2elib import Gateway

from sandbox_operator.api.names import SANDBOX_ID_LABEL
from testlib import CODE_INTERPRETER_TEMPLATE, Cluster, sandbox_manifest, wait_phase, wait_until

# Memory the bombs ask for: well above the templates' 512 MiB limit.
BOMB_BYTES = 2 * 1024**3


@pytest.fixture
def sbx(cluster: Cluster, gateway: Gateway) -> Iterator[Sandbox]:
    sandbox = Sandbox.create(template="code-interpreter", timeout=300, **gateway.sdk())
    assert pods_of(cluster, gateway.namespace, sandbox.sandbox_id), "the sandbox's pod is found by its id label"
    try:
        yield sandbox
    finally:
        sandbox.kill()
        # Its container gone too: the pids limit counts the uid's processes node-wide, so a dying
        # fork bomb must not meet the next test's sandbox.
        wait_until(
            lambda: not pods_of(cluster, gateway.namespace, sandbox.sandbox_id),
            timeout=60,
            message=f"the pods of {sandbox.sandbox_id} gone",
        )


def pods_of(cluster: Cluster, namespace: str, sandbox_id: str) -> list[Any]:
    listing = cluster.get_json("pods", "-n", namespace, "-l", f"{SANDBOX_ID_LABEL}={sandbox_id}") or {}
    return list(listing.get("items", []))


def usable(sandbox: Sandbox) -> bool:
    try:
        return bool(sandbox.commands.run("echo ok", timeout=10).stdout.strip() == "ok")
    except Exception:
        return False


def test_the_sandbox_runs_as_its_user_in_its_home(sbx: Sandbox) -> None:
    run = sbx.commands.run("id; pwd; echo $HOME; stat -c %U ~/.; ps -o pid=,comm= -p 1")
    lines = run.stdout.splitlines()
    assert lines[0].startswith("uid=1000(user) gid=1000(user)")
    assert lines[1:3] == ["/home/user", "/home/user"]
    pid1 = lines[-1].split()
    assert pid1[0] == "1" and pid1[1] in ("tini", "sandbox-agent", "python3"), "an init reaps orphans"
    written = sbx.files.write("owned.txt", "mine")
    info = sbx.files.get_info(written.path)
    assert info.owner == "user" and info.group == "user"


def test_a_memory_bomb_in_run_code_kills_the_kernel_not_the_sandbox(sbx: Sandbox) -> None:
    sbx.run_code("kept = 41")
    bomb = sbx.run_code(f"hog = b'x' * {BOMB_BYTES}", timeout=120)
    assert bomb.error is not None, "the kernel's death is reported as an execution error"
    assert "out of memory" in f"{bomb.error.name} {bomb.error.value}".lower()
    # The agent lives and the next execution gets a fresh kernel.
    assert usable(sbx)
    assert sbx.run_code("1 + 1").text == "2"
    assert sbx.run_code("'kept' in globals()").text == "False"


def test_a_memory_bomb_in_a_command_exits_137(sbx: Sandbox) -> None:
    with pytest.raises(CommandExitException) as failure:
        sbx.commands.run(f"python3 -c 'hog = b\"x\" * {BOMB_BYTES}'", timeout=120)
    assert failure.value.exit_code == 137
    assert usable(sbx)


def test_a_full_workspace_refuses_writes_and_recovers_after_a_delete(sbx: Sandbox) -> None:
    # The workspace is the template's 1 GiB claim, a filesystem of that size.
    fill = sbx.commands.run("dd if=/dev/zero of=/home/user/fill bs=1M count=2048 2>&1; df -k /home/user", timeout=120)
    assert "No space left on device" in fill.stdout
    with pytest.raises(NotEnoughSpaceException):
        sbx.files.write("after.txt", b"y" * (4 * 1024 * 1024))
    sbx.commands.run("rm /home/user/fill")
    sbx.files.write("after.txt", b"y" * (4 * 1024 * 1024))
    assert sbx.files.get_info("after.txt").size == 4 * 1024 * 1024


def test_a_fork_bomb_is_bounded_and_killed_with_its_whole_tree(sbx: Sandbox) -> None:
    # The bomb's first shell returns at once; its tree stays killable by the command's pid.
    handle = sbx.commands.run(":(){ :|:& };:", background=True)

    # It fills the pids limit (RLIMIT_NPROC): spawning is refused with resource_exhausted while it
    # lives (its population swings, so a single try may slip through a gap)...
    def refused_for_the_process_limit() -> bool:
        try:
            sbx.commands.run("true", timeout=10)
        except RateLimitException as refused:
            return "process limit" in str(refused)
        except Exception:
            return False
        return False

    wait_until(refused_for_the_process_limit, timeout=60, message="a spawn refused for the process limit")
    # ...and killing the command ends its whole tree: the sandbox is usable again within seconds.
    assert sbx.commands.kill(handle.pid)
    wait_until(lambda: usable(sbx), timeout=30, message="the sandbox usable after the fork bomb")
    left = sbx.commands.run("ps -e -o comm= | grep -c bash || true").stdout.strip()
    assert int(left or 0) <= 2, f"fork bomb processes left: {left}"


def test_a_stopped_command_is_killed_with_its_children(sbx: Sandbox) -> None:
    handle = sbx.commands.run("sleep 300 & sleep 301 & wait", background=True)
    wait_until(
        lambda: "sleep 301" in sbx.commands.run("ps -e -o args=").stdout,
        timeout=30,
        message="the command's children running",
    )
    assert handle.kill()
    wait_until(
        lambda: "sleep 30" not in sbx.commands.run("ps -e -o args=").stdout,
        timeout=30,
        message="the children gone with the command",
    )


def test_the_root_filesystem_refuses_writes(cluster: Cluster, gateway: Gateway) -> None:
    body = CODE_INTERPRETER_TEMPLATE % "ro-root"
    cluster.apply(body.replace("  timeouts:", "  security: {readOnlyRootFilesystem: true}\n  timeouts:"))
    sandbox = Sandbox.create(template="ro-root", timeout=120, **gateway.sdk())
    try:
        run = sandbox.commands.run("touch /usr/x /etc/x 2>&1; echo hi > /tmp/ok && cat /tmp/ok", timeout=30)
        assert run.stdout.count("Read-only file system") == 2
        assert run.stdout.strip().endswith("hi"), "/tmp and the workspace stay writable"
        sandbox.files.write("still-writable.txt", "yes")
    finally:
        sandbox.kill()
    default = Sandbox.create(template="code-interpreter", timeout=120, **gateway.sdk())
    try:
        run = default.commands.run("touch /usr/x 2>&1 || true", timeout=30)
        assert "Permission denied" in run.stdout, "root-owned image files stay root's"
    finally:
        default.kill()


SCAN = """
import os
token = TOKEN
found, refused = [], []
for pid in filter(str.isdigit, os.listdir('/proc')):
    for name in ('environ', 'cmdline', 'mem'):
        try:
            with open(f'/proc/{pid}/{name}', 'rb') as handle:
                data = handle.read(1 << 20) if name != 'mem' else handle.read(1)
            if token.encode() in data:
                found.append(f'{pid}/{name}')
        except OSError as error:
            refused.append(f'{pid}/{name}:{error.errno}')
print(found, len(refused) > 0)
"""


def test_user_code_cannot_read_the_access_token(cluster: Cluster, namespace: str, operator: object) -> None:
    cluster.apply(CODE_INTERPRETER_TEMPLATE % "tokened")
    cluster.apply(sandbox_manifest("tok", template="tokened"), namespace)
    status_now = wait_phase(cluster, namespace, "tok", "Running", timeout=120)["status"]
    ip = status_now["podIP"]
    # The operator gave the pod its own token (derived from the key the gateway holds too).
    pod = cluster.get_json("pod", status_now["podName"], "-n", namespace)
    (token,) = [e["value"] for e in pod["spec"]["containers"][0]["env"] if e["name"] == "SANDBOX_ACCESS_TOKEN"]
    assert pod["metadata"]["annotations"]["sandbox.dev/agent-token-id"] == status_now["agentTokenId"]

    def execute(code: str, access_token: str | None) -> tuple[int, str]:
        headers = {"Content-Type": "application/json", **({"X-Access-Token": access_token} if access_token else {})}
        request = urllib.request.Request(
            f"http://{ip}:49999/execute", data=json.dumps({"code": code}).encode(), headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    assert execute("1", None)[0] == 401, "the agent requires its token"
    status, output = execute(SCAN.replace("TOKEN", repr(token)), token)
    assert status == 200, output
    stdout = "".join(
        json.loads(line).get("text", "") for line in output.splitlines() if json.loads(line).get("type") == "stdout"
    )
    assert stdout.startswith("[] True"), f"the token is readable at {stdout}"
    # Nor from a shell command's environment.
    status, output = execute("import os; print(sorted(k for k in os.environ if 'TOKEN' in k))", token)
    assert "SANDBOX_ACCESS_TOKEN" not in output
