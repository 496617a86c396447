"""The session REST API: plain HTTP/JSON for clients without an E2B SDK (curl, other languages).

A session is a name the client chooses (an agent conversation, a notebook, a CI job); it owns at
most one sandbox, the Sandbox `session-<id>` in the API key's namespace, so every call is
idempotent by name:

    PUT    /api/v1/session/{id}/sandbox             get or create (resume when paused) → 201 / 200
    GET    /api/v1/session/{id}/sandbox             its state                          → 200 / 404
    DELETE /api/v1/session/{id}/sandbox             end it                             → 204 / 404
    POST   /api/v1/session/{id}/sandbox/commands    {"cmd", "cwd"?, "envs"?, "timeout"?} → exit code, stdout, stderr
    POST   /api/v1/session/{id}/sandbox/code        {"code", "language"?}              → results, stdout, stderr, error
    GET    /api/v1/session/{id}/sandbox/files?path= the file's bytes
    PUT    /api/v1/session/{id}/sandbox/files?path= the request body becomes the file

Commands and code run through the sandbox's agent (envd Process.Start, the interpreter's /execute),
so they obey the sandbox's execution timeout and output cap like SDK calls do.
"""

from __future__ import annotations

import base64
import json
import re
from typing import TYPE_CHECKING, Any

from aiohttp import web

from sandbox_operator.agent.connect import FLAG_END_STREAM, STREAM_CONTENT_TYPE, EnvelopeDecoder, encode_envelope
from sandbox_operator.api import Phase
from sandbox_operator.api.names import ENVD_PORT, INTERPRETER_PORT, SESSION_LABEL
from sandbox_operator.gateway import e2b
from sandbox_operator.gateway.http import json_response, read_payload
from sandbox_operator.kube import ApiError

if TYPE_CHECKING:
    from sandbox_operator.gateway.server import Gateway

JSON = dict[str, Any]

SESSION_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
MAX_OUTPUT_BYTES = 4 << 20  # a command's stdout/stderr returned inline


def session_name(session_id: str) -> str:
    if not SESSION_ID.match(session_id):
        raise e2b.Refused(
            400, "a session id is 1-40 lowercase letters, digits and '-', starting and ending with a letter or digit"
        )
    return f"session-{session_id}"


def routes(gateway: Gateway) -> list[tuple[str, str, Any]]:
    api = SessionApi(gateway)
    base = "/api/v1/session/{session}/sandbox"
    return [
        ("PUT", base, api.ensure),
        ("GET", base, api.get),
        ("DELETE", base, api.delete),
        ("POST", base + "/commands", api.commands),
        ("POST", base + "/code", api.code),
        ("GET", base + "/files", api.read_file),
        ("PUT", base + "/files", api.write_file),
    ]


