"""Forking one ``--workers`` worker: what the child drops of the
supervisor's state, and the signals it must never run.

The child runs ``forget_parent`` (close the supervisor's admin socket, its
loop and the other workers' control channels), ignores the signals the
supervisor relays as events (so a signal to the whole process group is
taken once, from the supervisor), and then ``run``; it never returns into
the supervisor's code: ``os._exit`` with ``run``'s status, after the log
lines queued in the child are flushed.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Callable, Optional

from .control import WorkerLink
from .loop import Timer

log = logging.getLogger("rawproxy.supervisor")

# Relayed as events: a worker ignores them from anyone else (SIGUSR2, the
# upgrade, is the supervisor's alone).
RELAYED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2)


def fork_worker(index: int, forget_parent: Callable[[], None], run: Callable[[], int]) -> int:
    """Fork; in the parent return the child's pid (or raise OSError)."""
    sys.stderr.flush()
    # Blocked across the fork: the child must not run the supervisor's
    # handlers, which would wake its loop through the socket they share.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, RELAYED + (signal.SIGCHLD,))
    try:
        pid = os.fork()
        if pid == 0:
            _become_worker(index, forget_parent, run, mask)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return pid


def _become_worker(index: int, forget_parent: Callable[[], None], run: Callable[[], int],
                   mask: set[int]) -> None:
    code = 1
    try:
        forget_parent()
        for signum in RELAYED:
            signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        code = run()
    except BaseException:
        log.exception("worker %d crashed", index)
    finally:
        # os._exit skips the handlers' close: flush queued log lines.
        for handler in logging.getLogger("rawproxy").handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class WorkerSlot:
    """The supervisor's record of worker ``index``, across its restarts."""

    __slots__ = ("index", "pid", "link", "ready", "started_at", "restart_delay_s", "timer")

    def __init__(self, index: int, restart_delay_s: float) -> None:
        self.index = index
        self.pid = 0  # 0: not running
        self.link: Optional[WorkerLink] = None
        self.ready = False
        self.started_at = 0.0
        self.restart_delay_s = restart_delay_s
        self.timer: Optional[Timer] = None  # the ready deadline, or the restart

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
