"""The event loop the operator and the gateway run on: uvloop when installed, else asyncio's own.

Both spend much of their CPU in event-loop and socket work (watch streams, API requests, the
gateway's proxy), which uvloop does in C. `SANDBOX_EVENT_LOOP=asyncio` opts out.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
EVENT_LOOP_ENV = "SANDBOX_EVENT_LOOP"


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None (asyncio's default) when it is missing or opted out of."""
    if os.environ.get(EVENT_LOOP_ENV, "auto") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    factory = loop_factory()
    log.info("event loop: %s", "uvloop" if factory is not None else "asyncio")
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
