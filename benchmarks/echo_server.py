"""An echo backend for the idle and integrity workloads (a script, one loop).

``python3 echo_server.py PORT`` listens on 127.0.0.1:PORT and sends every
byte back on the connection it came from.  A FIN from the client is answered
with a FIN once everything received was echoed (so the client sees the whole
echo, then EOF).  Idle connections cost a socket and a small dict entry, no
buffer, so 10,000 held connections stay cheap on this side.  Backpressure:
while a connection has unsent bytes it is not read from.
"""

from __future__ import annotations

import selectors
import signal
import socket
import sys
from typing import Optional

CHUNK_BYTES = 256 * 1024


class Conn:
    __slots__ = ("sock", "pending", "eof")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending: Optional[memoryview] = None
        self.eof = False


def serve(port: int) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    conns: dict[int, Conn] = {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    def close(conn: Conn) -> None:
        sel.unregister(conn.sock)
        del conns[conn.sock.fileno()]
        conn.sock.close()

    def flush(conn: Conn) -> None:
        """Send what is pending; switch interest between read and write."""
        if conn.pending is not None:
            try:
                sent = conn.sock.send(conn.pending)
            except BlockingIOError:
                sent = 0
            except OSError:
                close(conn)
                return
            conn.pending = conn.pending[sent:] if sent < len(conn.pending) else None
        if conn.pending is not None:
            sel.modify(conn.sock, selectors.EVENT_WRITE)
        elif conn.eof:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            close(conn)
        else:
            sel.modify(conn.sock, selectors.EVENT_READ)

    while True:
        for key, _ in sel.select():
            if key.fileobj is listener:
                for _ in range(64):
                    try:
                        sock, _addr = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conns[sock.fileno()] = Conn(sock)
                    sel.register(sock, selectors.EVENT_READ)
                continue
            conn = conns.get(key.fd)
            if conn is None:
                continue
            if conn.pending is None:
                try:
                    data = conn.sock.recv(CHUNK_BYTES)
                except BlockingIOError:
                    continue
                except OSError:
                    close(conn)
                    continue
                if data:
                    conn.pending = memoryview(data)
                else:
                    conn.eof = True
            flush(conn)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
