"""The event loop choice: uvloop when installed, asyncio's own when opted out."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from sandbox_operator import eventloop


def test_uvloop_is_used_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(eventloop.EVENT_LOOP_ENV, raising=False)
    assert eventloop.loop_factory() is uvloop.new_event_loop

    async def loop_type() -> type:
        return type(asyncio.get_running_loop())

    assert issubclass(eventloop.run(loop_type()), uvloop.Loop)


def test_asyncio_when_opted_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(eventloop.EVENT_LOOP_ENV, "asyncio")
    assert eventloop.loop_factory() is None

    async def loop_type() -> type:
        return type(asyncio.get_running_loop())

    assert not issubclass(eventloop.run(loop_type()), uvloop.Loop)
