"""What this operator process has written but its watches have not brought back yet.

Two kinds of such state bridge the gap between a write and its watch event: the warm pods being
handed to a sandbox right now (never offered twice), and the spec digest of the Service /
NetworkPolicy last written per sandbox (so a reconcile in between does not apply it twice).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

from sandbox_operator.controller.store import Key

ChildKind = Literal["service", "networkpolicy"]
# Children written whole (POST, or a merge patch when outdated) and watched only for their spec digest.
CHILD_KINDS: tuple[ChildKind, ...] = ("service", "networkpolicy")


@dataclass
class InFlight:
    _claims: set[Key] = field(default_factory=set)
    _ensured: dict[tuple[str, ChildKind], str] = field(default_factory=dict)  # (sandbox uid, kind) -> digest
    _shared_writes: dict[Key, tuple[str, asyncio.Future[None]]] = field(default_factory=dict)

    # --- warm pods being claimed -----------------------------------------------------------------

    def is_claiming(self, pod: Key) -> bool:
        return pod in self._claims

    @contextmanager
    def claiming(self, pod: Key) -> Iterator[None]:
        """Mark a warm pod as being handed to a sandbox for the duration of the claim."""
        self._claims.add(pod)
        try:
            yield
        finally:
            self._claims.discard(pod)

    # --- children just written -------------------------------------------------------------------

    def ensured(self, uid: str, kind: ChildKind) -> str | None:
        """The digest of the child this process last wrote for the sandbox, until the watch says
        it is gone."""
        return self._ensured.get((uid, kind))

    def note_ensured(self, uid: str, kind: ChildKind, digest: str) -> None:
        self._ensured[(uid, kind)] = digest

    def forget_child(self, uid: str, kind: ChildKind) -> None:
        """The child was deleted (by us, or seen deleted by the watch): the next reconcile re-applies."""
        self._ensured.pop((uid, kind), None)

    def forget_sandbox(self, uid: str) -> None:
        for kind in CHILD_KINDS:
            self._ensured.pop((uid, kind), None)

    # --- shared children being written -----------------------------------------------------------

    async def write_once(self, key: Key, digest: str, write: Callable[[], Awaitable[None]]) -> None:
        """Run `write` for the shared child `key` at `digest`, or wait for the same write already
        under way: a burst of 1,000 sandboxes needing one shared NetworkPolicy writes it once. A
        waiter's cancellation does not cancel the write the others wait for; its failure fails them all
        (each retries)."""
        pending = self._shared_writes.get(key)
        if pending is None or pending[0] != digest:
            future = asyncio.ensure_future(write())
            self._shared_writes[key] = (digest, future)

            def done(finished: asyncio.Future[None]) -> None:
                if self._shared_writes.get(key, (None, None))[1] is finished:
                    del self._shared_writes[key]
                if not finished.cancelled():
                    finished.exception()  # retrieved: a failure is reported to the waiters

            future.add_done_callback(done)
            pending = (digest, future)
        await asyncio.shield(pending[1])
