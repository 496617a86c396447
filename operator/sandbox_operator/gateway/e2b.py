"""The E2B control-plane API as pure functions: request bodies → Sandbox objects, Sandbox objects →
E2B JSON, what to answer for which Sandbox state, routing and admission of data-plane requests. No I/O
here; gateway.server does the talking.

Field names follow docs/e2b-protocol.md §4.3 exactly (they are what the unmodified SDKs parse).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
import secrets
import string
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, unquote

from pydantic import ValidationError

from sandbox_operator.agent import ENVD_COMPATIBLE_VERSION
from sandbox_operator.agent.signing import tokens_equal, verify_signature
from sandbox_operator.api import (
    API_VERSION,
    OnIdle,
    Phase,
    capped_lifetime,
    namespace_allowed,
    parse_duration,
    resolve_resources,
)
from sandbox_operator.api.names import (
    AGENT_PORTS,
    AGENT_TOKEN_HEADER,
    API_KEY_LABEL,
    API_KEY_NAMESPACES_ANNOTATION,
    AUTO_RESUME_ANNOTATION,
    CREATED_BY_ANNOTATION,
    END_AT_ANNOTATION,
    ENVD_PORT,
    INTERPRETER_PORT,
    PAUSED_ANNOTATION,
    PUBLIC_TRAFFIC_ANNOTATION,
    RESUME_REQUEST_ANNOTATION,
    SIGNED_PATH_HEADER,
    TOKEN_EPOCH_ANNOTATION,
    TRAFFIC_TOKEN_HEADER,
)
from sandbox_operator.api.v1alpha1 import SandboxSpec, SandboxTemplateSpec
from sandbox_operator.resources.names import sandbox_id_for

JSON = dict[str, Any]

CLIENT_ID = "sandbox-operator"
DEFAULT_TIMEOUT_S = 300  # the SDK's documented server default
# The longest timeout accepted anywhere (sandbox lifetime, command deadline): 30 days fits the CRD's
# duration grammar (at most 9 digits of seconds) and Connect-Timeout-Ms (at most 10 digits of ms).
MAX_TIMEOUT_S = 30 * 24 * 3600
MAX_LIST_LIMIT = 100
# The SDKs' default template names, served by our templates of the same purpose.
TEMPLATE_ALIASES = {"code-interpreter-v1": "code-interpreter"}
# envd endpoints that only the orchestrator may call: never proxied from outside (docs/e2b-protocol.md §7).
INTERNAL_PATHS = frozenset({"/init", "/freeze", "/unfreeze", "/collapse", "/fsfreeze", "/fsthaw", "/files/compose"})
RUNNING_PHASES = frozenset({Phase.CREATING, Phase.RUNNING, Phase.RESUMING})
PAUSED_PHASES = frozenset({Phase.SUSPENDING, Phase.SUSPENDED})
SETTLED_PHASES = frozenset({Phase.RUNNING, Phase.ERROR, Phase.TERMINATED})  # a start has an outcome
# Not forwarded in either direction (RFC 9110 §7.6.1), plus what the proxy sets itself.
HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
# The client's credentials never reach a sandbox (the agent gets its own token), nor does a client's
# claim to a signed path (only the gateway sets that header).
STRIPPED_HEADERS = frozenset(
    {"x-api-key", AGENT_TOKEN_HEADER.lower(), TRAFFIC_TOKEN_HEADER.lower(), SIGNED_PATH_HEADER.lower()}
)
NOT_FORWARDED = HOP_HEADERS | STRIPPED_HEADERS
# Kubernetes statuses passed on as they are; any other is the gateway's upstream failing (502).
KUBERNETES_STATUSES = frozenset({400, 403, 404, 409, 422, 429})


class BadRequest(ValueError):
    """A request the API refuses with 400 and this message."""


class Refused(Exception):
    """A request the API refuses with this status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# --- identity and tokens ---------------------------------------------------------------------------


def sandbox_id_of(body: Mapping[str, Any]) -> str:
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    return str(status.get("sandboxID") or sandbox_id_for(meta["namespace"], meta["name"], meta["uid"]))


# Keeps traffic tokens apart from access tokens of the same object (an identity, a namespace first,
# never starts with it).
_TRAFFIC_TOKEN_DOMAIN = b"sandbox-traffic-token/v1\x00"


def _token_identity(body: Mapping[str, Any]) -> bytes:
    meta = body.get("metadata") or {}
    epoch = (meta.get("annotations") or {}).get(TOKEN_EPOCH_ANNOTATION)
    return (f"{meta['namespace']}/{meta['name']}/{meta['uid']}" + (f"/{epoch}" if epoch else "")).encode()


def _derived(key: bytes, message: bytes) -> str:
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def access_token(key: bytes, body: Mapping[str, Any]) -> str:
    """The sandbox's envd access token: derived from the gateway key and the object's identity, so
    the gateway can check it without storing it. It lives as long as the object (a re-created
    sandbox gets a new one), and changing the object's token-epoch annotation revokes it."""
    return _derived(key, _token_identity(body))


def public_traffic(body: Mapping[str, Any]) -> bool:
    """E2B's allowPublicTraffic: false only when the sandbox.dev/public-traffic annotation says so."""
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    return annotations.get(PUBLIC_TRAFFIC_ANNOTATION) != "false"


def traffic_token(key: bytes, body: Mapping[str, Any]) -> str:
    """The trafficAccessToken of a sandbox with private ports (allowPublicTraffic: false): derived as the
    access token is (the same on every replica, revoked by a new token epoch) but a token of its own,
    so that whoever is given it to reach the sandbox's ports cannot drive its envd. A sandbox with the
    default public traffic answers its access token (what the code-interpreter SDK sends on 49999)."""
    if public_traffic(body):
        return access_token(key, body)
    return _derived(key, _TRAFFIC_TOKEN_DOMAIN + _token_identity(body))


