"""Gaps E2B's own SDK test suites found, checked against what the installed `e2b` SDK sends and parses
(its generated API client's models and query building): network.allowPublicTraffic and the traffic
access token, malformed allowOut/denyOut, and the list's order, pagination and filters.

The pure mapping (gateway.e2b) is tested directly; the wiring once through the real Gateway
application over the in-memory API (tests/fakeapi.py) and a fake agent.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from e2b.api.client.api.sandboxes.get_v2_sandboxes import _get_kwargs as sdk_list_request
from e2b.api.client.models.listed_sandbox import ListedSandbox
from e2b.api.client.models.order_direction import OrderDirection
from e2b.api.client.models.sandbox import Sandbox as SdkSandbox
from e2b.api.client.models.sandbox_detail import SandboxDetail
from e2b.api.client.models.sandbox_network_config import SandboxNetworkConfig
from e2b.api.client.models.sandbox_state import SandboxState
from multidict import CIMultiDict
from yarl import URL

from fakeapi import FakeApi, upstream_to
from sandbox_operator.api import Sandbox
from sandbox_operator.api.names import (
    ENVD_PORT,
    INTERPRETER_PORT,
    PUBLIC_TRAFFIC_ANNOTATION,
    SANDBOXES,
    TOKEN_EPOCH_ANNOTATION,
)
from sandbox_operator.gateway import e2b
from sandbox_operator.gateway.cache import KEPT_ANNOTATIONS, Cache
from sandbox_operator.gateway.server import Gateway, GatewayConfig

JSON = dict[str, Any]
KEY = b"k" * 32
UID = "0b5a9d1e-3f3c-4b0e-9d8e-1f2a3b4c5d6e"
USER_PORT = 8080


def sandbox(
    sandbox_id: str = "sbx1",
    *,
    phase: str = "Running",
    created: datetime = datetime(2026, 12, 1, 10, 0, tzinfo=UTC),
    private: bool = False,
    metadata: dict[str, str] | None = None,
) -> JSON:
    annotations = {PUBLIC_TRAFFIC_ANNOTATION: "false"} if private else {}
    return {
        "metadata": {
            "name": f"e2b-{sandbox_id}",
            "namespace": "team-a",
            "uid": f"{UID}-{sandbox_id}",
            "creationTimestamp": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "annotations": annotations,
        },
        "spec": {"template": "base", "metadata": metadata or {}},
        "status": {"phase": phase, "podIP": "10.255.0.3", "sandboxID": sandbox_id},
    }


def create(request: JSON) -> JSON:
    return e2b.sandbox_from_request({"templateID": "base", **request}, namespace="team-a", template="base")


# --- 1. network.allowPublicTraffic -------------------------------------------------------------------


def test_the_sdks_allow_public_traffic_false_makes_the_sandbox_private() -> None:
    network = SandboxNetworkConfig(allow_public_traffic=False).to_dict()  # what the SDK sends
    assert network == {"allowPublicTraffic": False}
    body = create({"network": network})
    assert body["metadata"]["annotations"][PUBLIC_TRAFFIC_ANNOTATION] == "false"
    assert "network" not in body["spec"]  # not spec: egress stays the template's
    Sandbox.model_validate({**body, "metadata": {**body["metadata"], "uid": UID}})
    assert not e2b.public_traffic(body)


@pytest.mark.parametrize("network", [None, {}, {"allowPublicTraffic": True}, {"allowPublicTraffic": None}])
def test_public_traffic_is_the_default_and_leaves_no_annotation(network: JSON | None) -> None:
    body = create({} if network is None else {"network": network})
    assert PUBLIC_TRAFFIC_ANNOTATION not in body["metadata"]["annotations"]
    assert e2b.public_traffic(body)


def test_allow_public_traffic_goes_with_an_allow_list() -> None:
    body = create({"network": {"allowPublicTraffic": False, "allowOut": ["1.1.1.1"], "denyOut": ["0.0.0.0/0"]}})
    assert body["spec"]["network"] == {"egress": "allowList", "egressAllow": ["1.1.1.1/32"]}
    assert body["metadata"]["annotations"][PUBLIC_TRAFFIC_ANNOTATION] == "false"


@pytest.mark.parametrize("value", ["false", 0, 1, [], {}, "true"])
def test_allow_public_traffic_must_be_a_boolean(value: Any) -> None:
    with pytest.raises(e2b.BadRequest, match=r"^network\.allowPublicTraffic must be a boolean \(true or false\)$"):
        create({"network": {"allowPublicTraffic": value}})


def test_the_annotation_says_private_only_as_false() -> None:
    for value, public in (("false", False), ("true", True), ("False", True), ("", True)):
        body = sandbox()
        body["metadata"]["annotations"] = {PUBLIC_TRAFFIC_ANNOTATION: value}
        assert e2b.public_traffic(body) is public
    assert e2b.public_traffic({"metadata": {}})


def test_the_gateways_cache_keeps_the_public_traffic_annotation() -> None:
    assert PUBLIC_TRAFFIC_ANNOTATION in KEPT_ANNOTATIONS
    cache = Cache(client=None, keys_namespace="sandbox-system")  # type: ignore[arg-type]  # no watches here
    body = sandbox(private=True)
    body["metadata"]["resourceVersion"] = "1"
    cache.observe(body)
    kept = cache.find("sbx1")
    assert kept is not None and not e2b.public_traffic(kept)
    assert e2b.traffic_token(KEY, kept) == e2b.traffic_token(KEY, body)


def test_a_private_sandboxs_traffic_token_is_its_own_and_the_same_on_every_replica() -> None:
    private = sandbox(private=True)
    traffic = e2b.traffic_token(KEY, private)
    assert traffic == e2b.traffic_token(KEY, sandbox(private=True))  # derived: every replica agrees
    assert traffic != e2b.access_token(KEY, private)  # whoever reaches its ports cannot drive its envd
    assert traffic != e2b.traffic_token(b"x" * 32, private)
    recreated = sandbox(private=True)
    recreated["metadata"]["uid"] = "another"
    assert traffic != e2b.traffic_token(KEY, recreated)
    rotated = sandbox(private=True)
    rotated["metadata"]["annotations"][TOKEN_EPOCH_ANNOTATION] = "2"
    assert e2b.traffic_token(KEY, rotated) not in (traffic, e2b.access_token(KEY, rotated))
    # A public sandbox answers its access token, which the code-interpreter SDK sends on 49999.
    assert e2b.traffic_token(KEY, sandbox()) == e2b.access_token(KEY, sandbox())


def test_create_connect_and_get_carry_the_traffic_token_where_the_sdk_reads_it() -> None:
    body = sandbox(private=True)
    token, traffic = e2b.access_token(KEY, body), e2b.traffic_token(KEY, body)
    created = SdkSandbox.from_dict(e2b.sandbox_response(body, token, traffic, "example.com"))
    assert created.traffic_access_token == traffic and created.envd_access_token == token
    detail = SandboxDetail.from_dict(e2b.sandbox_detail(body, None, token, traffic))
    assert detail.envd_access_token == token
    assert detail.network.allow_public_traffic is False  # type: ignore[union-attr]  # parsed, not Unset
    assert detail.additional_properties["trafficAccessToken"] == traffic
    public = sandbox()
    shown = e2b.sandbox_detail(public, None, "tok", "tok")
    assert SandboxDetail.from_dict(shown).network.allow_public_traffic is True  # type: ignore[union-attr]
    listed = e2b.sandbox_detail(body, None, None)  # a list item: no tokens, no network
    assert ListedSandbox.from_dict(listed).sandbox_id == "sbx1"
    assert not {"envdAccessToken", "trafficAccessToken", "network"} & set(listed)


USER = e2b.Route("sbx1", USER_PORT)
ENVD = e2b.Route("sbx1", ENVD_PORT)
INTERPRETER = e2b.Route("sbx1", INTERPRETER_PORT)


def admit(
    route: e2b.Route, headers: dict[str, str], *, path: str = "/", public: bool = False, method: str = "GET"
) -> e2b.Admission | tuple[int, str]:
    try:
        return e2b.proxy_admission(
            route,
            method=method,
            path=path,
            headers=CIMultiDict(headers),  # as aiohttp hands them over: case-insensitive
            query={},
            token="envd-token",
            now=1000.0,
            traffic="traffic-token" if not public else "envd-token",
            public=public,
        )
    except e2b.Refused as refused:
        return refused.status, str(refused)


PRIVATE_PORTS = (403, "this sandbox's ports are private: missing or invalid E2B-Traffic-Access-Token header")


def test_a_private_sandboxs_ports_need_the_traffic_token_header_else_403() -> None:
    assert admit(USER, {"e2b-traffic-access-token": "traffic-token"}) == e2b.Admission()  # as E2B's test sends it
    assert admit(USER, {}) == PRIVATE_PORTS
    assert admit(USER, {"e2b-traffic-access-token": "wrong"}) == PRIVATE_PORTS
    assert admit(USER, {"X-Access-Token": "envd-token"}) == PRIVATE_PORTS  # the header E2B names, its token
    assert admit(USER, {"X-Access-Token": "traffic-token"}) == PRIVATE_PORTS
    assert admit(e2b.Route("sbx1", 22), {}) == PRIVATE_PORTS  # before the port check: no probing


def test_a_private_sandboxs_agent_keeps_its_access_token() -> None:
    assert admit(ENVD, {"X-Access-Token": "envd-token"}, path="/process") == e2b.Admission()
    assert admit(ENVD, {"e2b-traffic-access-token": "traffic-token"}, path="/process")[0] == 401  # type: ignore[index]
    assert admit(ENVD, {}, path="/health") == e2b.Admission()
    # The code interpreter: contexts with the traffic token alone (all the SDK sends there), /execute
    # with the access token it adds.
    traffic = {"E2B-Traffic-Access-Token": "traffic-token"}
    for path in ("/contexts", "/contexts/c1/restart", "/contexts/c1", "/health"):
        assert admit(INTERPRETER, traffic, path=path, method="POST") == e2b.Admission(), path
    assert admit(INTERPRETER, traffic, path="/execute", method="POST")[0] == 401  # type: ignore[index]
    both = {**traffic, "X-Access-Token": "envd-token"}
    assert admit(INTERPRETER, both, path="/execute", method="POST") == e2b.Admission()


def test_a_public_sandboxs_ports_keep_the_access_token_in_either_header() -> None:
    assert admit(USER, {"X-Access-Token": "envd-token"}, public=True) == e2b.Admission()
    assert admit(USER, {"E2B-Traffic-Access-Token": "envd-token"}, public=True) == e2b.Admission()
    assert admit(USER, {}, public=True)[0] == 401  # type: ignore[index]


# --- 2. allowOut / denyOut that are not lists of strings ----------------------------------------------


@pytest.mark.parametrize("field", ["allowOut", "denyOut"])
@pytest.mark.parametrize("value", ["0.0.0.0/0", 5, 1.5, ["1.1.1.1", 2], [None], None, True, {"a": "b"}])
def test_allow_out_and_deny_out_must_be_lists_of_strings(field: str, value: Any) -> None:
    with pytest.raises(e2b.BadRequest, match=rf"^network\.{field} must be a list of strings$"):
        create({"network": {field: value}})


def test_empty_allow_out_and_deny_out_are_no_rules() -> None:
    assert "network" not in create({"network": {"allowOut": [], "denyOut": []}})["spec"]


# --- 3. list: order, pagination, filters ---------------------------------------------------------------


def sdk_query(**given: Any) -> Any:
    """What the server framework hands over for a Sandbox.list() page: the SDK's query parameters,
    encoded by its HTTP client (httpx) and decoded as aiohttp does (yarl)."""
    params = sdk_list_request(**given)["params"]
    url = httpx.Request("GET", "http://gateway/v2/sandboxes", params=params).url
    return URL(str(url)).query


def sdk_metadata(metadata: dict[str, str]) -> str:
    """SandboxPaginator's metadata parameter (before the HTTP client encodes it again)."""
    return urlencode({quote(k): quote(v) for k, v in metadata.items()})


