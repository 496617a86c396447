"""The agent's own defences (docs/agent.md, "Threat model"), against real agents over raw HTTP:

1. every route but GET /health needs the token, and no process the agent starts gets it;
2. a signed /files request (a signature here, or the gateway's signed-path header with the token)
   touches exactly its path, and no upload part escapes its target directory;
3. bad input is a 4xx, never a 5xx;
4. slow clients are cut (header, keep-alive and body timeouts);
5. allow/deny decisions see the canonical path.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import struct
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentlib import ACCESS_TOKEN, AgentProcess, start_agent, stop_agent

from sandbox_operator.agent.signing import Operation, compute_signature
from sandbox_operator.api.names import AGENT_TOKEN_ENV, AGENT_TOKEN_HEADER, SIGNED_PATH_HEADER

AUTH = {AGENT_TOKEN_HEADER: ACCESS_TOKEN}
JSON = {"Content-Type": "application/json"}
STREAM = {"Content-Type": "application/connect+json"}
# Slow-client limits of the `slow_agent` (seconds); a test waits at most CUT_DEADLINE for the cut.
HEADER_TIMEOUT, KEEPALIVE_TIMEOUT, BODY_TIMEOUT = 0.5, 1.0, 0.5
CUT_DEADLINE = 10.0


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """An agent with a token, of this module's own (tests here change its /init state)."""
    process = start_agent(tmp_path_factory.mktemp("secured"), token=ACCESS_TOKEN)
    yield process
    stop_agent(process)


@pytest.fixture(scope="module")
def slow_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    process = start_agent(
        tmp_path_factory.mktemp("slow"),
        token=ACCESS_TOKEN,
        env={
            "SANDBOX_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
            "SANDBOX_KEEPALIVE_TIMEOUT": str(KEEPALIVE_TIMEOUT),
            "SANDBOX_BODY_TIMEOUT": str(BODY_TIMEOUT),
        },
    )
    yield process
    stop_agent(process)


# -- helpers ---------------------------------------------------------------------------------------


