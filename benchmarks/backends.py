"""The backends the workloads proxy to, each on CPU 1 on its own port.

* ``iperf3`` -- ``iperf3 -s`` (bulk);
* ``redis`` -- ``redis-server`` without persistence (request/response);
* ``http`` -- nginx, one worker, serving a tiny file (churn);
* ``echo`` -- :mod:`benchmarks.echo_server` (idle, integrity).

Started once per run when a selected workload needs them, restarted on
demand (an iperf3 server can be left wedged by a broken test), stopped at
the end.  Configuration files live in the run's temporary directory.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Optional

from .procs import LOAD_CPU, BenchError, Proc, free_port, pinned

HERE = Path(__file__).resolve().parent
TINY_FILE = "tiny.txt"

NGINX_HTTP_CONF = """\
{user}worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type text/plain;
    client_body_temp_path {prefix}/tmp;
    proxy_temp_path {prefix}/tmp;
    fastcgi_temp_path {prefix}/tmp;
    uwsgi_temp_path {prefix}/tmp;
    scgi_temp_path {prefix}/tmp;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {prefix}/www;
    }}
}}
"""

# Which executable each backend needs (a workload is skipped without it).
BACKEND_BINARIES = {"iperf3": "iperf3", "redis": "redis-server", "http": "nginx", "echo": ""}


def nginx_user_line() -> str:
    # As root, nginx's workers would switch to an unprivileged user that
    # cannot read a private temporary directory; stay root for the benchmark.
    return "user root;\n" if os.geteuid() == 0 else ""


class Backends:
    def __init__(self, workdir: Path) -> None:
        self._workdir = workdir
        self._procs: dict[str, Proc] = {}
        self.ports: dict[str, int] = {}

    def missing(self, kind: str) -> Optional[str]:
        binary = BACKEND_BINARIES[kind]
        if binary and shutil.which(binary) is None:
            return binary
        return None

    def port(self, kind: str) -> int:
        """The backend's port, starting it first if it is not running."""
        proc = self._procs.get(kind)
        if proc is None or proc.popen.poll() is not None:
            self._start(kind)
        return self.ports[kind]

    def restart(self, kind: str) -> None:
        proc = self._procs.pop(kind, None)
        if proc is not None:
            proc.stop()
        self._start(kind)

    def stop_all(self) -> None:
        for proc in self._procs.values():
            proc.stop()
        self._procs.clear()

    def _start(self, kind: str) -> None:
        port = free_port()
        log = self._workdir / f"backend-{kind}-{port}.log"
        if kind == "iperf3":
            argv = ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)]
        elif kind == "redis":
            argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                    "--save", "", "--appendonly", "no", "--protected-mode", "no",
                    "--maxclients", "10000", "--loglevel", "warning",
                    "--dir", str(self._workdir)]
        elif kind == "http":
            argv = self._nginx_http_argv(port)
        elif kind == "echo":
            argv = [sys.executable, str(HERE / "echo_server.py"), str(port)]
        else:
            raise BenchError(f"unknown backend {kind}")
        proc = Proc(f"{kind} backend", pinned(LOAD_CPU, argv), log)
        try:
            proc.wait_listening([port])
        except BenchError:
            proc.stop()
            raise
        self._procs[kind] = proc
        self.ports[kind] = port

    def _nginx_http_argv(self, port: int) -> list[str]:
        prefix = self._workdir / f"nginx-http-{port}"
        (prefix / "www").mkdir(parents=True)
        (prefix / "tmp").mkdir()
        (prefix / "www" / TINY_FILE).write_text("ok\n")
        for path in (self._workdir, prefix, prefix / "www"):
            path.chmod(0o755)
        conf = prefix / "nginx.conf"
        conf.write_text(NGINX_HTTP_CONF.format(user=nginx_user_line(), prefix=prefix, port=port))
        return ["nginx", "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"]
