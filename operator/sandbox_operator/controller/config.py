"""Operator settings (from the command line)."""

from __future__ import annotations

from dataclasses import dataclass

MANAGED_BY = "sandbox-operator"
# kopf's own finalizer/annotation prefix: distinct, so another kopf operator never collides (kopf #372).
ANNOTATION_PREFIX = "sandbox.dev"
FINALIZER = "sandbox.dev/finalizer"


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
