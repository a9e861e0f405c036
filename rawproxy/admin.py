"""The admin endpoint (``--admin HOST:PORT`` or ``--admin unix:/path``): a
tiny HTTP/1.1 server on the proxy's own event loop.

* ``GET /healthz`` -> ``200 ok`` while serving, ``503 draining`` while draining
  (but 200 after an upgrade's hand-over: the new process serves);
* ``GET /metrics`` -> Prometheus text format 0.0.4 (``metrics.py``);
* ``GET /config``  -> the running config and each target's health, as JSON;
* ``GET /``        -> the status page for people (``statuspage.py``), which
  reads ``/config`` and ``/metrics`` itself every second.

With a token (``--admin-token-file``) every path but ``/healthz`` needs
``Authorization: Bearer <token>``; without it the answer is 401 with
``WWW-Authenticate: Bearer``.  The 401 for ``/`` carries a small sign-in
page: it asks for the token, keeps it in the tab's sessionStorage and
loads the status page with it (see README).

One request per connection (``Connection: close``).  After the response the
write side is shut and the rest of the request is read and discarded until
the client closes (a lingering close): closing with unread bytes would make
the kernel send RST, and the client could lose the response.  A slow or
malicious client cannot stall the proxy: requests are read without
blocking, capped at :data:`MAX_REQUEST_BYTES`, and a connection is closed
:data:`REQUEST_TIMEOUT_S` after its accept whatever it is doing.  At most
:data:`MAX_CLIENTS` admin connections are open at once; past that, a new
client replaces the oldest one that was already answered or has not sent a
whole request yet (so idle connections cannot lock out a scraper), else the
oldest still being written to (a client that never reads its answer), and
is refused only when every slot waits for the handlers' answer.

Out of descriptors (EMFILE and friends) at accept, the listener pauses
(:data:`ACCEPT_PAUSE_S`, doubling up to :data:`ACCEPT_PAUSE_MAX_S`), one
waiting client is shed through a reserve descriptor, and one warning is
logged per episode: the loop never spins on a listener that stays readable.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import socket
from typing import Callable, Optional

from . import metrics, netio, statuspage
from .adminhttp import HTML, format_response, head_end, header_value, parse_request_head
from .adminsock import (AdminAddress, SocketFile, is_authorized, open_listener,
                        remove_socket_file, socket_identity)
from .loop import EVENT_ERROR, EVENT_READ, EVENT_WRITE, EventLoop, Timer

log = logging.getLogger("rawproxy.admin")

MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT_S = 5.0
MAX_CLIENTS = 64
ACCEPT_BATCH = 16
ACCEPT_PAUSE_S = 0.1
ACCEPT_PAUSE_MAX_S = 2.0

_PATHS = ("/", "/healthz", "/metrics", "/config")

Response = tuple[int, str, bytes]  # status, content type, body


class AdminHandlers:
    """What the endpoints answer; the server (or the supervisor of several
    workers) supplies the three views.  Who may ask is AdminServer's business."""

    def __init__(self, is_draining: Callable[[], bool],
                 metrics_text: Callable[[], str],
                 config_view: Callable[[], object]) -> None:
        self._is_draining = is_draining
        self._metrics_text = metrics_text
        self._config_view = config_view
        self._page = b""  # read on the first request for it

    def respond_async(self, method: str, path: str,
                      reply: Callable[[Response], None]) -> None:
        """Answer through ``reply``, now or later on the loop (the supervisor
        answers once its workers have); the connection waits meanwhile."""
        reply(self.respond(method, path))

    def respond(self, method: str, path: str) -> Response:
        path = path.split("?", 1)[0]
        if path not in _PATHS:
            return 404, "text/plain", b"not found\n"
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if path == "/healthz":
            if self._is_draining():
                return 503, "text/plain", b"draining\n"
            return 200, "text/plain", b"ok\n"
        if path == "/":
            if not self._page:
                self._page = statuspage.load_page()
            return 200, HTML, self._page
        if path == "/metrics":
            body = self._metrics_text().encode()
            return 200, metrics.CONTENT_TYPE, body
        body = (json.dumps(self._config_view(), indent=2) + "\n").encode()
        return 200, "application/json", body


class _Phase(enum.Enum):
    READING = "reading"      # waiting for a whole request head
    WAITING = "waiting"      # for the handlers' answer (respond_async)
    WRITING = "writing"      # sending the response
    LINGERING = "lingering"  # answered; discarding until the client closes
    CLOSED = "closed"


