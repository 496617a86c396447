"""The usage collector task: polls running sandboxes' agents with bounded concurrency.

Each round scrapes `http://<podIP>:<envd port>/agent/metrics` of every Running sandbox, updates the
usage table the `/metrics` exporter reads, and — at most once per `status_interval` per sandbox —
writes the latest snapshot to `status.usage` together with `status.lastActivityAt` when the agent
saw newer activity (that is what feeds the idle timeout).

A round lasts at most one interval: each scrape has a short timeout (an agent answers in
milliseconds, a dead one must not hold a slot for the whole interval), scrapes still unfinished
when the interval ends are cancelled, and the next round starts with the sandboxes scraped least
recently, so none is starved. Numbers older than STALE_AFTER_INTERVALS rounds are withdrawn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

import aiohttp

from sandbox_operator.api import Phase, Sandbox, SandboxTemplate, resolve_resources
from sandbox_operator.api.names import SANDBOXES
from sandbox_operator.controller.agents import MAX_AGENT_TIMEOUT, AgentClient
from sandbox_operator.controller.config import OperatorConfig
from sandbox_operator.controller.store import JSON, Key, Store
from sandbox_operator.kube import KubeClient
from sandbox_operator.lifecycle.status import format_time, parse_time
from sandbox_operator.metrics.usage import AgentSample, Limits, SandboxUsage

log = logging.getLogger(__name__)

# A sandbox without a successful scrape for this many intervals shows `sandbox_up 0`, no numbers.
STALE_AFTER_INTERVALS: Final = 3.0


def scrape_timeout(interval: float) -> float:
    return max(0.1, min(interval, MAX_AGENT_TIMEOUT))


class UsageCollector:
    """``on_activity(key)`` is called after a status write moved the sandbox's lastActivityAt."""

    def __init__(
        self, store: Store, client: KubeClient, config: OperatorConfig, on_activity: Callable[[Key], None]
    ) -> None:
        self.store = store
        self.client = client
        self.on_activity = on_activity
        self.interval = config.usage_interval
        self.status_interval = config.usage_status_interval
        self.metadata_keys = config.metric_metadata_keys
        self.scrape_timeout = scrape_timeout(self.interval)
        self.agents = AgentClient(config.agent_port, self.scrape_timeout)
        self.agent_token = config.agent_token
        self.usage: dict[Key, SandboxUsage] = {}
        # What each entry's labels and limits were computed from: (sandbox, template) resourceVersion.
        self._entry_sources: dict[Key, tuple[str, str]] = {}
        self._last_status_write: dict[Key, float] = {}
        # Monotonic time each sandbox's last scrape started: the next round goes oldest first.
        self._attempted: dict[Key, float] = {}
        self._limit = asyncio.Semaphore(config.usage_concurrency)
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
        await self.agents.close()

    def forget(self, key: Key) -> None:
        self.usage.pop(key, None)
        self._entry_sources.pop(key, None)
        self._last_status_write.pop(key, None)
        self._attempted.pop(key, None)

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
        for key, body in self.store.sandboxes.items():
            status = body.get("status") or {}
            if status.get("phase") == Phase.RUNNING and status.get("podIP"):
                targets[key] = body
        return targets

    async def collect_once(self) -> None:
        targets = self._targets()
        for key in list(self.usage):
            if key not in targets:
                self.forget(key)
        for key in list(self._attempted):
            if key not in targets:
                self._attempted.pop(key, None)
        # Least recently scraped first: what a cut-short round skipped goes first in the next one.
        order = sorted(targets, key=lambda k: self._attempted.get(k, float("-inf")))
        tasks = [asyncio.create_task(self._scrape(key, targets[key])) for key in order]
        if tasks:
            budget = max(self.interval, self.scrape_timeout)
            done, pending = await asyncio.wait(tasks, timeout=budget)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
                log.info(
                    "usage round cut short after %.1fs: %d of %d scrapes left for the next round",
                    budget,
                    len(pending),
                    len(tasks),
                )
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    log.error("usage scrape failed", exc_info=task.exception())
        self._withdraw_stale(time.time())

    def _withdraw_stale(self, now: float) -> None:
        oldest = now - STALE_AFTER_INTERVALS * max(self.interval, self.scrape_timeout)
        for entry in self.usage.values():
            if entry.up and entry.sampled_at < oldest:
                entry.record_unreachable()

    def _entry(self, key: Key, body: JSON) -> SandboxUsage | None:
        spec = body.get("spec") or {}
        template_name = str(spec.get("template", ""))
        template_body = self.store.template_for(template_name, started=True)
        entry = self.usage.get(key)
        if template_body is None:
            return entry  # keep what is known; limits cannot be resolved without the template
        sources = (
            str((body.get("metadata") or {}).get("resourceVersion", "")),
            str((template_body.get("metadata") or {}).get("resourceVersion", "")),
        )
        if entry is not None and self._entry_sources.get(key) == sources:
            return entry
        # New, or the sandbox or its template changed: labels (metadata) and limits may differ.
        template = SandboxTemplate.from_body(template_body)
        resources = resolve_resources(Sandbox.from_body(body).spec, template.spec)
        metadata = spec.get("metadata") or {}
        allow_listed = (str(metadata.get(k, "")) for k in self.metadata_keys)
        labels = (key[0], key[1], template_name, *allow_listed)
        limits = Limits(
            cpu_cores=resources.cpu_millicores / 1000,
            memory_bytes=float(resources.memory_bytes),
            disk_bytes=float(resources.disk_bytes),
        )
        self._entry_sources[key] = sources
        if entry is None:
            entry = SandboxUsage(labels=labels, limits=limits)
            self.usage[key] = entry
        else:
            # In place: the exporter reads labels at scrape time, so the old series disappear with
            # the old values, and the CPU rate carries on from the previous sample.
            entry.labels, entry.limits = labels, limits
        return entry

    async def _scrape(self, key: Key, body: JSON) -> None:
        entry = self._entry(key, body)
        if entry is None:
            return
        async with self._limit:
            self._attempted[key] = time.monotonic()
            try:
                status = body["status"]
                sample = await self.agents.sample(status["podIP"], self.agent_token(status.get("agentTokenId")))
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
        status: dict[str, Any] = {
            "usage": {
                "cpuCores": round(entry.cpu_cores or 0.0, 4),
                "memoryBytes": int(sample.memory_used_bytes),
                "diskBytes": int(sample.disk_used_bytes),
                "rxBytes": int(sample.rx_bytes),
                "txBytes": int(sample.tx_bytes),
                "processes": int(sample.processes),
                "collectedAt": format_time(datetime.fromtimestamp(entry.sampled_at, UTC)),
            }
        }
        if sample.last_activity:
            activity = datetime.fromtimestamp(sample.last_activity, UTC).replace(microsecond=0)
            known = parse_time((body.get("status") or {}).get("lastActivityAt"))
            if known is None or activity > known:
                status["lastActivityAt"] = format_time(activity)
        namespace, name = key
        try:
            updated = await self.client.patch(SANDBOXES.path(namespace, name, "status"), {"status": status})
        except Exception as exc:
            log.debug("usage status write of %s/%s failed: %s", namespace, name, exc)
            return
        if updated is not None:
            self.store.put_sandbox(updated)
            if "lastActivityAt" in status:
                self.on_activity(key)  # the idle deadline moved