T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def fleet() -> list[JSON]:
    """Seven sandboxes, paused and running; two share a creation second (the ID breaks the tie)."""
    return [
        sandbox("sbxa", created=T0),
        sandbox("sbxb", created=T0 + timedelta(seconds=1), phase="Suspended"),
        sandbox("sbxc", created=T0 + timedelta(seconds=2), metadata={"team": "a b"}),
        sandbox("sbxd", created=T0 + timedelta(seconds=2), phase="Suspending"),
        sandbox("sbxe", created=T0 + timedelta(seconds=3), phase="Resuming"),
        sandbox("sbxf", created=T0 + timedelta(seconds=4), phase="Suspended", metadata={"team": "a b"}),
        sandbox("sbxg", created=T0 + timedelta(seconds=5), phase="Creating"),
    ]


NEWEST_FIRST = ["sbxg", "sbxf", "sbxe", "sbxd", "sbxc", "sbxb", "sbxa"]


def listed(bodies: list[JSON], query: Any, *, paginated: bool = True) -> tuple[list[str], str | None]:
    items, token = e2b.list_sandboxes(bodies, {}, e2b.parse_list_query(query), paginated=paginated)
    for item in items:
        ListedSandbox.from_dict(item)  # every item parses as the SDK's model
    return [item["sandboxID"] for item in items], token


