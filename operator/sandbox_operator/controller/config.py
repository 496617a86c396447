"""Operator settings (from the command line)."""

from __future__ import annotations

from dataclasses import dataclass

from sandbox_operator.api.names import ENVD_PORT


@dataclass(frozen=True)
class OperatorConfig:
    namespaces: tuple[str, ...] = ()  # empty: all namespaces
    kubeconfig: str | None = None
    bind_address: str = "0.0.0.0"
    metrics_port: int = 9090
    liveness_port: int = 8080
    workers: int = 16
    max_in_flight: int = 64
    gateway_namespace: str = "sandbox-system"
    normal_events: bool = True
    # Usage collection (metrics/usage.py): seconds between scrapes of every running sandbox's agent,
    # scrapes in flight at once, seconds between status.usage writes per sandbox.
    usage_interval: float = 15.0
    usage_concurrency: int = 32
    usage_status_interval: float = 60.0
    agent_port: int = ENVD_PORT
    # spec.metadata keys that become metric labels (metadata_<key>); bounded on purpose.
    metric_metadata_keys: tuple[str, ...] = ()
