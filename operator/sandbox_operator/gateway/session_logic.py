"""The session API as pure functions, as e2b.py is for the E2B API: session ids → Sandbox names, what
to answer for which Sandbox state, requests → agent calls, agent output → responses. No I/O here;
gateway.session does the talking.
"""

from __future__ import annotations

import base64
import enum
import json
import re
from collections.abc import Container, Mapping
from typing import Any

from sandbox_operator.agent.connect import FLAG_END_STREAM, STREAM_CONTENT_TYPE, EnvelopeDecoder, encode_envelope
from sandbox_operator.api import Phase
from sandbox_operator.api.names import SESSION_LABEL
from sandbox_operator.gateway import e2b

JSON = dict[str, Any]

SESSION_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
SESSION_PREFIX = "session-"  # a session's Sandbox is `session-<id>`
DEFAULT_TEMPLATE = "base"
MAX_OUTPUT_BYTES = 4 << 20  # a command's stdout/stderr returned inline
COMMAND_TIMEOUT_S = 60  # a command's default execution timeout
# Response headers of the agent's /files that a file download keeps.
FILE_HEADERS = frozenset({"content-type", "content-encoding"})


def session_name(session_id: str) -> str:
    """The name of the session's Sandbox; 400 for an id that is not a DNS-label-safe name."""
    if not SESSION_ID.match(session_id):
        raise e2b.Refused(
            400, "a session id is 1-40 lowercase letters, digits and '-', starting and ending with a letter or digit"
        )
    return SESSION_PREFIX + session_id


# --- the session's sandbox -------------------------------------------------------------------------


class Ensure(enum.Enum):
    """What PUT does for the sandbox the session has now."""

    CREATE = "create"  # none
    REPLACE = "replace"  # one that ended or failed: delete it, then create
    RESUME = "resume"  # a paused one
    SERVE = "serve"  # a running (or starting) one


def ensure_step(existing: Mapping[str, Any] | None) -> Ensure:
    if existing is None:
        return Ensure.CREATE
    state = e2b.state_of(existing)
    if state is None:
        return Ensure.REPLACE
    return Ensure.RESUME if state == "paused" else Ensure.SERVE


def session_manifest(payload: Mapping[str, Any], *, namespace: str, session_id: str, templates: Container[str]) -> JSON:
    """The session's Sandbox for PUT; 400 for an unknown template or a bad request."""
    wanted = payload.get("template") or DEFAULT_TEMPLATE
    template = e2b.template_for(e2b.template_name(wanted), templates)
    if template is None:
        raise e2b.Refused(400, f"template {wanted!r} not found")
    manifest = e2b.sandbox_from_request(
        {"timeout": payload.get("timeout"), "metadata": payload.get("metadata"), "envVars": payload.get("envVars")},
        namespace=namespace,
        template=template,
    )
    manifest["metadata"]["name"] = session_name(session_id)
    manifest["metadata"]["labels"] = {SESSION_LABEL: session_id}
    return manifest


def session_sandbox(body: JSON | None, session_id: str) -> JSON:
    """The sandbox GET shows; 404 when the session has none (or it ended)."""
    if body is None or e2b.state_of(body) is None:
        raise e2b.Refused(404, f"session {session_id} has no sandbox")
    return body


def serving_sandbox(body: JSON | None, session_id: str) -> JSON:
    """The sandbox commands, code and files go to: 404 without one, 409 unless it is Running."""
    if body is None or (body.get("metadata") or {}).get("deletionTimestamp") or e2b.state_of(body) is None:
        raise e2b.Refused(404, f"session {session_id} has no sandbox: PUT it first")
    status = body.get("status") or {}
    if status.get("phase") != Phase.RUNNING or not status.get("podIP"):
        raise e2b.Refused(
            409, f"the session's sandbox is {status.get('phase') or 'starting'}, not Running: PUT it to resume"
        )
    return body


def describe(session_id: str, body: Mapping[str, Any], template: Mapping[str, Any] | None, token: str) -> JSON:
    """A session's sandbox as the API shows it: E2B's SandboxDetail plus the session and the phase."""
    detail = e2b.sandbox_detail(body, template, token)
    return {"sessionID": session_id, "phase": (body.get("status") or {}).get("phase"), **detail}


# --- commands: envd Process.Start ------------------------------------------------------------------