def api_key_digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_api_key() -> str:
    """`e2b_` + 40 hex characters: the shape older SDKs validate."""
    return "e2b_" + secrets.token_hex(20)


def api_key_secret(name: str, key: str, *, keys_namespace: str, grants: str) -> JSON:
    """The Secret the gateway reads an API key from: in its own namespace, granting `grants`."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": keys_namespace,
            "labels": {API_KEY_LABEL: "true"},
            "annotations": {API_KEY_NAMESPACES_ANNOTATION: grants},
        },
        "type": "Opaque",
        "stringData": {"key": key},
    }


# --- create ----------------------------------------------------------------------------------------


def parse_json_object(raw: bytes) -> JSON:
    """A request body as a JSON object; BadRequest for anything else, including nesting too deep for
    the parser (RecursionError) and numbers too long to convert."""
    if not raw.strip():
        return {}
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise BadRequest("the request body must be JSON (UTF-8, not nested too deeply)") from None
    if not isinstance(payload, dict):
        raise BadRequest("the request body must be a JSON object")
    return payload


def text(value: Any, field: str) -> str:
    """A string field that reaches a process, a path or the API server: no NUL bytes (every one of
    them refuses those, some with an error that is not the client's to read)."""
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be a string")
    if "\x00" in value:
        raise BadRequest(f"{field} must not contain NUL bytes")
    return value


def string_map(value: Any, field: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise BadRequest(f"{field} must be an object of string values")
    for key, item in value.items():
        text(key, f"{field} keys")
        text(item, f"{field}[{key!r}]")
    return dict(value)


def seconds(value: Any, field: str, default: int | None = None) -> int:
    if value is None:
        if default is None:
            raise BadRequest(f"{field} is required")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TIMEOUT_S:
        raise BadRequest(f"{field} must be an integer number of seconds from 0 to {MAX_TIMEOUT_S}")
    return value


def template_name(template_id: Any) -> str:
    if not isinstance(template_id, str) or not template_id:
        raise BadRequest("templateID is required")
    return template_id


def template_for(wanted: str, available: Container[str]) -> str | None:
    """The SandboxTemplate serving an E2B template name: exact, else its alias; None when neither exists."""
    for name in (wanted, TEMPLATE_ALIASES.get(wanted)):
        if name and name in available:
            return name
    return None


def usable_template(name: str, body: Mapping[str, Any], namespace: str) -> SandboxTemplateSpec:
    """The spec of template `name` (its object as the cache holds it), for a client whose API key
    grants `namespace`; 403 when the template's allowedNamespaces leave that namespace out (the
    operator would put the sandbox in Error, TemplateNotAllowed: say so before creating it)."""
    try:
        template = SandboxTemplateSpec.model_validate(body.get("spec") or {})
    except ValidationError:
        raise Refused(500, f"SandboxTemplate {name!r} cannot be read by this gateway version") from None
    if not namespace_allowed(namespace, template):
        raise Refused(403, f"template {name!r} may not be used in namespace {namespace!r} (its allowedNamespaces)")
    return template


def sandbox_for_create(
    payload: Mapping[str, Any], *, namespace: str, templates: Mapping[str, Mapping[str, Any]]
) -> JSON:
    """The Sandbox object POST /v2/sandboxes makes from `templates` (name -> SandboxTemplate object);
    400 for an unknown template or a bad request, 403 for a template the namespace may not use."""
    wanted = template_name(payload.get("templateID"))
    name = template_for(wanted, templates)
    if name is None:
        raise Refused(400, f"template {wanted!r} not found: no SandboxTemplate of that name")
    template = usable_template(name, templates[name], namespace)
    return sandbox_from_request(payload, namespace=namespace, template=name, template_spec=template)


def sandbox_from_request(
    request: Mapping[str, Any], *, namespace: str, template: str, template_spec: SandboxTemplateSpec | None = None
) -> JSON:
    """A Sandbox object for POST /v2/sandboxes (or the v1 POST /sandboxes) in `namespace`. With the
    template's spec, the timeout is clamped to its maxLifetimeLimit as the operator would (0, "never
    ending", gets the limit), so the spec says the lifetime the sandbox really has."""
    auto_pause, auto_resume = lifecycle_from_request(request)
    timeout = seconds(request.get("timeout"), "timeout", DEFAULT_TIMEOUT_S)
    if template_spec is not None:
        timeout = capped_lifetime(timeout, template_spec)
    spec: JSON = {
        "template": template,
        # E2B's timeout is the sandbox's whole life from now; there is no idle clock.
        "timeouts": {"maxLifetime": f"{timeout}s", "idle": "0"},
        "metadata": string_map(request.get("metadata"), "metadata"),
        "env": string_map(request.get("envVars"), "envVars"),
    }
    if auto_pause:
        spec["onLifetimeEnd"] = OnIdle.SUSPEND.value  # the timeout pauses instead of killing
    network = _network_from_request(request)
    if network:
        spec["network"] = network
    annotations = {CREATED_BY_ANNOTATION: "e2b-api"}
    if auto_resume:
        annotations[AUTO_RESUME_ANNOTATION] = "true"
    if not allow_public_traffic(request):
        annotations[PUBLIC_TRAFFIC_ANNOTATION] = "false"
    return {
        "apiVersion": API_VERSION,
        "kind": "Sandbox",
        # E2B sandboxes have no names: a random one, shaped like a DNS label.
        "metadata": {"name": f"e2b-{secrets.token_hex(6)}", "namespace": namespace, "annotations": annotations},
        "spec": spec,
    }


def _optional_bool(request: Mapping[str, Any], field: str, name: str | None = None) -> bool | None:
    """A boolean field, None when absent or null; anything else is refused, naming it (`name`)."""
    value = request.get(field)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"{name or field} must be a boolean (true or false)")
    return value


def lifecycle_from_request(request: Mapping[str, Any]) -> tuple[bool, bool]:
    """E2B's lifecycle fields: whether the timeout pauses (`autoPause`) and whether traffic resumes
    a paused sandbox (`autoResume.enabled`). `autoPauseMemory` is accepted either way: a pause here
    never keeps memory (docs/gateway.md). Auto-resume needs auto-pause, and E2B refuses it with a
    filesystem-only pause (`autoPauseMemory: false`), as here."""
    auto_pause = bool(_optional_bool(request, "autoPause"))
    keep_memory = _optional_bool(request, "autoPauseMemory")
    resume = request.get("autoResume")
    if resume is not None and not (isinstance(resume, Mapping) and isinstance(resume.get("enabled"), bool)):
        raise BadRequest('autoResume must be an object {"enabled": true|false}')
    auto_resume = bool(resume and resume["enabled"])
    if auto_resume and not auto_pause:
        raise BadRequest("autoResume needs autoPause (lifecycle on_timeout: pause)")
    if auto_resume and keep_memory is False:
        raise BadRequest("autoResume cannot be combined with a filesystem-only pause (autoPauseMemory: false)")
    return auto_pause, auto_resume


def auto_resumes(body: Mapping[str, Any]) -> bool:
    """Traffic for this sandbox resumes it while it is paused (the sandbox.dev/auto-resume annotation)."""
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    return annotations.get(AUTO_RESUME_ANNOTATION) == "true"


def wakes_on_traffic(body: Mapping[str, Any]) -> bool:
    """A request for this sandbox should wake it and wait: it auto-resumes and is paused (or already
    resuming), and nobody is deleting it or holds it suspended by its spec."""
    return (
        auto_resumes(body)
        and phase_of(body) in (*PAUSED_PHASES, Phase.RESUMING)
        and not deleting(body)
        and not suspended_by_spec(body)
    )


def own_timeout(body: Mapping[str, Any]) -> int:
    """The timeout a sandbox was created with (its spec's maxLifetime, in whole seconds): what a wake
    on traffic gives it from the wake on, as E2B's auto-resume does. The E2B default without one."""
    lifetime = ((body.get("spec") or {}).get("timeouts") or {}).get("maxLifetime")
    try:
        value = parse_duration(lifetime) if isinstance(lifetime, str) else 0
    except ValueError:
        value = 0
    return value or DEFAULT_TIMEOUT_S


def lifecycle_detail(body: Mapping[str, Any]) -> JSON:
    """SandboxDetail's `lifecycle`: what the timeout does and whether traffic resumes."""
    suspends = (body.get("spec") or {}).get("onLifetimeEnd") == OnIdle.SUSPEND.value
    return {"autoResume": auto_resumes(body), "onTimeout": "pause" if suspends else "kill"}


def allow_public_traffic(request: Mapping[str, Any]) -> bool:
    """network.allowPublicTraffic: a boolean, true when absent or null (E2B's default)."""
    network = request.get("network")
    if not isinstance(network, Mapping):
        return True
    value = _optional_bool(network, "allowPublicTraffic", "network.allowPublicTraffic")
    return True if value is None else value


def _network_from_request(request: Mapping[str, Any]) -> JSON:
    network = request.get("network")
    allow_internet = request.get("allow_internet_access")
    if network is not None and not isinstance(network, Mapping):
        raise BadRequest("network must be an object")
    allow_out = _string_list(network, "allowOut")
    deny_out = _string_list(network, "denyOut")
    unsupported = sorted(set(network or {}) - {"allowOut", "denyOut", "allowPublicTraffic"})
    if unsupported:
        raise BadRequest(f"network.{unsupported[0]} is not supported (allowOut, denyOut and allowPublicTraffic are)")
    if allow_out:
        if deny_out not in ([], ["0.0.0.0/0"]):
            raise BadRequest('network.denyOut must be ["0.0.0.0/0"] (or empty) when allowOut is set')
        return {"egress": "allowList", "egressAllow": [_allow_entry(entry) for entry in allow_out]}
    if deny_out:
        if deny_out != ["0.0.0.0/0"]:
            raise BadRequest('network.denyOut supports only ["0.0.0.0/0"] (deny everything)')
        return {"egress": "deny"}
    if allow_internet is False:
        return {"egress": "deny"}
    if allow_internet is True:
        return {"egress": "allow"}
    return {}  # the template's network decides


def _string_list(network: Mapping[str, Any] | None, field: str) -> list[str]:
    """network.allowOut / denyOut: absent is empty; anything but a list of strings (null too: the
    schema's arrays are not nullable) is refused, naming the field."""
    if network is None or field not in network:
        return []
    value = network[field]
    if not isinstance(value, list) or not all(isinstance(entry, str) for entry in value):
        raise BadRequest(f"network.{field} must be a list of strings")
    return value


def _allow_entry(entry: Any) -> str:
    """E2B allows bare IPs and host names; our allow-list takes CIDRs and host:port."""
    if not isinstance(entry, str) or not entry:
        raise BadRequest("network.allowOut entries must be non-empty strings")
    if re.fullmatch(r"[0-9.]+", entry):
        return f"{entry}/32"
    if ":" in entry or "/" in entry:
        return entry
    return f"{entry}:443"


def lifetime_for_timeout(created: datetime, now: datetime, timeout: int) -> str:
    """maxLifetime (counted from creation) that ends the sandbox `timeout` seconds from `now`."""
    return f"{math.ceil((now - created).total_seconds()) + timeout}s"


def _parse_time(stamp: Any) -> datetime:
    return datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))


