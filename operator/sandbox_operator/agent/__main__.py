"""Console entry point: `sandbox-agent` / `python -m sandbox_operator.agent`."""

from __future__ import annotations

import asyncio

from .config import parse_config
from .server import configure_logging, serve


def main() -> None:
    config = parse_config()
    configure_logging()
    config.workdir.mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
