"""What the agent does first: hide its memory from user code and, at PID 1, act as its own init.

User code runs as the agent's uid, so without PR_SET_DUMPABLE=0 it could read the access token from
/proc/<agent>/environ or /proc/<agent>/mem (or ptrace the agent). A template whose `command` starts
`sandbox-agent` directly (no tini) makes the agent PID 1 of the container's pid namespace: orphans of
user commands are re-parented to it, and unreaped zombies would use up the pids limit until every spawn
fails with EAGAIN. So at PID 1 the process forks: the child is the agent, the parent stays a minimal
init that reaps everything, forwards termination signals from outside the container to the agent, undoes
a SIGSTOP of the agent, and ends the container when the agent ends.

Standard library only and nothing heavy imported: the init parent should stay small.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from typing import Final

PR_SET_DUMPABLE: Final = 4
# Signals the runtime (kubelet, crun, docker) sends to stop or poke a container; forwarded to the agent.
FORWARDED_SIGNALS: Final = frozenset(
    {
        signal.SIGTERM,
        signal.SIGINT,
        signal.SIGHUP,
        signal.SIGQUIT,
        signal.SIGUSR1,
        signal.SIGUSR2,
    }
)
WAITED_SIGNALS: Final = FORWARDED_SIGNALS | {signal.SIGCHLD}
# A SIGCHLD is never lost (it stays pending while blocked), so this only bounds how stale reaping can be.
REAP_INTERVAL_SECONDS: Final = 1.0
# Signals from inside the sandbox that are logged when ignored; then silence (user code could flood the log).
IGNORED_SIGNALS_LOGGED: Final = 10
# After the agent exits: how long to wait for the killed leftovers to be reaped before exiting anyway
# (the kernel kills whatever remains of the namespace when its init exits).
DRAIN_SECONDS: Final = 2.0


def make_undumpable() -> bool:
    """prctl(PR_SET_DUMPABLE, 0): /proc/<pid>/environ, /proc/<pid>/mem and ptrace then need root (or
    CAP_SYS_PTRACE), so processes of the same uid cannot read this one's memory. Children inherit it
    until they exec (an exec'd program is dumpable again). False when prctl is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        result = libc.prctl(
            ctypes.c_int(PR_SET_DUMPABLE), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)
        )
    except (OSError, AttributeError):
        return False
    if result != 0:
        _say(f"prctl(PR_SET_DUMPABLE, 0) failed: {os.strerror(ctypes.get_errno())}")
        return False
    return True


def exit_code(status: int) -> int:
    """A waitpid status as the exit code a shell (and the kubelet) reports: the code, or 128 + signal."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return 1


def should_forward(signum: int, sender_pid: int) -> bool:
    """Forward a stop/poke signal to the agent only when it came from outside the container's pid
    namespace (si_pid reads 0 there, as for the kernel's own signals): user code inside the sandbox
    must not be able to shut the sandbox down through PID 1."""
    return signum in FORWARDED_SIGNALS and sender_pid == 0


def become_init_if_pid1() -> None:
    """At PID 1: fork, return in the child (which goes on as the agent), and never return in the
    parent, which supervises the child and exits with its status. Elsewhere: return at once."""
    if os.getpid() != 1:
        return
    # Blocked before the fork so that no signal is lost or handled by a default action in between;
    # the parent collects them with sigtimedwait, the child restores the old mask.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, WAITED_SIGNALS)
    agent = os.fork()
    if agent == 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return
    code = 1
    try:
        code = supervise(agent)
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os._exit(code)


def supervise(agent: int) -> int:
    """The init loop: reap every child, forward outside signals to the agent, resume it when stopped.
    Returns the exit code once the agent has exited and what it left behind is killed."""
    ignored = 0
    while True:
        info = signal.sigtimedwait(WAITED_SIGNALS, REAP_INTERVAL_SECONDS)
        if info is not None and info.si_signo != signal.SIGCHLD:
            if should_forward(info.si_signo, info.si_pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(agent, info.si_signo)
            else:
                ignored += 1
                if ignored <= IGNORED_SIGNALS_LOGGED:
                    name = signal.Signals(info.si_signo).name
                    more = "; further ones are not logged" if ignored == IGNORED_SIGNALS_LOGGED else ""
                    _say(f"ignored {name} from pid {info.si_pid} in the sandbox{more}")
        status = reap(agent)
        if status is not None:
            break
    # Nothing in the sandbox outlives the agent: kill(-1) from PID 1 reaches every other process of the
    # namespace (never called elsewhere: from a host process, as root, it would kill the machine's).
    if os.getpid() == 1:
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)
    deadline = time.monotonic() + DRAIN_SECONDS
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.01)
    return exit_code(status)


def reap(agent: int) -> int | None:
    """Collect every child that exited; SIGCONT the agent if something stopped it. Returns the agent's
    wait status once it has exited, else None."""
    agent_status: int | None = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG | os.WUNTRACED)
        except ChildProcessError:
            return agent_status
        if pid == 0:
            return agent_status
        if pid != agent:
            continue
        if os.WIFSTOPPED(status):
            # User code may SIGSTOP the agent (same uid); a stopped agent would hang every request.
            _say(f"the agent was stopped by {signal.Signals(os.WSTOPSIG(status)).name}; resuming it")
            with contextlib.suppress(ProcessLookupError):
                os.kill(agent, signal.SIGCONT)
        else:
            agent_status = status


def _say(message: str) -> None:
    # A closed stderr must not take PID 1 (and with it the sandbox) down.
    with contextlib.suppress(OSError, ValueError):
        print(f"sandbox-agent init: {message}", file=sys.stderr, flush=True)