def requested_end(body: Mapping[str, Any], timeout: int, now: datetime, *, only_longer: bool) -> datetime | None:
    """The end `timeout` seconds from `now` (whole seconds, rounded up), for the sandbox.dev/end-at
    annotation; None when nothing is to change (`only_longer`, as connect asks, and the sandbox
    already lives that long)."""
    expires = (body.get("status") or {}).get("expiresAt")
    if only_longer and expires and (_parse_time(expires) - now).total_seconds() >= timeout:
        return None
    return datetime.fromtimestamp(math.ceil(now.timestamp()) + timeout, UTC)


def end_patch(end: datetime) -> JSON:
    """The merge patch that asks for `end` (an annotation: spec.timeouts stay as their author wrote them)."""
    return {"metadata": {"annotations": {END_AT_ANNOTATION: end.strftime("%Y-%m-%dT%H:%M:%SZ")}}}


def end_in_effect(body: Mapping[str, Any] | None, end: datetime, before: str | None) -> bool:
    """The operator has acted on a requested end (or the sandbox is gone): status.expiresAt is the
    end, or moved from `before` (the template's maxLifetimeLimit may cap it short of the end)."""
    if body is None:
        return True
    expires = (body.get("status") or {}).get("expiresAt")
    if not expires:
        return False
    return abs((_parse_time(expires) - end).total_seconds()) < 1 or expires != before


