"""Deliberately broken relays for the probe to catch, on 127.0.0.1:0.

``Relay(backend_port, fault)`` accepts clients and relays each one to a new
connection to the backend, with one fault in the echo direction:

- ``none``: an honest relay (the probe must pass it);
- ``flip``: flips one bit of the echo stream's byte ``at``;
- ``drop_tail``: forwards ``at`` bytes of each echo, drops the rest, then
  ends the stream normally when the backend does;
- ``close_early``: forwards ``at`` bytes of each echo, then closes both
  sides abortively (RST, so the client cannot mistake it for an EOF);
- ``swallow``: forwards nothing back (the client stalls);
- ``mix``: pairs connections as they arrive and sends each one the other's
  echo.

Blocking sockets, two threads per connection, a timeout on every call.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Callable, Optional

IO_TIMEOUT_S = 10.0
Transform = Callable[[bytes], Optional[bytes]]   # None: close abortively now


class Relay:
    def __init__(self, backend_port: int, fault: str, at: int = 0) -> None:
        self.backend_port = backend_port
        self.fault = fault
        self.at = at
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._waiting: list[tuple[socket.socket, socket.socket]] = []
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                backend = socket.create_connection(("127.0.0.1", self.backend_port),
                                                   timeout=IO_TIMEOUT_S)
            except OSError:
                return
            client.settimeout(IO_TIMEOUT_S)
            with self._lock:
                self._socks += [client, backend]
            if self.fault != "mix":
                self._wire(client, backend, client)
                continue
            with self._lock:
                self._waiting.append((client, backend))
                if len(self._waiting) < 2:
                    continue
                (c1, b1), (c2, b2) = self._waiting
                self._waiting.clear()
            self._wire(c1, b1, c2)
            self._wire(c2, b2, c1)

    def _wire(self, client: socket.socket, backend: socket.socket,
              echo_to: socket.socket) -> None:
        """client -> backend unchanged; backend -> echo_to through the fault."""
        for args in ((client, backend, _keep), (backend, echo_to, self._transform(echo_to))):
            threading.Thread(target=_pump, args=args, daemon=True).start()

    def _transform(self, client: socket.socket) -> Transform:
        seen = 0

        def apply(data: bytes) -> Optional[bytes]:
            nonlocal seen
            start, seen = seen, seen + len(data)
            if self.fault == "flip" and start <= self.at < seen:
                out = bytearray(data)
                out[self.at - start] ^= 0x01
                return bytes(out)
            if self.fault == "drop_tail":
                return data[:max(0, self.at - start)]
            if self.fault == "close_early" and seen >= self.at:
                client.sendall(data[:self.at - start])
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return None
            if self.fault == "swallow":
                return b""
            return data
        return apply

    def close(self) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self._thread.join(IO_TIMEOUT_S)
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            sock.close()


def _keep(data: bytes) -> Optional[bytes]:
    return data


def _pump(src: socket.socket, dst: socket.socket, transform: Transform) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                dst.shutdown(socket.SHUT_WR)
                return
            out = transform(data)
            if out is None:
                dst.close()
                src.close()
                return
            dst.sendall(out)
    except OSError:
        return
