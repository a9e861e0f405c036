"""A killable echo backend for the soak: ``python3 echo_server.py PORT``.

Binds 127.0.0.1:PORT with SO_REUSEADDR (so a new instance can take the port
right after the previous one was SIGKILLed, whatever it left in TIME_WAIT),
prints ``listening`` on stdout once it listens, then echoes every connection
until EOF, one thread each, and closes it.  It runs until killed, or until
its stdin reaches EOF: the runner holds the other end, so a runner that dies
takes its backends with it.  Standard library only, imports nothing local.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

IO_TIMEOUT_S = 60.0
CHUNK_BYTES = 64 * 1024


def serve(conn: socket.socket) -> None:
    with conn:
        conn.settimeout(IO_TIMEOUT_S)
        try:
            while True:
                data = conn.recv(CHUNK_BYTES)
                if not data:
                    return
                conn.sendall(data)
        except OSError:
            return


def exit_when_orphaned() -> None:
    sys.stdin.buffer.read()
    os._exit(0)


def main(argv: list[str]) -> int:
    port = int(argv[0])
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("127.0.0.1", port))
    except OSError as exc:
        print(f"echo_server: cannot bind 127.0.0.1:{port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    listener.listen(512)
    threading.Thread(target=exit_when_orphaned, daemon=True).start()
    print("listening", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