def raw(
    port: int, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request exactly as given: no redirect followed, no path cleaned up."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in {**(headers or {}), "Content-Length": str(len(body or b""))}.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def envelope(message: dict[str, Any]) -> bytes:
    payload = json.dumps(message).encode()
    return struct.pack(">BI", 0, len(payload)) + payload


def envelopes(body: bytes) -> list[tuple[int, dict[str, Any]]]:
    found: list[tuple[int, dict[str, Any]]] = []
    while body:
        flags, length = struct.unpack(">BI", body[:5])
        found.append((flags, json.loads(body[5 : 5 + length])))
        body = body[5 + length :]
    return found


def start(agent: AgentProcess, message: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    status, _, body = raw(
        agent.envd_port, "POST", "/process.Process/Start", {**AUTH, **STREAM, **(headers or {})}, envelope(message)
    )
    return status, body


def stream_error(body: bytes) -> str | None:
    """The Connect code in a stream's end-stream envelope, or None when it ended without one."""
    flags, last = envelopes(body)[-1]
    assert flags == 2, body
    error = last.get("error")
    return None if error is None else str(error["code"])


def command_output(body: bytes) -> bytes:
    out = b""
    for _, message in envelopes(body):
        data = message.get("event", {}).get("data", {})
        for key in ("stdout", "pty"):
            if key in data:
                out += base64.b64decode(data[key])
    return out


def signed_query(path: str, operation: Operation, username: str = "") -> str:
    expiration = int(time.time()) + 60
    signature = compute_signature(path, operation, username, ACCESS_TOKEN, expiration)
    return urllib.parse.urlencode({"path": path, "signature": signature, "signature_expiration": str(expiration)})


def multipart(*parts: tuple[str, str | None, bytes]) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body of (field name, filename, content) parts, and its Content-Type.
    An absolute filename goes as `filename*` (aiohttp drops a quoted one's leading slashes)."""
    boundary = "sandbox-test-boundary"
    body = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None and filename.startswith("/"):
            disposition += f"; filename*=utf-8''{urllib.parse.quote(filename, safe='')}"
        elif filename is not None:
            disposition += f'; filename="{filename}"'

        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


# -- 1. authentication ------------------------------------------------------------------------------

RPC_METHODS = (
    "process.Process/List",
    "process.Process/SendInput",
    "process.Process/SendSignal",
    "process.Process/Update",
    "process.Process/CloseStdin",
    "process.Process/Start",
    "process.Process/Connect",
    "process.Process/StreamInput",
    "filesystem.Filesystem/Stat",
    "filesystem.Filesystem/MakeDir",
    "filesystem.Filesystem/Move",
    "filesystem.Filesystem/ListDir",
    "filesystem.Filesystem/Remove",
    "filesystem.Filesystem/WatchDir",
    "filesystem.Filesystem/CreateWatcher",
    "filesystem.Filesystem/GetWatcherEvents",
    "filesystem.Filesystem/RemoveWatcher",
    "process.Process/NoSuchMethod",
)
ENVD_ROUTES = (
    ("GET", "/agent/metrics"),
    ("GET", "/metrics"),
    ("GET", "/metrics?format=prometheus"),
    ("GET", "/envs"),
    ("POST", "/init"),
    ("GET", "/files?path=x"),
    ("POST", "/files?path=x"),
    ("DELETE", "/files?path=x"),
    ("POST", "/health"),
    ("GET", "/no/such/route"),
    *(("POST", f"/{method}") for method in RPC_METHODS),
)
INTERPRETER_ROUTES = (
    ("POST", "/execute"),
    ("GET", "/contexts"),
    ("POST", "/contexts"),
    ("POST", "/contexts/x/restart"),
    ("DELETE", "/contexts/x"),
    ("POST", "/health"),
    ("GET", "/no/such/route"),
)


@pytest.mark.parametrize("token", [None, "wrong-token", "t\udcffken"], ids=["none", "wrong", "not-utf8"])
def test_every_route_but_get_health_needs_the_token(secured: AgentProcess, token: str | None) -> None:
    headers = {} if token is None else {AGENT_TOKEN_HEADER: token}
    if token is not None and not token.isascii():
        headers = {AGENT_TOKEN_HEADER: token.encode("utf-8", "surrogateescape").decode("latin-1")}
    routes = [(secured.envd_port, method, path) for method, path in (*ENVD_ROUTES, *INTERPRETER_ROUTES)]
    routes += [(secured.interpreter_port, method, path) for method, path in INTERPRETER_ROUTES]
    for port, method, path in routes:
        status, _, body = raw(port, method, path, {**JSON, **headers}, b"{}" if method == "POST" else None)
        assert status == 401, (port, method, path, status, body)
        error = json.loads(body)
        assert error["code"] in (401, "unauthenticated") and "token" in error["message"], (port, method, path)
    for port in (secured.envd_port, secured.interpreter_port):
        assert raw(port, "GET", "/health")[0] in (200, 204)


def test_the_token_admits_metrics_and_the_operator_scrape(secured: AgentProcess) -> None:
    status, _, body = raw(secured.envd_port, "GET", "/agent/metrics", AUTH)
    assert status == 200 and body.startswith(b"# HELP")


def test_no_process_the_agent_starts_gets_the_token(secured: AgentProcess) -> None:
    """Commands, PTYs and kernels (and what they start) see neither the token nor its variable, even
    when /init's envVars, a command's envs or an execution's env_vars name it."""
    leaked = {AGENT_TOKEN_ENV: ACCESS_TOKEN}
    status, _, _ = raw(secured.envd_port, "POST", "/init", {**AUTH, **JSON}, json.dumps({"envVars": leaked}).encode())
    assert status == 204
    show = "cat /proc/self/environ; echo; env"
    for extra in ({}, {"pty": {"size": {"cols": 80, "rows": 24}}}):
        status, body = start(
            secured, {"process": {"cmd": "/bin/sh", "args": ["-c", show], "envs": leaked}, **extra, "stdin": False}
        )
        assert status == 200 and stream_error(body) is None, body
        output = command_output(body)
        assert b"PATH=" in output, output  # the environment was really printed
        assert ACCESS_TOKEN.encode() not in output and AGENT_TOKEN_ENV.encode() not in output, (extra, output)

    # A kernel started after the /init above, and a process the kernel starts.
    status, _, reply = raw(secured.envd_port, "POST", "/contexts", {**AUTH, **JSON}, b"{}")
    assert status == 200, reply
    context = json.loads(reply)["id"]
    code = (
        "import os, subprocess\n"
        "print(open('/proc/self/environ', 'rb').read().decode(errors='replace'))\n"
        "print(subprocess.run(['env'], capture_output=True, text=True).stdout)\n"
        "print(sorted(os.environ))"
    )
    execute = {"code": code, "context_id": context, "env_vars": leaked}
    status, _, lines = raw(secured.envd_port, "POST", "/execute", {**AUTH, **JSON}, json.dumps(execute).encode())
    assert status == 200 and b"PATH" in lines, lines
    assert ACCESS_TOKEN.encode() not in lines and AGENT_TOKEN_ENV.encode() not in lines, lines


# -- 2. signed /files requests ------------------------------------------------------------------------


def test_a_signed_upload_writes_exactly_the_signed_path(secured: AgentProcess) -> None:
    home = secured.workdir
    outside = home.parent / "escaped-by-signed-upload.txt"
    body, content_type = multipart(
        ("file", "named-by-the-part.txt", b"signed content"), ("file", "../escaped-by-signed-upload.txt", b"evil")
    )
    status, _, reply = raw(
        secured.envd_port, "POST", "/files?" + signed_query("signed/target.txt", "write"), content_type, body
    )
    assert status == 400 and b"exactly one" in reply, reply
    assert not outside.exists() and not (home / "named-by-the-part.txt").exists()

    # One file part: written to the signed path whatever its filename says.
    body, content_type = multipart(("file", "../../escaped-by-signed-upload.txt", b"only this"))
    status, _, reply = raw(
        secured.envd_port, "POST", "/files?" + signed_query("signed/target.txt", "write"), content_type, body
    )
    assert status == 200, reply
    assert [entry["path"] for entry in json.loads(reply)] == [str(home / "signed" / "target.txt")]
    assert (home / "signed" / "target.txt").read_bytes() == b"only this"
    assert not outside.exists() and not (home.parent.parent / "escaped-by-signed-upload.txt").exists()

    # Any other part is refused, before or instead of the file part.
    for parts in ((("other", None, b"x"), ("file", "a.txt", b"y")), (("other", None, b"x"),)):
        body, content_type = multipart(*parts)
        status, _, reply = raw(
            secured.envd_port, "POST", "/files?" + signed_query("signed/other.txt", "write"), content_type, body
        )
        assert status == 400, (parts, reply)
    assert not (home / "signed" / "other.txt").exists() and not (home / "a.txt").exists()


def test_the_gateways_signed_path_header_confines_the_request(secured: AgentProcess) -> None:
    home = secured.workdir
    (home / "gw").mkdir(exist_ok=True)
    (home / "gw" / "allowed.txt").write_bytes(b"allowed")
    (home / "gw" / "other.txt").write_bytes(b"other")
    header = {**AUTH, SIGNED_PATH_HEADER: "gw/allowed.txt"}

    # A download reads exactly the signed path; a query naming another is refused.
    assert raw(secured.envd_port, "GET", "/files", header)[::2] == (200, b"allowed")
    assert raw(secured.envd_port, "GET", "/files?path=gw%2Fallowed.txt", header)[::2] == (200, b"allowed")
    assert raw(secured.envd_port, "GET", "/files?path=gw%2Fother.txt", header)[0] == 400

    # An upload: one file part, to the signed path; more parts are refused.
    body, content_type = multipart(("file", "gw/other.txt", b"new"), ("file", "../gw-escape.txt", b"evil"))
    assert raw(secured.envd_port, "POST", "/files", {**header, **content_type}, body)[0] == 400
    assert (home / "gw" / "other.txt").read_bytes() == b"other" and not (home.parent / "gw-escape.txt").exists()
    body, content_type = multipart(("file", "gw/other.txt", b"new"))
    assert raw(secured.envd_port, "POST", "/files", {**header, **content_type}, body)[0] == 200
    assert (home / "gw" / "allowed.txt").read_bytes() == b"new" and (home / "gw" / "other.txt").read_bytes() == b"other"

    # The header counts only with the agent's token: without it (even with a valid signature) it is 401.
    query = "/files?" + signed_query("gw/allowed.txt", "read")
    for headers in ({SIGNED_PATH_HEADER: "gw/allowed.txt"}, {AGENT_TOKEN_HEADER: "wrong", SIGNED_PATH_HEADER: "x"}):
        assert raw(secured.envd_port, "GET", query, headers)[0] == 401, headers
    assert raw(secured.envd_port, "GET", query)[::2] == (200, b"new")  # the signature alone still works


def test_upload_part_filenames_resolve_as_paths_do(secured: AgentProcess, tmp_path: Path) -> None:
    # A part's filename is its destination, as the SDKs send it: resolved as a `path` would be, so an
    # absolute one outside the home (`write_files` to /tmp) lands there, not under the home (aiohttp's
    # parser dropped the leading "/"). The token holder may write there with `path` or a command
    # anyway: the home was never a boundary, and a signed upload stays held to its one path (above).
    home = secured.workdir
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    body, content_type = multipart(("file", str(elsewhere / "absolute.txt"), b"abs"), ("file", "../up.txt", b"up"))
    status, _, reply = raw(secured.envd_port, "POST", "/files", {**AUTH, **content_type}, body)
    assert status == 200, reply
    written = [entry["path"] for entry in json.loads(reply)]
    assert written == [str(elsewhere / "absolute.txt"), str(home.parent / "up.txt")]
    assert (elsewhere / "absolute.txt").read_bytes() == b"abs" and (home.parent / "up.txt").read_bytes() == b"up"
    assert not (home / elsewhere.relative_to("/")).exists()  # not re-rooted under the home
    (home.parent / "up.txt").unlink()

    # Inside it, relative, absolute or with a harmless `..`, several parts in one request work.
    body, content_type = multipart(
        ("file", "parts/a.txt", b"A"), ("file", str(home / "parts" / "b.txt"), b"B"), ("file", "parts/x/../c.txt", b"C")
    )
    status, _, reply = raw(secured.envd_port, "POST", "/files", {**AUTH, **content_type}, body)
    assert status == 200, reply
    assert sorted(p.name for p in (home / "parts").iterdir()) == ["a.txt", "b.txt", "c.txt"]

    # With a 'path', one file part: a second is refused, not written to its own filename.
    body, content_type = multipart(("file", "one.txt", b"1"), ("file", "two.txt", b"2"))
    status, _, _ = raw(secured.envd_port, "POST", "/files?path=parts%2Fone.txt", {**AUTH, **content_type}, body)
    assert status == 400 and not (home / "two.txt").exists()


# -- 3. bad input -------------------------------------------------------------------------------------


def test_nul_bytes_in_paths_are_bad_requests(secured: AgentProcess) -> None:
    (secured.workdir / "a-file").write_text("not a directory")
    for method in ("GET", "POST"):
        for query in ("path=a%00b", "path=ok.txt&username=a%00b", "path=" + "x" * 300, "path=a-file%2Fbelow"):
            status, _, body = raw(
                secured.envd_port, method, f"/files?{query}", {**AUTH, "Content-Type": "application/octet-stream"}, b"x"
            )
            assert status == 400, (method, query, body)
    for method, message in (
        ("Stat", {"path": "a\x00b"}),
        ("ListDir", {"path": "a\x00b"}),
        ("MakeDir", {"path": "a\x00b"}),
        ("Remove", {"path": "a\x00b"}),
        ("Move", {"source": "a", "destination": "b\x00"}),
        ("CreateWatcher", {"path": "a\x00b"}),
    ):
        status, _, body = raw(
            secured.envd_port,
            "POST",
            f"/filesystem.Filesystem/{method}",
            {**AUTH, **JSON},
            json.dumps(message).encode(),
        )
        assert (status, json.loads(body)["code"]) == (400, "invalid_argument"), (method, body)
    for body_json in ({"defaultUser": "a\x00b"}, {"defaultWorkdir": "/a\x00"}, {"envVars": {"A": "b\x00"}}):
        status, _, body = raw(secured.envd_port, "POST", "/init", {**AUTH, **JSON}, json.dumps(body_json).encode())
        assert status == 400, (body_json, body)
    status, _, body = raw(
        secured.envd_port, "POST", "/contexts", {**AUTH, **JSON}, json.dumps({"cwd": "a\x00"}).encode()
    )
    assert status == 400, body


def test_a_bad_process_start_is_a_connect_error(secured: AgentProcess) -> None:
    (secured.workdir / "a-file").write_text("not a directory")
    locked = secured.workdir / "locked"
    locked.mkdir(exist_ok=True)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"cmd": "true", "cwd": "/no/such/dir"}, "invalid_argument"),
        ({"cmd": "true", "cwd": "a-file"}, "invalid_argument"),
        ({"cmd": "true", "cwd": "a\x00b"}, "invalid_argument"),
        ({"cmd": "true", "cwd": "x" * 5000}, "invalid_argument"),
        ({"cmd": "true", "envs": {"A": "b\x00"}}, "invalid_argument"),
        ({"cmd": "true", "envs": {"A=B": "c"}}, "invalid_argument"),
        ({"cmd": "tr\x00ue"}, "invalid_argument"),
        ({"cmd": "true", "args": ["a\x00"]}, "invalid_argument"),
        ({"cmd": "/no/such/program"}, "invalid_argument"),
    ]
    if os.geteuid() != 0:  # root enters any directory
        locked.chmod(0)
        cases.append(({"cmd": "true", "cwd": str(locked)}, "invalid_argument"))
    try:
        for process, code in cases:
            status, body = start(secured, {"process": process})
            assert status == 200 and stream_error(body) == code, (process, body)
    finally:
        locked.chmod(0o755)
    # Huge numbers: a window of 1e10 cells, a pid or depth past uint32.
    status, body = start(secured, {"process": {"cmd": "true"}, "pty": {"size": {"cols": 10**10, "rows": 24}}})
    assert status == 200 and stream_error(body) == "invalid_argument", body
    for method, message in (
        ("filesystem.Filesystem/ListDir", {"path": ".", "depth": 10**10}),
        ("process.Process/SendSignal", {"process": {"pid": 10**30}, "signal": "SIGNAL_SIGKILL"}),
        ("process.Process/Update", {"process": {"pid": "1" * 40}}),
    ):
        status, _, body = raw(secured.envd_port, "POST", f"/{method}", {**AUTH, **JSON}, json.dumps(message).encode())
        assert (status, json.loads(body)["code"]) == (400, "invalid_argument"), (method, body)


