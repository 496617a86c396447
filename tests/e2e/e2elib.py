"""Helpers of the e2e tier (importable from its test modules: pytest puts tests/e2e on sys.path)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Gateway:
    url: str
    namespace: str
    api_key: str
    other_key: str  # a key for another namespace
    process: subprocess.Popen[bytes]
    log: Path
    metrics_url: str = ""  # its Prometheus metrics (--metrics-port)

    def sdk(self, api_key: str | None = None) -> dict[str, Any]:
        return {"api_key": api_key or self.api_key, "api_url": self.url, "sandbox_url": self.url}