def test_lists_are_newest_first_then_by_sandbox_id() -> None:
    assert listed(fleet(), sdk_query()) == (NEWEST_FIRST, None)
    assert listed(list(reversed(fleet())), {})[0] == NEWEST_FIRST  # whatever order the cache holds them in
    assert listed(fleet(), sdk_query(order=OrderDirection.ASC))[0] == NEWEST_FIRST[::-1]
    assert listed(fleet(), {}, paginated=False) == (NEWEST_FIRST, None)  # the v1 list: all of it, same order


def test_a_three_page_walk_across_paused_and_running_returns_each_sandbox_once() -> None:
    bodies = fleet()
    states = [SandboxState.RUNNING, SandboxState.PAUSED]
    seen: list[str] = []
    pages = 0
    token: str | None = None
    while True:
        ids, token = listed(bodies, sdk_query(state=states, limit=3, next_token=token or None))
        seen += ids
        pages += 1
        if pages == 1:
            # Meanwhile: a listed sandbox is paused, an unlisted one resumed, one deleted, one created.
            next(b for b in bodies if b["status"]["sandboxID"] == "sbxg")["status"]["phase"] = "Suspended"
            next(b for b in bodies if b["status"]["sandboxID"] == "sbxb")["status"]["phase"] = "Running"
            bodies = [b for b in bodies if b["status"]["sandboxID"] != "sbxe"] + [
                sandbox("sbxz", created=T0 + timedelta(minutes=1))
            ]
        if token is None:
            break
        assert pages < 5
    assert pages == 3
    assert seen == ["sbxg", "sbxf", "sbxe", "sbxd", "sbxc", "sbxb", "sbxa"]  # each once, no shift
    assert len(seen) == len(set(seen))


