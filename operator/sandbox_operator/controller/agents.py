"""HTTP to the agents in sandbox pods: the usage scrape and the activity check of the idle timeout."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Final

import aiohttp

from sandbox_operator.api.names import AGENT_TOKEN_HEADER
from sandbox_operator.metrics.usage import AgentSample, parse_agent_metrics

log = logging.getLogger(__name__)

# An agent answers in milliseconds; a dead one must not hold a caller for long.
MAX_AGENT_TIMEOUT: Final = 3.0
# The agent's exposition is a few KiB; more is not an agent talking.
MAX_METRICS_BYTES: Final = 1 << 20


class AgentClient:
    def __init__(self, port: int, timeout: float = MAX_AGENT_TIMEOUT) -> None:
        self.port = port
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def sample(self, pod_ip: str, token: str | None) -> AgentSample:
        """One scrape of the agent's /agent/metrics (with its access token); raises
        aiohttp.ClientError, TimeoutError, OSError or ValueError when the agent does not answer with
        its metrics."""
        headers = {AGENT_TOKEN_HEADER: token} if token else None
        async with self._client().get(f"http://{pod_ip}:{self.port}/agent/metrics", headers=headers) as response:
            response.raise_for_status()
            raw = await response.content.read(MAX_METRICS_BYTES + 1)
        if len(raw) > MAX_METRICS_BYTES:
            raise ValueError(f"the agent's metrics exceed {MAX_METRICS_BYTES} bytes")
        return parse_agent_metrics(raw.decode(errors="replace"))

    async def last_activity(self, pod_ip: str, token: str | None) -> datetime | None:
        """When the agent last saw activity (now, while a command or execution runs); None when the
        agent does not answer or reports none."""
        try:
            sample = await self.sample(pod_ip, token)
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
            log.debug("activity check of %s failed: %s", pod_ip, exc)
            return None
        if not sample.last_activity:
            return None
        return datetime.fromtimestamp(sample.last_activity, UTC)
