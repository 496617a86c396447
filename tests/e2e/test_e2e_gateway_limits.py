"""Bounded input through the real gateway process (docs/gateway.md, "Bounded input"): large bodies
do not grow its memory (RSS from /proc/<pid>/status, sampled while the body is sent), bad input is
a 4xx with a message, and agent output past the read buffers or the caps is no 5xx.

Loopback only; each body is sent once, generated as it is sent (the test holds none of it).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from e2elib import Gateway

from testlib import request_json

MiB = 1 << 20
CHUNK = b"\x00" * MiB
SESSION = "/api/v1/session/limits-1/sandbox"


def rss_bytes(pid: int) -> int:
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmRSS:"):
            return int(row.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@contextlib.contextmanager
def peak_rss_growth(pid: int) -> Iterator[list[int]]:
    """The gateway's highest RSS above its RSS at the start, sampled every 5 ms meanwhile
    (the list's one item, set on exit)."""
    before = rss_bytes(pid)
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes(pid))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    growth = [0]
    try:
        yield growth
    finally:
        done.set()
        sampler.join()
        growth[0] = max(peak[0], rss_bytes(pid)) - before


def send(
    gw: Gateway,
    method: str,
    path: str,
    size: int,
    headers: dict[str, str],
    *,
    chunked: bool = False,
    prefix: bytes = b"",
    suffix: bytes = b"",
) -> tuple[int, bytes]:
    """Send `prefix`, zeros (one MiB at a time) and `suffix`, `size` bytes in all; the status and the answer."""
    url = urlsplit(gw.url)
    connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=120)
    try:
        connection.putrequest(method, path)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.putheader("Transfer-Encoding" if chunked else "Content-Length", "chunked" if chunked else str(size))
        connection.endheaders()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a 413 may close early
            for part in (prefix, *(CHUNK for _ in range((size - len(prefix) - len(suffix)) // MiB)), suffix):
                data = part if not chunked else b"%x\r\n%s\r\n" % (len(part), part)
                connection.send(data)
            if chunked:
                connection.send(b"0\r\n\r\n")
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# The start of a create body; what follows (zeros) makes it invalid, which only a gateway that
# read all of it would find out.
CREATE_PREFIX = b'{"templateID": "base", "metadata": {"pad": "'


@pytest.mark.timeout(180)
@pytest.mark.parametrize("chunked", [False, True])
def test_a_64mib_create_body_is_413_and_does_not_grow_the_gateway(gateway: Gateway, chunked: bool) -> None:
    pid = gateway.process.pid
    headers = {"X-API-KEY": gateway.api_key, "Content-Type": "application/json"}
    with peak_rss_growth(pid) as growth:
        status, answer = send(
            gateway, "POST", "/v2/sandboxes", 64 * MiB, headers, chunked=chunked, prefix=CREATE_PREFIX
        )
    print(f"create body of 64 MiB (chunked={chunked}): gateway RSS grew {growth[0] / MiB:.1f} MiB")
    assert status == 413, answer[:200]
    assert json.loads(answer) == {"code": 413, "message": "a JSON request body may be at most 1048576 bytes"}
    assert growth[0] < 32 * MiB
    assert request_json("GET", gateway.url + "/health")[0] == 200


@pytest.fixture(scope="module")
def session(gateway: Gateway) -> Iterator[str]:
    headers = {"X-API-KEY": gateway.api_key}
    start = {"sandbox_type": "custom", "template_id": "base"}
    status, started = request_json("POST", gateway.url + SESSION + "/start", start, headers, timeout=120)
    assert status == 200 and started["status"] == "running", started
    try:
        yield SESSION
    finally:
        request_json("POST", gateway.url + SESSION + "/stop", headers=headers)


def call(gw: Gateway, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    return request_json(method, gw.url + path, body, {"X-API-KEY": gw.api_key}, timeout=120)


@pytest.mark.timeout(300)
def test_a_256mib_session_upload_and_download_stream(gateway: Gateway, session: str) -> None:
    pid = gateway.process.pid
    size = 256 * MiB
    boundary = "e2e-boundary-7c1f"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    headers = {"X-API-KEY": gateway.api_key, "Content-Type": f"multipart/form-data; boundary={boundary}"}
    with peak_rss_growth(pid) as up:
        status, answer = send(
            gateway,
            "POST",
            f"{session}/upload?path=/home/user",
            len(head) + size + len(tail),
            headers,
            prefix=head,
            suffix=tail,
        )
    print(f"256 MiB session upload (multipart): gateway RSS grew {up[0] / MiB:.1f} MiB")
    assert status == 200 and json.loads(answer) == {"path": "/home/user/big.bin"}, answer[:200]
    assert call(gateway, "POST", f"{session}/commands", {"cmd": "stat -c %s big.bin"})[1]["stdout"].strip() == str(size)

    url = urlsplit(gateway.url)
    connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=120)
    received = 0
    with peak_rss_growth(pid) as down:
        connection.request("GET", f"{session}/download?path=/home/user/big.bin", headers={"X-API-KEY": gateway.api_key})
        response = connection.getresponse()
        while chunk := response.read(MiB):
            received += len(chunk)
    connection.close()
    print(f"256 MiB session download: gateway RSS grew {down[0] / MiB:.1f} MiB")
    assert response.status == 200 and received == size
    assert up[0] < 64 * MiB and down[0] < 64 * MiB


@pytest.mark.timeout(180)
def test_bad_input_is_4xx_with_the_reason(gateway: Gateway, session: str) -> None:
    headers = {"X-API-KEY": gateway.api_key, "Content-Type": "application/json"}
    deep = b"[" * 100_000
    for path in ("/v2/sandboxes", f"{session}/commands", f"{session}/execute"):
        status, answer = send(gateway, "POST", path, len(deep), headers, prefix=deep)
        assert status == 400 and b"must be JSON" in answer, (path, answer)
    status, answer = call(gateway, "POST", "/v2/sandboxes", {"templateID": "base", "timeout": 10**10})
    assert status == 400 and "timeout" in answer["message"]
    status, answer = call(gateway, "GET", f"{session}/download?path=a%00b")
    assert status == 400 and "NUL" in answer["detail"]
    status, answer = call(gateway, "POST", f"{session}/commands", {"cmd": "pwd", "cwd": "/no/such/dir"})
    assert status == 400 and "/no/such/dir" in answer["detail"] and "invalid_argument" in answer["detail"]


@pytest.mark.timeout(180)
def test_agent_output_past_the_read_buffers_and_the_caps(gateway: Gateway, session: str) -> None:
    # One /execute line of 1 MiB: past aiohttp's line limit, not past the gateway's message cap.
    status, answer = call(gateway, "POST", f"{session}/execute", {"code": "print('x' * (1 << 20), end='')"})
    assert status == 200 and answer["output"] == "x" * MiB and "truncated" not in answer, str(answer)[:300]
    # 6 MiB of command output: the first 4 MiB and a marker.
    status, answer = call(gateway, "POST", f"{session}/commands", {"cmd": "head -c 6291456 /dev/zero | tr '\\0' y"})
    assert status == 200 and answer["truncated"] == ["stdout"], str(answer)[:300]
    assert answer["stdout"].startswith("y" * 1000) and answer["stdout"].endswith("bytes]\n")
