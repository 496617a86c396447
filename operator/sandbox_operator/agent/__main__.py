"""Console entry point: `sandbox-agent` / `python -m sandbox_operator.agent`."""

from __future__ import annotations

import os

from .config import SECRET_ENV_VARS
from .init import become_init_if_pid1, make_undumpable


def main() -> None:
    # First, before the token is read or anything else runs: same-uid user code must not read this
    # process's environment or memory (docs/agent.md, "Running as a container").
    make_undumpable()
    become_init_if_pid1()
    # Imported after the fork: the init parent stays a small process.
    from .config import parse_config
    from .listen import bind_listeners

    config = parse_config()
    # Read once; children get an environment without it anyway (config.SECRET_ENV_VARS), and nothing
    # later may find it in os.environ.
    for name in SECRET_ENV_VARS:
        os.environ.pop(name, None)
    # Listening before the heavy imports: a connection made meanwhile waits instead of being refused.
    bound = bind_listeners(config)
    import asyncio

    from .server import configure_logging, serve

    configure_logging()
    config.workdir.mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(config, bound))


if __name__ == "__main__":
    main()
