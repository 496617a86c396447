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

from sandbox_operator.agent.connect import (
    FLAG_END_STREAM,
    HTTP_STATUS_BY_CODE,
    STREAM_CONTENT_TYPE,
    ConnectError,
    EnvelopeDecoder,
    encode_envelope,
)
from sandbox_operator.api import Phase
from sandbox_operator.api.names import SESSION_LABEL
from sandbox_operator.gateway import e2b

JSON = dict[str, Any]

SESSION_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
SESSION_PREFIX = "session-"  # a session's Sandbox is `session-<id>`
DEFAULT_TEMPLATE = "base"
# What a command or a code cell returns inline, per stream (stdout, stderr, and a cell's results):
# past it the stream is cut, ends in TRUNCATED_MARKER and is named in the result's "truncated".
MAX_OUTPUT_BYTES = 4 << 20
TRUNCATED_MARKER = "\n[output truncated: over {limit} bytes]\n"
# One message of the agent's stream (a Process.Start envelope, an /execute line): one that is longer
# is not parsed (a line is dropped and "messages" named in "truncated"; an envelope is a 502).
MAX_MESSAGE_BYTES = 2 * MAX_OUTPUT_BYTES
MAX_PATH_BYTES = 4096  # PATH_MAX: a longer path fails in the sandbox anyway
COMMAND_TIMEOUT_S = 60  # a command's default execution timeout
# Connect errors that are about the request (a bad cwd, a missing path): the client's to fix, passed
# on with their status; any other error of the agent is the gateway's upstream failing (502).
CLIENT_ERROR_CODES = frozenset(
    {"invalid_argument", "failed_precondition", "out_of_range", "not_found", "already_exists", "permission_denied"}
)
# HTTP statuses of an agent refusing a request the gateway built from the client's fields.
CLIENT_ERROR_STATUSES = frozenset({400, 404, 409, 413, 422})
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
    e2b.text(cmd, "cmd")
    envs = e2b.string_map(payload.get("envs"), "envs")
    process: JSON = {"cmd": "/bin/bash", "args": ["-l", "-c", cmd], "envs": envs}
    if payload.get("cwd") is not None:
        process["cwd"] = _path(payload["cwd"], "cwd")
    timeout = e2b.seconds(payload.get("timeout"), "timeout", COMMAND_TIMEOUT_S)
    headers = {"Content-Type": STREAM_CONTENT_TYPE, "Connect-Protocol-Version": "1"}
    if timeout:  # 0: no deadline
        headers["Connect-Timeout-Ms"] = str(timeout * 1000)
    return encode_envelope(json.dumps({"process": process}).encode()), headers


def command_failure(status: int, text: str) -> e2b.Refused:
    """The agent refused a call (the command did not start, the cell did not run): its refusals of
    what the client sent pass on, anything else (its token, its failures) is a bad gateway."""
    return e2b.Refused(status if status in CLIENT_ERROR_STATUSES else 502, f"the agent answered {status}: {text}")


def _malformed(what: str) -> e2b.Refused:
    # The agent runs in the tenant's sandbox: a stream it garbles is its failure, not the gateway's.
    return e2b.Refused(502, f"the agent's {what} is malformed")


def _object(raw: bytes, what: str) -> Mapping[str, Any]:
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError):
        raise _malformed(what) from None
    if not isinstance(parsed, Mapping):
        raise _malformed(what)
    return parsed


