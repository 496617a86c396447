"""Kubernetes operator for E2B-compatible code sandboxes."""

__version__ = "0.1.0"
