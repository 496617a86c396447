"""The session API as pure functions, as e2b.py is for the E2B API: session ids → Sandbox names, what
to answer for which Sandbox state, requests → agent calls, agent output → responses. No I/O here;
gateway.session does the talking.
"""

from __future__ import annotations

import base64
import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from sandbox_operator.agent.connect import (
    FLAG_END_STREAM,
    HTTP_STATUS_BY_CODE,
    STREAM_CONTENT_TYPE,
    ConnectError,
    EnvelopeDecoder,
    encode_envelope,
)
from sandbox_operator.agent.filesystem import FILE_TYPE_DIRECTORY
from sandbox_operator.api import OnIdle, Phase
from sandbox_operator.api.names import (
    CREATED_BY_ANNOTATION,
    EXECUTION_TIMEOUT_PREFIX,
    SESSION_LABEL,
    SESSION_TYPE_ANNOTATION,
)
from sandbox_operator.api.resolve import capped_lifetime
from sandbox_operator.gateway import e2b

JSON = dict[str, Any]

SESSION_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
SESSION_PREFIX = "session-"  # a session's Sandbox is `session-<id>`
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
# The keys of an /execute result that are not rich output (text is the output; the rest is bookkeeping).
PLAIN_RESULT_KEYS = frozenset({"text", "is_main_result", "extra"})
ARTIFACT_PREFERENCE = ("chart", "png", "jpeg", "svg", "pdf", "html", "latex", "markdown", "json", "javascript")


def session_name(session_id: str) -> str:
    """The name of the session's Sandbox; 400 for an id that is not a DNS-label-safe name."""
    if not SESSION_ID.match(session_id):
        raise e2b.Refused(
            400, "a session id is 1-40 lowercase letters, digits and '-', starting and ending with a letter or digit"
        )
    return SESSION_PREFIX + session_id


# --- configuration ---------------------------------------------------------------------------------


class SandboxType(enum.StrEnum):
    """What `POST /start` asks for: the gateway's code-interpreter template, or a template of the
    client's choosing (`template_id`)."""

    CODE_INTERPRETER = "code_interpreter"
    CUSTOM = "custom"


@dataclass(frozen=True)
class SessionLimits:
    """The session API's defaults, per gateway (`sandbox-gateway --session-*`): every session sandbox
    gets these timeouts, whatever its template's defaults are (a template's maxLifetimeLimit still
    caps them)."""

    execution_s: int = 300  # one execute or install
    idle_s: int = 30 * 60  # then the sandbox suspends (a later call resumes it on the same workspace)
    lifetime_s: int = 60 * 60  # then it ends (the next start makes a new one)
    code_interpreter_template: str = "code-interpreter"  # sandbox_type code_interpreter
    custom_template: str = "base"  # sandbox_type custom without a template_id
    anonymous_namespace: str | None = None  # serve calls without X-API-KEY in this namespace (opt-in)

    def __post_init__(self) -> None:
        for field, value in (("execution", self.execution_s), ("idle", self.idle_s), ("lifetime", self.lifetime_s)):
            if not 0 < value <= e2b.MAX_TIMEOUT_S:
                raise ValueError(f"the session {field} timeout must be 1 to {e2b.MAX_TIMEOUT_S} s, not {value}")


# --- the session's sandbox -------------------------------------------------------------------------


class Ensure(enum.Enum):
    """What a call that needs the session's sandbox does for the sandbox the session has now."""

    CREATE = "create"  # none
    REPLACE = "replace"  # one that ended, failed or is being deleted: wait for it to go, then create
    RESUME = "resume"  # a paused one
    SERVE = "serve"  # a running (or starting) one


def ensure_step(existing: Mapping[str, Any] | None) -> Ensure:
    if existing is None:
        return Ensure.CREATE
    state = e2b.state_of(existing)
    if state is None or e2b.deleting(existing):
        return Ensure.REPLACE
    return Ensure.RESUME if state == "paused" else Ensure.SERVE


def start_request(payload: Mapping[str, Any], limits: SessionLimits) -> tuple[SandboxType, str]:
    """The sandbox type and template a `POST /start` body asks for; 400 for anything else."""
    raw_type = payload.get("sandbox_type", SandboxType.CODE_INTERPRETER.value)
    try:
        sandbox_type = SandboxType(raw_type)
    except ValueError:
        choices = " or ".join(repr(t.value) for t in SandboxType)
        raise e2b.Refused(400, f"sandbox_type must be {choices}, not {raw_type!r}") from None
    template_id = payload.get("template_id")
    if template_id is None:
        default = limits.code_interpreter_template
        return sandbox_type, default if sandbox_type is SandboxType.CODE_INTERPRETER else limits.custom_template
    if not isinstance(template_id, str) or not template_id:
        raise e2b.Refused(400, "template_id must be a non-empty string")
    return sandbox_type, template_id


