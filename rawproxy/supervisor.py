"""``--workers N``: N proxy processes, one event loop each, one supervisor.

Each worker is a single-process proxy on ``SO_REUSEPORT`` listeners
(forked by ``workerproc``).  The supervisor serves no traffic and never blocks its loop:

* starts worker 0, then the others once it listens: a port that cannot be
  bound is reported once (exit 1);
* relays SIGHUP and SIGTERM/SIGINT (a second one: exit at once) to every
  worker as ``reload`` and ``stop`` events (``control``), and exits 0 once
  all have exited.  As in HAProxy's master-worker mode, workers share its
  process group but ignore those signals: Ctrl-C and systemd's
  KillMode=control-group signal the whole group, and a worker that took
  one itself and one relayed would count two and reset, not drain;
* restarts a worker that dies, or could not be forked, after a pause that
  doubles while restarts keep failing fast (1 s .. 30 s), with the last
  config a worker accepted;
* serves ``--admin`` (``metricsmerge``), asking all workers under one
  deadline, and passes each worker's passive-health changes on;
* upgrades as a whole on SIGUSR2 (``upgrade``): it asks every worker for its
  listening sockets (over the control channel), starts the program again with
  them and the admin socket, and once the new supervisor says its workers are
  all ready, stops its own (they drain) and exits 0; ``lifecycle`` tells systemd.

It stays root under ``--user``, as nginx's and HAProxy's masters do: a
worker it restarts must bind as root, since Linux lets a socket join an
``SO_REUSEPORT`` group only under the uid of the sockets already in it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import socket
import sys
import time
from typing import Callable, Optional

from .admin import AdminServer
from .adminsock import AdminAddress, open_listener, remove_socket_file, socket_identity
from .control import Answers, WorkerLink, ask_all, collect_listeners
from .lifecycle import Lifecycle
from .loop import EventLoop
from .metricsmerge import SupervisorViews
from .workerproc import WorkerSlot, fork_worker

log = logging.getLogger("rawproxy.supervisor")

CONTROL_TIMEOUT_S = 2.0
READY_TIMEOUT_S = 15.0
RESTART_MIN_S = 1.0
RESTART_MAX_S = 30.0

# What a worker runs, given by the CLI (never imported here): (index, its end
# of the control socketpair, the last config a worker accepted) -> status.
WorkerMain = Callable[[int, socket.socket, Optional[str]], int]
# Starts a worker and returns its pid, or raises OSError: by default a fork
# that runs WorkerMain; a seam for tests.
StartProcess = Callable[[int, socket.socket], int]


class Supervisor:
    def __init__(self, count: int, worker_main: WorkerMain,
                 admin_address: Optional[AdminAddress] = None,
                 admin_token: Optional[str] = None,
                 start_process: Optional[StartProcess] = None,
                 life: Optional[Lifecycle] = None,
                 on_worker_exit: Callable[[int], None] = lambda index: None) -> None:
        """``on_worker_exit(index)``: a worker was reaped (the shared
        connection counters forget what it held)."""
        # Inherited sockets, systemd, the upgrade (a bare one: none of them).
        self._life = life or Lifecycle.bare()
        self._on_worker_exit = on_worker_exit
        self._worker_main = worker_main
        self._start_process = start_process or self._fork
        self._workers = [WorkerSlot(index, RESTART_MIN_S) for index in range(count)]
        self._admin_address = admin_address
        self._admin_token = admin_token
        self._admin_sock: Optional[socket.socket] = None
        self._loop = EventLoop()
        self._admin: Optional[AdminServer] = None
        self._launching = 0  # the worker start-up waits for; -1 once all were ready
        self._stopping = False
        self._exit_code = 0
        self._accepted_config: Optional[str] = None

    def run(self) -> int:
        """Start the workers and supervise them; the process exit status."""
        loop = self._loop
        try:
            if self._admin_address is not None:
                try:  # before any worker exists: a busy admin port is one clean error
                    self._admin_sock = self._life.sockets.take_admin(
                        self._admin_address.host, self._admin_address.port,
                        self._admin_address.path) or open_listener(self._admin_address)
                except OSError as exc:
                    print(f"rawproxy: error: cannot listen on {self._admin_address} (admin "
                          f"endpoint): {exc.strerror or exc}", file=sys.stderr, flush=True)
                    return 1
            self._install_signal_handlers()  # before the first fork: a signal is an event
            self._start(self._workers[0])
            if not self._stopping:  # else worker 0 could not even be forked
                loop.run()
            for worker in self._workers:  # left only after a failed start: killed
                if worker.pid:
                    os.waitpid(worker.pid, 0)
            if self._admin is not None:
                self._admin.answer_in_flight()
            log.info("all workers exited")
            return self._exit_code
        finally:
            if self._admin is not None:
                self._admin.close()
            elif self._admin_sock is not None:  # never served: its socket file goes too
                socket_file = socket_identity(self._admin_sock)
                self._admin_sock.close()
                remove_socket_file(socket_file)
            self._life.close()
            loop.close()

    def _install_signal_handlers(self) -> None:
        on_stop, on_reload = self._life.notifying(self.stop, lambda: self._order_all("reload"))
        self._loop.add_signal_handler(signal.SIGTERM, on_stop)
        self._loop.add_signal_handler(signal.SIGINT, on_stop)
        self._loop.add_signal_handler(signal.SIGHUP, on_reload)
        self._loop.add_signal_handler(signal.SIGCHLD, self._reap)
        self._life.enable_upgrade(self._loop, self._collect_sockets, self._handed_over,
                                  self._upgrade_refusal)

    def _start(self, worker: WorkerSlot) -> None:
        ours, theirs = socket.socketpair()
        self._attach(worker, ours)
        worker.started_at = time.monotonic()
        try:
            worker.pid = self._start_process(worker.index, theirs)
        except OSError as exc:
            self._detach(worker)
            self._on_failure(worker, f"could not be started ({exc.strerror or exc})")
            return
        finally:
            theirs.close()
        log.info("worker %d started (pid %d)", worker.index, worker.pid)
        worker.timer = self._loop.call_later(READY_TIMEOUT_S, lambda: self._not_ready(worker))

    def _attach(self, worker: WorkerSlot, sock: socket.socket) -> None:
        worker.link = WorkerLink(self._loop, sock, functools.partial(self._on_event, worker),
                                 functools.partial(self._on_channel_closed, worker))

    def _fork(self, index: int, control: socket.socket) -> int:
        return fork_worker(index, functools.partial(self._forget_parent, index),
                           lambda: self._worker_main(index, control, self._accepted_config))

    def _forget_parent(self, index: int) -> None:
        """In a new worker: drop the supervisor's sockets and loop."""
        if self._admin is not None:
            self._admin.close_after_fork()
        elif self._admin_sock is not None:
            self._admin_sock.close()
        self._loop.close_after_fork()
        self._life.after_fork(index)  # this worker's part of the inherited sockets
        for other in self._workers:
            if other.link is not None:
                other.link.channel.sock.close()  # the loop is the parent's: no unwatch

    def _not_ready(self, worker: WorkerSlot) -> None:
        worker.timer = None
        log.error("worker %d not ready after %.0fs: killing it", worker.index, READY_TIMEOUT_S)
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGKILL)  # its exit is handled as any other

    def _on_ready(self, worker: WorkerSlot) -> None:
        worker.cancel_timer()
        worker.ready = True
        if worker.index != self._launching:  # a restarted one
            log.info("worker %d ready", worker.index)
        elif worker.index + 1 < len(self._workers):
            if not self._stopping:
                self._launching += 1
                self._start(self._workers[self._launching])
        else:
            self._launching = -1
            if self._admin_sock is not None and self._admin_address is not None:
                self._admin = AdminServer(self._loop, self._views(), self._admin_address,
                                          sock=self._admin_sock, token=self._admin_token)
                self._admin.start()
            log.info("supervising %d workers", len(self._workers))
            self._life.serving(workers=len(self._workers))

    def stop(self) -> None:
        """Drain every worker (SIGTERM/SIGINT); called again, they exit at once."""
        if self._stopping:
            log.info("second stop signal: workers exit now")
        self._stopping = True
        for worker in self._workers:
            if not worker.pid:
                worker.cancel_timer()  # a pending restart
        self._order_all("stop")
        self._reap()  # none left: the loop stops

    def _order_all(self, order: str) -> None:
        for worker in self._workers:
            if worker.pid and worker.link is not None:
                worker.link.send_event(order)

    def _reap(self) -> None:
        for worker in self._workers:
            if worker.pid:
                try:
                    pid, status = os.waitpid(worker.pid, os.WNOHANG)
                except ChildProcessError:
                    pid, status = worker.pid, 0
                if pid:
                    self._on_exit(worker, os.waitstatus_to_exitcode(status))
        if self._stopping and not any(worker.pid for worker in self._workers):
            self._loop.stop()

    def _on_exit(self, worker: WorkerSlot, code: int) -> None:
        worker.pid = 0
        self._detach(worker)
        worker.cancel_timer()
        self._on_worker_exit(worker.index)  # before any restart of that index
        if not self._stopping:
            self._on_failure(worker, f"exited unexpectedly (status {code})",
                             code if code > 0 else 1)

    def _on_failure(self, worker: WorkerSlot, what: str, code: int = 1) -> None:
        if worker.index == self._launching:  # a port that cannot be bound, say
            log.error("worker %d %s", worker.index, what)
            self._exit_code = code
            self._stopping = True
            for other in self._workers:
                if other.pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(other.pid, signal.SIGKILL)
            self._loop.stop()
            return
        if time.monotonic() - worker.started_at > RESTART_MAX_S:
            worker.restart_delay_s = RESTART_MIN_S  # it ran a good while: no penalty
        delay = worker.restart_delay_s
        worker.restart_delay_s = min(RESTART_MAX_S, delay * 2)
        log.error("worker %d %s; restarting in %.2gs", worker.index, what, delay)
        # stop() cancels it: no check needed when it fires.
        worker.timer = self._loop.call_later(delay, functools.partial(self._start, worker))

    # -- upgrading (SIGUSR2) ----------------------------------------------------------

    def _upgrade_refusal(self) -> Optional[str]:
        if self._stopping:
            return "the workers are stopping"
        if self._launching != -1:
            return "the workers are still starting"
        return None

    def _collect_sockets(self, deliver: Callable[[list[int], Optional[str]], None]) -> None:
        """Every ready worker's listening sockets, then the admin socket."""
        admin = [self._admin_sock.fileno()] if self._admin_sock is not None else []
        collect_listeners(self._loop, [worker.link if worker.ready else None
                                       for worker in self._workers],
                          admin, CONTROL_TIMEOUT_S, deliver)

    def _handed_over(self) -> None:
        """The new supervisor's workers all serve: ours drain, then we exit 0."""
        if self._admin is not None:
            self._admin.hand_over()  # run() closes it once its requests are answered
        elif self._admin_sock is not None:
            self._admin_sock.close()
        self._admin_sock = None
        self.stop()

    def _detach(self, worker: WorkerSlot) -> None:
        worker.ready = False
        if worker.link is not None:
            worker.link.close()  # whoever waits for an answer gets None
            worker.link = None

    def _on_channel_closed(self, worker: WorkerSlot) -> None:
        worker.ready = False  # it is exiting; or, orphaned by a bad frame, it drains

    def _on_event(self, worker: WorkerSlot, body: str) -> None:
        kind, _, payload = body.partition(" ")
        if kind == "ready":
            self._on_ready(worker)
        elif kind == "accepted":
            self._accepted_config = payload
        elif kind == "health":
            for other in self._workers:
                if other is not worker and other.link is not None:
                    other.link.send_event(body)  # a stuck one learns for itself

    def _views(self) -> SupervisorViews:
        return SupervisorViews(lambda: self._stopping,
                               lambda: sum(worker.ready for worker in self._workers), self.ask_all)

    def ask_all(self, request: str, deliver: Callable[[Answers], None]) -> None:
        """Ask every ready worker at once; ``deliver`` gets the answers, by
        worker, once all have come or CONTROL_TIMEOUT_S has passed."""
        links = [worker.link if worker.ready else None for worker in self._workers]
        ask_all(self._loop, links, request, CONTROL_TIMEOUT_S, deliver)