def test_a_walk_in_ascending_order_ends_as_well() -> None:
    first, token = listed(fleet(), sdk_query(order=OrderDirection.ASC, limit=4))
    assert first == ["sbxa", "sbxb", "sbxc", "sbxd"] and token is not None
    rest, token = listed(fleet(), sdk_query(order=OrderDirection.ASC, limit=4, next_token=token))
    assert rest == ["sbxe", "sbxf", "sbxg"] and token is None


def test_the_last_full_page_has_no_next_token() -> None:
    ids, token = listed(fleet(), sdk_query(limit=7))
    assert len(ids) == 7 and token is None
    ids, token = listed(fleet(), sdk_query(limit=6))
    assert len(ids) == 6 and token is not None
    assert listed(fleet(), sdk_query(limit=6, next_token=token)) == (["sbxa"], None)


def test_state_filters() -> None:
    assert listed(fleet(), sdk_query(state=[SandboxState.PAUSED]))[0] == ["sbxf", "sbxd", "sbxb"]
    assert listed(fleet(), sdk_query(state=[SandboxState.RUNNING]))[0] == ["sbxg", "sbxe", "sbxc", "sbxa"]
    # Repeated parameters (form, exploded) mean the same as the SDK's comma-joined list.
    repeated = URL("http://gateway/v2/sandboxes?state=running&state=paused").query
    assert listed(fleet(), repeated)[0] == NEWEST_FIRST


