"""Local mode's autostart phase: an app whose one machine starts stopped.

:class:`MachineStub` holds a loopback port bound but not listening (a
connect to it is refused: the machine is stopped) and serves a tiny
machines API on another loopback port: ``POST`` to it (rawproxy's
``Machines.Start`` hook, SPEC 10) makes the held socket listen and hands it
to the probe's echo server, so the machine is up.  It counts the calls and
notes when the first came.  :func:`app_config` is the app to add to the
derived config; the scenario checks its port after the others, and the
report shows the calls and how long the first client waited.
"""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from .echo import EchoBackend, EchoServer

APP_NAME = "probe-autostart"


class MachineStub:
    def __init__(self, echo: EchoServer, held: socket.socket) -> None:
        self._echo = echo
        self._held = held
        self.port: int = held.getsockname()[1]
        self.calls = 0
        self.first_call_at: Optional[float] = None  # time.perf_counter()
        self.backend: Optional[EchoBackend] = None
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                stub.start()
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._api = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._api.daemon_threads = True
        self.api_port: int = self._api.server_address[1]
        self._thread = threading.Thread(target=self._api.serve_forever, daemon=True)
        self._thread.start()

    def start(self) -> None:
        with self._lock:
            self.calls += 1
            if self.first_call_at is None:
                self.first_call_at = time.perf_counter()
            if self.backend is None:
                self._held.listen(128)
                self.backend = self._echo.add(self._held)

    def app_config(self, port: int) -> dict[str, Any]:
        return {"Name": APP_NAME, "Ports": [port], "Targets": [f"127.0.0.1:{self.port}"],
                "ConnectTimeout": 2,
                "Machines": {"Start": {"URL": f"http://127.0.0.1:{self.api_port}/start"},
                             "StartTimeout": 10}}

    def close(self) -> None:
        self._api.shutdown()
        self._api.server_close()
        self._thread.join(5)
        if self.backend is None:
            self._held.close()  # else the echo server closes it
