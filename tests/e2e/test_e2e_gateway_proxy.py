"""The proxy and the public listener through the real gateway, operator and agents (docs/gateway.md,
"Threat model"): the agent is reached with its own token (when its pod has one: the assertions that
need it are skipped for a pod without `status.agentTokenId`), signed file URLs work without a token,
internal paths are refused however spelled, undeclared ports are not proxied; and slow clients are cut
by a second gateway process with tight limits (loopback, a bounded number of connections).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from e2b import Sandbox
from e2elib import Gateway

from sandbox_operator.api.names import ENVD_PORT
from testlib import Cluster, free_port, request_json, wait_until


def sandbox_body(cluster: Cluster, namespace: str, sandbox_id: str) -> dict[str, Any]:
    items = (cluster.get_json("sandboxes", "-n", namespace) or {}).get("items", [])
    (body,) = [item for item in items if item["status"].get("sandboxID") == sandbox_id]
    return dict(body)


def status_of(url: str, headers: dict[str, str] | None = None, method: str = "GET", data: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def raw_status(url: str, target: str, headers: dict[str, str], method: str = "POST") -> int:
    """The status for a request target sent exactly as spelled (urllib and httpx normalise paths)."""
    host, port = url.removeprefix("http://").split(":")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Content-Length: 2", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n{}").encode())
        return int(sock.makefile("rb").readline().split()[1])


def test_the_agent_is_reached_with_its_own_token_and_internal_paths_never(cluster: Cluster, gateway: Gateway) -> None:
    sbx = Sandbox.create(template="base", timeout=120, **gateway.sdk())
    try:
        token = sbx._envd_access_token or ""
        assert sbx.commands.run("echo through").stdout == "through\n"
        route = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": str(ENVD_PORT), "X-Access-Token": token}
        assert status_of(gateway.url + "/envs", route) == 200
        body = sandbox_body(cluster, gateway.namespace, sbx.sandbox_id)
        if body["status"].get("agentTokenId"):
            # The client's token is not the agent's: straight to the pod it is refused, so the gateway's
            # requests above passed with the agent's own token.
            direct = f"http://{body['status']['podIP']}:{ENVD_PORT}/envs"
            assert status_of(direct, {"X-Access-Token": token}) == 401

        # Signed file URLs: no token, the signature stands in (and, with agent tokens, the path is the
        # one the gateway tells the agent). The URLs are the gateway's (sandbox_url): routed by the Host
        # a domain would give them.
        host = {"Host": f"{ENVD_PORT}-{sbx.sandbox_id}.example.com"}
        sbx.files.write("signed/a.txt", "signed\n")
        downloaded = httpx.get(sbx.download_url("signed/a.txt"), headers=host, timeout=30)
        assert downloaded.status_code == 200 and downloaded.content == b"signed\n", downloaded.text
        assert httpx.get(sbx.download_url("signed/a.txt").replace("a.txt", "b.txt"), headers=host).status_code == 401
        upload = sbx.upload_url("signed/b.txt")
        uploaded = httpx.post(upload, headers=host, files={"file": ("b.txt", b"uploaded\n")}, timeout=30)
        assert uploaded.status_code == 200, uploaded.text
        assert sbx.files.read("signed/b.txt") == "uploaded\n"

        for target in ("/./init", "/a/../init", "//init", "/%2e/init", "/%2E%2E/init", "/%69nit", "/x/..//freeze"):
            assert raw_status(gateway.url, target, route) == 403, target
        assert sbx.commands.run("echo still").stdout == "still\n"  # nothing reached /init

        # Only the agent's ports and declared ones are proxied.
        status, answer = request_json("GET", gateway.url + "/", headers={**route, "E2b-Sandbox-Port": "8080"})
        assert status == 502 and "port is not open" in answer["message"]
    finally:
        sbx.kill()


# --- slow clients: a gateway of its own with tight limits -------------------------------------------

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
KEEPALIVE_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 8


@dataclass
class TightGateway:
    host: str
    port: int
    metrics_port: int
    api_key: str


@pytest.fixture(scope="module")
def tight_gateway(
    cluster: Cluster, gateway: Gateway, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TightGateway]:
    port, metrics_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("tight-gateway") / "gateway.log"
    args = [
        *("--kubeconfig", cluster.kubeconfig, "--bind-address", "127.0.0.1"),
        *("--port", str(port), "--metrics-port", str(metrics_port), "--keys-namespace", gateway.namespace),
        *("--header-timeout", str(HEADER_TIMEOUT_S), "--body-timeout", str(BODY_TIMEOUT_S)),
        *("--keepalive-timeout", str(KEEPALIVE_TIMEOUT_S), "--max-connections-per-ip", str(MAX_CONNECTIONS)),
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "sandbox_operator", "gateway", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=cluster.env(),
        )

    def serving() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"gateway exited:\n{log.read_text()}")
        try:
            return request_json("GET", f"http://127.0.0.1:{port}/health")[0] == 200
        except urllib.error.URLError:
            return False

    try:
        wait_until(serving, timeout=60, message="tight gateway /health")
        yield TightGateway("127.0.0.1", port, metrics_port, gateway.api_key)
    finally:
        process.terminate()
        process.wait(timeout=30)


def connect(gw: TightGateway) -> socket.socket:
    sock = socket.create_connection((gw.host, gw.port), timeout=10)
    sock.setblocking(False)
    return sock


def is_closed(sock: socket.socket) -> bool:
    """The gateway closed it: what it sent before is read and dropped, then EOF (or a reset)."""
    try:
        while chunk := sock.recv(65536):
            del chunk
        return True
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def read_all(sock: socket.socket, within: float) -> bytes:
    sock.setblocking(True)
    sock.settimeout(within)
    data = b""
    with contextlib.suppress(ConnectionError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_dribbled_headers_and_idle_connections_are_cut(tight_gateway: TightGateway) -> None:
    dribblers = [connect(tight_gateway) for _ in range(MAX_CONNECTIONS // 2)]
    idle = connect(tight_gateway)
    try:
        started = time.monotonic()
        for sock in dribblers:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")

        def all_cut() -> bool:
            for sock in dribblers:
                with contextlib.suppress(OSError):
                    sock.send(b"X")  # a header byte at every poll: the connection is never idle
            return all(is_closed(sock) for sock in dribblers)

        wait_until(all_cut, timeout=HEADER_TIMEOUT_S + 10, message="dribbling connections cut", interval=0.1)
        assert time.monotonic() - started >= HEADER_TIMEOUT_S * 0.8
        wait_until(lambda: is_closed(idle), timeout=KEEPALIVE_TIMEOUT_S + 10, message="idle connection closed")
        assert request_json("GET", f"http://{tight_gateway.host}:{tight_gateway.port}/health")[0] == 200
    finally:
        for sock in [*dribblers, idle]:
            sock.close()


def test_a_create_whose_body_never_comes_is_answered_408(tight_gateway: TightGateway) -> None:
    sock = connect(tight_gateway)
    try:
        head = f"POST /v2/sandboxes HTTP/1.1\r\nHost: x\r\nX-API-KEY: {tight_gateway.api_key}\r\n"
        sock.sendall((head + 'Content-Length: 100\r\n\r\n{"templateID": ').encode())
        started = time.monotonic()
        answer = read_all(sock, BODY_TIMEOUT_S + 10)
        assert answer.startswith(b"HTTP/1.1 408") and b"the request body stopped arriving" in answer
        assert BODY_TIMEOUT_S * 0.8 <= time.monotonic() - started < BODY_TIMEOUT_S + 10
    finally:
        sock.close()


def test_connections_per_client_ip_are_capped(tight_gateway: TightGateway) -> None:
    url = f"http://{tight_gateway.host}:{tight_gateway.port}/health"
    held: list[socket.socket] = []
    try:
        for _ in range(MAX_CONNECTIONS):
            held.append(connect(tight_gateway))
            time.sleep(0.02)  # accepted in order (a connection not yet accepted is not counted)
        time.sleep(0.2)
        over = connect(tight_gateway)
        over.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = read_all(over, 10)
        over.close()
        assert answer == b"" or answer.startswith(b"HTTP/1.1 429"), answer[:200]  # 429, or closed
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: status_of(url) == 200, timeout=10, message="served again below the cap")


def test_metrics_are_on_their_own_port_only(tight_gateway: TightGateway) -> None:
    assert status_of(f"http://{tight_gateway.host}:{tight_gateway.port}/metrics") == 404
    with urllib.request.urlopen(f"http://{tight_gateway.host}:{tight_gateway.metrics_port}/metrics") as response:
        assert b"sandbox_gateway_requests_total" in response.read()
