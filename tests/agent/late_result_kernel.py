"""A Jupyter kernel that publishes its results the way Deno's kernel sometimes does: after the
request's idle status and after its execute_reply (here always, and 0.3 s later, so a result still in
flight when the reply arrives is the rule, not a race). It handles one shell request at a time, as
Deno's does. Run by the agent from a kernelspec named `deno` (test_agent_late_results.py).

    python late_result_kernel.py <connection file>
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

import zmq
from jupyter_client.session import Session

LATE_BY_S = 0.3


def main(connection_file: str) -> None:
    with open(connection_file) as file:
        info = json.load(file)
    session = Session(key=info["key"].encode(), signature_scheme=info["signature_scheme"])
    context = zmq.Context()

    def bind(kind: int, port_key: str) -> zmq.Socket[Any]:
        socket = context.socket(kind)
        socket.bind(f"{info['transport']}://{info['ip']}:{info[port_key]}")
        return socket

    shell, control = bind(zmq.ROUTER, "shell_port"), bind(zmq.ROUTER, "control_port")
    iopub, stdin, heartbeat = bind(zmq.PUB, "iopub_port"), bind(zmq.ROUTER, "stdin_port"), bind(zmq.REP, "hb_port")
    threading.Thread(target=lambda: zmq.device(zmq.QUEUE, heartbeat, heartbeat), daemon=True).start()
    del stdin
    count = 0

    def status(state: str, parent: dict[str, Any]) -> None:
        session.send(iopub, "status", {"execution_state": state}, parent=parent)

    poller = zmq.Poller()
    poller.register(shell, zmq.POLLIN)
    poller.register(control, zmq.POLLIN)
    while True:
        for socket, _ in poller.poll():
            idents, frames = session.feed_identities(socket.recv_multipart())
            request = session.deserialize(frames)
            kind = request["header"]["msg_type"]
            status("busy", request)
            if kind == "kernel_info_request":
                content = {
                    "status": "ok",
                    "protocol_version": "5.3",
                    "implementation": "late-results",
                    "language_info": {"name": "typescript"},
                }
                session.send(socket, "kernel_info_reply", content, parent=request, ident=idents)
                status("idle", request)
            elif kind == "execute_request":
                count += 1
                status("idle", request)
                reply = {"status": "ok", "execution_count": count, "user_expressions": {}}
                session.send(socket, "execute_reply", reply, parent=request, ident=idents)
                time.sleep(LATE_BY_S)  # the result follows the reply, as Deno's now and then does
                result = {"execution_count": count, "data": {"text/plain": f"late {count}"}, "metadata": {}}
                session.send(iopub, "execute_result", result, parent=request)
            elif kind == "shutdown_request":
                session.send(socket, "shutdown_reply", {"status": "ok", "restart": False}, parent=request, ident=idents)
                status("idle", request)
                return
            else:
                status("idle", request)


if __name__ == "__main__":
    main(sys.argv[1])
