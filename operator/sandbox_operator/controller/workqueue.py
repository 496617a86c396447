"""A deduplicating work queue with delayed requeues: the operator's single scheduler.

Every trigger (a Sandbox event, a child Pod event, a timeout deadline, a retry backoff) becomes
`add(key)` or `add_at(key, when)`. A key is processed by at most one worker at a time; a key added
while it is being processed is processed again afterwards (level-based reconcile needs no more).
Deadlines live in one heap, so thousands of sandboxes with idle/lifetime timeouts cost one timer
task, not one per object. Only the earliest pending deadline per key is kept.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock or (lambda: asyncio.get_running_loop().time())
        self._ready: deque[K] = deque()
        self._queued: set[K] = set()  # in _ready, not yet handed to a worker
        self._processing: set[K] = set()
        self._dirty: set[K] = set()  # added again while processing
        self._heap: list[tuple[float, int, K]] = []
        self._due_at: dict[K, float] = {}  # earliest live deadline per key (heap entries may be stale)
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self._ready)

    @property
    def pending_deadlines(self) -> int:
        return len(self._due_at)

    def add(self, key: K) -> None:
        if self._closed:
            return
        if key in self._processing:
            self._dirty.add(key)
            return
        if key in self._queued:
            return
        self._queued.add(key)
        self._ready.append(key)
        self._wakeup.set()

    def add_at(self, key: K, when: float) -> None:
        """Process `key` at loop time `when` (or now, if that is past)."""
        if self._closed:
            return
        current = self._due_at.get(key)
        if current is not None and current <= when:
            return
        self._due_at[key] = when
        heapq.heappush(self._heap, (when, next(self._seq), key))
        self._wakeup.set()

    def add_after(self, key: K, delay: float) -> None:
        self.add_at(key, self._clock() + max(0.0, delay))

    def forget(self, key: K) -> None:
        """Drop pending deadlines of a key (e.g. the object was deleted)."""
        self._due_at.pop(key, None)
        self._dirty.discard(key)

    def _promote_due(self) -> float | None:
        """Move due deadlines to the ready queue; return seconds until the next one."""
        now = self._clock()
        while self._heap:
            when, _, key = self._heap[0]
            if self._due_at.get(key) != when:
                heapq.heappop(self._heap)  # stale: superseded by an earlier deadline or forgotten
                continue
            if when > now:
                return when - now
            heapq.heappop(self._heap)
            del self._due_at[key]
            self.add(key)
        return None

    async def get(self) -> K:
        """Wait for the next key to process. Call `done(key)` when finished."""
        while True:
            if self._closed:
                raise QueueClosed
            delay = self._promote_due()
            if self._ready:
                key = self._ready.popleft()
                self._queued.discard(key)
                self._processing.add(key)
                return key
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=delay)
            except TimeoutError:
                pass

    def done(self, key: K) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def close(self) -> None:
        self._closed = True
        self._wakeup.set()


class QueueClosed(Exception):
    """The queue was closed while waiting."""
