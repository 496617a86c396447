"""The work queue: dedup, one worker per key, re-processing of keys added while busy, deadlines."""

from __future__ import annotations

import asyncio

import pytest

from sandbox_operator.controller.workqueue import QueueClosed, WorkQueue


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_duplicate_adds_are_processed_once() -> None:
    queue: WorkQueue[str] = WorkQueue()
    for _ in range(3):
        queue.add("a")
    queue.add("b")
    assert len(queue) == 2
    assert await queue.get() == "a"
    assert await queue.get() == "b"


async def test_key_added_while_processing_is_requeued_after_done() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add("a")
    key = await queue.get()
    queue.add("a")  # an event arrived while a worker holds the key
    assert len(queue) == 0, "a key in flight must not be handed to a second worker"
    queue.done(key)
    assert len(queue) == 1
    assert await queue.get() == "a"


async def test_deadline_promotes_only_when_due() -> None:
    clock = FakeClock()
    queue: WorkQueue[str] = WorkQueue(clock=clock)
    queue.add_at("late", 110.0)
    queue.add_at("early", 105.0)
    assert queue._promote_due() == pytest.approx(5.0)
    assert len(queue) == 0
    clock.now = 106.0
    queue._promote_due()
    assert list(queue._ready) == ["early"]
    assert queue.pending_deadlines == 1


async def test_only_the_earliest_deadline_per_key_is_kept() -> None:
    clock = FakeClock()
    queue: WorkQueue[str] = WorkQueue(clock=clock)
    queue.add_at("a", 120.0)
    queue.add_at("a", 110.0)
    queue.add_at("a", 130.0)  # later than the pending one: ignored
    assert queue.pending_deadlines == 1
    clock.now = 111.0
    queue._promote_due()
    assert list(queue._ready) == ["a"]
    clock.now = 200.0
    queue._ready.clear()
    queue._queued.clear()
    queue._promote_due()
    assert len(queue) == 0, "superseded heap entries must not fire again"


async def test_forget_drops_pending_deadline() -> None:
    clock = FakeClock()
    queue: WorkQueue[str] = WorkQueue(clock=clock)
    queue.add_at("gone", 101.0)
    queue.forget("gone")
    clock.now = 150.0
    assert queue._promote_due() is None
    assert len(queue) == 0


async def test_get_wakes_up_for_a_deadline_with_real_loop_time() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add_after("soon", 0.01)
    assert await asyncio.wait_for(queue.get(), timeout=5) == "soon"


async def test_close_releases_waiting_workers() -> None:
    queue: WorkQueue[str] = WorkQueue()
    waiter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    queue.close()
    with pytest.raises(QueueClosed):
        await asyncio.wait_for(waiter, timeout=5)
