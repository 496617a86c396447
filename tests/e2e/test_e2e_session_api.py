"""The session REST API as its contract specifies it (docs/gateway.md, "The session API"), replayed
over plain HTTP against the real gateway, operator and a sandbox container: the contract's own test
table, then its error cases, then the documented curl examples, run as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2elib import Gateway

from sandbox_operator.api.names import EGRESS_HOSTS_NOT_ENFORCED_ANNOTATION
from sandbox_operator.gateway.session_logic import session_name
from testlib import Cluster, governing_policies, request_json

DOCS = Path(__file__).resolve().parents[2] / "docs" / "gateway.md"
BOUNDARY = "session-e2e-5d2c"
# A small pure-Python package that no sandbox image carries: installing it needs the package index.
PACKAGE, VERSION = "tabulate", "0.9.0"


def base(session_id: str) -> str:
    return f"/api/v1/session/{session_id}/sandbox"


def call(gw: Gateway, method: str, path: str, body: Any = None, *, key: str | None = None) -> tuple[int, Any]:
    headers = {"X-API-KEY": key or gw.api_key}
    return request_json(method, gw.url + path, body, headers, timeout=300)


def raw_call(
    gw: Gateway, method: str, path: str, data: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """An HTTP call whose body and answer are bytes (uploads, downloads)."""
    request = urllib.request.Request(
        gw.url + path, data=data or None, method=method, headers={"X-API-KEY": gw.api_key, **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def multipart(filename: str, content: bytes) -> tuple[bytes, dict[str, str]]:
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body += content + f"\r\n--{BOUNDARY}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


@pytest.fixture
def session(gateway: Gateway) -> Iterator[str]:
    session_id = f"chat-{uuid.uuid4().hex[:8]}"
    try:
        yield session_id
    finally:
        call(gateway, "POST", base(session_id) + "/stop")


@pytest.mark.timeout(600)
def test_the_contracts_table(cluster: Cluster, gateway: Gateway, session: str) -> None:
    url = base(session)
    # start → running
    status, info = call(gateway, "POST", f"{url}/start", {"sandbox_type": "code_interpreter"})
    assert status == 200, info
    assert info["status"] == "running" and info["session_id"] == session and info["sandbox_type"] == "code_interpreter"
    assert set(info) == {"sandbox_id", "session_id", "sandbox_type", "status", "created_at", "last_activity"}
    for stamp in (info["created_at"], info["last_activity"]):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", stamp), stamp
    # the template's network default governs it: the package index only (port 443, hosts listed)
    pod_name = cluster.get_json("sandbox", session_name(session), "-n", gateway.namespace)["status"]["podName"]
    (governing,) = governing_policies(cluster, gateway.namespace, pod_name)
    assert governing == "sbx-net-code-interpreter-template"  # shared by the template's default-class pods
    policy = cluster.get_json("networkpolicy", governing, "-n", gateway.namespace)
    assert policy["spec"]["egress"][2]["ports"] == [{"protocol": "TCP", "port": 443}], policy["spec"]["egress"]
    assert policy["metadata"]["annotations"][EGRESS_HOSTS_NOT_ENFORCED_ANNOTATION] == (
        "pypi.org:443,files.pythonhosted.org:443"
    )
    # start again → the same sandbox
    status, again = call(gateway, "POST", f"{url}/start", {"sandbox_type": "code_interpreter"})
    assert status == 200 and again["sandbox_id"] == info["sandbox_id"]
    status, shown = call(gateway, "GET", f"{url}/status")
    assert status == 200 and shown["sandbox_id"] == info["sandbox_id"] and shown["status"] == "running"

    # simple code
    status, result = call(gateway, "POST", f"{url}/execute", {"code": "print('hello from the session')"})
    assert status == 200 and result["success"] is True and result["error"] is None, result
    assert result["output"] == "hello from the session\n"
    assert isinstance(result["execution_time_ms"], int) and result["execution_time_ms"] >= 0
    assert result["artifacts"] == []
    # failing code: the exception's name and message
    status, failed = call(gateway, "POST", f"{url}/execute", {"code": "print(undefined_name)"})
    assert status == 200 and failed["success"] is False
    assert "NameError" in failed["error"] and "undefined_name" in failed["error"]
    # state across executes: one kernel per session
    assert call(gateway, "POST", f"{url}/execute", {"code": "x = 6 * 7"})[1]["success"] is True
    status, kept = call(gateway, "POST", f"{url}/execute", {"code": "print(x)"})
    assert status == 200 and kept["output"] == "42\n"
    # a chart is an artifact
    figure = "import matplotlib.pyplot as plt\nplt.plot([1, 2], [3, 4])\nplt.title('t')\nplt.show()"
    status, drawn = call(gateway, "POST", f"{url}/execute", {"code": figure})
    assert status == 200 and drawn["success"] is True, drawn
    assert drawn["artifacts"] and drawn["artifacts"][0]["type"] in {"chart", "png"}, drawn["artifacts"]

    # install, then import in the next execute
    status, installed = call(gateway, "POST", f"{url}/install", {"packages": [f"{PACKAGE}=={VERSION}"]})
    assert status == 200 and installed["success"] is True, installed
    status, imported = call(
        gateway, "POST", f"{url}/execute", {"code": f"import {PACKAGE}; print({PACKAGE}.__version__)"}
    )
    assert status == 200 and imported["output"] == f"{VERSION}\n", imported

    # upload → its path; download → its bytes; the listing shows it
    content = b"name,score\nada,10\n"
    data, headers = multipart("scores.csv", content)
    status, _, answer = raw_call(gateway, "POST", f"{url}/upload", data, headers)
    assert status == 200 and json.loads(answer) == {"path": "/home/user/upload/scores.csv"}
    status, got_headers, downloaded = raw_call(gateway, "GET", f"{url}/download?path=/home/user/upload/scores.csv")
    assert status == 200 and downloaded == content
    assert got_headers["Content-Type"] == "application/octet-stream"
    assert got_headers["Content-Disposition"] == 'attachment; filename="scores.csv"'
    status, listed = call(gateway, "GET", f"{url}/files?path=/home/user/upload")
    assert (
        status == 200
        and {"path": "/home/user/upload/scores.csv", "size": len(content), "is_directory": False} in listed
    )
    status, home = call(gateway, "GET", f"{url}/files")  # default: /home/user
    assert status == 200 and any(entry["path"] == "/home/user/upload" and entry["is_directory"] for entry in home)
    # the code sees the upload where the answer said it is
    status, read = call(
        gateway, "POST", f"{url}/execute", {"code": "print(open('/home/user/upload/scores.csv').read())"}
    )
    assert read["output"] == content.decode() + "\n"

    # stop → 204, then no sandbox; start after stop → a new one
    status, _ = call(gateway, "POST", f"{url}/stop")
    assert status == 204
    status, none = call(gateway, "GET", f"{url}/status")
    assert status == 200 and none is None
    status, renewed = call(gateway, "POST", f"{url}/start", {"sandbox_type": "code_interpreter"})
    assert status == 200 and renewed["status"] == "running" and renewed["sandbox_id"] != info["sandbox_id"]


@pytest.mark.timeout(300)
def test_timeouts_missing_files_and_bad_bodies(gateway: Gateway, session: str) -> None:
    url = base(session)
    # No sandbox yet: nothing to read, and stop is still a 204.
    status, missing = call(gateway, "GET", f"{url}/download?path=/home/user/nothing")
    assert status == 404 and "POST /start" in missing["detail"]
    assert call(gateway, "POST", f"{url}/stop")[0] == 204
    # execute starts the session's sandbox itself
    status, result = call(gateway, "POST", f"{url}/execute", {"code": "kept = 'yes'"})
    assert status == 200 and result["success"] is True
    status, info = call(gateway, "GET", f"{url}/status")
    assert info["status"] == "running" and info["sandbox_type"] == "code_interpreter"

    # an execution past its timeout: 408, and the kernel keeps its state
    status, slow = call(gateway, "POST", f"{url}/execute", {"code": "import time; time.sleep(120)", "timeout": 2})
    assert status == 408 and "timed out" in slow["detail"], slow
    assert call(gateway, "POST", f"{url}/execute", {"code": "print(kept)"})[1]["output"] == "yes\n"

    status, gone = call(gateway, "GET", f"{url}/download?path=/home/user/no-such-file.txt")
    assert status == 404 and "no-such-file.txt" in gone["detail"]
    status, gone = call(gateway, "GET", f"{url}/files?path=/home/user/no/such/dir")
    assert status == 404 and "detail" in gone

    sandboxes_before = call(gateway, "GET", "/v2/sandboxes")[1]
    for method, path, body in (
        ("POST", f"{url}/execute", {"code": 42}),
        ("POST", f"{url}/execute", {}),
        ("POST", f"{url}/install", {"packages": "numpy"}),
        ("POST", f"{url}/install", {"packages": ["--index-url", "https://example.invalid/simple"]}),
        ("POST", f"{url}/start", {"sandbox_type": "gpu"}),
        ("POST", "/api/v1/session/Not_Valid/sandbox/start", {}),
        ("POST", base("other-" + session[5:]) + "/start", {"sandbox_type": "custom", "template_id": "nope"}),
    ):
        status, answer = call(gateway, method, path, body)
        assert status == 400 and isinstance(answer, dict) and answer.get("detail"), (path, body, status, answer)
    status, _, answer = raw_call(gateway, "POST", f"{url}/upload", b"not a form", {"Content-Type": "text/plain"})
    assert status == 400 and "multipart" in json.loads(answer)["detail"]
    status, _, answer = raw_call(gateway, "GET", f"{url}/status", headers={"X-API-KEY": "e2b_" + "0" * 40})
    assert status == 401 and "detail" in json.loads(answer)
    assert call(gateway, "GET", "/v2/sandboxes")[1] == sandboxes_before  # nothing made by bad input


def documented_examples() -> str:
    """The session API's curl examples in docs/gateway.md (the ```bash block after its marker)."""
    text = DOCS.read_text()
    found = re.search(r"<!-- session-examples -->\s*```bash\n(.*?)```", text, re.S)
    assert found, "docs/gateway.md lost its session examples block"
    return found.group(1)


@pytest.mark.timeout(600)
def test_the_documented_examples_run_as_written(gateway: Gateway, session: str, tmp_path: Path) -> None:
    env = {**os.environ, "GW": gateway.url, "KEY": gateway.api_key, "SESSION": session}
    script = "set -euo pipefail\n" + documented_examples()
    ran = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    lines = [json.loads(line) for line in ran.stdout.splitlines() if line.startswith(("{", "["))]
    started = lines[0]
    assert started["status"] == "running" and started["session_id"] == session
    assert any(isinstance(line, dict) and line.get("output") == "42\n" for line in lines), ran.stdout
    assert (tmp_path / "result.csv").read_bytes() == b"a,b\n1,2\n"