@pytest.mark.parametrize(
    "header",
    [
        {"Connect-Timeout-Ms": "10000000000"},
        {"Connect-Timeout-Ms": "1e10"},
        {"Connect-Timeout-Ms": "-1"},
        {"Keepalive-Ping-Interval": "1e10"},
        {"Keepalive-Ping-Interval": "inf"},
        {"Keepalive-Ping-Interval": "nan"},
        {"Keepalive-Ping-Interval": "soon"},
    ],
)
def test_huge_or_malformed_timeouts_are_400(secured: AgentProcess, header: dict[str, str]) -> None:
    status, body = start(secured, {"process": {"cmd": "true"}}, header)
    assert (status, json.loads(body)["code"]) == (400, "invalid_argument"), body
    status, _, body = raw(secured.envd_port, "POST", "/process.Process/List", {**AUTH, **JSON, **header}, b"{}")
    assert (status, json.loads(body)["code"]) == (400, "invalid_argument"), body


def test_json_nested_100k_deep_is_400(secured: AgentProcess) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    deep_object = b'{"code": ' + deep + b"}"
    for port, path, body, headers in (
        (secured.envd_port, "/filesystem.Filesystem/Stat", deep, JSON),
        (secured.envd_port, "/init", deep_object, JSON),
        (secured.envd_port, "/execute", deep_object, JSON),
        (secured.interpreter_port, "/execute", deep_object, JSON),
        (secured.interpreter_port, "/contexts", deep_object, JSON),
        (secured.envd_port, "/process.Process/Start", struct.pack(">BI", 0, len(deep)) + deep, STREAM),
    ):
        status, _, reply = raw(port, "POST", path, {**AUTH, **headers}, body)
        assert status == 400 and b"deeper" in reply, (port, path, status, reply[:200])
    # A deep string is just a string.
    status, _, _ = raw(
        secured.envd_port,
        "POST",
        "/filesystem.Filesystem/Stat",
        {**AUTH, **JSON},
        json.dumps({"path": "[" * 200 + "/" + "{" * 200}).encode(),
    )
    assert status == 404


