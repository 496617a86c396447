"""Operator settings (from the command line)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sandbox_operator.api.names import DEFAULT_CLUSTER_CIDRS, DEFAULT_DNS_NAMESPACE, DEFAULT_DNS_POD_LABELS, ENVD_PORT
from sandbox_operator.lifecycle.lease import LeaseTimings
from sandbox_operator.resources.builders import PolicySettings
from sandbox_operator.resources.tokens import agent_token


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
    # The key agent access tokens derive from, shared with the gateway (resources.tokens); None
    # starts agents without a token (development only: any pod on the network could drive them).
    agent_token_key: bytes | None = None
    # The cluster's own networks (pods, Services, nodes) that `allow` egress keeps sandboxes off.
    egress_cluster_cidrs: tuple[str, ...] = DEFAULT_CLUSTER_CIDRS
    # The cluster DNS pods every sandbox's egress reaches (namespace, pod labels).
    dns_namespace: str = DEFAULT_DNS_NAMESPACE
    dns_pod_labels: tuple[tuple[str, str], ...] = DEFAULT_DNS_POD_LABELS
    # Leader election (controller.leader): off for one replica; on, only the Lease's holder acts.
    leader_election: bool = False
    leader_election_namespace: str = "sandbox-system"
    leader_election_name: str = "sandbox-operator"
    leader_identity: str = ""  # this replica's name in the Lease (the pod's name, made unique)
    lease_timings: LeaseTimings = field(default_factory=LeaseTimings)

    @property
    def policy_settings(self) -> PolicySettings:
        return PolicySettings(
            gateway_namespace=self.gateway_namespace,
            dns_namespace=self.dns_namespace,
            dns_pod_labels=self.dns_pod_labels,
            cluster_cidrs=self.egress_cluster_cidrs,
        )

    def agent_token(self, token_id: str | None) -> str | None:
        """The access token of the agent whose pod has ``token_id``; None when there is none."""
        if self.agent_token_key is None or not token_id:
            return None
        return agent_token(self.agent_token_key, token_id)
