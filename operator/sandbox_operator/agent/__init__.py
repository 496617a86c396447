"""The in-sandbox agent: an envd-compatible server (port 49983) and a code interpreter (port 49999).

It ships in every sandbox image, so nothing here may import kopf or the kubernetes client.
"""

ENVD_COMPATIBLE_VERSION = "0.6.4"
"""The envd version whose SDK-visible features this agent implements (the control plane reports it)."""
