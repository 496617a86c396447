"""The agent's one ZeroMQ context, made at start-up, before the first request is served.

Apart from the interpreter, which loads later (lazy.Deferred): the context's threads must exist
before user code can fill the sandbox's process table (see `shared_zmq_context`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import zmq.asyncio


def shared_zmq_context() -> zmq.asyncio.Context:
    """The one zmq context of every kernel manager and client.

    libzmq starts a context's I/O and reaper threads with its first socket and abort()s the whole
    process when it cannot (`Resource temporarily unavailable (src/thread.cpp:241)`). A context per
    manager and per client (plus the client's heartbeat thread) made every kernel start five threads
    in the agent, so near the sandbox's process limit a kernel start killed the agent. One context,
    its threads started now, makes starting a kernel cost the agent no thread at all. The agent makes
    it before it serves a request, so before any user process runs: made later (when the interpreter
    loads), a command that filled the process table first made it abort the agent.
    """
    import zmq
    import zmq.asyncio

    context = zmq.asyncio.Context()
    context.socket(zmq.PAIR).close(linger=0)
    return context
