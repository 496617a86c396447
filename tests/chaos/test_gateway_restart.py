"""Fault: the gateway dies (SIGKILL) with requests in flight, and a new process takes its port; and
two gateway replicas behind one address.

The gateway holds no state of its own: sandboxes are Kubernetes objects, the access tokens derive
from the token key it shares with the operator, the API keys are Secrets. So a restarted gateway, or
another replica, serves every sandbox as the first did. What a restart cuts is what was in flight:
the SDK call fails at once (no hang), while the sandbox is untouched: a command started in the
foreground keeps running (E2B: a client going away does not stop a command, docs/agent.md) and
`commands.connect(pid)` re-attaches to it, and an upload cut short leaves the old file, never a
truncated one.

Like test_agent_crash.py, the module runs on a private control plane on the container node: the
sandboxes are real containers of the small base image.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from agentcrashlib import PERSISTENT_TEMPLATE
from chaoslib import Gateway, gateway_on, private_container_cluster
from e2b import CommandExitException, Sandbox, SandboxUnreachableException
from gatewayrestartlib import RoundRobin, kill, replica, restart

from testlib import Cluster, OperatorProcess, wait_until

TEMPLATE = "restart-base"
MiB = 1024 * 1024
# A line every 0.2 s, numbered, for about five minutes (the test kills it long before).
STREAM = "for i in $(seq 1 1500); do echo line $i; sleep 0.2; done"


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if request.config.getoption("--kubeconfig"):
        pytest.skip("the test needs sandboxes that really run: the container node the fixtures start")
    with private_container_cluster(tmp_path_factory) as started:
        yield started


@pytest.fixture(scope="module")
def gateway(cluster: Cluster, operator: OperatorProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with gateway_on(
        cluster, tmp_path_factory.mktemp("gateway-restart"), PERSISTENT_TEMPLATE % TEMPLATE, "op-gwrestart"
    ) as handle:
        yield handle


@pytest.fixture
def sandbox(cluster: Cluster, gateway: Gateway) -> Iterator[Sandbox]:
    if gateway.process.poll() is not None:
        restart(cluster, gateway)  # a test before failed between its kill and its restart
    sbx = Sandbox.create(template=TEMPLATE, timeout=600, **gateway.sdk())
    try:
        yield sbx
    finally:
        if gateway.process.poll() is None:
            Sandbox.kill(sbx.sandbox_id, **gateway.sdk())  # else it goes with the namespace


class Background:
    """`call` in a thread: its result or what it raised (the SDK's exception is the finding)."""

    def __init__(self, call: Callable[[], object]) -> None:
        self.outcome: object = None
        self._call = call
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.outcome = self._call()
        except BaseException as error:
            self.outcome = error

    def ended_within(self, seconds: float) -> bool:
        self._thread.join(seconds)
        return not self._thread.is_alive()


class Lines:
    """The numbers of the `line N` lines of STREAM seen on stdout, in order of arrival."""

    def __init__(self) -> None:
        self.numbers: list[int] = []
        self._partial = ""

    def __call__(self, text: str) -> None:
        *complete, self._partial = (self._partial + text).split("\n")
        self.numbers += [int(found.group(1)) for line in complete if (found := re.fullmatch(r"line (\d+)", line))]


def _streaming_pid(sbx: Sandbox) -> int | None:
    found = [process.pid for process in sbx.commands.list() if STREAM in process.args]
    return found[0] if found else None


@pytest.mark.timeout(600)  # the private cluster's start-up is counted too; each wait has its own deadline
def test_a_streaming_command_survives_a_gateway_restart(cluster: Cluster, gateway: Gateway, sandbox: Sandbox) -> None:
    sandbox.files.write("kept.txt", "written before the restart\n")
    before = Lines()
    streaming = Background(lambda: sandbox.commands.run(STREAM, timeout=0, on_stdout=before))
    wait_until(lambda: len(before.numbers) >= 3, timeout=60, message=f"the first lines ({streaming.outcome!r})")
    pid = _streaming_pid(sandbox)
    assert pid is not None

    assert kill(gateway) == -9
    # The call ends at once with the SDK's error for a connection lost mid-stream whose health probe
    # finds no gateway either ("could not be reached"), not with a result and not hanging.
    assert streaming.ended_within(30), "commands.run still hangs 30 s after the gateway died"
    error = streaming.outcome
    print(f"commands.run mid-stream, gateway SIGKILLed: {type(error).__name__}: {error}")
    assert isinstance(error, SandboxUnreachableException), repr(error)
    last_seen = before.numbers[-1]

    restart(cluster, gateway)
    again = Sandbox.connect(sandbox.sandbox_id, **gateway.sdk())
    assert again.files.read("kept.txt") == "written before the restart\n"
    assert sandbox.files.read("kept.txt") == "written before the restart\n"  # the old handle works too
    # The command ran on in the sandbox (no client needed), the same process: re-attach and read on.
    assert _streaming_pid(again) == pid
    after = Lines()
    attached = again.commands.connect(pid, timeout=120)
    waiting = Background(lambda: attached.wait(on_stdout=after))
    wait_until(lambda: len(after.numbers) >= 3, timeout=30, message=f"output after re-attaching ({waiting.outcome!r})")
    assert after.numbers[0] > last_seen, (last_seen, after.numbers)  # the same run, not a new one, nor a replay
    assert after.numbers == list(range(after.numbers[0], after.numbers[0] + len(after.numbers)))

    assert again.commands.kill(pid) is True
    assert waiting.ended_within(30)
    print(f"the re-attached command killed: {type(waiting.outcome).__name__}: {waiting.outcome}")
    assert isinstance(waiting.outcome, CommandExitException), repr(waiting.outcome)
    wait_until(lambda: _streaming_pid(again) is None, timeout=10, message="the killed command gone from the list")


class HeldUpload:
    """An upload body of `data` in 1 MiB chunks that stops after `hold_after` bytes until `release()`:
    the test acts while the body is being sent."""

    def __init__(self, data: bytes, hold_after: int) -> None:
        self.data = data
        self.hold_after = hold_after
        self.held = threading.Event()
        self._released = threading.Event()

    def release(self) -> None:
        self._released.set()

    def __iter__(self) -> Iterator[bytes]:
        for offset in range(0, len(self.data), MiB):
            if offset == self.hold_after:
                self.held.set()
                assert self._released.wait(120), "the held upload was never released"
            yield self.data[offset : offset + MiB]


def _sizes(sbx: Sandbox, directory: str) -> dict[str, int]:
    """Every file in `directory` (hidden ones too): name → size."""
    listing = sbx.commands.run(f"cd {directory} && find . -type f -printf '%s %P\\n'").stdout
    return {name: int(size) for size, name in (line.split(" ", 1) for line in listing.splitlines())}


def _files_in(sbx: Sandbox, directory: str) -> dict[str, tuple[int, str]]:
    """Every file in `directory` (hidden ones too): name → (size, sha256)."""
    script = f"cd {directory} && find . -type f -printf '%s %P\\n' | while read -r size name; do"
    script += ' echo "$size $(sha256sum < "$name" | cut -c1-64) $name"; done'
    listing = sbx.commands.run(script).stdout
    return {name: (int(size), digest) for size, digest, name in (line.split(" ", 2) for line in listing.splitlines())}


def _digest(data: bytes) -> tuple[int, str]:
    return len(data), hashlib.sha256(data).hexdigest()


@pytest.mark.timeout(300)
def test_an_upload_cut_by_a_gateway_restart_leaves_the_old_file(
    cluster: Cluster, gateway: Gateway, sandbox: Sandbox
) -> None:
    old = b"the old content, complete\n" * 4096
    new = bytes(range(256)) * (64 * MiB // 256)
    sandbox.files.write("uploads/target.bin", old)
    assert _files_in(sandbox, "uploads") == {"target.bin": _digest(old)}

    body = HeldUpload(new, hold_after=32 * MiB)
    uploading = Background(lambda: sandbox.files.write("uploads/target.bin", body))  # an iterable: streamed
    assert body.held.wait(60), f"the upload never got going: {uploading.outcome!r}"

    # Part of the body is in the sandbox (in whatever file the agent writes it to) before the kill.
    def arrived() -> int:
        return sum(_sizes(sandbox, "uploads").values()) - len(old)

    wait_until(lambda: arrived() >= MiB, timeout=60, message="the first MiB of the upload in the sandbox")
    assert kill(gateway) == -9
    body.release()
    assert uploading.ended_within(30), "files.write still hangs 30 s after the gateway died"
    error = uploading.outcome
    print(f"files.write mid-body, gateway SIGKILLed: {type(error).__name__}: {error}")
    assert isinstance(error, SandboxUnreachableException), repr(error)

    restart(cluster, gateway)
    again = Sandbox.connect(sandbox.sandbox_id, **gateway.sdk())
    # The old file, whole, and nothing else (no partial temporary file left behind).
    settled = wait_until(
        lambda: (found := _files_in(again, "uploads")).keys() == {"target.bin"} and found,
        timeout=30,
        message="only target.bin in uploads/",
    )
    assert settled["target.bin"] in (_digest(old), _digest(new)), f"a truncated mix: {settled}"
    assert settled["target.bin"] == _digest(old)  # the cut body never completed

    info = again.files.write("uploads/target.bin", new)
    assert info.path.endswith("/uploads/target.bin")
    assert _files_in(again, "uploads") == {"target.bin": _digest(new)}


def _sdk(url: str, api_key: str) -> dict[str, Any]:
    return {"api_key": api_key, "api_url": url, "sandbox_url": url}


@pytest.mark.timeout(300)
def test_two_replicas_serve_every_sandbox(
    cluster: Cluster, gateway: Gateway, tmp_path_factory: pytest.TempPathFactory
) -> None:
    first = gateway
    with (
        replica(cluster, first, tmp_path_factory.mktemp("gateway-replica")) as second,
        RoundRobin([int(first.url.rsplit(":", 1)[1]), int(second.url.rsplit(":", 1)[1])]) as spread,
    ):
        # One address in front of both: every call lands on whichever replica its connection went to.
        through = _sdk(spread.url, first.api_key)
        sbx = Sandbox.create(template=TEMPLATE, timeout=600, **through)
        try:
            # A command in the background holds its connection: the calls meanwhile need another one,
            # which goes to the other replica.
            held = sbx.commands.run("sleep 300", background=True)
            assert sbx.commands.run("echo hello").stdout == "hello\n"
            sbx.files.write("notes/a.txt", "through either replica\n")
            assert sbx.files.read("notes/a.txt") == "through either replica\n"
            assert held.kill() is True
            assert sbx.pause() is True
            assert sbx.get_info().state.value == "paused"
            resumed = Sandbox.connect(sbx.sandbox_id, **through)
            assert resumed.commands.run("cat notes/a.txt").stdout == "through either replica\n"
        finally:
            killed = Sandbox.kill(sbx.sandbox_id, **through)
        assert killed is True
        print(f"connections per replica through the round-robin address: {spread.connections}")
        assert all(spread.connections), spread.connections

        # Each step on a named replica: created on the first, run on the second, paused on the second,
        # resumed on the first.
        created = Sandbox.create(template=TEMPLATE, timeout=600, **first.sdk())
        try:
            on_second = Sandbox.connect(created.sandbox_id, **second.sdk())
            assert on_second.commands.run("echo on the second > where.txt && cat where.txt").stdout == "on the second\n"
            assert on_second.pause() is True
            assert Sandbox.get_info(created.sandbox_id, **first.sdk()).state.value == "paused"
            on_first = Sandbox.connect(created.sandbox_id, **first.sdk())
            assert on_first.commands.run("cat where.txt").stdout == "on the second\n"
            assert on_first.get_info().state.value == "running"
        finally:
            assert Sandbox.kill(created.sandbox_id, **second.sdk()) is True