class SessionApi:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    def _key(self, request: web.Request) -> tuple[str, str]:
        namespace = self.gw.namespace_of(request)
        return namespace, session_name(request.match_info["session"])

    def _describe(self, request: web.Request, body: JSON) -> JSON:
        template = self.gw.cache.template(body["spec"]["template"])
        detail = e2b.sandbox_detail(body, template, self.gw.token_of(body))
        return {"sessionID": request.match_info["session"], "phase": (body.get("status") or {}).get("phase"), **detail}

    def _serving(self, key: tuple[str, str]) -> JSON:
        body = self.gw.cache.sandboxes.get(key)
        if body is None or body["metadata"].get("deletionTimestamp") or e2b.state_of(body) is None:
            raise e2b.Refused(404, f"session {key[1].removeprefix('session-')} has no sandbox: PUT it first")
        status = body.get("status") or {}
        if status.get("phase") != Phase.RUNNING or not status.get("podIP"):
            raise e2b.Refused(
                409, f"the session's sandbox is {status.get('phase') or 'starting'}, not Running: PUT it to resume"
            )
        return body

    async def ensure(self, request: web.Request) -> web.StreamResponse:
        namespace, name = self._key(request)
        payload = await read_payload(request)
        existing = self.gw.cache.sandboxes.get((namespace, name))
        created = False
        if existing is None or e2b.state_of(existing) is None:
            if existing is not None:  # ended or failed: make room for a new one
                await self.gw.delete_sandbox(namespace, name, wait=True)
            template = self.gw.template_named(e2b.template_name(payload.get("template") or "base"))
            if template is None:
                raise e2b.Refused(400, f"template {payload.get('template') or 'base'!r} not found")
            manifest = e2b.sandbox_from_request(
                {
                    "timeout": payload.get("timeout"),
                    "metadata": payload.get("metadata"),
                    "envVars": payload.get("envVars"),
                },
                namespace=namespace,
                template=template,
            )
            manifest["metadata"]["name"] = name
            manifest["metadata"]["labels"] = {SESSION_LABEL: request.match_info["session"]}
            try:
                await self.gw.create_sandbox(namespace, manifest)
                created = True
            except ApiError as exc:
                if exc.status != 409:
                    raise  # 409: a concurrent PUT of the same session created it; serve that one
        elif e2b.state_of(existing) == "paused":
            await self.gw.set_suspended(namespace, name, False)
        body = await self.gw.until_serving((namespace, name), delete_on_failure=created)
        return json_response(201 if created else 200, self._describe(request, body))

    async def get(self, request: web.Request) -> web.StreamResponse:
        namespace, name = self._key(request)
        body = self.gw.cache.sandboxes.get((namespace, name))
        if body is None or e2b.state_of(body) is None:
            raise e2b.Refused(404, f"session {request.match_info['session']} has no sandbox")
        return json_response(200, self._describe(request, body))

    async def delete(self, request: web.Request) -> web.StreamResponse:
        namespace, name = self._key(request)
        if not await self.gw.delete_sandbox(namespace, name, wait=False):
            raise e2b.Refused(404, f"session {request.match_info['session']} has no sandbox")
        return web.Response(status=204)

    async def commands(self, request: web.Request) -> web.StreamResponse:
        body = self._serving(self._key(request))
        payload = await read_payload(request)
        cmd = payload.get("cmd")
        if not isinstance(cmd, str) or not cmd:
            raise e2b.Refused(400, "'cmd' must be a non-empty string (run by bash -l -c)")
        envs = e2b.string_map(payload.get("envs"), "envs")
        process: JSON = {"cmd": "/bin/bash", "args": ["-l", "-c", cmd], "envs": envs}
        if payload.get("cwd") is not None:
            process["cwd"] = str(payload["cwd"])
        timeout = e2b.seconds(payload.get("timeout"), "timeout", 60)
        headers = {"Content-Type": STREAM_CONTENT_TYPE, "Connect-Protocol-Version": "1"}
        if timeout:
            headers["Connect-Timeout-Ms"] = str(timeout * 1000)
        stdout, stderr = bytearray(), bytearray()
        end: JSON = {}
        decoder = EnvelopeDecoder(max_length=MAX_OUTPUT_BYTES * 2)
        url = f"http://{body['status']['podIP']}:{ENVD_PORT}/process.Process/Start"
        async with self.gw.upstream().post(
            url, data=encode_envelope(json.dumps({"process": process}).encode()), headers=headers
        ) as response:
            if response.status != 200:
                raise e2b.Refused(502, f"the agent answered {response.status}: {await response.text()}")
            async for chunk in response.content.iter_any():
                for flags, message in decoder.feed(chunk):
                    parsed = json.loads(message)
                    if flags & FLAG_END_STREAM:
                        if parsed.get("error"):
                            error = parsed["error"]
                            raise e2b.Refused(
                                504 if error.get("code") == "deadline_exceeded" else 502,
                                f"{error.get('code')}: {error.get('message')}",
                            )
                        continue
                    event = parsed.get("event") or {}
                    for stream, sink in (("stdout", stdout), ("stderr", stderr)):
                        data = (event.get("data") or {}).get(stream)
                        if data and len(sink) < MAX_OUTPUT_BYTES:
                            sink.extend(base64.b64decode(data)[: MAX_OUTPUT_BYTES - len(sink)])
                    if "end" in event:
                        end = event["end"]
        return json_response(
            200,
            {
                "exitCode": int(end.get("exitCode") or 0),
                "stdout": stdout.decode(errors="replace"),
                "stderr": stderr.decode(errors="replace"),
                "error": end.get("error"),
            },
        )

    async def code(self, request: web.Request) -> web.StreamResponse:
        body = self._serving(self._key(request))
        payload = await read_payload(request)
        if not isinstance(payload.get("code"), str):
            raise e2b.Refused(400, "'code' must be a string")
        execute: JSON = {"code": payload["code"]}
        if payload.get("language") is not None:
            execute["language"] = payload["language"]
        result: JSON = {"results": [], "stdout": "", "stderr": "", "error": None, "executionCount": None}
        url = f"http://{body['status']['podIP']}:{INTERPRETER_PORT}/execute"
        token = self.gw.token_of(body)
        async with self.gw.upstream().post(url, json=execute, headers={"X-Access-Token": token}) as response:
            if response.status != 200:
                raise e2b.Refused(response.status if response.status < 500 else 502, await response.text())
            async for raw in response.content:
                if not raw.strip():
                    continue
                line = json.loads(raw)
                kind = line.get("type")
                if kind in ("stdout", "stderr"):
                    result[kind] += line.get("text", "")
                elif kind == "result":
                    result["results"].append({k: v for k, v in line.items() if k != "type"})
                elif kind == "error":
                    result["error"] = {k: line.get(k) for k in ("name", "value", "traceback")}
                elif kind == "number_of_executions":
                    result["executionCount"] = line.get("execution_count")
        return json_response(200, result)

    async def read_file(self, request: web.Request) -> web.StreamResponse:
        return await self._files(request, "GET")

    async def write_file(self, request: web.Request) -> web.StreamResponse:
        return await self._files(request, "POST")

    async def _files(self, request: web.Request, method: str) -> web.StreamResponse:
        body = self._serving(self._key(request))
        path = request.query.get("path")
        if not path:
            raise e2b.Refused(400, "the 'path' query parameter is required")
        url = f"http://{body['status']['podIP']}:{ENVD_PORT}/files"
        data = await request.read() if method == "POST" else None
        headers = {"Accept-Encoding": request.headers.get("Accept-Encoding", "identity")}
        if method == "POST":
            headers["Content-Type"] = "application/octet-stream"
        async with self.gw.upstream().request(
            method, url, params={"path": path}, data=data, headers=headers
        ) as response:
            content = await response.read()
            kept = {k: v for k, v in response.headers.items() if k.lower() in ("content-type", "content-encoding")}
            return web.Response(status=response.status, body=content, headers=kept)