def test_metadata_filters_as_the_sdk_encodes_them() -> None:
    query = sdk_query(metadata=sdk_metadata({"team": "a b"}))
    assert listed(fleet(), query)[0] == ["sbxf", "sbxc"]
    both = sdk_query(metadata=sdk_metadata({"team": "a b"}), state=[SandboxState.RUNNING])
    assert listed(fleet(), both)[0] == ["sbxc"]
    assert listed(fleet(), sdk_query(metadata=sdk_metadata({"team": "a"})))[0] == []


def test_started_after_filters_by_start_time() -> None:
    query = sdk_query(started_after=T0 + timedelta(seconds=4))  # the SDK sends it with its offset
    assert listed(fleet(), query)[0] == ["sbxg", "sbxf"]
    local = (T0 + timedelta(seconds=4)).astimezone(timezone(timedelta(hours=2)))
    assert listed(fleet(), sdk_query(started_after=local))[0] == ["sbxg", "sbxf"]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"limit": "0"}, "limit must be between 1 and 100"),
        ({"limit": "101"}, "limit must be between 1 and 100"),
        ({"limit": "-3"}, "limit must be between 1 and 100"),
        ({"limit": "ten"}, "limit must be an integer"),
        ({"limit": "1.5"}, "limit must be an integer"),
        ({"nextToken": "sbxa"}, "nextToken is not a token this API returned"),
        ({"nextToken": "%%%"}, "nextToken is not a token this API returned"),
        ({"nextToken": "WzFd"}, "nextToken is not a token this API returned"),  # [1]
        ({"nextToken": "WyJ4IiwieSJd"}, "nextToken is not a token this API returned"),  # ["x","y"]
        ({"nextToken": "W1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tb" * 200}, "nextToken is not a token this API returned"),
        ({"order": "newest"}, "order must be asc or desc"),
        ({"state": "running,sleeping"}, "state must be running and/or paused"),
        ({"startedAfter": "yesterday"}, "startedAfter must be an RFC 3339 time"),
    ],
)
def test_bad_list_queries_are_400s_that_say_why(query: dict[str, str], message: str) -> None:
    with pytest.raises(e2b.BadRequest, match=message):
        e2b.parse_list_query(query)


def test_next_tokens_are_opaque_and_round_trip() -> None:
    key = e2b.list_key(sandbox("sbxq", created=T0))
    token = e2b.next_token(key)
    assert "sbxq" not in token and e2b.parse_next_token(token) == key
    assert e2b.parse_list_query({"nextToken": token}).after == key


# --- the wiring: create, get, connect and the proxy through the real application ---------------------

API_KEY = "e2b_" + "c" * 40


@dataclass
class Served:
    client: TestClient[web.Request, web.Application]
    api: FakeApi
    gateway: Gateway


