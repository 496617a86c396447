"""The code interpreter's error, apart from it: the HTTP layer checks requests with it before the
interpreter (and Jupyter, ZeroMQ) is loaded, which happens only after the agent listens."""

from __future__ import annotations


class InterpreterError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