def pause_patch() -> JSON:
    """The merge patch of E2B's pause: the sandbox.dev/paused annotation (spec.suspended stays the user's)."""
    return {"metadata": {"annotations": {PAUSED_ANNOTATION: "true"}}}


def resume_patch(now: datetime, end: datetime | None = None) -> JSON:
    """The merge patch of a resume: the pause request goes, and a new resume request releases an idle
    or lifetime suspension (any new value does; a timestamp is new). With `end`, the new end in the
    same patch: a lifetime suspension released without it would be held again at once."""
    annotations: dict[str, Any] = {
        PAUSED_ANNOTATION: None,
        RESUME_REQUEST_ANNOTATION: now.isoformat(timespec="microseconds"),
    }
    if end is not None:
        annotations.update(end_patch(end)["metadata"]["annotations"])
    return {"metadata": {"annotations": annotations}}


def suspended_by_spec(body: Mapping[str, Any]) -> bool:
    """Its author holds it suspended (spec.suspended: true): no API call or traffic resumes it."""
    return (body.get("spec") or {}).get("suspended") is True


def ensure_resumable(body: Mapping[str, Any], sandbox_id: str) -> None:
    """A sandbox suspended by its spec resumes only by a spec change: its author's, not an API call's."""
    if suspended_by_spec(body):
        raise Refused(
            409, f"sandbox {sandbox_id} is suspended by its spec (spec.suspended: true): set it to false to resume"
        )


# --- responses -------------------------------------------------------------------------------------


def phase_of(body: Mapping[str, Any]) -> str | None:
    phase = (body.get("status") or {}).get("phase")
    return str(phase) if phase else None


def state_of(body: Mapping[str, Any]) -> str | None:
    """E2B's state: running / paused; None for sandboxes the API no longer shows (ended or failed)."""
    phase = phase_of(body)
    if phase is None or phase in RUNNING_PHASES:
        return "running"
    if phase in PAUSED_PHASES:
        return "paused"
    return None


def deleting(body: Mapping[str, Any]) -> bool:
    """The Sandbox's delete has begun (its deletionTimestamp is set)."""
    return bool((body.get("metadata") or {}).get("deletionTimestamp"))


def gone_or_going(body: Mapping[str, Any] | None) -> bool:
    """The Sandbox is gone or its delete has begun: what a delete waits for before it answers."""
    return body is None or deleting(body)


def visible(body: Mapping[str, Any] | None) -> bool:
    """The E2B API shows the sandbox: it exists, has not ended or failed and is not being deleted."""
    return body is not None and state_of(body) is not None and not deleting(body)


def not_found(sandbox_id: str) -> Refused:
    return Refused(404, f"sandbox {sandbox_id} not found")


def require_visible(body: JSON | None, sandbox_id: str) -> JSON:
    """The sandbox a control-plane call names; 404 when the API does not show it."""
    if body is None or not visible(body):
        raise not_found(sandbox_id)
    return body


def ensure_pausable(body: Mapping[str, Any], sandbox_id: str) -> None:
    if state_of(body) == "paused":
        raise Refused(409, f"sandbox {sandbox_id} is already paused")


def suspended_or_gone(body: Mapping[str, Any] | None) -> bool:
    """Where a pause ends."""
    return body is None or (body.get("status") or {}).get("phase") == Phase.SUSPENDED


def suspend_declared(body: Mapping[str, Any]) -> bool:
    """Someone asks for the sandbox to be suspended: its spec, or an API client's pause."""
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    return bool((body.get("spec") or {}).get("suspended")) or annotations.get(PAUSED_ANNOTATION) == "true"


def settled(body: Mapping[str, Any] | None) -> bool:
    """A start has an outcome: gone, failed, ended, suspended again by someone, or Running with a
    pod IP to talk to."""
    if body is None or suspend_declared(body):
        return True
    status = body.get("status") or {}
    return status.get("phase") in SETTLED_PHASES and (status.get("phase") != Phase.RUNNING or bool(status.get("podIP")))


def started(body: JSON | None) -> JSON:
    """The settled sandbox when it runs; 409 when it was deleted or paused meanwhile, 500 when it
    failed."""
    if body is None:
        raise Refused(409, "the sandbox was deleted while it was starting")
    if suspend_declared(body):
        # Another client (kubectl, another SDK) paused it while this start waited: theirs is the
        # later word, and waiting on would only run into the timeout.
        raise Refused(409, "the sandbox was paused while it was starting (spec.suspended or sandbox.dev/paused)")
    status = body["status"]
    if status["phase"] != Phase.RUNNING:
        reason = status.get("reason") or status["phase"]
        raise Refused(500, f"the sandbox failed to start: {reason}: {status.get('message')}")
    return body


