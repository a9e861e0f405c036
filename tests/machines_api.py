"""A small machines API for the Machines tests (SPEC 10), on loopback only.

:class:`MachinesAPI` is an HTTP server on ``127.0.0.1:0``: ``POST
/start/<target>`` starts a real echo backend process on the target's port
(after ``listen_delay_s``, as a booting machine would) and answers 200;
``POST /stop/<target>`` kills it (after ``stop_delay_s``).  ``mode`` makes it misbehave: ``"500"``
answers 500, ``"hang"`` never answers (until :meth:`close`), ``"dead"``
answers 200 and starts nothing.  Calls are counted per path.  Every
process it started is stopped by PID in :meth:`close`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from tests.support import ECHO_SCRIPT

# tests.support's echo backend, waiting ``delay`` seconds before it listens.
ECHO = "import sys, time\ntime.sleep(float(sys.argv[2]))\n" + ECHO_SCRIPT


def start_echo(port: int, delay_s: float = 0.0) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", ECHO, str(port), str(delay_s)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


class MachinesAPI:
    def __init__(self, mode: str = "ok", listen_delay_s: float = 0.0,
                 stop_delay_s: float = 0.0) -> None:
        self.mode = mode
        self.stop_delay_s = stop_delay_s  # a stop that takes a while: to race it
        self.listen_delay_s = listen_delay_s
        self.calls: dict[str, int] = {}
        self.bodies: list[dict[str, str]] = []
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()
        self._release = threading.Event()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                status = api.handle(self.path, body)
                if status == 0:
                    api._release.wait(30)
                    return
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, action: str) -> str:
        return f"http://127.0.0.1:{self.port}/{action}/{{target}}"

    def count(self, action: str) -> int:
        with self._lock:
            return sum(n for path, n in self.calls.items() if path.startswith(f"/{action}/"))

    def handle(self, path: str, body: dict[str, str]) -> int:
        """The status to answer (0: hang)."""
        with self._lock:
            self.calls[path] = self.calls.get(path, 0) + 1
            self.bodies.append(body)
        if self.mode == "500":
            return 500
        if self.mode == "hang":
            return 0
        port = int(path.rsplit("%3A", 1)[-1]) if "%3A" in path else 0
        if self.mode == "ok" and path.startswith("/start/") and port:
            self.start(port)
        elif path.startswith("/stop/") and port:
            self._release.wait(self.stop_delay_s)
            self.stop(port)
        return 200

    def start(self, port: int) -> None:
        with self._lock:
            proc = self.procs.get(port)
            if proc is None or proc.poll() is not None:
                self.procs[port] = start_echo(port, self.listen_delay_s)

    def stop(self, port: int) -> None:
        with self._lock:
            proc: Optional[subprocess.Popen[bytes]] = self.procs.pop(port, None)
        if proc is not None:
            stop_process(proc)

    def running(self) -> list[int]:
        with self._lock:
            return [port for port, proc in self.procs.items() if proc.poll() is None]

    def close(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        for port in list(self.procs):
            self.stop(port)