class _AdminConnection:
    __slots__ = ("_admin", "sock", "fd", "phase", "_request", "_response", "_timer")

    def __init__(self, admin: AdminServer, sock: socket.socket) -> None:
        self._admin = admin
        self.sock = sock
        self.fd = sock.fileno()
        self.phase = _Phase.READING
        self._request = b""
        self._response = memoryview(b"")
        self._timer: Optional[Timer] = admin.loop.call_later(REQUEST_TIMEOUT_S, self._on_timeout)

    def on_events(self, events: int) -> None:
        try:
            if events & EVENT_ERROR:  # reset while waiting for the answer
                self.close()
            elif self.phase is _Phase.LINGERING:
                self._recv()
            elif self.phase is _Phase.READING:
                self._read()
            if self.phase is _Phase.WRITING:
                self._write()
        except OSError:
            self.close()

    def _recv(self) -> bytes:
        """What arrived (b"" if nothing yet); closes the connection at EOF."""
        try:
            data = self.sock.recv(MAX_REQUEST_BYTES)
        except netio.WOULD_BLOCK:
            return b""
        if not data:
            self.close()
        return data

    def _read(self) -> None:
        data = self._recv()
        if not data:
            return
        self._request += data
        end = head_end(self._request)
        if end < 0:
            if len(self._request) >= MAX_REQUEST_BYTES:
                self._reply(431, "text/plain", b"request too large\n", False)
            return
        head = self._request[:end]
        self._request = b""
        parsed = parse_request_head(head)
        if parsed is None:
            self._reply(400, "text/plain", b"bad request\n", False)
            return
        method, path = parsed
        head_only = method == "HEAD"
        denied = self._admin.check_token(path, header_value(head, "Authorization"))
        if denied is not None:
            self._reply(*denied, head_only)
            return
        self.phase = _Phase.WAITING
        self._admin.loop.set_interest(self.fd, 0)

        def reply(response: Response) -> None:
            if self.phase is not _Phase.WAITING:  # closed meanwhile (timeout, reset)
                return
            self._reply(*response, head_only)
            try:
                self._write()  # at once: a late answer comes from outside on_events
            except OSError:
                self.close()

        try:
            self._admin.respond_async(method, path, reply)
        except Exception:
            # A view that fails is one failed request, not a connection left
            # hanging until its timer.
            log.exception("admin: %s %s failed", method, path)
            reply((500, "text/plain", b"internal error\n"))

    def _reply(self, status: int, content_type: str, body: bytes, head_only: bool) -> None:
        self._response = memoryview(format_response(status, content_type, body, head_only))
        self.phase = _Phase.WRITING
        self._admin.loop.set_interest(self.fd, EVENT_WRITE)

    def _write(self) -> None:
        try:
            sent = self.sock.send(self._response)
        except netio.WOULD_BLOCK:
            return
        self._response = self._response[sent:]
        if not self._response:
            self.sock.shutdown(socket.SHUT_WR)
            self.phase = _Phase.LINGERING
            self._admin.loop.set_interest(self.fd, EVENT_READ)

    def _on_timeout(self) -> None:
        self._timer = None
        self.close()

    def close(self) -> None:
        if self.phase is _Phase.CLOSED:
            return
        self.phase = _Phase.CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._admin.loop.unwatch(self.fd)
        netio.close(self.sock)
        self._admin.connections.pop(self, None)
        self._admin.note_closed()