def session_manifest(
    *,
    namespace: str,
    session_id: str,
    sandbox_type: SandboxType,
    wanted: str,
    templates: Mapping[str, Mapping[str, Any]],
    limits: SessionLimits,
) -> JSON:
    """The session's Sandbox: the template asked for with the session's timeouts (idle suspends, so
    the workspace outlives a pause). 400 for an unknown template, 403 for one the namespace may not use."""
    name = e2b.template_for(wanted, templates)
    if name is None:
        raise e2b.Refused(400, f"template {wanted!r} not found: no SandboxTemplate of that name")
    template = e2b.usable_template(name, templates[name], namespace)
    lifetime = capped_lifetime(limits.lifetime_s, template)
    manifest = e2b.sandbox_from_request({}, namespace=namespace, template=name)
    manifest["spec"]["timeouts"] = {
        "maxLifetime": f"{lifetime}s",
        "idle": f"{min(limits.idle_s, lifetime)}s",
        "execution": f"{min(limits.execution_s, lifetime)}s",
    }
    manifest["spec"]["onIdle"] = OnIdle.SUSPEND.value
    metadata = manifest["metadata"]
    metadata["name"] = session_name(session_id)
    metadata["labels"] = {SESSION_LABEL: session_id}
    metadata["annotations"] = {CREATED_BY_ANNOTATION: "session-api", SESSION_TYPE_ANNOTATION: sandbox_type.value}
    return manifest


def live_sandbox(body: JSON | None) -> JSON | None:
    """The session's sandbox as `GET /status` shows it: None when it has none (or it is being deleted)."""
    if body is None or e2b.deleting(body):
        return None
    return body


def existing_sandbox(body: JSON | None, session_id: str) -> JSON:
    """The sandbox a download or a listing reads from; 404 when the session has none to read."""
    if body is None or e2b.deleting(body) or e2b.state_of(body) is None:
        raise e2b.Refused(404, f"session {session_id} has no sandbox: POST /start first")
    return body


class SessionStatus(enum.StrEnum):
    """SandboxInfo.status."""

    STARTING = "starting"
    RUNNING = "running"
    STOPPED = "stopped"
    ERROR = "error"


def session_status(body: Mapping[str, Any]) -> SessionStatus:
    status = body.get("status") or {}
    phase = status.get("phase")
    if phase == Phase.RUNNING:
        return SessionStatus.RUNNING if status.get("podIP") else SessionStatus.STARTING
    if phase in (Phase.SUSPENDING, Phase.SUSPENDED, Phase.TERMINATING, Phase.TERMINATED):
        return SessionStatus.STOPPED
    if phase == Phase.ERROR:
        return SessionStatus.ERROR
    return SessionStatus.STARTING  # no phase yet, Creating, Resuming


