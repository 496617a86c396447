"""The Kubernetes API client every component shares (operator, gateway, usage collection): JSON over
HTTP with bounded concurrency, credentials from a kubeconfig or the pod's service account.

The paths it is given come from ``sandbox_operator.api.names`` (ApiResource)."""

from sandbox_operator.kube.client import JSON, ApiError, Credentials, KubeClient

__all__ = ["JSON", "ApiError", "Credentials", "KubeClient"]