class AdminServer:
    """The listener and its connections.  ``token`` (``--admin-token-file``):
    every path but ``/healthz`` then needs ``Authorization: Bearer <token>``."""

    def __init__(self, loop: EventLoop, handlers: AdminHandlers, address: AdminAddress,
                 sock: Optional[socket.socket] = None, token: Optional[str] = None) -> None:
        self.loop = loop
        self.handlers = handlers
        self.address = address
        self.port = address.port
        self._token = token
        self._signin = statuspage.load_signin() if token is not None else b""
        # Insertion-ordered: the oldest connection comes first.
        self.connections: dict[_AdminConnection, None] = {}
        self._sock = sock  # already bound (the supervisor binds before forking)
        self._socket_file: Optional[SocketFile] = None
        self._reserve_fd = -1
        self._pause_s = 0.0  # 0 while accepting; else the current pause
        self._resume_timer: Optional[Timer] = None
        self._handed_over = False
        self._on_idle: Optional[Callable[[], None]] = None

    def start(self) -> None:
        """Bind (unless given a bound socket) and listen; raises OSError."""
        if self._sock is None:
            self._sock = open_listener(self.address)
        if self.address.path is None:
            self.port = self._sock.getsockname()[1]
            self.address = self.address.with_port(self.port)
        self._socket_file = socket_identity(self._sock)
        self._reserve_fd = _open_reserve_fd()
        self.loop.watch(self._sock.fileno(), self._on_accept)
        self.loop.set_interest(self._sock.fileno(), EVENT_READ)
        log.info("admin endpoint on %s", self.address.url())

    def check_token(self, path: str, authorization: Optional[str]) -> Optional[Response]:
        """None if the request may go on, else the 401 to answer."""
        path = path.split("?", 1)[0]
        if self._token is None or path == "/healthz" or is_authorized(authorization,
                                                                      self._token):
            return None
        if path == "/":  # a browser: the page that asks for the token
            return 401, HTML, self._signin
        return 401, "text/plain", b"unauthorized: send Authorization: Bearer <token>\n"

    def _accept(self) -> socket.socket:
        """One pending client (raises like socket.accept); a seam for tests."""
        assert self._sock is not None
        return self._sock.accept()[0]

    def _on_accept(self, events: int) -> None:
        if self._sock is None:
            return
        if events & EVENT_ERROR:  # reported only while paused: nothing to act on
            self.loop.mute(self._sock.fileno())
            return
        for _ in range(ACCEPT_BATCH):
            try:
                sock = self._accept()
            except netio.WOULD_BLOCK:
                break
            except OSError as exc:
                if exc.errno in netio.ACCEPT_TRANSIENT_ERRNOS:
                    continue
                if exc.errno in netio.ACCEPT_RESOURCE_ERRNOS:
                    self._shed_one()
                self._pause(exc)
                return
            self._admit(sock)
        if self._pause_s:
            log.info("admin accept resumed")
            self._pause_s = 0.0

    def _admit(self, sock: socket.socket) -> None:
        if len(self.connections) >= MAX_CLIENTS and not self._evict_one():
            netio.abort(sock)
            return
        sock.setblocking(False)
        conn = _AdminConnection(self, sock)
        self.connections[conn] = None
        self.loop.watch(conn.fd, conn.on_events)
        self.loop.set_interest(conn.fd, EVENT_READ)

    def _evict_one(self) -> bool:
        """Close the oldest connection answered or idle, else the oldest still
        writing (a peer that does not read its answer keeps that phase: such
        clients must not lock out /healthz probes); never one WAITING."""
        for phase in (_Phase.LINGERING, _Phase.READING, _Phase.WRITING):
            for conn in self.connections:
                if conn.phase is phase:
                    conn.close()
                    return True
        return False

    def _shed_one(self) -> None:
        """libuv's trick (as server.py): spend the reserve descriptor to accept
        and close one waiting client, so it hears at once."""
        if self._reserve_fd < 0:
            return
        os.close(self._reserve_fd)
        self._reserve_fd = -1
        try:
            netio.abort(self._accept())
        except OSError:
            pass
        self._reserve_fd = _open_reserve_fd()

    def _pause(self, exc: OSError) -> None:
        """Stop reading the listener for a while; warn once per episode."""
        assert self._sock is not None
        reason = exc.strerror or exc
        if not self._pause_s:
            log.warning("admin accept failed: %s; pausing admin accepts", reason)
        else:
            log.debug("admin accept still failing: %s", reason)
        self._pause_s = min(max(self._pause_s * 2, ACCEPT_PAUSE_S), ACCEPT_PAUSE_MAX_S)
        self.loop.set_interest(self._sock.fileno(), 0)
        self._resume_timer = self.loop.call_later(self._pause_s, self._resume)

    def _resume(self) -> None:
        self._resume_timer = None
        if self._sock is None:
            return
        if self._reserve_fd < 0:
            self._reserve_fd = _open_reserve_fd()
        self.loop.set_interest(self._sock.fileno(), EVENT_READ)

    @property
    def listening_socket(self) -> Optional[socket.socket]:
        return self._sock

    def note_closed(self) -> None:
        on_idle = self._on_idle
        if on_idle is not None and not self.connections:
            self._on_idle = None
            on_idle()

    def respond_async(self, method: str, path: str,
                      reply: Callable[[Response], None]) -> None:
        if self._handed_over and path.split("?", 1)[0] == "/healthz" and method in (
                "GET", "HEAD"):
            # Asked before the hand-over; the process that took the socket
            # over is serving (it said so), whatever this one is doing now.
            reply((200, "text/plain", b"ok\n"))
        else:
            self.handlers.respond_async(method, path, reply)

    def hand_over(self) -> None:
        """Stop accepting, leaving the socket (and its file) to the process
        that now serves it (an upgrade); see :meth:`answer_in_flight`."""
        self._socket_file = None
        self._handed_over = True
        self._stop_listening()

    def when_idle(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once no admin connection is open (now, if none
        is): after a hand-over, the end of a drain waits for the requests
        accepted before it (each has :data:`REQUEST_TIMEOUT_S` at most)."""
        if self.connections:
            self._on_idle = callback
        else:
            callback()

    def answer_in_flight(self) -> None:
        """After a hand-over, once the loop has stopped: run it again until
        the requests accepted before the hand-over are answered (a stop
        signal meanwhile cuts it short)."""
        if self._handed_over and self.connections:
            self.when_idle(self.loop.stop)
            self.loop.run()

    def close_after_fork(self) -> None:
        """In a forked child: close the descriptors, leave the parent's loop
        (and the unix socket file, which the parent still serves) alone."""
        for conn in self.connections:
            netio.close(conn.sock)
        if self._sock is not None:
            netio.close(self._sock)
        if self._reserve_fd >= 0:
            os.close(self._reserve_fd)

    def close(self) -> None:
        for conn in list(self.connections):
            conn.close()
        self._stop_listening()

    def _stop_listening(self) -> None:
        if self._resume_timer is not None:
            self._resume_timer.cancel()
            self._resume_timer = None
        if self._reserve_fd >= 0:
            os.close(self._reserve_fd)
            self._reserve_fd = -1
        if self._sock is not None:
            self.loop.unwatch(self._sock.fileno())
            netio.close(self._sock)
            self._sock = None
            remove_socket_file(self._socket_file)


def _open_reserve_fd() -> int:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1  # out of descriptors already; retried when accepting resumes