def running_pod_ip(body: Mapping[str, Any] | None) -> str | None:
    """The pod IP of a Running sandbox; None while it has none to serve traffic (or is not Running)."""
    status = (body or {}).get("status") or {}
    if status.get("phase") != Phase.RUNNING or not status.get("podIP"):
        return None
    return str(status["podIP"])


def metrics_pod_ip(body: Mapping[str, Any]) -> str | None:
    """Where to sample the sandbox's metrics: its pod IP while E2B calls it running (else no metrics)."""
    pod_ip = (body.get("status") or {}).get("podIP")
    return str(pod_ip) if pod_ip and state_of(body) == "running" else None


def sandbox_response(body: Mapping[str, Any], token: str, traffic: str, domain: str | None) -> JSON:
    """The `Sandbox` schema (create / connect): `token` the envd access token, `traffic` the
    trafficAccessToken (`traffic_token`)."""
    return {
        "templateID": body["spec"]["template"],
        "sandboxID": sandbox_id_of(body),
        "clientID": CLIENT_ID,
        "envdVersion": ENVD_COMPATIBLE_VERSION,
        "envdAccessToken": token,
        "trafficAccessToken": traffic,
        "domain": domain,
        "alias": body["spec"]["template"],
    }


def _time(value: Any, fallback: datetime) -> str:
    if isinstance(value, str) and value:
        return value
    return fallback.strftime("%Y-%m-%dT%H:%M:%SZ")


def _created(body: Mapping[str, Any]) -> datetime:
    stamp = (body.get("metadata") or {}).get("creationTimestamp")
    if isinstance(stamp, str) and stamp:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return datetime.now(UTC)


def sandbox_detail(
    body: Mapping[str, Any], template: Mapping[str, Any] | None, token: str | None, traffic: str | None = None
) -> JSON:
    """`SandboxDetail` (get_info: with the tokens) / `ListedSandbox` (without): every required field,
    sizes from the effective resources. get_info also says `network.allowPublicTraffic` and, as create
    and connect do, the `trafficAccessToken`."""
    status = body.get("status") or {}
    created = _created(body)
    started = _time(status.get("startedAt"), created)
    # No maxLifetime means no end: report a distant one (the field is required).
    end = _time(status.get("expiresAt"), created + timedelta(days=3650))
    cpu, memory_mb, disk_mb = 1, 512, 1024
    if template is not None:
        resources = resolve_resources(
            SandboxSpec.model_validate(body["spec"]), SandboxTemplateSpec.model_validate(template["spec"])
        )
        cpu = max(1, math.ceil(resources.cpu_millicores / 1000))
        memory_mb = resources.memory_bytes // (1024 * 1024)
        disk_mb = resources.disk_bytes // (1024 * 1024)
    detail: JSON = {
        "templateID": body["spec"]["template"],
        "alias": body["spec"]["template"],
        "sandboxID": sandbox_id_of(body),
        "clientID": CLIENT_ID,
        "startedAt": started,
        "endAt": end,
        "envdVersion": ENVD_COMPATIBLE_VERSION,
        "cpuCount": cpu,
        "memoryMB": memory_mb,
        "diskSizeMB": disk_mb,
        "state": state_of(body) or "running",
        "metadata": dict(body["spec"].get("metadata") or {}),
    }
    if token is not None:
        detail["envdAccessToken"] = token
    if traffic is not None:
        detail["trafficAccessToken"] = traffic
        detail["network"] = {"allowPublicTraffic": public_traffic(body)}
        detail["lifecycle"] = lifecycle_detail(body)
    return detail


def metric_from_agent(sample: Any) -> JSON:
    """A `SandboxMetric` from the agent's envd GET /metrics JSON. The agent runs in the tenant's
    sandbox, so its answer is input like any other: ValueError when it is not a metrics sample."""
    if not isinstance(sample, Mapping):
        raise ValueError("the agent's metrics are not a JSON object")
    try:
        timestamp = int(sample.get("ts") or datetime.now(UTC).timestamp())
        cpu_used = float(sample.get("cpu_used_pct") or 0.0)
        if not math.isfinite(cpu_used):  # NaN would make the answer invalid JSON
            raise ValueError("the agent's cpu_used_pct is not a finite number")
        return {
            "timestamp": datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "timestampUnix": timestamp,
            "cpuCount": int(sample.get("cpu_count") or 1),
            "cpuUsedPct": cpu_used,
            "memUsed": int(sample.get("mem_used") or 0),
            "memTotal": int(sample.get("mem_total") or 0),
            "memCache": int(sample.get("mem_cache") or 0),
            "diskUsed": int(sample.get("disk_used") or 0),
            "diskTotal": int(sample.get("disk_total") or 0),
        }
    except (TypeError, ValueError, OverflowError, OSError) as exc:  # "soon" or a list for a number, a year past 9999
        raise ValueError(f"the agent's metrics are malformed: {exc}") from None


def metrics_window(query: Mapping[str, str]) -> tuple[int | None, int | None]:
    """The `start` and `end` (unix seconds) of a metrics request; 400 when they are not integers or
    end before they start."""
    bounds: list[int | None] = []
    for name in ("start", "end"):
        raw = query.get(name)
        if raw is None or raw == "":
            bounds.append(None)
            continue
        try:
            bounds.append(int(raw))
        except ValueError:
            raise BadRequest(f"{name} must be a unix time in seconds") from None
    start, end = bounds
    if start is not None and end is not None and end < start:
        raise BadRequest("end must not be before start")
    return start, end


METRICS_END_SLACK_S = 5  # the one sample is taken after the request: an `end` of "now" still includes it