# -- 4. slow clients ----------------------------------------------------------------------------------


def _closed_within(sock: socket.socket, deadline: float) -> tuple[float, bytes]:
    """Read until the server closes the connection; (seconds it took, what was received). Fails when
    it is still open after `deadline` seconds."""
    sock.settimeout(deadline)
    began = time.monotonic()
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the connection was still open after {deadline}s; received {received[:200]!r}")
    return time.monotonic() - began, received


@pytest.mark.parametrize("listener", ["envd", "interpreter"])
def test_a_stalled_request_line_is_cut_at_the_header_timeout(slow_agent: AgentProcess, listener: str) -> None:
    port = slow_agent.envd_port if listener == "envd" else slow_agent.interpreter_port
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /heal")
        took, received = _closed_within(sock, CUT_DEADLINE)
    assert received == b"" and took >= HEADER_TIMEOUT * 0.8
    # Headers that never end count the same.
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        assert _closed_within(sock, CUT_DEADLINE)[1] == b""


def test_idle_connections_are_closed_at_the_keepalive_timeout(slow_agent: AgentProcess) -> None:
    with socket.create_connection(("127.0.0.1", slow_agent.envd_port)) as sock:  # never sends anything
        took, received = _closed_within(sock, CUT_DEADLINE)
    assert received == b"" and took >= KEEPALIVE_TIMEOUT * 0.8
    with socket.create_connection(("127.0.0.1", slow_agent.envd_port)) as sock:  # idle after one request
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        took, received = _closed_within(sock, CUT_DEADLINE)
    assert received.startswith(b"HTTP/1.1 204") and took >= KEEPALIVE_TIMEOUT * 0.8