@contextlib.asynccontextmanager
async def serve(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Served]:
    api = FakeApi()
    gateway = Gateway(api, GatewayConfig(token_key=KEY, create_timeout=5))
    gateway.cache.api_keys[e2b.api_key_digest(API_KEY)] = "team-a"
    gateway.cache.templates["base"] = {"metadata": {"name": "base"}, "spec": {"image": "i", "ports": [USER_PORT]}}
    create_sandbox = gateway.create_sandbox

    async def create_and_run(namespace: str, manifest: JSON) -> None:
        """The create, then what the operator would report: Running on a pod IP."""
        await create_sandbox(namespace, manifest)
        stored = api.objects[SANDBOXES.path(namespace, manifest["metadata"]["name"])]
        running = {**stored, "status": {"phase": "Running", "podIP": "10.255.0.4"}}
        running["metadata"] = {
            **stored["metadata"],
            "resourceVersion": str(int(stored["metadata"]["resourceVersion"]) + 1),
        }
        gateway.cache.observe(running)

    monkeypatch.setattr(gateway, "create_sandbox", create_and_run)

    async def answer(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    agent = web.Application()
    agent.router.add_route("*", "/{tail:.*}", answer)
    app = gateway.app()
    app.on_startup.clear()  # no watches: the cache is filled above
    app.on_cleanup.clear()
    async with TestServer(agent) as agent_server, TestClient(TestServer(app)) as client:
        gateway._upstream = upstream_to(agent_server.port)  # every pod is the fake
        try:
            yield Served(client, api, gateway)
        finally:
            await gateway._upstream.close()


async def test_a_private_sandbox_end_to_end_through_the_gateway(monkeypatch: pytest.MonkeyPatch) -> None:
    async with serve(monkeypatch) as served:
        key = {"X-API-KEY": API_KEY}
        response = await served.client.post(
            "/v2/sandboxes", json={"templateID": "base", "network": {"allowPublicTraffic": False}}, headers=key
        )
        assert response.status == 201, await response.text()
        created = SdkSandbox.from_dict(await response.json())
        traffic, envd = created.traffic_access_token, created.envd_access_token
        assert isinstance(traffic, str) and isinstance(envd, str) and traffic != envd
        (stored,) = served.api.of_kind(SANDBOXES, "team-a").values()
        assert stored["metadata"]["annotations"][PUBLIC_TRAFFIC_ANNOTATION] == "false"

        sandbox_id = created.sandbox_id
        got = await (await served.client.get(f"/sandboxes/{sandbox_id}", headers=key)).json()
        assert got["trafficAccessToken"] == traffic and got["network"] == {"allowPublicTraffic": False}
        connected = await served.client.post(f"/v2/sandboxes/{sandbox_id}/connect", json={}, headers=key)
        assert connected.status == 200 and (await connected.json())["trafficAccessToken"] == traffic

        host = {"Host": f"{USER_PORT}-{sandbox_id}.example.com"}
        without = await served.client.get("/", headers=host)
        assert without.status == 403 and "private" in (await without.json())["message"]
        assert (await served.client.get("/", headers={**host, "X-Access-Token": envd})).status == 403
        with_token = await served.client.get("/", headers={**host, "e2b-traffic-access-token": traffic})
        assert with_token.status == 200 and await with_token.text() == "ok"
        envd_route = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(ENVD_PORT)}
        assert (await served.client.get("/envs", headers={**envd_route, "X-Access-Token": envd})).status == 200
        refused = await served.client.get("/envs", headers={**envd_route, "E2B-Traffic-Access-Token": traffic})
        assert refused.status == 401


async def test_a_malformed_allow_public_traffic_is_a_400_and_creates_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    async with serve(monkeypatch) as served:
        response = await served.client.post(
            "/v2/sandboxes",
            json={"templateID": "base", "network": {"allowPublicTraffic": "false"}},
            headers={"X-API-KEY": API_KEY},
        )
        assert response.status == 400
        assert (await response.json()) == {
            "code": 400,
            "message": "network.allowPublicTraffic must be a boolean (true or false)",
        }
        assert served.api.of_kind(SANDBOXES, "team-a") == {}


async def test_the_list_header_carries_the_next_token(monkeypatch: pytest.MonkeyPatch) -> None:
    async with serve(monkeypatch) as served:
        for body in fleet():
            body["metadata"]["resourceVersion"] = "1"
            served.gateway.cache.observe(body)
        seen: list[str] = []
        params: dict[str, str] = {"limit": "3"}
        for _ in range(3):
            response = await served.client.get("/v2/sandboxes", params=params, headers={"X-API-KEY": API_KEY})
            assert response.status == 200
            seen += [item["sandboxID"] for item in await response.json()]
            token = response.headers.get("x-next-token")
            if token is None:
                break
            params = {"limit": "3", "nextToken": token}
        assert seen == NEWEST_FIRST and token is None
        bad = await served.client.get("/v2/sandboxes", params={"nextToken": "nope"}, headers={"X-API-KEY": API_KEY})
        assert bad.status == 400 and "nextToken" in (await bad.json())["message"]
