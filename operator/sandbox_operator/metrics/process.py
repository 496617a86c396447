"""Process and Python runtime metrics for a component's own registry.

The operator and the gateway each serve a registry of their own (not prometheus_client's global
one, so tests can run several in one process): these collectors add what the global registry would
have had, `process_*` (resident memory, CPU seconds, open fds, start time) and `python_*` (`python_info`,
`python_gc_*`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector


def register_process_metrics(registry: CollectorRegistry) -> None:
    """Register the process, platform and garbage-collector collectors on `registry`."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