@pytest.mark.parametrize(
    ("listener", "path", "content_type"),
    [
        ("envd", "/filesystem.Filesystem/Stat", "application/json"),
        ("envd", "/process.Process/Start", "application/connect+json"),
        ("envd", "/init", "application/json"),
        ("envd", "/files?path=slow.txt", "application/octet-stream"),
        ("envd", "/files?path=slow.txt", "multipart/form-data; boundary=b"),
        ("interpreter", "/execute", "application/json"),
    ],
)
def test_a_stalled_body_is_408_and_the_connection_closed(
    slow_agent: AgentProcess, listener: str, path: str, content_type: str
) -> None:
    port = slow_agent.envd_port if listener == "envd" else slow_agent.interpreter_port
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\n{AGENT_TOKEN_HEADER}: {ACCESS_TOKEN}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: 1000\r\n\r\n"
    )
    partial = b"--b\r\nContent-Disposition: form-data; name=file\r\n\r\nab" if "multipart" in content_type else b"\x00"
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head.encode() + partial)
        took, received = _closed_within(sock, CUT_DEADLINE)
    assert received.startswith(b"HTTP/1.1 408"), received[:200]
    assert took >= BODY_TIMEOUT * 0.8


# -- 5. canonical paths -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/./init", "/a/../init", "/%2e/init", "/a/%2E%2E/init", "//init", "/init/"])
def test_other_spellings_of_a_path_are_that_path(secured: AgentProcess, path: str) -> None:
    body = json.dumps({"envVars": {"SPELLED": path}}).encode()
    status, _, _ = raw(secured.envd_port, "POST", path, JSON, body)
    assert status == 401  # /init needs the token, however it is spelled
    # With the token it is /init, served only under that name: a redirect, nothing applied.
    status, headers, _ = raw(secured.envd_port, "POST", path, {**AUTH, **JSON}, body)
    assert (status, headers.get("Location")) == (308, "/init")
    assert "SPELLED" not in json.loads(raw(secured.envd_port, "GET", "/envs", AUTH)[2])


def test_the_open_health_route_is_recognised_in_any_spelling(secured: AgentProcess) -> None:
    for port in (secured.envd_port, secured.interpreter_port):
        status, headers, _ = raw(port, "GET", "/x/../health")
        assert (status, headers.get("Location")) == (308, "/health"), port
    # And the interpreter routes by their canonical name on either port (their own token headers).
    traffic = {"E2B-Traffic-Access-Token": ACCESS_TOKEN}
    for port in (secured.envd_port, secured.interpreter_port):
        status, headers, _ = raw(port, "GET", "/./contexts?x=1", traffic)
        assert (status, headers.get("Location")) == (308, "/contexts?x=1"), port