def _iso(stamp: datetime) -> str:
    return stamp.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _parsed(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def sandbox_info(session_id: str, body: Mapping[str, Any], last_call: datetime | None) -> JSON:
    """`SandboxInfo`. last_activity is the latest of the operator's record (status.lastActivityAt),
    this gateway's last call for the session, and the start."""
    metadata = body.get("metadata") or {}
    status = body.get("status") or {}
    created = _parsed(metadata.get("creationTimestamp")) or datetime.now(UTC)
    moments = [created, _parsed(status.get("startedAt")), _parsed(status.get("lastActivityAt")), last_call]
    annotations = metadata.get("annotations") or {}
    return {
        "sandbox_id": e2b.sandbox_id_of(body),
        "session_id": session_id,
        "sandbox_type": annotations.get(SESSION_TYPE_ANNOTATION) or SandboxType.CUSTOM.value,
        "status": session_status(body).value,
        "created_at": _iso(created),
        "last_activity": _iso(max(moment for moment in moments if moment is not None)),
    }


def error_body(status: int, message: str) -> tuple[int, JSON]:
    """The session API's error: `{"detail"}`, with the statuses its contract names. What fails in or
    behind the sandbox (its agent unreachable, a start that failed or timed out) is a 500."""
    answered = 500 if status >= 500 else 400 if status == 422 else status
    return answered, {"detail": message}


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
    if code == "deadline_exceeded":  # the command's timeout: the contract's execution timeout
        status = 408
    elif code in CLIENT_ERROR_CODES:  # e.g. a cwd that does not exist: the client's to fix
        status = HTTP_STATUS_BY_CODE[code]
    else:
        status = 502
    raise e2b.Refused(status, f"{code}: {message}")


# --- code: the interpreter's /execute --------------------------------------------------------------


def execute_request(payload: Mapping[str, Any], limits: SessionLimits) -> tuple[JSON, int]:
    """The interpreter's /execute body for `POST /execute` `{"code", "timeout"?, "language"?}`, and its timeout (s):
    the session's execution timeout, or less when the body asks (an extension of the contract)."""
    code = payload.get("code")
    if not isinstance(code, str):
        raise e2b.Refused(400, "'code' must be a string")
    if not code.strip():
        raise e2b.Refused(400, "'code' is empty")
    execute: JSON = {"code": code}
    if payload.get("language") is not None:  # another kernel of the sandbox (an extension too)
        execute["language"] = e2b.text(payload["language"], "language")
    timeout = limits.execution_s
    if payload.get("timeout") is not None:
        asked = e2b.seconds(payload["timeout"], "timeout")
        timeout = min(asked, timeout) if asked else timeout
    execute["timeout"] = timeout
    return execute, timeout


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


# --- the contract's ExecutionResult ----------------------------------------------------------------


def timed_out(error: Mapping[str, Any] | None) -> bool:
    """The interpreter's own timeout (it interrupted the code), not user code raising TimeoutError."""
    return bool(
        error
        and error.get("name") == "TimeoutError"
        and str(error.get("value") or "").startswith(EXECUTION_TIMEOUT_PREFIX)
    )


def _artifact(result: Mapping[str, Any]) -> JSON | None:
    """A cell's rich result (a chart, an image, HTML...) as an artifact; None for plain text only."""
    rich = {k: v for k, v in result.items() if k not in PLAIN_RESULT_KEYS and v is not None}
    if not rich:
        return None
    kind = next((name for name in ARTIFACT_PREFERENCE if name in rich), sorted(rich)[0])
    artifact: JSON = {"type": kind, "data": rich[kind]}
    if len(rich) > 1:
        artifact["formats"] = rich
    return artifact


def execution_result(cell: Mapping[str, Any], elapsed_s: float, timeout: int) -> JSON:
    """`ExecutionResult` from a folded /execute stream (CodeOutput.result()); 408 when the code ran
    into the execution timeout (the kernel was interrupted, its state kept)."""
    error = cell.get("error")
    if timed_out(error):
        raise e2b.Refused(408, f"the execution timed out after {timeout} s and was interrupted")
    results = cell.get("results") or []
    texts = [str(r["text"]) for r in results if r.get("is_main_result") and r.get("text") is not None]
    output = "".join(part for part in (cell.get("stdout"), cell.get("stderr")) if part)
    if texts:
        output += ("" if not output or output.endswith("\n") else "\n") + "\n".join(texts)
    answer: JSON = {
        "success": error is None,
        "output": output,
        "error": f"{error.get('name')}: {error.get('value')}" if error else None,
        "execution_time_ms": max(0, round(elapsed_s * 1000)),
        "artifacts": [a for a in map(_artifact, results) if a is not None],
    }
    if cell.get("truncated"):
        answer["truncated"] = cell["truncated"]
    return answer


# --- install: pip in the session's kernel ----------------------------------------------------------

# One requirement as pip reads it, without options, URLs or paths: a name, extras, version specifiers.
REQUIREMENT = re.compile(
    r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?"  # the project name
    r"(\[[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*\])?"  # extras
    r"((===|==|~=|!=|<=|>=|<|>)[A-Za-z0-9.*+!_-]+(,(===|==|~=|!=|<=|>=|<|>)[A-Za-z0-9.*+!_-]+)*)?$"
)
MAX_PACKAGES = 64
MAX_REQUIREMENT_CHARS = 200


def install_packages(payload: Mapping[str, Any]) -> list[str]:
    """The requirements of `POST /install`; 400 for anything pip would read as an option, a URL or a path."""
    packages = payload.get("packages")
    if not isinstance(packages, list) or not packages:
        raise e2b.Refused(400, "'packages' must be a non-empty list of requirement strings")
    if len(packages) > MAX_PACKAGES:
        raise e2b.Refused(400, f"at most {MAX_PACKAGES} packages per install")
    for package in packages:
        if not isinstance(package, str) or len(package) > MAX_REQUIREMENT_CHARS or not REQUIREMENT.match(package):
            raise e2b.Refused(
                400,
                f"{package!r} is not a requirement (a project name, [extras] and version specifiers, e.g. 'numpy>=2')",
            )
    return packages


def install_code(packages: list[str]) -> str:
    """The cell that installs `packages` with the kernel's own pip (a user install: the image's
    site-packages are root's) and makes them importable by the next execute without a restart (the
    user site directory did not exist when the kernel started, so it is not on sys.path yet)."""
    return (
        "import importlib as _si, site as _ss, subprocess as _sp, sys as _sy\n"
        f"_sr = _sp.run([_sy.executable, '-m', 'pip', 'install', '--user', '--no-input', '--', *{packages!r}], "
        "stdout=_sp.PIPE, stderr=_sp.STDOUT, text=True)\n"
        "print(_sr.stdout, end='')\n"
        "_ss.addsitedir(_ss.getusersitepackages()); _si.invalidate_caches()\n"
        "if _sr.returncode:\n"
        "    raise RuntimeError(f'pip install exited with {_sr.returncode}')\n"
    )


# --- upload, download, listing ---------------------------------------------------------------------

DEFAULT_UPLOAD_DIR = "/home/user/upload"
DEFAULT_LIST_DIR = "/home/user"
UPLOAD_FIELD = "file"  # the multipart form field of `POST /upload`


def directory_query(query: Mapping[str, str], default: str) -> str:
    """The `path` of an upload or a listing: an absolute directory (a default when absent)."""
    path = query.get("path") or default
    _path(path, "path")
    if not path.startswith("/"):
        raise e2b.Refused(400, f"'path' must be an absolute directory, not {path!r}")
    return path.rstrip("/") or "/"


def upload_target(directory: str, filename: str | None) -> str:
    """Where an uploaded file goes: its own name (no directory part) in `directory`."""
    if not filename:
        raise e2b.Refused(400, f"the '{UPLOAD_FIELD}' part needs a filename")
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    if name in ("", ".", "..") or "\x00" in name:
        raise e2b.Refused(400, f"{filename!r} is not a file name")
    return _path(f"{directory.rstrip('/')}/{name}", "path")


def download_headers(path: str, agent_headers: Mapping[str, str]) -> dict[str, str]:
    """A download's headers: the bytes as an attachment named after the file (RFC 6266; a name that is
    not plain ASCII also goes as filename*)."""
    name = path.rstrip("/").rsplit("/", 1)[-1] or "download"
    plain = name.encode("ascii", "replace").decode().replace('"', "_").replace("\\", "_").replace("?", "_")
    disposition = f'attachment; filename="{plain}"'
    if plain != name:
        disposition += f"; filename*=UTF-8''{quote(name, safe='')}"
    headers = {"Content-Type": "application/octet-stream", "Content-Disposition": disposition}
    if "content-encoding" in {k.lower() for k in agent_headers}:
        headers["Content-Encoding"] = next(v for k, v in agent_headers.items() if k.lower() == "content-encoding")
    return headers


def list_request(path: str) -> bytes:
    """The envd Filesystem.ListDir request (Connect JSON) for one level of `path`."""
    return json.dumps({"path": path, "depth": 1}).encode()


def listed_entries(answer: Any) -> list[JSON]:
    """ListDir's answer as `[{"path", "size", "is_directory"}]` (protojson sends int64 as a string)."""
    entries = answer.get("entries") if isinstance(answer, Mapping) else None
    if not isinstance(entries, list):
        raise _malformed("directory listing")
    listed: list[JSON] = []
    for entry in entries:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("path"), str):
            raise _malformed("directory listing")
        try:
            size = int(entry.get("size") or 0)
        except (TypeError, ValueError):
            raise _malformed("directory listing") from None
        listed.append({"path": entry["path"], "size": size, "is_directory": entry.get("type") == FILE_TYPE_DIRECTORY})
    return sorted(listed, key=lambda item: item["path"])


