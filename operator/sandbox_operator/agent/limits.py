"""Per-execution output cap, the concurrency limit, and the activity/execution statistics."""

from __future__ import annotations

import bisect
import errno
import time
from dataclasses import dataclass, field
from typing import Final

# Upper bounds (seconds) of the execution-duration histogram buckets.
DURATION_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def truncation_marker(limit: int) -> bytes:
    return f"\n[output truncated: the limit of {limit} bytes per execution was reached]\n".encode()


class OutputLimiter:
    """Counts the bytes an execution emitted; past the limit it yields one marker, then nothing.

    Shared by all the streams of one execution (stdout and stderr count together).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.emitted = 0
        self.truncated = False

    def take(self, chunk: bytes) -> tuple[bytes, bytes]:
        """Return (the part of chunk to emit, the marker to emit after it or b"")."""
        if self.limit <= 0:
            self.emitted += len(chunk)
            return chunk, b""
        if self.truncated:
            return b"", b""
        room = self.limit - self.emitted
        if len(chunk) <= room:
            self.emitted += len(chunk)
            return chunk, b""
        self.truncated = True
        self.emitted = self.limit
        return chunk[: max(room, 0)], truncation_marker(self.limit)

    def take_text(self, text: str) -> tuple[str, str]:
        kept, marker = self.take(text.encode())
        return kept.decode(errors="ignore"), marker.decode()

    def take_whole(self, size: int) -> tuple[bool, bytes]:
        """For output that is useless when cut (an image, an HTML bundle): keep all `size` bytes of
        it or none. Returns (keep it, the marker to emit instead or b"")."""
        if self.limit <= 0:
            self.emitted += size
            return True, b""
        if self.truncated:
            return False, b""
        if size <= self.limit - self.emitted:
            self.emitted += size
            return True, b""
        self.truncated = True
        self.emitted = self.limit
        return False, truncation_marker(self.limit)


# Spawn failures that mean the sandbox ran out of something (its pids limit is RLIMIT_NPROC or a pids
# cgroup: fork and thread creation fail with EAGAIN), not that the request was wrong.
EXHAUSTED_RESOURCES: Final = {
    errno.EAGAIN: "the sandbox's process limit is reached (EAGAIN)",
    errno.ENOMEM: "the sandbox is out of memory (ENOMEM)",
    errno.EMFILE: "the agent's open-file limit is reached (EMFILE)",
    errno.ENFILE: "the system's open-file limit is reached (ENFILE)",
}


def exhaustion_message(error: BaseException, action: str) -> str | None:
    """`cannot <action>: <why>` when error says a limit is reached, else None (a real error)."""
    if isinstance(error, OSError) and error.errno in EXHAUSTED_RESOURCES:
        return f"cannot {action}: {EXHAUSTED_RESOURCES[error.errno]}"
    # threading reports a failed pthread_create (EAGAIN under the pids limit) only by this message.
    if isinstance(error, RuntimeError) and "can't start new thread" in str(error):
        return f"cannot start a thread: {EXHAUSTED_RESOURCES[errno.EAGAIN]}"
    return None


class ConcurrencyLimitError(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(
            f"too many concurrent executions: the sandbox allows {limit} at once "
            "(SANDBOX_MAX_CONCURRENT_EXECUTIONS); wait for one to finish and retry"
        )
        self.limit = limit


@dataclass
class ExecutionStats:
    """What the operator's idle timeout and metrics read from /metrics."""

    started_at: float = field(default_factory=time.time)
    last_activity: float = field(default_factory=time.time)
    limit: int = 0
    running: int = 0
    executions_total: dict[str, int] = field(default_factory=dict)
    timeouts_total: dict[str, int] = field(default_factory=dict)
    rejected_total: int = 0
    duration_sum: dict[str, float] = field(default_factory=dict)
    duration_buckets: dict[str, list[int]] = field(default_factory=dict)

    def touch(self) -> None:
        self.last_activity = time.time()

    def activity_at(self, now: float) -> float:
        """Last activity as the idle timeout should see it: a command, PTY or code execution that is
        still running (a long job, a background server) is activity, so it reads as `now`."""
        return now if self.running > 0 else self.last_activity

    def acquire(self) -> None:
        """Take an execution slot or raise ConcurrencyLimitError."""
        if self.limit > 0 and self.running >= self.limit:
            self.rejected_total += 1
            raise ConcurrencyLimitError(self.limit)
        self.running += 1
        self.touch()

    def release(self, kind: str, duration: float, timed_out: bool) -> None:
        self.running = max(0, self.running - 1)
        self.touch()
        self.executions_total[kind] = self.executions_total.get(kind, 0) + 1
        self.duration_sum[kind] = self.duration_sum.get(kind, 0.0) + duration
        buckets = self.duration_buckets.setdefault(kind, [0] * len(DURATION_BUCKETS))
        index = bisect.bisect_left(DURATION_BUCKETS, duration)
        if index < len(buckets):
            buckets[index] += 1
        if timed_out:
            self.timeouts_total[kind] = self.timeouts_total.get(kind, 0) + 1


@dataclass
class ExecutionSlot:
    started: float
    timed_out: bool = False
