"""Local echo backends: one thread, one selector, any number of listeners.

``EchoServer`` owns the thread; ``add()`` opens a backend on 127.0.0.1:0.
Each connection is echoed until the client's EOF, then the write side is
shut down and the socket closed (half-close, as a real echo service).
At most ``_PENDING_BYTES`` wait per connection: past that the backend
stops reading until the client drains its echo.

A backend counts the connections it served (those that carried a byte,
so a bare TCP health check is not counted) and remembers the probe stream
id each one started with, which proves which client reached it.
``stop(backend)`` closes its listener from the loop thread and returns once
it is closed: from then on connects to it are refused.  ``close()`` stops
everything and joins the thread.  ``add(listener)`` serves on a socket the
caller bound (local mode picks its ports, see probe.ports).
"""

from __future__ import annotations

import selectors
import socket
import threading
from typing import Callable, Optional, Union

from .framing import HEADER_SIZE, stream_of

_PENDING_BYTES = 256 * 1024
_RECV_BYTES = 256 * 1024
_CLOSE_TIMEOUT_S = 5.0


class EchoBackend:
    __slots__ = ("port", "listener", "served", "streams", "stopped")

    def __init__(self, listener: Optional[socket.socket] = None) -> None:
        if listener is None:
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(1024)
        self.listener = listener
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        self.served = 0
        self.streams: list[int] = []
        self.stopped = False


class _Conn:
    __slots__ = ("sock", "backend", "pending", "head", "eof", "mask")

    def __init__(self, sock: socket.socket, backend: EchoBackend) -> None:
        self.sock = sock
        self.backend = backend
        self.pending = bytearray()
        self.head = bytearray()   # the first bytes, until the stream id is known
        self.eof = False
        self.mask = selectors.EVENT_READ


_Handler = Union[EchoBackend, _Conn, None]


class EchoServer:
    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._handlers: dict[int, _Handler] = {self._wake_r.fileno(): None}
        self._calls: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._running = True
        self._thread = threading.Thread(target=self._run, name="probe-echo", daemon=True)
        self._thread.start()

    def add(self, listener: Optional[socket.socket] = None) -> EchoBackend:
        """A backend on ``listener`` (bound and listening; its own on port 0 if None)."""
        backend = EchoBackend(listener)
        self._call(lambda: self._register(backend.listener, backend, selectors.EVENT_READ))
        return backend

    def stop(self, backend: EchoBackend) -> None:
        self._call(lambda: self._stop_backend(backend))

    def snapshot(self, backend: EchoBackend) -> tuple[int, tuple[int, ...]]:
        """(connections served, their stream ids), read consistently."""
        with self._lock:
            return backend.served, tuple(backend.streams)

    def close(self) -> None:
        """Never raises: it runs while stopping, where an error would leave the
        rest (the proxy) running.  A loop that does not answer is left to die
        with the process (its thread is a daemon)."""
        if self._thread.is_alive():
            try:
                self._call(self._shutdown, _CLOSE_TIMEOUT_S)
            except (TimeoutError, OSError):
                pass
        self._thread.join(_CLOSE_TIMEOUT_S)
        self._wake_w.close()

    def _call(self, fn: Callable[[], None], timeout_s: float = 10.0) -> None:
        """Run ``fn`` on the loop thread and wait for it."""
        done = threading.Event()

        def wrapped() -> None:
            try:
                fn()
            finally:
                done.set()

        with self._lock:
            self._calls.append(wrapped)
        self._wake_w.send(b"x")
        if not done.wait(timeout_s):
            raise TimeoutError("echo server did not answer")

    def _register(self, sock: socket.socket, handler: _Handler, mask: int) -> None:
        self._selector.register(sock, mask)
        self._handlers[sock.fileno()] = handler

    def _drop(self, sock: socket.socket) -> None:
        self._handlers.pop(sock.fileno(), None)
        self._selector.unregister(sock)
        sock.close()

    def _stop_backend(self, backend: EchoBackend) -> None:
        if not backend.stopped:
            backend.stopped = True
            self._drop(backend.listener)

    def _shutdown(self) -> None:
        self._running = False
        for handler in list(self._handlers.values()):
            if isinstance(handler, EchoBackend):
                self._drop(handler.listener)
            elif isinstance(handler, _Conn):
                self._drop(handler.sock)

    def _run(self) -> None:
        try:
            while self._running:
                for key, events in self._selector.select():
                    handler = self._handlers.get(key.fd, None)
                    if key.fileobj is self._wake_r:
                        self._run_calls()
                    elif isinstance(handler, EchoBackend):
                        self._on_accept(handler)
                    elif isinstance(handler, _Conn):
                        self._on_conn(handler, events)
        finally:
            self._selector.close()
            self._wake_r.close()

    def _run_calls(self) -> None:
        try:
            self._wake_r.recv(4096)
        except BlockingIOError:
            pass
        with self._lock:
            calls, self._calls = self._calls, []
        for call in calls:
            call()

    def _on_accept(self, backend: EchoBackend) -> None:
        for _ in range(64):
            try:
                sock, _addr = backend.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:   # e.g. out of descriptors: try again on the next event
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._register(sock, _Conn(sock, backend), selectors.EVENT_READ)

    def _on_conn(self, conn: _Conn, events: int) -> None:
        try:
            if events & selectors.EVENT_READ:
                self._on_readable(conn)
            if conn.pending:
                del conn.pending[:conn.sock.send(conn.pending)]
        except BlockingIOError:
            pass
        except OSError:   # reset or broken pipe: the client is gone
            self._drop(conn.sock)
            return
        if conn.eof and not conn.pending:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._drop(conn.sock)
            return
        mask = ((selectors.EVENT_READ if not conn.eof and len(conn.pending) < _PENDING_BYTES
                 else 0) | (selectors.EVENT_WRITE if conn.pending else 0))
        if mask != conn.mask:
            conn.mask = mask
            self._selector.modify(conn.sock, mask)

    def _on_readable(self, conn: _Conn) -> None:
        data = conn.sock.recv(_RECV_BYTES)
        if not data:
            conn.eof = True
            return
        if len(conn.head) < HEADER_SIZE:
            self._note_head(conn, data)
        conn.pending += data

    def _note_head(self, conn: _Conn, data: bytes) -> None:
        first = not conn.head
        conn.head += data[:HEADER_SIZE - len(conn.head)]
        stream: Optional[int] = stream_of(bytes(conn.head))
        with self._lock:
            if first:
                conn.backend.served += 1
            if stream is not None and len(conn.head) == HEADER_SIZE:
                conn.backend.streams.append(stream)