def in_window(metric: Mapping[str, Any], start: int | None, end: int | None) -> bool:
    """The live sample falls in [start, end] (end with METRICS_END_SLACK_S): the gateway keeps no
    history, so a range that ended earlier, or starts later, is empty."""
    moment = int(metric["timestampUnix"])
    return (start is None or moment >= start) and (end is None or moment <= end + METRICS_END_SLACK_S)


def error_body(code: int, message: str) -> JSON:
    return {"code": code, "message": message}


def kubernetes_error(status: int, body: Any) -> tuple[int, JSON]:
    """Kubernetes' answer, in E2B's error shape; invalid specs keep the API server's message."""
    message = body.get("message") if isinstance(body, dict) else str(body)
    answered = status if status in KUBERNETES_STATUSES else 502
    if answered == 422:
        answered = 400  # the CRD's validation: a bad request as far as E2B clients are concerned
    return answered, error_body(answered, f"kubernetes: {message}")


# --- listing ---------------------------------------------------------------------------------------

ListKey = tuple[datetime, str]  # (creation time, sandbox ID): the order of a list, newest first by default
_OLDEST = datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True)
class ListQuery:
    states: frozenset[str]
    metadata: dict[str, str]
    template: str | None
    limit: int
    after: ListKey | None = None  # nextToken: where the previous page ended
    order: str = "desc"  # by creation time, then sandbox ID
    started_after: datetime | None = None


def parse_list_query(query: Mapping[str, str]) -> ListQuery:
    """GET /v2/sandboxes' query as the SDK sends it: `state` comma-joined (repeated works too),
    `metadata` double-encoded, `template`, `order` asc/desc, `startedAfter` RFC 3339, `limit` 1..100 and
    `nextToken` (the previous page's x-next-token); BadRequest naming what is wrong."""
    getall = getattr(query, "getall", None)
    raw_states = ",".join(getall("state", [])) if getall is not None else query.get("state") or ""
    states = frozenset(s for s in raw_states.split(",") if s) or frozenset({"running", "paused"})
    unknown = states - {"running", "paused"}
    if unknown:
        raise BadRequest(f"state must be running and/or paused, not {sorted(unknown)[0]!r}")
    try:
        limit = int(query.get("limit") or MAX_LIST_LIMIT)
    except ValueError:
        raise BadRequest("limit must be an integer") from None
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise BadRequest(f"limit must be between 1 and {MAX_LIST_LIMIT}")
    order = query.get("order") or "desc"
    if order not in ("asc", "desc"):
        raise BadRequest(f"order must be asc or desc, not {order!r}")
    started_after = query.get("startedAfter") or None
    return ListQuery(
        states,
        parse_metadata_filter(query.get("metadata") or ""),
        query.get("template") or None,
        limit,
        parse_next_token(query["nextToken"]) if query.get("nextToken") else None,
        order,
        _parse_started_after(started_after) if started_after else None,
    )


def _parse_started_after(value: str) -> datetime:
    try:
        stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"startedAfter must be an RFC 3339 time, not {value!r}") from None
    return stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=UTC)


def parse_metadata_filter(value: str) -> dict[str, str]:
    """The SDK URL-quotes each key and value, then url-encodes `k=v&...` (docs/e2b-protocol.md §4.2): after the
    framework's decoding of the query, parse it as a query string and unquote once more."""
    return {unquote(k): unquote(v) for k, v in parse_qsl(value, keep_blank_values=True)}


def list_key(body: Mapping[str, Any]) -> ListKey:
    """Where a sandbox stands in a list: its creation (immutable: a pause or resume does not move it), then
    its ID. A body without a creation time (none the API server returns) sorts as the oldest."""
    stamp = (body.get("metadata") or {}).get("creationTimestamp")
    try:
        created = _parse_time(stamp) if stamp else _OLDEST
    except ValueError:
        created = _OLDEST
    return (created if created.tzinfo is not None else created.replace(tzinfo=UTC)), sandbox_id_of(body)


