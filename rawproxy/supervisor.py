"""``--workers N``: N proxy processes, one event loop each, one supervisor.

Each worker is an ordinary single-process proxy whose listeners set
``SO_REUSEPORT``, so the kernel spreads new connections over the workers and
each core runs its own loop (the GIL makes threads useless for this).  The
supervisor (the process the operator started) serves no traffic:

* it starts worker 0 and waits until it is listening before starting the
  others, so a port that cannot be bound is reported once (exit 1);
* it forwards SIGHUP (reload) and SIGTERM/SIGINT (drain; a second one: exit
  at once) to every worker, and exits 0 once all have exited;
* it restarts a worker that dies unexpectedly, after a pause that doubles
  while restarts keep failing fast (1 s .. 30 s);
* it serves ``--admin`` itself: ``/metrics`` asks every worker for its
  exposition (labelled ``worker="N"``) over a control socketpair and merges
  the families, ``/config`` lists every worker's view;
* it passes each worker's passive-health changes on to the others.

Control protocol, on a socketpair per worker: the supervisor writes one
request line, ``<id> metrics`` or ``<id> config``; the worker answers with a
frame, a 4-byte big-endian length then UTF-8 text whose first line is the
same id.  Ids let the supervisor drop an answer that arrives after it gave
up waiting, instead of taking it for the answer to the next question.  A
worker announces itself with a ``ready`` frame once its listeners are bound.
Id 0 is an event, never answered: a worker sends a frame ``0`` /
``health [app, address, down_until]`` when its passive health marks a target
down (or up again, ``down_until`` 0; edges only, not every failure), and
the supervisor passes it on to
every other worker as the line ``0 health [...]``, so one worker's failed
connect spares the others theirs.  ``down_until`` is on the monotonic
clock, which all processes of a host share.  A worker whose control socket
reaches EOF (the supervisor died) drains and exits, so no worker outlives
its supervisor for long.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
from typing import Callable, Optional

from . import netio
from .admin import AdminHandlers, AdminServer
from .loop import EVENT_READ, EventLoop

log = logging.getLogger("rawproxy.supervisor")

CONTROL_TIMEOUT_S = 2.0
MAX_FRAME_BYTES = 64 << 20  # far above any /metrics or /config answer
READY_TIMEOUT_S = 15.0
RESTART_MIN_S = 1.0
RESTART_MAX_S = 30.0

# What a worker runs: (worker index, its end of the control socketpair) ->
# exit status.  Given by the CLI, so this module never imports it.
WorkerMain = Callable[[int, socket.socket], int]


# Requests carry ids from 1 up; id 0 marks an event, which gets no answer:
# a worker's passive-health change, which the supervisor passes on to the
# other workers as a request line "0 health [app, address, down_until]".
EVENT_ID = "0"


def encode_health(app: str, address: str, down_until: float) -> str:
    return "health " + json.dumps([app, address, down_until])


def decode_health(text: str) -> Optional[tuple[str, str, float]]:
    kind, _, payload = text.partition(" ")
    try:
        app, address, down_until = json.loads(payload)
        if kind == "health" and isinstance(app, str) and isinstance(address, str):
            return app, address, float(down_until)
    except (ValueError, TypeError):
        pass
    return None


def write_frame(sock: socket.socket, text: str) -> None:
    data = text.encode()
    sock.sendall(struct.pack("!I", len(data)) + data)


def read_frame(sock: socket.socket) -> str:
    header = _read_exactly(sock, 4)
    (length,) = struct.unpack("!I", header)
    return _read_exactly(sock, length).decode()


def _read_exactly(sock: socket.socket, nbytes: int) -> bytes:
    chunks = []
    while nbytes:
        chunk = sock.recv(min(nbytes, 1 << 20))
        if not chunk:
            raise ConnectionError("control socket closed")
        chunks.append(chunk)
        nbytes -= len(chunk)
    return b"".join(chunks)


class WorkerControl:
    """The worker's end: answers the supervisor from the worker's own loop."""

    def __init__(self, loop: EventLoop, sock: socket.socket, index: int,
                 metrics_text: Callable[[], str], config_view: Callable[[], object],
                 on_orphaned: Callable[[], None],
                 on_shared_health: Callable[[str, str, float], None] = lambda *a: None) -> None:
        self._loop = loop
        self._sock = sock
        self.index = index
        self._metrics_text = metrics_text
        self._config_view = config_view
        self._on_orphaned = on_orphaned
        self._on_shared_health = on_shared_health
        self._pending = b""
        # A roomy send buffer so an answer is written whole even when the
        # supervisor is slow to read; the timeout bounds the rare worst case.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.settimeout(CONTROL_TIMEOUT_S)
        loop.watch(sock.fileno(), self._on_readable)
        loop.set_interest(sock.fileno(), EVENT_READ)

    def announce_ready(self) -> None:
        write_frame(self._sock, "ready")

    def share_health(self, app: str, address: str, down_until: float) -> None:
        """Tell the supervisor of a passive-health change, for the other workers.

        Only edges are sent (up -> down, down -> up), a few a second at most
        per target, so the frame fits the socket buffer and the write does
        not wait; a supervisor stuck past CONTROL_TIMEOUT_S costs the event."""
        try:
            write_frame(self._sock, f"{EVENT_ID}\n" + encode_health(app, address, down_until))
        except OSError:
            pass  # the supervisor is gone or stuck: the others learn for themselves

    def _on_readable(self, events: int) -> None:
        try:
            data = self._sock.recv(4096)
        except (BlockingIOError, InterruptedError, socket.timeout):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            self._on_orphaned()
            return
        self._pending += data
        while b"\n" in self._pending:
            line, self._pending = self._pending.split(b"\n", 1)
            request_id, _, request = line.decode(errors="replace").strip().partition(" ")
            if request_id == EVENT_ID:
                shared = decode_health(request)
                if shared is not None:
                    self._on_shared_health(*shared)
                continue  # events get no answer
            if request == "metrics":
                answer = self._metrics_text()
            elif request == "config":
                answer = json.dumps(self._config_view())
            else:
                answer = ""
            try:
                write_frame(self._sock, f"{request_id}\n{answer}")
            except OSError:
                pass  # the supervisor gave up waiting; it asks again next time

    def close(self) -> None:
        if self._loop.is_watched(self._sock.fileno()):
            self._loop.unwatch(self._sock.fileno())
        netio.close(self._sock)


class _Worker:
    __slots__ = ("index", "pid", "control", "started_at", "restart_delay_s", "next_request",
                 "inbox")

    def __init__(self, index: int) -> None:
        self.index = index
        self.pid = 0
        self.control: Optional[socket.socket] = None
        self.started_at = 0.0
        self.restart_delay_s = RESTART_MIN_S
        self.next_request = 0
        self.inbox = bytearray()  # bytes read from control, not yet a whole frame

    def take_frame(self) -> Optional[str]:
        """The next whole frame in the inbox, or None; ValueError on a length
        no worker sends (the stream is out of step: the inbox is emptied)."""
        if len(self.inbox) < 4:
            return None
        (length,) = struct.unpack_from("!I", self.inbox)
        if length > MAX_FRAME_BYTES:
            self.inbox.clear()
            raise ValueError(f"control frame of {length} bytes")
        if len(self.inbox) < 4 + length:
            return None
        frame = bytes(self.inbox[4:4 + length]).decode(errors="replace")
        del self.inbox[:4 + length]
        return frame


class Supervisor:
    def __init__(self, count: int, worker_main: WorkerMain,
                 admin_address: Optional[tuple[str, int]] = None) -> None:
        self._worker_main = worker_main
        self._workers = [_Worker(index) for index in range(count)]
        self._admin_address = admin_address
        self._admin_sock: Optional[socket.socket] = None
        self._loop: Optional[EventLoop] = None
        self._admin: Optional[AdminServer] = None
        self._stopping = False

    # -- starting workers -------------------------------------------------------

    def _spawn(self, worker: _Worker) -> None:
        parent_end, child_end = socket.socketpair()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            parent_end.close()
            code = 1
            try:
                self._forget_parent_state()
                code = self._worker_main(worker.index, child_end)
            except BaseException:
                log.exception("worker %d crashed", worker.index)
            finally:
                # os._exit skips the handlers' close: flush queued log lines.
                for handler in logging.getLogger("rawproxy").handlers:
                    handler.flush()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        child_end.close()
        worker.pid = pid
        worker.control = parent_end
        worker.started_at = time.monotonic()
        log.info("worker %d started (pid %d)", worker.index, pid)

    def _forget_parent_state(self) -> None:
        """In a new worker: drop the supervisor's loop, admin and other pipes."""
        if self._admin is not None:
            self._admin.close_after_fork()
        elif self._admin_sock is not None:
            self._admin_sock.close()
        if self._loop is not None:
            self._loop.close_after_fork()
        for other in self._workers:
            if other.control is not None:
                other.control.close()

    def _wait_ready(self, worker: _Worker) -> Optional[int]:
        """None when the worker is listening, else the status it exited with."""
        assert worker.control is not None
        worker.control.settimeout(READY_TIMEOUT_S)
        try:
            if read_frame(worker.control) == "ready":
                return None
        except (OSError, ConnectionError):
            pass
        try:
            os.kill(worker.pid, signal.SIGKILL)  # alive but silent: give up on it
        except ProcessLookupError:
            pass
        _, status = os.waitpid(worker.pid, 0)
        worker.pid = 0
        return os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") \
            else (status >> 8)

    def run(self) -> int:
        """Start the workers and supervise them; the process exit status."""
        if self._admin_address is not None:
            host, port = self._admin_address
            try:  # before any worker exists: a busy admin port is one clean error
                self._admin_sock = netio.open_listener(host, port, 64)
            except OSError as exc:
                print(f"rawproxy: error: cannot listen on {host}:{port} (admin endpoint): "
                      f"{exc.strerror or exc}", file=sys.stderr, flush=True)
                return 1
        # Handlers before the first fork: a signal during start-up is queued
        # for the loop instead of killing the supervisor by default action.
        loop = self._loop = EventLoop()
        try:
            loop.add_signal_handler(signal.SIGTERM, self._on_stop_signal)
            loop.add_signal_handler(signal.SIGINT, self._on_stop_signal)
            loop.add_signal_handler(signal.SIGHUP, lambda: self._signal_all(signal.SIGHUP))
            loop.add_signal_handler(signal.SIGCHLD, self._reap)
            for worker in self._workers:
                self._spawn(worker)
                failed = self._wait_ready(worker)
                if failed is not None:
                    self._signal_all(signal.SIGKILL)
                    self._reap_all_blocking()
                    return failed if failed > 0 else 1
                self._watch_control(worker)
            return self._supervise(loop)
        finally:
            if self._admin is not None:
                self._admin.close()
            elif self._admin_sock is not None:
                self._admin_sock.close()
            loop.close()

    # -- running ----------------------------------------------------------------

    def _supervise(self, loop: EventLoop) -> int:
        if self._admin_sock is not None:
            self._admin = AdminServer(loop, AdminHandlers(
                lambda: self._stopping, self.metrics_text, self.config_view),
                *self._admin_address or ("", 0), sock=self._admin_sock)
            self._admin.start()
        log.info("supervising %d workers", len(self._workers))
        self._reap()  # a worker may have died before SIGCHLD was handled
        loop.run()
        log.info("all workers exited")
        return 0

    def _on_stop_signal(self) -> None:
        if self._stopping:
            log.info("second stop signal: workers exit now")
        self._stopping = True
        self._signal_all(signal.SIGTERM)

    def _signal_all(self, signum: int) -> None:
        for worker in self._workers:
            if worker.pid:
                try:
                    os.kill(worker.pid, signum)
                except ProcessLookupError:
                    pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            for worker in self._workers:
                if worker.pid == pid:
                    self._on_exit(worker, status)
        if self._stopping and not any(w.pid for w in self._workers):
            assert self._loop is not None
            self._loop.stop()

    def _on_exit(self, worker: _Worker, status: int) -> None:
        worker.pid = 0
        if worker.control is not None:
            self._unwatch_control(worker)
            worker.control.close()
            worker.control = None
        worker.inbox.clear()
        if self._stopping:
            return
        assert self._loop is not None
        if time.monotonic() - worker.started_at > RESTART_MAX_S:
            worker.restart_delay_s = RESTART_MIN_S  # it ran a good while: no penalty
        log.error("worker %d exited unexpectedly (status %d); restarting in %.0fs",
                  worker.index, status, worker.restart_delay_s)
        delay = worker.restart_delay_s
        worker.restart_delay_s = min(RESTART_MAX_S, delay * 2)
        self._loop.call_later(delay, lambda: self._restart(worker))

    def _restart(self, worker: _Worker) -> None:
        if self._stopping or worker.pid:
            return
        self._spawn(worker)
        if self._wait_ready(worker) is not None:
            self._on_exit(worker, 1)
        else:
            self._watch_control(worker)

    def _reap_all_blocking(self) -> None:
        for worker in self._workers:
            if worker.pid:
                try:
                    os.waitpid(worker.pid, 0)
                except ChildProcessError:
                    pass
                worker.pid = 0

    # -- the control channels ------------------------------------------------------

    def _watch_control(self, worker: _Worker) -> None:
        """Read a ready worker's events between questions, on the loop."""
        if worker.control is not None and self._loop is not None:
            fd = worker.control.fileno()
            self._loop.watch(fd, lambda events: self._on_control_readable(worker))
            self._loop.set_interest(fd, EVENT_READ)

    def _unwatch_control(self, worker: _Worker) -> None:
        if worker.control is not None and self._loop is not None \
                and self._loop.is_watched(worker.control.fileno()):
            self._loop.unwatch(worker.control.fileno())

    def _on_control_readable(self, worker: _Worker) -> None:
        control = worker.control
        if control is None:
            return
        try:
            control.settimeout(0.0)  # _ask sets its own timeout again
            data = control.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._unwatch_control(worker)  # it exited: SIGCHLD does the rest
            return
        worker.inbox += data
        self._drain_inbox(worker)

    def _drain_inbox(self, worker: _Worker) -> None:
        """Handle every whole frame already read (events are passed on)."""
        try:
            frame = worker.take_frame()
            while frame is not None:
                self._on_frame(worker, frame)
                frame = worker.take_frame()
        except ValueError as exc:
            log.warning("worker %d: control channel out of step: %s", worker.index, exc)

    def _on_frame(self, worker: _Worker, frame: str) -> None:
        """An event is passed on; an answer nobody waits for any more is dropped."""
        frame_id, _, body = frame.partition("\n")
        if frame_id != EVENT_ID:
            return
        line = f"{EVENT_ID} {body}\n".encode()
        for other in self._workers:
            if other is not worker and other.pid and other.control is not None:
                try:
                    other.control.settimeout(CONTROL_TIMEOUT_S)
                    other.control.sendall(line)
                except OSError:
                    pass  # it is exiting, or stuck: it learns for itself

    def _read_frame(self, worker: _Worker, control: socket.socket, deadline: float) -> str:
        frame = worker.take_frame()
        while frame is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("no answer in time")
            control.settimeout(remaining)
            data = control.recv(65536)
            if not data:
                raise ConnectionError("control socket closed")
            worker.inbox += data
            frame = worker.take_frame()
        return frame

    # -- admin views --------------------------------------------------------------

    def _ask(self, worker: _Worker, request: str) -> Optional[str]:
        control = worker.control
        if not worker.pid or control is None:
            return None
        worker.next_request += 1
        request_id = str(worker.next_request)
        deadline = time.monotonic() + CONTROL_TIMEOUT_S
        try:
            control.settimeout(CONTROL_TIMEOUT_S)
            control.sendall(f"{request_id} {request}\n".encode())
            while True:
                frame = self._read_frame(worker, control, deadline)
                answer_id, _, answer = frame.partition("\n")
                if answer_id == request_id:
                    return answer
                # An event (passed on), or a late answer to a question we
                # gave up on (dropped).
                self._on_frame(worker, frame)
        except (OSError, ConnectionError, ValueError) as exc:
            if getattr(exc, "errno", None) not in (None, errno.EPIPE, errno.ECONNRESET):
                log.warning("worker %d did not answer %s: %s", worker.index, request, exc)
            return None
        finally:
            # Frames read together with the answer: the selector will not
            # wake for bytes already taken off the socket.
            self._drain_inbox(worker)

    def metrics_text(self) -> str:
        texts = [text for text in (self._ask(w, "metrics") for w in self._workers) if text]
        return merge_expositions(texts)

    def config_view(self) -> object:
        views = []
        for worker in self._workers:
            text = self._ask(worker, "config")
            try:
                views.append(json.loads(text) if text else None)
            except ValueError:
                views.append(None)
        return {"Workers": views, "Draining": self._stopping}


def merge_expositions(texts: list[str]) -> str:
    """One exposition from several: each family's HELP/TYPE once, then the
    samples of every input (they differ by their ``worker`` label)."""
    order: list[str] = []
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for text in texts:
        family = ""
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split(" ", 3)[2]
                if family not in headers:
                    order.append(family)
                    headers[family] = []
                    samples[family] = []
                if len(headers[family]) < 2 and line not in headers[family]:
                    headers[family].append(line)
            elif line and family:
                samples[family].append(line)
    lines: list[str] = []
    for family in order:
        lines.extend(headers[family])
        lines.extend(samples[family])
    return "\n".join(lines) + "\n" if lines else ""
