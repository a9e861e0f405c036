"""The thread-per-connection TCP proxy, the design rawproxy rejected: a peer.

``python3 thread_proxy.py --listen 127.0.0.1:8000 --target 127.0.0.1:9000``.
Blocking sockets; the accepting thread hands each client to a new thread,
which connects to the target, starts one more thread for the way back and
pumps the way there itself: two threads per connection, 64 KiB reads,
``sendall`` for backpressure, ``shutdown(SHUT_WR)`` for half-close.  Default
thread stacks, as a Python user would write it.  It is in the benchmark to
put numbers on why rawproxy is an event loop: what a thread costs per idle
connection, per new connection, and per message once the GIL is shared.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
from types import FrameType
from typing import Optional

READ_BYTES = 64 * 1024


def split_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy until EOF (then half-close the sink) or an error (then reset both)."""
    try:
        while True:
            data = source.recv(READ_BYTES)
            if not data:
                sink.shutdown(socket.SHUT_WR)
                return
            sink.sendall(data)
    except OSError:
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(client: socket.socket, target: tuple[str, int]) -> None:
    try:
        upstream = socket.create_connection(target)
    except OSError:
        client.close()
        return
    for sock in (client, upstream):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
    back.start()
    pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--target", required=True, help="HOST:PORT")
    args = parser.parse_args(argv)
    target = split_address(args.target)
    listener = socket.create_server(split_address(args.listen), backlog=4096)

    def stop(signum: int, frame: Optional[FrameType]) -> None:
        raise SystemExit(0)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    with listener:
        while True:
            client, _ = listener.accept()
            threading.Thread(target=serve, args=(client, target), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