def next_token(key: ListKey) -> str:
    """The opaque x-next-token for a page ending at `key`: the key itself, so the next page continues
    right after it whatever was created, paused, resumed or deleted meanwhile (no offset to shift)."""
    created, sandbox_id = key
    raw = json.dumps([created.isoformat(), sandbox_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def parse_next_token(token: str) -> ListKey:
    try:
        created, sandbox_id = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        stamp = datetime.fromisoformat(created)
        if not isinstance(sandbox_id, str) or stamp.tzinfo is None:
            raise ValueError(sandbox_id)
    except (ValueError, TypeError, RecursionError):  # binascii.Error and JSONDecodeError are ValueErrors
        raise BadRequest("nextToken is not a token this API returned (x-next-token of a list)") from None
    return stamp, sandbox_id


def _started(body: Mapping[str, Any]) -> datetime:
    stamp = (body.get("status") or {}).get("startedAt")
    try:
        started = _parse_time(stamp) if stamp else list_key(body)[0]
    except ValueError:
        started = list_key(body)[0]
    return started if started.tzinfo is not None else started.replace(tzinfo=UTC)


def matches(body: Mapping[str, Any], query: ListQuery) -> bool:
    state = state_of(body)
    if state is None or state not in query.states:
        return False
    if query.template and body["spec"]["template"] not in (query.template, TEMPLATE_ALIASES.get(query.template)):
        return False
    if query.started_after is not None and _started(body) < query.started_after:
        return False
    metadata = body["spec"].get("metadata") or {}
    return all(metadata.get(k) == v for k, v in query.metadata.items())


def ordered(bodies: Iterable[Mapping[str, Any]], order: str = "desc") -> list[Mapping[str, Any]]:
    """Newest first (`desc`, E2B's default) or oldest first, by `list_key`: a total order."""
    return sorted(bodies, key=list_key, reverse=order == "desc")


def page(bodies: list[Mapping[str, Any]], query: ListQuery) -> tuple[list[Mapping[str, Any]], str | None]:
    """Of `bodies` in the query's order (`ordered`): the `limit` after `query.after`, and the next
    token when more follow."""
    rest = bodies
    if query.after is not None:
        after = query.after
        rest = [b for b in bodies if (list_key(b) < after if query.order == "desc" else list_key(b) > after)]
    chosen = rest[: query.limit]
    more = len(rest) > query.limit
    return chosen, (next_token(list_key(chosen[-1])) if more and chosen else None)


def list_sandboxes(
    bodies: Iterable[Mapping[str, Any]], templates: Mapping[str, JSON], query: ListQuery, *, paginated: bool
) -> tuple[list[JSON], str | None]:
    """GET /v2/sandboxes (`paginated`) or the v1 GET /sandboxes (everything at once): the sandboxes the
    filters (state, metadata, template, startedAfter) leave, in the query's order, and the next page's token."""
    shown = ordered((body for body in bodies if visible(body) and matches(body, query)), query.order)
    chosen, token = page(shown, query) if paginated else (shown, None)
    return [sandbox_detail(body, templates.get(body["spec"]["template"]), None) for body in chosen], token


# --- data-plane routing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    sandbox_id: str
    port: int


_HOST_ROUTE = re.compile(r"^(?P<port>\d{1,5})-(?P<id>[a-z0-9]+)\.")


def route_of(headers: Mapping[str, str], host: str) -> Route | str | None:
    """Where a data-plane request goes: the E2b-Sandbox-Id/-Port headers, else the Host's left-most
    label `{port}-{id}`. None: not a data-plane request. A string: a malformed one (the reason)."""
    sandbox = headers.get("E2b-Sandbox-Id")
    port = headers.get("E2b-Sandbox-Port")
    if sandbox or port:
        if not (sandbox and port):
            return "both E2b-Sandbox-Id and E2b-Sandbox-Port are required"
        if not port.isdigit() or not 0 < int(port) < 65536:
            return f"invalid E2b-Sandbox-Port {port!r}"
        return Route(sandbox, int(port))
    found = _HOST_ROUTE.match(host.lower())
    if found and 0 < int(found["port"]) < 65536:
        return Route(found["id"], int(found["port"]))
    return None


def sandbox_gone_body(sandbox_id: str) -> JSON:
    """The 502 the E2B proxy answers for a sandbox it cannot reach (the SDK reads it as not found)."""
    return {"sandboxId": sandbox_id, "message": "The sandbox was not found", "code": 502}


def port_not_open_body(route: Route) -> JSON:
    return {
        "sandboxId": route.sandbox_id,
        "port": route.port,
        "code": 502,
        "message": "The sandbox is running but port is not open",
    }


def proxy_path(raw_path: str) -> str:
    """The path a proxied request is checked by and forwarded with (the request's raw path): percent
    escapes of unreserved characters decoded (others upper-cased, the same octets), repeated slashes
    collapsed, dot segments removed (RFC 3986 §5.2.4). The HTTP client and the agent's router do the
    same to a path, so checking the path as sent let `/./init`, `/a/../init` or `/%69nit` through."""
    path = _PERCENT_ESCAPE.sub(_unreserved, raw_path.partition("#")[0])  # a fragment is never sent
    segments = _SLASHES.sub("/", "/" + path).split("/")
    kept: list[str] = []
    for segment in segments[1:]:
        if segment == "..":
            if kept:
                kept.pop()
        elif segment != ".":
            kept.append(segment)
    if segments[-1] in (".", ".."):
        kept.append("")  # /a/b/.. is /a/, a directory
    return "/" + "/".join(kept)


_PERCENT_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_SLASHES = re.compile(r"/{2,}")
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")


def _unreserved(escape: re.Match[str]) -> str:
    char = chr(int(escape[1], 16))
    return char if char in _UNRESERVED else "%" + escape[1].upper()


def internal_path(path: str) -> bool:
    """An envd endpoint only the orchestrator may call, also when spelled with escapes a server may
    decode before routing (`/files%2Fcompose`)."""
    return path in INTERNAL_PATHS or proxy_path(unquote(path)) in INTERNAL_PATHS


@dataclass(frozen=True)
class Admission:
    """A data-plane request that may pass to the sandbox."""

    signed_path: str | None = None  # admitted by a signed /files URL: the one path it may read or write


def _interpreter_traffic_path(path: str) -> bool:
    """The code interpreter's calls the SDK makes with the trafficAccessToken alone (/execute also
    carries the access token, and needs it)."""
    return path in ("/health", "/contexts") or path.startswith("/contexts/")


def proxy_admission(
    route: Route,
    *,
    method: str,
    path: str,
    headers: Mapping[str, str],
    query: Mapping[str, str],
    token: str,
    now: float,
    traffic: str | None = None,
    public: bool = True,
) -> Admission:
    """Whether and how a data-plane request (`path` as `proxy_path` made it) may pass; Refused when not
    (403 internal, 401 without a valid token or signature). /health is open (the SDK probes it without a
    token); /files may carry a signature instead (signed download/upload URLs). A sandbox without
    `public` traffic (allowPublicTraffic: false) admits its user ports only with its `traffic` token in
    E2B-Traffic-Access-Token (403 otherwise, as E2B); the agent's ports keep the access token, and the
    code interpreter's context calls also take the traffic token (the SDK sends only that one there)."""
    if route.port == ENVD_PORT and internal_path(path):
        raise Refused(403, f"{path} is internal to the sandbox")
    if not public and route.port not in AGENT_PORTS:
        if tokens_equal(headers.get(TRAFFIC_TOKEN_HEADER), traffic or token):
            return Admission()
        raise Refused(403, f"this sandbox's ports are private: missing or invalid {TRAFFIC_TOKEN_HEADER} header")
    given = headers.get(AGENT_TOKEN_HEADER) or headers.get(TRAFFIC_TOKEN_HEADER)
    if tokens_equal(given, token) or (route.port == ENVD_PORT and path == "/health"):
        return Admission()
    if (
        route.port == INTERPRETER_PORT
        and traffic is not None
        and _interpreter_traffic_path(path)
        and tokens_equal(headers.get(TRAFFIC_TOKEN_HEADER), traffic)
    ):
        return Admission()
    if route.port == ENVD_PORT and path == "/files" and query.get("signature"):
        signed = query.get("path", "")
        refused = verify_signature(
            signature=query.get("signature"),
            expiration=query.get("signature_expiration"),
            path=signed,
            operation="read" if method == "GET" else "write",
            username=query.get("username", ""),
            access_token=token,
            now=now,
        )
        if refused is not None:
            raise Refused(401, f"file URL refused: {refused}")
        if any(ord(char) < 0x20 or ord(char) == 0x7F for char in signed):
            raise Refused(400, "a signed file path must not contain control characters")  # no header carries them
        return Admission(signed_path=signed)
    raise Refused(401, "missing or invalid access token (X-Access-Token or E2B-Traffic-Access-Token)")


def declared_port(port: int, body: Mapping[str, Any], template: Mapping[str, Any] | None) -> bool:
    """The proxy passes traffic to the agent's ports and to those the template (spec.ports) or the
    sandbox (spec.network.ports) declare: the ports its NetworkPolicy admits (resources.builders),
    so that a cluster not enforcing NetworkPolicy does not expose every listening socket either."""
    if port in AGENT_PORTS:
        return True
    template_ports = ((template or {}).get("spec") or {}).get("ports") or ()
    sandbox_ports = (((body.get("spec") or {}).get("network")) or {}).get("ports") or ()
    return port in template_ports or port in sandbox_ports


def forwarded_headers(
    headers: Mapping[str, str],
    content_length: int | None,
    *,
    port: int,
    agent_headers: Mapping[str, str],
    admission: Admission,
) -> dict[str, str]:
    """The headers a proxied request carries to the sandbox: the client's, less hop-by-hop ones, the
    gateway's credentials and any X-Sandbox-Signed-Path of its own; to the agent's ports, the agent's
    token (`agent_headers`: the client's token was checked and stripped) and, for a request admitted by
    a signed URL, the one path it may touch. A user port's server is the tenant's and gets neither."""
    forwarded = {k: v for k, v in headers.items() if k.lower() not in NOT_FORWARDED}
    if content_length is not None:
        forwarded["Content-Length"] = str(content_length)
    # Only what the client accepts (else the HTTP client would offer gzip on its behalf).
    forwarded["Accept-Encoding"] = headers.get("Accept-Encoding", "identity")
    if port in AGENT_PORTS:
        forwarded.update(agent_headers)
        if admission.signed_path is not None:
            forwarded[SIGNED_PATH_HEADER] = admission.signed_path
    return forwarded


# The handshake headers the gateway's own WebSocket client sets towards the sandbox (a key, version
# and extensions of its own; the client's subprotocols are offered as they were).
WEBSOCKET_HANDSHAKE_HEADERS = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol"}
)
# A relayed message larger than this closes both sides with 1009 (RFC 6455 §7.4.1): frames are
# buffered whole, so the bound is per connection memory.
WEBSOCKET_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Close codes that are only ever reported, never sent in a close frame (RFC 6455 §7.4.1).
_UNSENDABLE_CLOSE_CODES = frozenset({1004, 1005, 1006, 1015})


def _header_list(value: str | None) -> list[str]:
    """A comma-separated header's items, trimmed, empty ones left out (RFC 9110 §5.6.1)."""
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def _header_tokens(value: str | None) -> list[str]:
    return [token.lower() for token in _header_list(value)]


def websocket_upgrade(method: str, headers: Mapping[str, str]) -> bool:
    """Whether a request opens a WebSocket (RFC 6455 §4.1): a GET asking to upgrade to `websocket`.
    Other upgrades (h2c, custom protocols) are proxied as plain requests, their Upgrade dropped."""
    return (
        method == "GET"
        and "upgrade" in _header_tokens(headers.get("Connection"))
        and "websocket" in _header_tokens(headers.get("Upgrade"))
    )


def websocket_protocols(headers: Mapping[str, str]) -> tuple[str, ...]:
    """The subprotocols the client offers, in its order, offered to the sandbox as they are."""
    return tuple(_header_list(headers.get("Sec-WebSocket-Protocol")))


def relayed_close_code(code: int | None) -> int:
    """The close code to send one side when the other closed with `code`: the same, unless it is one
    that cannot be sent (no status, abnormal closure: 1000 for none, 1011 for a broken connection)."""
    if code is None or code == 1005:
        return 1000
    if code in _UNSENDABLE_CLOSE_CODES or not 1000 <= code <= 4999:
        return 1011
    return code


def host_only_cookie(set_cookie: str) -> str:
    """A sandbox's Set-Cookie without its Domain attribute. With one, a cookie set by
    `{port}-{id}.<domain>` would reach `api.<domain>` and every other sandbox under the domain (session
    fixation, cookie tossing); without, it stays on the sandbox's own host."""
    pair, *attributes = set_cookie.split(";")
    kept = [attribute for attribute in attributes if attribute.split("=", 1)[0].strip().lower() != "domain"]
    return ";".join([pair, *kept])


def returned_headers(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """The sandbox's response headers the client gets (repeated ones stay repeated; cookies host-only)."""
    return [
        (name, host_only_cookie(value) if name.lower() == "set-cookie" else value)
        for name, value in headers.items()
        if name.lower() not in HOP_HEADERS
    ]
