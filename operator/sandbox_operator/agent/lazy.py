"""Parts of the agent that load after it listens (the code interpreter: Jupyter, ZeroMQ).

The agent binds its ports and answers /health first; a `Deferred` part then loads in the background,
its imports on a worker thread so the event loop keeps serving envd meanwhile. A request that needs a
part still loading waits for it, up to `LOAD_WAIT_SECONDS`; it is refused (`NotLoaded`) only when the
load takes longer than that or failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Final, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a request waits for a part that is still loading: it takes well under a second, but a
# CPU-starved sandbox can be slow, and a request should wait rather than fail.
LOAD_WAIT_SECONDS: Final = 60.0


class NotLoaded(Exception):
    """A part did not load within the wait."""


async def import_modules(names: Iterable[str]) -> None:
    """Import `names` on a worker thread, the event loop serving meanwhile; on the loop itself when no
    thread can be started (near the sandbox's process limit)."""
    wanted = tuple(names)

    def run() -> None:
        for name in wanted:
            __import__(name)  # not importlib.import_module: `-X importtime` sees only these

    try:
        await asyncio.get_running_loop().run_in_executor(None, run)
    except RuntimeError:
        run()


class Deferred(Generic[T]):
    """A part made by `load` once `start` is called (shortly after the agent listens), or at the first
    `get`, whichever is first. A failed load is not retried: every `get` raises its error."""

    def __init__(self, name: str, load: Callable[[], Awaitable[T]], wait_seconds: float = LOAD_WAIT_SECONDS) -> None:
        self.name = name
        self._load = load
        self.wait_seconds = wait_seconds
        self._task: asyncio.Task[T] | None = None

    @property
    def loaded(self) -> T | None:
        """The part when it has loaded, else None."""
        task = self._task
        if task is None or not task.done() or task.cancelled() or task.exception() is not None:
            return None
        return task.result()

    def start(self) -> asyncio.Task[T]:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"load {self.name}")
            # _run logged a failure already: no "exception was never retrieved" when no request came.
            self._task.add_done_callback(lambda task: task.cancelled() or task.exception())
        return self._task

    async def _run(self) -> T:
        try:
            return await self._load()
        except Exception:
            log.exception("could not load the %s", self.name)
            raise

    async def get(self) -> T:
        """The part; waits while it loads (NotLoaded after `wait_seconds`), raises what its load raised."""
        task = self.start()
        if not task.done():
            try:
                # Shielded: a request that gives up (its client left) does not cancel the load.
                await asyncio.wait_for(asyncio.shield(task), self.wait_seconds)
            except TimeoutError:
                raise NotLoaded(f"the {self.name} is still loading after {self.wait_seconds:g}s") from None
        return task.result()

    async def close(self) -> T | None:
        """Stop a load still running; the part when it had loaded (for the caller to shut it down)."""
        task = self._task
        if task is None:
            return None
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return self.loaded
