"""A sandbox on the container node reaches PyPI over TLS: the node gives its containers the
machine's CA bundle (`--ca-bundle`, passed by testlib.local_cluster when the machine has one; this
machine's network intercepts TLS) and the host's name servers in /etc/resolv.conf. The images
themselves carry only Debian's bundle. This is what the session API's `POST /install` relies on."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2b import Sandbox
from e2elib import Gateway

from testlib import MACHINE_CA_BUNDLE

COMMAND_TIMEOUT = 120  # s: one download of a 11 kB wheel, with pip's own 30 s network timeout


@pytest.fixture(scope="module")
def sandbox(gateway: Gateway) -> Iterator[Any]:
    box = Sandbox.create(template="base", timeout=300, **gateway.sdk())
    try:
        yield box
    finally:
        box.kill()


def test_the_container_trusts_the_machines_cas_read_only(sandbox: Any) -> None:
    digest = sandbox.commands.run("sha256sum /etc/ssl/certs/ca-certificates.crt", timeout=30).stdout.split()[0]
    assert digest == hashlib.sha256(MACHINE_CA_BUNDLE.read_bytes()).hexdigest()
    mounts = sandbox.commands.run("cat /proc/self/mountinfo", timeout=30).stdout
    (line,) = [m for m in mounts.splitlines() if m.split()[4] == "/etc/ssl/certs/ca-certificates.crt"]
    assert "ro" in line.split()[5].split(","), line


def test_the_container_resolves_pypi_with_the_hosts_name_servers(sandbox: Any) -> None:
    resolv = sandbox.commands.run("cat /etc/resolv.conf", timeout=30).stdout
    host = Path("/etc/resolv.conf").read_text()
    host_servers = [line.split()[1] for line in host.splitlines() if line.startswith("nameserver")]
    assert [line.split()[1] for line in resolv.splitlines() if line.startswith("nameserver")] == host_servers
    found = sandbox.commands.run(
        "python3 -c \"import socket; print(socket.getaddrinfo('pypi.org', 443)[0][4][0])\"", timeout=30
    )
    assert found.exit_code == 0 and found.stdout.strip(), found.stderr


def test_pip_downloads_from_pypi_in_a_sandbox(sandbox: Any) -> None:
    run = sandbox.commands.run(
        "python3 -m pip download --no-deps --disable-pip-version-check --timeout 30 --dest /tmp/d six",
        timeout=COMMAND_TIMEOUT,
    )
    assert run.exit_code == 0, run.stderr
    wheels = sandbox.commands.run("ls /tmp/d", timeout=30).stdout.split()
    assert len(wheels) == 1 and wheels[0].startswith("six-") and wheels[0].endswith(".whl"), wheels
    size = int(sandbox.commands.run(f"stat -c %s /tmp/d/{wheels[0]}", timeout=30).stdout)
    assert size > 1000, size


def test_curl_reaches_pypi_over_tls(sandbox: Any) -> None:
    run = sandbox.commands.run("curl -sSf --max-time 30 https://pypi.org/simple/six/", timeout=60)
    assert run.exit_code == 0, run.stderr
    assert "six-" in run.stdout
