"""The admin endpoint (``--admin HOST:PORT``): a tiny HTTP/1.1 server on the
proxy's own event loop.

* ``GET /healthz`` -> ``200 ok`` while serving, ``503 draining`` while draining;
* ``GET /metrics`` -> Prometheus text format 0.0.4 (``metrics.py``);
* ``GET /config``  -> the running config and each target's health, as JSON.

One request per connection (``Connection: close``).  After the response the
write side is shut and the rest of the request is read and discarded until
the client closes (a lingering close): closing with unread bytes would make
the kernel send RST, and the client could lose the response.  A slow or malicious
client cannot stall the proxy: requests are read without blocking, capped
at :data:`MAX_REQUEST_BYTES`, and a connection that has not sent a whole
request within :data:`REQUEST_TIMEOUT_S` is closed.  At most
:data:`MAX_CLIENTS` admin connections are open at once; more are closed at
accept.
"""

from __future__ import annotations

import json
import logging
import socket
from typing import Callable, Optional

from . import metrics, netio
from .loop import EVENT_READ, EVENT_WRITE, EventLoop, Timer

log = logging.getLogger("rawproxy.admin")

MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT_S = 5.0
MAX_CLIENTS = 64

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}

Response = tuple[int, str, bytes]  # status, content type, body


class AdminHandlers:
    """What the endpoints answer; the server (or the supervisor of several
    workers) supplies the three views."""

    def __init__(self, is_draining: Callable[[], bool],
                 metrics_text: Callable[[], str],
                 config_view: Callable[[], object]) -> None:
        self._is_draining = is_draining
        self._metrics_text = metrics_text
        self._config_view = config_view

    def respond(self, method: str, path: str) -> Response:
        path = path.split("?", 1)[0]
        if path not in ("/healthz", "/metrics", "/config"):
            return 404, "text/plain", b"not found\n"
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if path == "/healthz":
            if self._is_draining():
                return 503, "text/plain", b"draining\n"
            return 200, "text/plain", b"ok\n"
        if path == "/metrics":
            body = self._metrics_text().encode()
            return 200, metrics.CONTENT_TYPE, body
        body = (json.dumps(self._config_view(), indent=2) + "\n").encode()
        return 200, "application/json", body


def parse_request_head(head: bytes) -> Optional[tuple[str, str]]:
    """(method, path) from the request line, or None if it is not HTTP/1.x."""
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return None
    try:
        return parts[0].decode("ascii"), parts[1].decode("ascii")
    except UnicodeDecodeError:
        return None


def format_response(status: int, content_type: str, body: bytes, head_only: bool) -> bytes:
    allow = "Allow: GET, HEAD\r\n" if status == 405 else ""
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"{allow}Connection: close\r\n\r\n").encode("ascii")
    return head if head_only else head + body


class _AdminConnection:
    __slots__ = ("_admin", "sock", "fd", "_request", "_response", "_timer", "_lingering")

    def __init__(self, admin: AdminServer, sock: socket.socket) -> None:
        self._admin = admin
        self.sock = sock
        self.fd = sock.fileno()
        self._request = b""
        self._response = memoryview(b"")
        self._lingering = False
        self._timer: Optional[Timer] = admin.loop.call_later(REQUEST_TIMEOUT_S, self._on_timeout)

    def on_events(self, events: int) -> None:
        try:
            if self._lingering:
                self._discard()
                return
            if events & EVENT_READ and not self._response:
                self._read()
            if self._response:
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
        end = self._request.find(b"\r\n\r\n")
        if end < 0:
            if len(self._request) >= MAX_REQUEST_BYTES:
                self._reply(431, "text/plain", b"request too large\n", False)
            return
        parsed = parse_request_head(self._request[:end])
        if parsed is None:
            self._reply(400, "text/plain", b"bad request\n", False)
            return
        method, path = parsed
        status, content_type, body = self._admin.handlers.respond(method, path)
        self._reply(status, content_type, body, method == "HEAD")

    def _reply(self, status: int, content_type: str, body: bytes, head_only: bool) -> None:
        self._response = memoryview(format_response(status, content_type, body, head_only))
        self._admin.loop.set_interest(self.fd, EVENT_WRITE)

    def _write(self) -> None:
        try:
            sent = self.sock.send(self._response)
        except netio.WOULD_BLOCK:
            return
        self._response = self._response[sent:]
        if not self._response:
            self.sock.shutdown(socket.SHUT_WR)
            self._lingering = True
            self._admin.loop.set_interest(self.fd, EVENT_READ)

    def _discard(self) -> None:
        self._recv()

    def _on_timeout(self) -> None:
        self._timer = None
        self.close()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._admin.loop.unwatch(self.fd)
        netio.close(self.sock)
        self._admin.connections.discard(self)


class AdminServer:
    def __init__(self, loop: EventLoop, handlers: AdminHandlers, host: str, port: int,
                 sock: Optional[socket.socket] = None) -> None:
        self.loop = loop
        self.handlers = handlers
        self.host = host
        self.port = port
        self.connections: set[_AdminConnection] = set()
        self._sock = sock  # already bound (the supervisor binds before forking)

    def start(self) -> None:
        """Bind (unless given a bound socket) and listen; raises OSError."""
        if self._sock is None:
            self._sock = netio.open_listener(self.host, self.port, 64)
        self.port = self._sock.getsockname()[1]
        self.loop.watch(self._sock.fileno(), self._on_accept)
        self.loop.set_interest(self._sock.fileno(), EVENT_READ)
        log.info("admin endpoint on http://%s/",
                 netio.format_sockaddr((self.host, self.port)))

    def _on_accept(self, events: int) -> None:
        assert self._sock is not None
        for _ in range(16):
            try:
                sock, _ = self._sock.accept()
            except netio.WOULD_BLOCK:
                return
            except OSError as exc:
                log.warning("admin accept failed: %s", exc.strerror or exc)
                return
            if len(self.connections) >= MAX_CLIENTS:
                netio.abort(sock)
                continue
            sock.setblocking(False)
            conn = _AdminConnection(self, sock)
            self.connections.add(conn)
            self.loop.watch(conn.fd, conn.on_events)
            self.loop.set_interest(conn.fd, EVENT_READ)

    def close_after_fork(self) -> None:
        """In a forked child: close the descriptors, leave the parent's loop alone."""
        for conn in self.connections:
            netio.close(conn.sock)
        if self._sock is not None:
            netio.close(self._sock)

    def close(self) -> None:
        for conn in list(self.connections):
            conn.close()
        if self._sock is not None:
            self.loop.unwatch(self._sock.fileno())
            netio.close(self._sock)
            self._sock = None