def agent_refusal(status: int, text: str, path: str) -> e2b.Refused:
    """A files call the agent refused: a missing path is the contract's 404, the client's other
    mistakes a 400, anything else the sandbox's failure (500)."""
    if status == 404:
        return e2b.Refused(404, f"{path} not found in the sandbox")
    if status in CLIENT_ERROR_STATUSES:
        return e2b.Refused(400, f"{path}: {text[:500]}")
    return e2b.Refused(500, f"the sandbox's agent answered {status}: {text[:500]}")


def parse_agent_json(raw: bytes, what: str) -> Mapping[str, Any]:
    """An agent's JSON object answer; a 502 (the sandbox's failure) for anything else."""
    return _object(raw, what)


def command_result(command: Mapping[str, Any], elapsed_s: float) -> JSON:
    """`POST /commands` (an extension): a CommandOutput result as an ExecutionResult plus its exit code."""
    exit_code = command["exitCode"]
    failed = exit_code != 0 or command.get("error")
    answer: JSON = {
        "success": not failed,
        "output": command["stdout"] + command["stderr"],
        "error": (command.get("error") or f"exit status {exit_code}") if failed else None,
        "execution_time_ms": max(0, round(elapsed_s * 1000)),
        "artifacts": [],
        "exit_code": exit_code,
        "stdout": command["stdout"],
        "stderr": command["stderr"],
    }
    if command.get("truncated"):
        answer["truncated"] = command["truncated"]
    return answer
