"""The floor: the least a Sandbox controller can do, to measure the operator against.

    python benchmarks/floor_controller.py --kubeconfig KUBECONFIG --namespace NS

A plain asyncio watch loop, no kopf: for each Sandbox in the namespace it creates exactly one pod
(the operator's emptyDir pod shape: same image, requests == limits, an emptyDir workspace; owned by
the Sandbox, so the garbage collector deletes it with its Sandbox) and, once that pod is Running and
Ready, writes the Sandbox's status once (phase Running). Nothing else: no template lookup, no
finalizer, no Service, NetworkPolicy, agent token or Events, no retries beyond transient errors.

Its requests carry the User-Agent (and field manager) `sandbox-floor-controller`. It logs "ready"
once both watches are open, and on SIGTERM/SIGINT logs its own write counts (`writes {json}`).
Uses the project's kube client and event loop (uvloop when installed, like the operator).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import signal
import ssl
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))  # the project, from source

from sandbox_operator import eventloop
from sandbox_operator.api.names import API_VERSION, PODS, SANDBOX_LABEL, SANDBOXES, ApiResource
from sandbox_operator.kube.client import JSON, ApiError, Credentials, KubeClient

USER_AGENT = "sandbox-floor-controller"
IMAGE = "ghcr.io/sandbox-operator/sandbox-base:dev"
AMOUNTS = {"cpu": "250m", "memory": "256Mi", "ephemeral-storage": "1Gi"}  # the benchmark template's default
TRANSIENT = frozenset({429, 500, 502, 503, 504})
log = logging.getLogger("floor")


def load_credentials(kubeconfig: str) -> Credentials:
    """Server, bearer token and CA of the current context (hack/cluster writes JSON kubeconfigs).

    Not Credentials.load: that imports the `kubernetes` package, whose memory and start-up a floor
    controller should not carry (its RSS and CPU are what the operator is compared with)."""
    text = Path(kubeconfig).read_text()
    try:
        config: JSON = json.loads(text)
    except ValueError:
        import yaml  # a hand-written kubeconfig; not needed for the benchmark's own

        config = yaml.safe_load(text)
    context = next(c["context"] for c in config["contexts"] if c["name"] == config["current-context"])
    cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
    user = next(u["user"] for u in config["users"] if u["name"] == context["user"])
    if "token" not in user:
        raise SystemExit("floor_controller: only token users are supported")
    tls = ssl.create_default_context()
    if "certificate-authority-data" in cluster:
        tls.load_verify_locations(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
    elif "certificate-authority" in cluster:
        tls.load_verify_locations(cafile=cluster["certificate-authority"])
    headers = {"Authorization": f"Bearer {user['token']}", "User-Agent": USER_AGENT}
    return Credentials(server=cluster["server"].rstrip("/"), headers=headers, ssl_context=tls)


def pod_for(sandbox: JSON) -> JSON:
    name, uid = sandbox["metadata"]["name"], sandbox["metadata"]["uid"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"sbx-{name}",
            "labels": {SANDBOX_LABEL: name},
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": "Sandbox",
                    "name": name,
                    "uid": uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "containers": [
                {
                    "name": "sandbox",
                    "image": IMAGE,
                    "resources": {"requests": dict(AMOUNTS), "limits": dict(AMOUNTS)},
                    "volumeMounts": [{"name": "workspace", "mountPath": "/home/user"}],
                }
            ],
            "volumes": [{"name": "workspace", "emptyDir": {"sizeLimit": AMOUNTS["ephemeral-storage"]}}],
        },
    }


def running_and_ready(pod: JSON) -> bool:
    status = pod.get("status") or {}
    conditions = status.get("conditions") or []
    return status.get("phase") == "Running" and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in conditions
    )


class FloorController:
    def __init__(self, client: KubeClient, namespace: str) -> None:
        self.client = client
        self.namespace = namespace
        self.sandboxes: set[str] = set()  # live (not deleting) Sandboxes seen
        self.pod_requested: set[str] = set()  # Sandboxes whose pod this process created (or found)
        self.pod_running: set[str] = set()  # Sandboxes whose pod is Running and Ready
        self.status_written: set[str] = set()  # Sandboxes whose status says Running
        self.tasks: set[asyncio.Task[None]] = set()

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def on_sandbox(self, kind: str, sandbox: JSON) -> None:
        name = sandbox["metadata"]["name"]
        if kind == "DELETED" or sandbox["metadata"].get("deletionTimestamp"):
            for known in (self.sandboxes, self.pod_requested, self.pod_running, self.status_written):
                known.discard(name)
            return
        self.sandboxes.add(name)
        if (sandbox.get("status") or {}).get("phase") == "Running":
            self.status_written.add(name)
        if name not in self.pod_requested:
            self.pod_requested.add(name)
            self.spawn(self.create_pod(sandbox))
        self.maybe_write_running(name)

    def on_pod(self, kind: str, pod: JSON) -> None:
        name = (pod["metadata"].get("labels") or {}).get(SANDBOX_LABEL)
        if not name:
            return
        if kind != "DELETED" and running_and_ready(pod):
            self.pod_running.add(name)
            self.maybe_write_running(name)
        else:
            self.pod_running.discard(name)

    def maybe_write_running(self, name: str) -> None:
        if name in self.sandboxes and name in self.pod_running and name not in self.status_written:
            self.status_written.add(name)
            self.spawn(self.write_running(name))

    async def create_pod(self, sandbox: JSON) -> None:
        await self.retrying(lambda: self.client.create(PODS.collection(self.namespace), pod_for(sandbox)))

    async def write_running(self, name: str) -> None:
        status = {"status": {"phase": "Running", "podName": f"sbx-{name}"}}
        path = SANDBOXES.path(self.namespace, name, "status")
        await self.retrying(lambda: self.client.patch(path, status))

    @staticmethod
    async def retrying(call: Callable[[], Coroutine[Any, Any, Any]], attempts: int = 6) -> None:
        """One write, retried with backoff on transient answers; other failures are logged."""
        delay = 0.1
        for attempt in range(attempts):
            try:
                await call()
                return
            except ApiError as exc:
                if exc.status not in TRANSIENT or attempt == attempts - 1:
                    log.warning("write failed: %s", exc)
                    return
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                if attempt == attempts - 1:
                    log.warning("write failed: %r", exc)
                    return
            await asyncio.sleep(delay)
            delay *= 2

    async def follow(self, resource: ApiResource, handle: Callable[[str, JSON], None], opened: asyncio.Event) -> None:
        """List, then watch from the list's resourceVersion; list again when the watch expires (410)."""
        path = resource.collection(self.namespace)
        params = {"labelSelector": SANDBOX_LABEL} if resource is PODS else {}
        version = ""
        while True:
            try:
                if not version:
                    listed: JSON = await self.client.request("GET", path, params=params)
                    for item in listed.get("items") or []:
                        handle("ADDED", item)
                    version = listed["metadata"]["resourceVersion"]
                query = {**params, "watch": "1", "resourceVersion": version, "allowWatchBookmarks": "true"}
                opened.set()
                async for event in self.client.watch_lines(path, query):
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        version = "" if obj.get("code") == 410 else version
                        break
                    version = (obj.get("metadata") or {}).get("resourceVersion") or version
                    if event.get("type") != "BOOKMARK":
                        handle(str(event.get("type")), obj)
            except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.warning("watch on %s: %r; again in 1 s", path, exc)
                version = "" if isinstance(exc, ApiError) and exc.status == 410 else version
                await asyncio.sleep(1)


async def run(kubeconfig: str, namespace: str) -> None:
    client = KubeClient(load_credentials(kubeconfig), field_manager=USER_AGENT)
    controller = FloorController(client, namespace)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    opened = [asyncio.Event(), asyncio.Event()]
    watches = [
        asyncio.create_task(controller.follow(SANDBOXES, controller.on_sandbox, opened[0])),
        asyncio.create_task(controller.follow(PODS, controller.on_pod, opened[1])),
    ]

    async def announce_ready() -> None:
        for event in opened:
            await event.wait()
        log.info("ready: watching sandboxes and pods in %s", namespace)

    watches.append(asyncio.create_task(announce_ready()))
    await stop.wait()
    for task in [*watches, *controller.tasks]:
        task.cancel()
    for task in [*watches, *controller.tasks]:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await client.close()
    writes = {f"{verb} {resource}": count for (verb, resource), count in sorted(client.writes.items())}
    log.info("writes %s", json.dumps(writes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--namespace", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    eventloop.run(run(args.kubeconfig, args.namespace))


if __name__ == "__main__":
    main()
