"""gzip-encoded upload bodies (Content-Encoding: gzip, as the E2B SDKs send with `gzip=True`):
octet-stream and multipart are decoded, a body that is not gzip is 400 (never 500), and a zip bomb
stops at the upload cap (413) without the agent buffering what it inflates to."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentlib import ACCESS_TOKEN, AgentProcess, start_agent, stop_agent

CAP = 100_000
BOUNDARY = "gzipboundary0123"


@pytest.fixture(scope="module")
def capped_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    process = start_agent(
        tmp_path_factory.mktemp("gzip"), token=ACCESS_TOKEN, env={"SANDBOX_MAX_UPLOAD_BYTES": str(CAP)}
    )
    yield process
    stop_agent(process)


def multipart(content: bytes, filename: str) -> bytes:
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    return head.encode() + content + f"\r\n--{BOUNDARY}--\r\n".encode()


def upload(agent: AgentProcess, query: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    headers = {"X-Access-Token": ACCESS_TOKEN, "Content-Encoding": "gzip", "Content-Type": content_type}
    status, _, answer = agent.request("POST", f"/files?{query}", body=body, headers=headers)
    return status, answer


def home(agent: AgentProcess) -> Path:
    return agent.workdir  # relative paths resolve against the user's home, the agent's workdir


def test_gzip_octet_stream_and_multipart_uploads_are_decoded(capped_agent: AgentProcess) -> None:
    payload = bytes(range(256)) * 100
    status, answer = upload(capped_agent, "path=gz/octet.bin", gzip.compress(payload), "application/octet-stream")
    assert status == 200, answer
    assert (home(capped_agent) / "gz/octet.bin").read_bytes() == payload
    body = gzip.compress(multipart(payload, "gz/part.bin"))
    status, answer = upload(capped_agent, "", body, f"multipart/form-data; boundary={BOUNDARY}")
    assert status == 200, answer
    assert (home(capped_agent) / "gz/part.bin").read_bytes() == payload


@pytest.mark.parametrize("content_type", ["application/octet-stream", f"multipart/form-data; boundary={BOUNDARY}"])
def test_a_body_that_is_not_gzip_is_a_400(capped_agent: AgentProcess, content_type: str) -> None:
    status, answer = upload(capped_agent, "path=gz/bad.bin", b"this is not gzip data at all", content_type)
    assert status == 400, answer
    assert b"Content-Encoding" in answer


def test_a_zip_bomb_stops_at_the_upload_cap(capped_agent: AgentProcess) -> None:
    bomb = gzip.compress(b"\0" * 200_000_000)  # ~200 kB that inflate to 200 MB
    assert len(bomb) < 2 * CAP * 2
    status, answer = upload(capped_agent, "path=gz/bomb.bin", bomb, "application/octet-stream")
    assert status == 413, answer
    assert capped_agent.process.poll() is None
    status, answer = upload(capped_agent, "path=gz/after.bin", gzip.compress(b"ok"), "application/octet-stream")
    assert (status, (home(capped_agent) / "gz/after.bin").read_bytes()) == (200, b"ok"), answer
