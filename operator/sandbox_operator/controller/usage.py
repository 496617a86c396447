"""The usage collector task: polls running sandboxes' agents with bounded concurrency.

Each round scrapes `http://<podIP>:<envd port>/agent/metrics` of every Running sandbox, updates the
usage table the `/metrics` exporter reads, and — at most once per `status_interval` per sandbox —
writes the latest snapshot to `status.usage` together with `status.lastActivityAt` when the agent
saw newer activity (that is what feeds the idle timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiohttp

from sandbox_operator.api import Phase, Sandbox, SandboxTemplate, resolve_resources
from sandbox_operator.lifecycle.status import format_time, parse_time
from sandbox_operator.metrics.usage import AgentSample, Limits, SandboxUsage, parse_agent_metrics

if TYPE_CHECKING:
    from sandbox_operator.controller.runtime import Runtime
    from sandbox_operator.controller.store import JSON, Key

log = logging.getLogger(__name__)


class UsageCollector:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        config = rt.config
        self.interval = config.usage_interval
        self.status_interval = config.usage_status_interval
        self.metadata_keys = config.metric_metadata_keys
        self.port = config.agent_port
        self.usage: dict[Key, SandboxUsage] = {}
        self._last_status_write: dict[Key, float] = {}
        self._limit = asyncio.Semaphore(config.usage_concurrency)
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.interval > 0 and self._task is None:
            self._task = asyncio.create_task(self._run(), name="usage-collector")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()

    def forget(self, key: Key) -> None:
        self.usage.pop(key, None)
        self._last_status_write.pop(key, None)

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.collect_once()
            except Exception:  # one bad round must not end collection
                log.exception("usage collection round failed")
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    def _targets(self) -> dict[Key, JSON]:
        targets = {}
        for key, body in self.rt.store.sandboxes.items():
            status = body.get("status") or {}
            if status.get("phase") == Phase.RUNNING and status.get("podIP"):
                targets[key] = body
        return targets

    async def collect_once(self) -> None:
        targets = self._targets()
        for key in list(self.usage):
            if key not in targets:
                self.forget(key)
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=max(1.0, self.interval)))
        await asyncio.gather(*(self._scrape(key, body) for key, body in targets.items()))

    def _entry(self, key: Key, body: JSON) -> SandboxUsage | None:
        entry = self.usage.get(key)
        if entry is not None:
            return entry
        spec = body.get("spec") or {}
        template_body = self.rt.store.templates.get(spec.get("template", ""))
        if template_body is None:
            return None
        template = SandboxTemplate.from_body(template_body)
        resources = resolve_resources(Sandbox.from_body(body).spec, template.spec)
        metadata = spec.get("metadata") or {}
        allow_listed = (str(metadata.get(k, "")) for k in self.metadata_keys)
        labels = (key[0], key[1], str(spec.get("template", "")), *allow_listed)
        entry = SandboxUsage(
            labels=labels,
            limits=Limits(
                cpu_cores=resources.cpu_millicores / 1000,
                memory_bytes=float(resources.memory_bytes),
                disk_bytes=float(resources.disk_bytes),
            ),
        )
        self.usage[key] = entry
        return entry

    async def _scrape(self, key: Key, body: JSON) -> None:
        entry = self._entry(key, body)
        if entry is None or self._session is None:
            return
        url = f"http://{body['status']['podIP']}:{self.port}/agent/metrics"
        async with self._limit:
            try:
                async with self._session.get(url) as response:
                    response.raise_for_status()
                    text = await response.text()
                sample = parse_agent_metrics(text)
            except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
                log.debug("usage scrape of %s/%s failed: %s", key[0], key[1], exc)
                if self.usage.get(key) is entry:
                    entry.record_unreachable()
                return
        if self.usage.get(key) is not entry:
            return  # the sandbox stopped or went away while we were scraping
        entry.record(sample, time.time())
        await self._maybe_write_status(key, body, entry, sample)

    async def _maybe_write_status(self, key: Key, body: JSON, entry: SandboxUsage, sample: AgentSample) -> None:
        now = time.monotonic()
        if now - self._last_status_write.get(key, -1e9) < self.status_interval:
            return
        self._last_status_write[key] = now
        status: dict[str, Any] = {"usage": {
            "cpuCores": round(entry.cpu_cores or 0.0, 4),
            "memoryBytes": int(sample.memory_used_bytes),
            "diskBytes": int(sample.disk_used_bytes),
            "rxBytes": int(sample.rx_bytes),
            "txBytes": int(sample.tx_bytes),
            "processes": int(sample.processes),
            "collectedAt": format_time(datetime.fromtimestamp(entry.sampled_at, UTC)),
        }}
        if sample.last_activity:
            activity = datetime.fromtimestamp(sample.last_activity, UTC).replace(microsecond=0)
            known = parse_time((body.get("status") or {}).get("lastActivityAt"))
            if known is None or activity > known:
                status["lastActivityAt"] = format_time(activity)
        namespace, name = key
        from sandbox_operator.controller.reconcile import sandbox_path

        try:
            updated = await self.rt.client.patch(f"{sandbox_path(namespace, name)}/status", {"status": status})
        except Exception as exc:
            log.debug("usage status write of %s/%s failed: %s", namespace, name, exc)
            return
        if updated is not None:
            self.rt.store.put_sandbox(updated)
            if "lastActivityAt" in status:
                self.rt.queue.add(("sandbox", namespace, name))  # the idle deadline moved
