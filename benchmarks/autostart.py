"""What an autostart costs a client (SPEC 10), beyond the machine's own start.

``python -m benchmarks.autostart [--repeat N]`` (``make bench-autostart``)
runs rawproxy with one app whose one target is stopped, and a machines API
in this process: its ``Start`` hook (an HTTP POST) starts an echo listener
on the target's port after ``delay`` (0, 100 and 500 ms: a machine that
boots that long).  For each delay, ``N`` times (default 10): a client
connects through the proxy, sends 64 bytes at once and waits for the echo;
then the listener is closed again (the machine "stops"), so the next
client's connect is refused and starts it anew.

Printed per delay (medians): the client's time to first byte; the
machine's own start time (hook received -> listening); and the proxy's
overhead, their difference: noticing the refusal, calling the hook, the
probe's back-off after the listener is up, the client's real connect and
the relay of the first bytes.  Everything on 127.0.0.1; the proxy is
stopped by its PID.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.procs import Proc, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PAYLOAD = bytes(range(64))
DELAYS_S = (0.0, 0.1, 0.5)


class Machine:
    """An echo listener on its port, started ``delay_s`` after the hook.

    A socket bound to the port and never listening holds it for the whole
    run (connects to it are refused, as to a stopped machine), so nothing
    else on a busy host takes the port between two starts; listeners share
    it through SO_REUSEPORT."""

    def __init__(self) -> None:
        self._holder = socket.socket()
        self._holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self._holder.bind((HOST, 0))
        self.port: int = self._holder.getsockname()[1]
        self.delay_s = 0.0
        self.hook_at = 0.0
        self.listening_at = 0.0
        self.listener: Optional[socket.socket] = None
        self.up = threading.Event()

    def start(self) -> None:
        self.hook_at = time.monotonic()
        threading.Thread(target=self._boot, daemon=True).start()

    def _boot(self) -> None:
        time.sleep(self.delay_s)  # the machine booting: the thing being measured around
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind((HOST, self.port))
        listener.listen(64)
        self.listening_at = time.monotonic()
        self.listener = listener
        self.up.set()
        while True:  # the proxy's probe connects first, then the client
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # stopped
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    def stop(self) -> None:
        if self.listener is not None:
            # Linux: shutdown wakes the accept() blocked on it; close alone would not.
            self.listener.shutdown(socket.SHUT_RDWR)
            self.listener.close()
            self.listener = None
        self.up.clear()

    def close(self) -> None:
        self.stop()
        self._holder.close()


def _echo(conn: socket.socket) -> None:
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(data)


def serve_api(machine: Machine) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            machine.start()
            self.send_response(202)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((HOST, 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def first_byte_s(port: int) -> float:
    started = time.monotonic()
    with socket.create_connection((HOST, port), timeout=30) as sock:
        sock.sendall(PAYLOAD)
        got = sock.recv(len(PAYLOAD))
        elapsed = time.monotonic() - started
        while len(got) < len(PAYLOAD):
            chunk = sock.recv(len(PAYLOAD) - len(got))
            if not chunk:
                raise RuntimeError("the proxy closed before the echo came back")
            got += chunk
    if got != PAYLOAD:
        raise RuntimeError("wrong bytes came back")
    return elapsed


def measure(repeat: int) -> list[tuple[float, float, float, float]]:
    """(delay, TTFB, machine's own start, overhead) medians, seconds."""
    machine = Machine()
    api = serve_api(machine)
    port = free_port()
    rows = []
    with tempfile.TemporaryDirectory(prefix="rawproxy-autostart-") as tmp:
        config = Path(tmp) / "autostart.json"
        config.write_text(json.dumps({"Apps": [{
            "Name": "autostart", "Ports": [port], "Targets": [f"{HOST}:{machine.port}"],
            "Machines": {"Start": {"URL": f"http://{HOST}:{api.server_address[1]}/start"},
                         "StartTimeout": 10}}]}))
        proc = Proc("rawproxy", [sys.executable, str(ROOT / "rawproxy.py"), "--config",
                                 str(config), "--listen-host", HOST, "--log-level", "error"],
                    Path(tmp) / "rawproxy.log", cwd=ROOT)
        try:
            proc.wait_listening([port])
            for delay_s in DELAYS_S:
                machine.delay_s = delay_s
                runs = []
                for _ in range(repeat):
                    ttfb = first_byte_s(port)
                    own = machine.listening_at - machine.hook_at
                    runs.append((ttfb, own, ttfb - own))
                    machine.stop()
                rows.append((delay_s, statistics.median(r[0] for r in runs),
                             statistics.median(r[1] for r in runs),
                             statistics.median(r[2] for r in runs)))
        finally:
            proc.stop()
            machine.close()
            api.shutdown()
            api.server_close()
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.autostart",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=10, help="clients per delay (10)")
    args = parser.parse_args(argv)
    print(f"autostart: time to first byte of a client of a stopped app "
          f"(medians of {args.repeat})")
    print(f"{'machine boot':>14} {'first byte':>12} {'machine start':>14} {'proxy adds':>12}")
    for delay_s, ttfb, own, overhead in measure(args.repeat):
        print(f"{delay_s * 1e3:>11.0f} ms {ttfb * 1e3:>9.1f} ms {own * 1e3:>11.1f} ms "
              f"{overhead * 1e3:>9.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