class _Capped:
    """One output stream, kept up to MAX_OUTPUT_BYTES: parts joined once (linear, however many)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.truncated = False

    def add(self, data: bytes) -> None:
        room = MAX_OUTPUT_BYTES - self.size
        if len(data) > room:
            self.truncated = True
            data = data[:room]
        if data:
            self.parts.append(data)
            self.size += len(data)

    def text(self) -> str:
        joined = b"".join(self.parts).decode(errors="replace")
        return joined + TRUNCATED_MARKER.format(limit=MAX_OUTPUT_BYTES) if self.truncated else joined


def _with_truncated(result: JSON, streams: Mapping[str, _Capped | bool]) -> JSON:
    cut = [name for name, stream in streams.items() if (stream.truncated if isinstance(stream, _Capped) else stream)]
    if cut:  # only then: an untruncated result keeps its shape
        result["truncated"] = cut
    return result


class CommandOutput:
    """The Process.Start stream, folded into the command's result: output (capped), exit code, error."""

    def __init__(self) -> None:
        self._out, self._err = _Capped(), _Capped()
        self.end: Mapping[str, Any] = {}
        self._decoder = EnvelopeDecoder(max_length=MAX_MESSAGE_BYTES)

    @property
    def stdout(self) -> bytes:
        return b"".join(self._out.parts)

    @property
    def stderr(self) -> bytes:
        return b"".join(self._err.parts)

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the stream; Refused when it ends with an error or is malformed."""
        try:
            envelopes = self._decoder.feed(chunk)
        except ConnectError as exc:  # an envelope over MAX_MESSAGE_BYTES, or compressed
            raise e2b.Refused(502, f"the agent's output stream is malformed: {exc.message}") from None
        for flags, message in envelopes:
            parsed = _object(message, "output stream")
            if flags & FLAG_END_STREAM:
                _raise_stream_error(parsed)
            else:
                event = parsed.get("event") or {}
                if not isinstance(event, Mapping):
                    raise _malformed("output stream")
                self._event(event)

    def _event(self, event: Mapping[str, Any]) -> None:
        data = event.get("data") or {}
        if not isinstance(data, Mapping):
            raise _malformed("output stream")
        for stream, sink in (("stdout", self._out), ("stderr", self._err)):
            chunk = data.get(stream)
            if not chunk:
                continue
            if sink.size >= MAX_OUTPUT_BYTES:  # full: not even decoded
                sink.truncated = True
                continue
            try:
                sink.add(base64.b64decode(chunk))
            except (TypeError, ValueError):
                raise _malformed("output stream") from None
        if "end" in event:
            end = event["end"]
            if not isinstance(end, Mapping):
                raise _malformed("output stream")
            self.end = end

    def result(self) -> JSON:
        exit_code = self.end.get("exitCode") or 0
        if isinstance(exit_code, bool) or not isinstance(exit_code, int):
            raise _malformed("exit code")
        result: JSON = {
            "exitCode": exit_code,
            "stdout": self._out.text(),
            "stderr": self._err.text(),
            "error": self.end.get("error"),
        }
        return _with_truncated(result, {"stdout": self._out, "stderr": self._err})


def _raise_stream_error(end_stream: Mapping[str, Any]) -> None:
    error = end_stream.get("error")
    if not error:
        return
    if not isinstance(error, Mapping):
        raise _malformed("output stream")
    code, message = str(error.get("code")), str(error.get("message"))[:4096]
    if code == "deadline_exceeded":
        status = 504
    elif code in CLIENT_ERROR_CODES:  # e.g. a cwd that does not exist: the client's to fix
        status = HTTP_STATUS_BY_CODE[code]
    else:
        status = 502
    raise e2b.Refused(status, f"{code}: {message}")


# --- code: the interpreter's /execute --------------------------------------------------------------


def execute_request(payload: Mapping[str, Any]) -> JSON:
    """The /execute body for a code cell."""
    if not isinstance(payload.get("code"), str):
        raise e2b.Refused(400, "'code' must be a string")
    execute: JSON = {"code": payload["code"]}
    if payload.get("language") is not None:
        execute["language"] = e2b.text(payload["language"], "language")
    return execute


def execute_failure(status: int, text: str) -> e2b.Refused:
    """The interpreter refused the cell: its client errors pass on, anything else is a bad gateway."""
    return e2b.Refused(status if status in CLIENT_ERROR_STATUSES else 502, text)


class CodeOutput:
    """The /execute lines, folded into the cell's result. Fed any chunks of the stream (not lines: a
    line may be longer than any read buffer); each stream is capped, and so is one line."""

    def __init__(self) -> None:
        self._out, self._err = _Capped(), _Capped()
        self._results: list[JSON] = []
        self._results_size = 0
        self._results_cut = False
        self._dropped = False  # a line over MAX_MESSAGE_BYTES was dropped (what it was is unknown)
        self.error: JSON | None = None
        self.execution_count: Any = None
        self._line = bytearray()  # the line being received
        self._skipping = False  # the line being received is over MAX_MESSAGE_BYTES: dropped

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the stream; complete lines are folded in (blank ones are keep-alives)."""
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                self._take(chunk[start:])
                return
            self._take(chunk[start:end])
            if not self._skipping:
                self._line_done(bytes(self._line))
            self._line.clear()
            self._skipping = False
            start = end + 1

    def _take(self, part: bytes) -> None:
        if self._skipping or not part:
            return
        if len(self._line) + len(part) > MAX_MESSAGE_BYTES:
            self._skipping = self._dropped = True
            self._line.clear()
            return
        self._line += part

    def _line_done(self, raw: bytes) -> None:
        if not raw.strip():
            return
        line = _object(raw, "/execute stream")
        kind = line.get("type")
        if kind in ("stdout", "stderr"):
            text = line.get("text", "")
            if not isinstance(text, str):
                raise _malformed("/execute stream")
            (self._out if kind == "stdout" else self._err).add(text.encode(errors="replace"))
        elif kind == "result":
            if self._results_size + len(raw) > MAX_OUTPUT_BYTES:
                self._results_cut = True
            else:
                self._results_size += len(raw)
                self._results.append({k: v for k, v in line.items() if k != "type"})
        elif kind == "error":
            self.error = {k: line.get(k) for k in ("name", "value", "traceback")}
        elif kind == "number_of_executions":
            self.execution_count = line.get("execution_count")

    @property
    def stdout(self) -> str:
        return self._out.text()

    def result(self) -> JSON:
        """The cell's result; a last line without its newline counts."""
        if self._line and not self._skipping:
            self._line_done(bytes(self._line))
        self._line.clear()
        result: JSON = {
            "results": self._results,
            "stdout": self._out.text(),
            "stderr": self._err.text(),
            "error": self.error,
            "executionCount": self.execution_count,
        }
        cut: dict[str, _Capped | bool] = {"stdout": self._out, "stderr": self._err}
        cut.update(results=self._results_cut, messages=self._dropped)
        return _with_truncated(result, cut)


# --- files: envd /files ----------------------------------------------------------------------------


def _path(value: Any, field: str) -> str:
    path = e2b.text(value, field)
    if len(path.encode(errors="replace")) > MAX_PATH_BYTES:
        raise e2b.BadRequest(f"{field} may be at most {MAX_PATH_BYTES} bytes")
    return path


def file_path(query: Mapping[str, str]) -> str:
    path = query.get("path")
    if not path:
        raise e2b.Refused(400, "the 'path' query parameter is required")
    return _path(path, "path")


def file_request_headers(method: str, accept_encoding: str) -> dict[str, str]:
    headers = {"Accept-Encoding": accept_encoding}
    if method == "POST":  # an upload: the request body is the file's bytes
        headers["Content-Type"] = "application/octet-stream"
    return headers


def file_response_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() in FILE_HEADERS}