def command_request(payload: Mapping[str, Any]) -> tuple[bytes, dict[str, str]]:
    """The Process.Start request (its one envelope, and its headers) for a command: bash -l -c `cmd`."""
    cmd = payload.get("cmd")
    if not isinstance(cmd, str) or not cmd:
        raise e2b.Refused(400, "'cmd' must be a non-empty string (run by bash -l -c)")
    envs = e2b.string_map(payload.get("envs"), "envs")
    process: JSON = {"cmd": "/bin/bash", "args": ["-l", "-c", cmd], "envs": envs}
    if payload.get("cwd") is not None:
        process["cwd"] = str(payload["cwd"])
    timeout = e2b.seconds(payload.get("timeout"), "timeout", COMMAND_TIMEOUT_S)
    headers = {"Content-Type": STREAM_CONTENT_TYPE, "Connect-Protocol-Version": "1"}
    if timeout:  # 0: no deadline
        headers["Connect-Timeout-Ms"] = str(timeout * 1000)
    return encode_envelope(json.dumps({"process": process}).encode()), headers


def command_failure(status: int, text: str) -> e2b.Refused:
    """The agent refused the command (it did not start)."""
    return e2b.Refused(502, f"the agent answered {status}: {text}")


class CommandOutput:
    """The Process.Start stream, folded into the command's result: output (capped), exit code, error."""

    def __init__(self) -> None:
        self.stdout, self.stderr = bytearray(), bytearray()
        self.end: JSON = {}
        self._decoder = EnvelopeDecoder(max_length=MAX_OUTPUT_BYTES * 2)

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the stream; Refused when it ends with an error."""
        for flags, message in self._decoder.feed(chunk):
            parsed = json.loads(message)
            if flags & FLAG_END_STREAM:
                _raise_stream_error(parsed)
            else:
                self._event(parsed.get("event") or {})

    def _event(self, event: Mapping[str, Any]) -> None:
        for stream, sink in (("stdout", self.stdout), ("stderr", self.stderr)):
            data = (event.get("data") or {}).get(stream)
            if data and len(sink) < MAX_OUTPUT_BYTES:
                sink.extend(base64.b64decode(data)[: MAX_OUTPUT_BYTES - len(sink)])
        if "end" in event:
            self.end = event["end"]

    def result(self) -> JSON:
        return {
            "exitCode": int(self.end.get("exitCode") or 0),
            "stdout": self.stdout.decode(errors="replace"),
            "stderr": self.stderr.decode(errors="replace"),
            "error": self.end.get("error"),
        }


def _raise_stream_error(end_stream: Mapping[str, Any]) -> None:
    error = end_stream.get("error")
    if error:
        raise e2b.Refused(
            504 if error.get("code") == "deadline_exceeded" else 502, f"{error.get('code')}: {error.get('message')}"
        )


# --- code: the interpreter's /execute --------------------------------------------------------------


def execute_request(payload: Mapping[str, Any]) -> JSON:
    """The /execute body for a code cell."""
    if not isinstance(payload.get("code"), str):
        raise e2b.Refused(400, "'code' must be a string")
    execute: JSON = {"code": payload["code"]}
    if payload.get("language") is not None:
        execute["language"] = payload["language"]
    return execute


def execute_failure(status: int, text: str) -> e2b.Refused:
    """The interpreter refused the cell: its client errors pass on, anything else is a bad gateway."""
    return e2b.Refused(status if status < 500 else 502, text)


class CodeOutput:
    """The /execute lines, folded into the cell's result."""

    def __init__(self) -> None:
        self.stdout = self.stderr = ""
        self.results: list[JSON] = []
        self.error: JSON | None = None
        self.execution_count: Any = None

    def feed(self, raw: bytes) -> None:
        """Take one line of the stream (blank lines are keep-alives)."""
        if not raw.strip():
            return
        line = json.loads(raw)
        kind = line.get("type")
        if kind == "stdout":
            self.stdout += line.get("text", "")
        elif kind == "stderr":
            self.stderr += line.get("text", "")
        elif kind == "result":
            self.results.append({k: v for k, v in line.items() if k != "type"})
        elif kind == "error":
            self.error = {k: line.get(k) for k in ("name", "value", "traceback")}
        elif kind == "number_of_executions":
            self.execution_count = line.get("execution_count")

    def result(self) -> JSON:
        return {
            "results": self.results,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "error": self.error,
            "executionCount": self.execution_count,
        }


# --- files: envd /files ----------------------------------------------------------------------------


def file_path(query: Mapping[str, str]) -> str:
    path = query.get("path")
    if not path:
        raise e2b.Refused(400, "the 'path' query parameter is required")
    return path


def file_request_headers(method: str, accept_encoding: str) -> dict[str, str]:
    headers = {"Accept-Encoding": accept_encoding}
    if method == "POST":  # an upload: the request body is the file's bytes
        headers["Content-Type"] = "application/octet-stream"
    return headers


def file_response_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() in FILE_HEADERS}
