"""SIGUSR2: start the program on disk again and hand it every listening socket.

The old process (:class:`Upgrader`), as a grammar::

    IDLE --SIGUSR2--> COLLECTING --sockets--> STARTING --"ready"--> HANDED_OVER
                          |                      +--exit, EOF or 10 s--> FAILING --reaped--> IDLE
                          +--a worker kept its sockets, or no start--> IDLE

A SIGUSR2 in any state but IDLE is refused with a log line.  STARTING
forks and execs the same interpreter with the same arguments
(:func:`this_program`: a changed checkout or ``.pyz`` is the new version),
the listening sockets and the write end of a pipe inherited, and
``RAWPROXY_UPGRADE=<old pid>:<pipe fd>:<fd>,<fd>,...`` saying which they
are.  The old process goes on accepting meanwhile: both processes hold the
same sockets (the same open file descriptions, so the same listen queues),
and either may accept a client.  Only when the new one writes ``ready``
does the old one hand over its admin socket and drain (SPEC 6), closing
its copies of the sockets: the queues live on in the new process, so no
client is refused or reset in between.  If the new one exits first, closes
the pipe, or is not ready within READY_TIMEOUT_S, the old one logs why,
kills it if need be and goes on serving.

Inheritance, not ``SCM_RIGHTS`` over a unix socket (HAProxy's way): the new
process is the old one's child, so the descriptors are there with no
socket path, no protocol and no moment at which a socket is in neither
process; and the new process adopts them by the address they are bound to,
as it adopts systemd's (``inherited``).  ``SCM_RIGHTS`` is used only where
inheritance cannot reach: from the workers up to their supervisor
(``channel``).

The new process (``lifecycle``) reads and removes the variable, checks
its config as at any start (an invalid one: exit 2, which the old one sees
as EOF), takes the sockets of its ports, binds new ones, closes the rest,
and writes ``ready <pid>`` once serving.  With ``NOTIFY_SOCKET`` the old
process tells systemd ``RELOADING=1`` when it starts the new one, then
``MAINPID=<new>`` and ``READY=1``, or ``READY=1`` alone after a failure.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import signal
import subprocess
import sys
from typing import Callable, Optional, Sequence

from . import systemd
from .loop import EVENT_READ, EventLoop, Timer

log = logging.getLogger("rawproxy.upgrade")

ENV_VAR = "RAWPROXY_UPGRADE"
READY_TIMEOUT_S = 10.0
EXIT_GRACE_S = 1.0  # after the pipe's EOF: how long the exit status may take to come
_REAP_POLL_S = 0.02
_REAP_LIMIT_S = 5.0  # after SIGKILL; past it the process is left to init

# (the descriptors to hand over, or why there are none); the collector
# keeps ownership: the child has its copies once the call returns.
Deliver = Callable[[Sequence[int], Optional[str]], None]
Collect = Callable[[Deliver], None]


class UpgradeError(Exception):
    """This process cannot be started again (say, it was run with -c)."""


def relaunch_argv(executable: str, orig_argv: Optional[Sequence[str]], argv: Sequence[str],
                  main_module: Optional[str]) -> list[str]:
    """The command line that starts this program again.

    ``orig_argv`` (``sys.orig_argv``, Python 3.10+) is what was run,
    interpreter options included; before 3.10, ``python -m pkg`` is told
    by ``main_module`` (``__main__.__spec__.name``) and a script, checkout
    launcher or ``.pyz`` by ``argv[0]``.
    """
    if not executable:
        raise UpgradeError("the interpreter's path is unknown (sys.executable is empty)")
    if orig_argv:
        return [executable, *orig_argv[1:]]
    if main_module:
        suffix = ".__main__"
        module = main_module[:-len(suffix)] if main_module.endswith(suffix) else main_module
        return [executable, "-m", module, *argv[1:]]
    if not argv or argv[0] in ("", "-c"):
        raise UpgradeError("started with -c or from a prompt: no program on disk to start again")
    return [executable, *argv]


def this_program() -> list[str]:
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    # A zipapp or a directory runs as module "__main__": its argv[0] is the path.
    return relaunch_argv(sys.executable, getattr(sys, "orig_argv", None), sys.argv,
                         None if name in (None, "__main__") else str(name))


def encode_handover(old_pid: int, ready_fd: int, fds: Sequence[int]) -> str:
    return f"{old_pid}:{ready_fd}:{','.join(str(fd) for fd in fds)}"


def decode_handover(value: str) -> Optional[tuple[int, int, list[int]]]:
    """(old pid, ready pipe, listening descriptors), or None if malformed."""
    parts = value.split(":")
    if len(parts) != 3:
        return None
    try:
        fds = [int(fd) for fd in parts[2].split(",")] if parts[2] else []
        return int(parts[0]), int(parts[1]), fds
    except ValueError:
        return None


def _status_text(code: Optional[int]) -> str:
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit status {code}"


class State(enum.Enum):
    IDLE = "idle"
    COLLECTING = "collecting"
    STARTING = "starting"
    FAILING = "failing"
    HANDED_OVER = "handed over"


class Upgrader:
    """The old process's side: see the module doc.  ``collect`` gathers the
    descriptors to hand over; ``refusal`` says why not now (draining, say);
    ``on_ready(pid)`` runs once the new process serves."""

    def __init__(self, loop: EventLoop, collect: Collect, on_ready: Callable[[int], None], *,
                 argv: Callable[[], list[str]] = this_program,
                 refusal: Callable[[], Optional[str]] = lambda: None,
                 notifier: Optional[systemd.Notifier] = None,
                 ready_timeout_s: float = READY_TIMEOUT_S) -> None:
        self._loop = loop
        self._collect = collect
        self._on_ready = on_ready
        self._argv = argv
        self._refusal = refusal
        self._notifier = notifier or systemd.Notifier(None)
        self._ready_timeout_s = ready_timeout_s
        self.state = State.IDLE
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self._pipe_fd = -1
        self._said = bytearray()
        self._timer: Optional[Timer] = None

    def request(self) -> None:
        """SIGUSR2."""
        why = self._busy() or self._refusal()
        if why is not None:
            log.warning("upgrade: SIGUSR2 ignored: %s", why)
            return
        self.state = State.COLLECTING
        self._collect(self._launch)

    def _busy(self) -> Optional[str]:
        if self.state is State.IDLE:
            return None
        if self.state is State.HANDED_OVER:
            return "this process has handed over already and is draining"
        pid = f" (new process {self.proc.pid})" if self.proc is not None else ""
        return f"an upgrade is already under way{pid}"

    def _launch(self, fds: Sequence[int], problem: Optional[str]) -> None:
        try:
            if problem is not None:
                raise UpgradeError(problem)
            argv = self._argv()
            self.proc = self._spawn(argv, fds)
        except (UpgradeError, OSError, ValueError, subprocess.SubprocessError) as exc:
            self.state = State.IDLE
            log.error("upgrade failed: %s; this process (pid %d) goes on serving",
                      exc, os.getpid())
            return
        self.state = State.STARTING
        self._notifier.reloading()
        self._loop.watch(self._pipe_fd, self._on_pipe)
        self._loop.set_interest(self._pipe_fd, EVENT_READ)
        self._timer = self._loop.call_later(self._ready_timeout_s, self._not_ready)
        log.info("upgrade: started %s as pid %d, handing over %d sockets; waiting up to "
                 "%gs for it to be ready", " ".join(argv), self.proc.pid, len(fds),
                 self._ready_timeout_s)

    def _spawn(self, argv: list[str], fds: Sequence[int]) -> subprocess.Popen[bytes]:
        read_fd, write_fd = os.pipe()
        env = dict(os.environ)
        env[ENV_VAR] = encode_handover(os.getpid(), write_fd, fds)
        try:
            # Same stdin/stdout/stderr; every other descriptor closed but these.
            proc = subprocess.Popen(argv, pass_fds=(*fds, write_fd), env=env)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)  # the child's copy is the only one: its exit is our EOF
        os.set_blocking(read_fd, False)
        self._pipe_fd = read_fd
        self._said.clear()
        return proc

    def _on_pipe(self, events: int) -> None:
        try:
            data = os.read(self._pipe_fd, 256)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._stop_waiting()
            self._fail("exited, or closed its ready pipe, before it was ready",
                       grace_s=EXIT_GRACE_S)
            return
        self._said += data
        if b"\n" in self._said:
            line = bytes(self._said).split(b"\n", 1)[0].decode(errors="replace")
            if line.split(" ")[0] == "ready":
                self._ready()
            else:
                self._stop_waiting()
                self._fail(f"said {line!r} instead of ready", grace_s=0.0)

    def _ready(self) -> None:
        assert self.proc is not None
        self._stop_waiting()
        self.state = State.HANDED_OVER
        pid = self.proc.pid
        log.info("upgrade: new process %d ready; this one (pid %d) hands over and drains",
                 pid, os.getpid())
        self._notifier.main_pid(pid)
        self._on_ready(pid)

    def _not_ready(self) -> None:
        self._timer = None
        self._stop_waiting()
        self._fail(f"was not ready within {self._ready_timeout_s:g}s", grace_s=0.0)

    def _stop_waiting(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pipe_fd >= 0:
            self._loop.unwatch(self._pipe_fd)
            os.close(self._pipe_fd)
            self._pipe_fd = -1

    def _fail(self, what: str, grace_s: float) -> None:
        """Reap the new process (killing it after ``grace_s``), then log and
        serve on; the loop never blocks on it."""
        assert self.proc is not None
        proc = self.proc
        self.state = State.FAILING
        kill_at = self._loop.time() + grace_s
        give_up_at = kill_at + _REAP_LIMIT_S
        killed = False

        def poll() -> None:
            nonlocal killed
            now = self._loop.time()
            if proc.poll() is None and now < give_up_at:
                if now >= kill_at and not killed:
                    killed = True
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                self._loop.call_later(_REAP_POLL_S, poll)
                return
            self.state = State.IDLE
            self.proc = None
            log.error("upgrade failed: new process %d %s (%s%s); this process (pid %d) "
                      "goes on serving", proc.pid, what, "killed it: " if killed else "",
                      _status_text(proc.returncode), os.getpid())
            self._notifier.ready()

        poll()

    def close(self) -> None:
        self._stop_waiting()

    def close_after_fork(self) -> None:
        """In a forked child: close the pipe, leave the parent's loop alone."""
        if self._pipe_fd >= 0:
            os.close(self._pipe_fd)
            self._pipe_fd = -1


class ReadyPipe:
    """The new process's side: ``ready <pid>`` to the old process, once."""

    def __init__(self, fd: int, old_pid: int) -> None:
        self.fd = fd
        self.old_pid = old_pid
        with contextlib.suppress(OSError):
            os.set_inheritable(fd, False)

    def announce(self) -> None:
        log.info("upgrade: serving; telling the old process (pid %d)", self.old_pid)
        try:
            os.write(self.fd, f"ready {os.getpid()}\n".encode())
        except OSError as exc:  # it died meanwhile: nothing to hand over from
            log.warning("upgrade: the old process did not hear it: %s", exc.strerror or exc)
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
