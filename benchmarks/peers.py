"""The peers: what sits between client and backend in each row of the table.

Each proxy peer is started fresh for every measurement (one port in, one
backend out), pinned to CPU 0, from a config generated into the run's
temporary directory, and stopped with SIGTERM afterwards:

* ``direct`` -- no proxy; the client talks to the backend (the ceiling);
* ``rawproxy`` -- this project, ``--log-level warning`` (at ``info`` it
  writes one access-log line per connection, which costs churn throughput);
* ``haproxy`` -- ``mode tcp``, ``nbthread 1``;
* ``nginx`` -- ``stream`` module, one worker, ``proxy_half_close on`` (off
  by default: nginx would then end both directions at the client's FIN and
  lose the tail of the echo, failing integrity);
* ``asyncio`` / ``uvloop`` -- :mod:`benchmarks.asyncio_proxy`;
* ``threads`` -- :mod:`benchmarks.thread_proxy`, two threads per connection
  (the design rawproxy rejected; in the table to measure why);
* ``rawproxy-w2`` -- rawproxy ``--workers 2`` on both cores (not run by
  default; only where rawproxy has ``--workers``);
* ``rawproxy-copy`` -- rawproxy ``--no-splice``: bytes through Python's
  ``recv_into``/``send``, the path on Python 3.9 and off Linux (not run by
  default);
* ``rawproxy-info`` -- rawproxy at ``--log-level info``, one access-log line
  per connection: next to ``rawproxy`` in one run, it prices that line (not
  run by default);
* ``rawproxy-base`` -- rawproxy from another checkout, the directory named
  by ``RAWPROXY_BASE`` (``git worktree add /tmp/base COMMIT``), with the same
  options as ``rawproxy``: before and after a change, interleaved round by
  round in one run (not run by default);
* ``floor`` -- :mod:`benchmarks.floor_proxy`, rawproxy's design and system
  calls with every feature taken out: next to ``rawproxy`` and ``haproxy``
  in one run, it splits the gap into CPython's share and the features'
  (not run by default; Linux, Python 3.10+).

``unavailable()`` says why a peer cannot run here (its binary is missing),
so the harness skips it with a note instead of failing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from .backends import nginx_user_line
from .procs import PROXY_CPU, Proc, pinned

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")

HAPROXY_CONF = """\
global
    nbthread 1
    maxconn {maxconn}
defaults
    mode tcp
    timeout connect 5s
    timeout client 5m
    timeout server 5m
frontend bench
    bind 127.0.0.1:{port}
    default_backend bench
backend bench
    server target 127.0.0.1:{target}
"""

NGINX_STREAM_CONF = """\
{load_module}{user}worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
worker_rlimit_nofile {nofile};
events {{ worker_connections {connections}; }}
stream {{
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        proxy_pass 127.0.0.1:{target};
        proxy_half_close on;
    }}
}}
"""


class PeerContext:
    """What every peer start needs: where to write, limits, extra options."""

    def __init__(self, workdir: Path, nofile: int, rawproxy_args: Sequence[str]) -> None:
        self.workdir = workdir
        self.nofile = nofile
        self.rawproxy_args = list(rawproxy_args)


StartFn = Callable[[PeerContext, int, int], list[str]]


class Peer:
    """A named way to put a proxy between port ``listen`` and ``target``."""

    def __init__(self, name: str, start_argv: Optional[StartFn],
                 check: Callable[[], Optional[str]], cpus: str = str(PROXY_CPU),
                 default: bool = True) -> None:
        self.name = name
        self._start_argv = start_argv
        self._check = check
        self.cpus = cpus
        self.default = default

    @property
    def is_direct(self) -> bool:
        return self._start_argv is None

    def unavailable(self) -> Optional[str]:
        return self._check()

    def start(self, ctx: PeerContext, listen_port: int, target_port: int) -> Optional[Proc]:
        """The running proxy (listening), or None for ``direct``."""
        if self._start_argv is None:
            return None
        argv = self._start_argv(ctx, listen_port, target_port)
        log = ctx.workdir / f"{self.name}-{listen_port}.log"
        proc = Proc(self.name, pinned(self.cpus, argv), log, cwd=ROOT)
        try:
            proc.wait_listening([listen_port])
        except Exception:
            proc.stop()
            raise
        return proc


def _needs(binary: str) -> Callable[[], Optional[str]]:
    def check() -> Optional[str]:
        return None if shutil.which(binary) else f"{binary} not installed"
    return check


def _always() -> Optional[str]:
    return None


def _rawproxy_argv(ctx: PeerContext, port: int, target: int,
                   extra: Sequence[str] = (), tree: Path = ROOT) -> list[str]:
    config = ctx.workdir / f"rawproxy-{port}.json"
    config.write_text(json.dumps({"Apps": [{"Name": "bench", "Ports": [port],
                                            "Targets": [f"127.0.0.1:{target}"]}]}))
    return [sys.executable, str(tree / "rawproxy.py"), "--config", str(config),
            "--listen-host", "127.0.0.1", "--log-level", "warning",
            "--drain-timeout", "2", *ctx.rawproxy_args, *extra]


def _rawproxy_w2_argv(ctx: PeerContext, port: int, target: int) -> list[str]:
    return _rawproxy_argv(ctx, port, target, ("--workers", "2"))


def _rawproxy_copy_argv(ctx: PeerContext, port: int, target: int) -> list[str]:
    return _rawproxy_argv(ctx, port, target, ("--no-splice",))


def _rawproxy_base_argv(ctx: PeerContext, port: int, target: int) -> list[str]:
    return _rawproxy_argv(ctx, port, target, tree=Path(os.environ["RAWPROXY_BASE"]))


def _rawproxy_base_check() -> Optional[str]:
    base = os.environ.get("RAWPROXY_BASE", "")
    if not base:
        return "RAWPROXY_BASE names no checkout to compare with"
    return None if (Path(base) / "rawproxy.py").is_file() else f"no rawproxy.py in {base}"


def _rawproxy_info_argv(ctx: PeerContext, port: int, target: int) -> list[str]:
    return _rawproxy_argv(ctx, port, target, ("--log-level", "info"))


def _rawproxy_has_workers() -> Optional[str]:
    help_text = subprocess.run([sys.executable, str(ROOT / "rawproxy.py"), "--help"],
                               capture_output=True, text=True, check=False).stdout
    return None if "--workers" in help_text else "rawproxy has no --workers option yet"


def _haproxy_argv(ctx: PeerContext, port: int, target: int) -> list[str]:
    # Each proxied connection takes two descriptors; leave room for the rest.
    maxconn = max(100, (ctx.nofile - 64) // 2)
    config = ctx.workdir / f"haproxy-{port}.cfg"
    config.write_text(HAPROXY_CONF.format(maxconn=maxconn, port=port, target=target))
    return ["haproxy", "-db", "-f", str(config)]


def _nginx_stream_check() -> Optional[str]:
    if shutil.which("nginx") is None:
        return "nginx not installed"
    built = subprocess.run(["nginx", "-V"], capture_output=True, text=True, check=False).stderr
    if "--with-stream=dynamic" in built and not NGINX_STREAM_MODULE.exists():
        return f"nginx stream module missing ({NGINX_STREAM_MODULE}; apt: libnginx-mod-stream)"
    if "--with-stream" not in built:
        return "nginx built without the stream module"
    return None


def _nginx_argv(ctx: PeerContext, port: int, target: int) -> list[str]:
    prefix = ctx.workdir / f"nginx-stream-{port}"
    prefix.mkdir(parents=True)
    load = (f"load_module {NGINX_STREAM_MODULE};\n" if NGINX_STREAM_MODULE.exists() else "")
    config = prefix / "nginx.conf"
    config.write_text(NGINX_STREAM_CONF.format(
        load_module=load, user=nginx_user_line(), prefix=prefix, port=port, target=target,
        nofile=ctx.nofile, connections=max(100, ctx.nofile - 64)))
    return ["nginx", "-p", str(prefix), "-c", str(config), "-g", "daemon off;"]


def _asyncio_argv(ctx: PeerContext, port: int, target: int) -> list[str]:
    return [sys.executable, str(HERE / "asyncio_proxy.py"),
            "--listen", f"127.0.0.1:{port}", "--target", f"127.0.0.1:{target}"]


def _uvloop_argv(ctx: PeerContext, port: int, target: int) -> list[str]:
    return _asyncio_argv(ctx, port, target) + ["--uvloop"]


def _threads_argv(ctx: PeerContext, port: int, target: int) -> list[str]:
    return [sys.executable, str(HERE / "thread_proxy.py"),
            "--listen", f"127.0.0.1:{port}", "--target", f"127.0.0.1:{target}"]


def _floor_argv(ctx: PeerContext, port: int, target: int) -> list[str]:
    return [sys.executable, str(HERE / "floor_proxy.py"),
            "--listen", f"127.0.0.1:{port}", "--target", f"127.0.0.1:{target}"]


def _floor_check() -> Optional[str]:
    return None if hasattr(os, "splice") else "floor needs os.splice (Linux, Python 3.10+)"


def _uvloop_check() -> Optional[str]:
    if importlib.util.find_spec("uvloop") is None:
        return f"uvloop not importable by {sys.executable} (pip install uvloop)"
    return None


PEERS: tuple[Peer, ...] = (
    Peer("direct", None, _always),
    Peer("rawproxy", _rawproxy_argv, _always),
    Peer("haproxy", _haproxy_argv, _needs("haproxy")),
    Peer("nginx", _nginx_argv, _nginx_stream_check),
    Peer("asyncio", _asyncio_argv, _always),
    Peer("uvloop", _uvloop_argv, _uvloop_check),
    Peer("threads", _threads_argv, _always),
    Peer("rawproxy-w2", _rawproxy_w2_argv, _rawproxy_has_workers, cpus="0,1", default=False),
    Peer("rawproxy-copy", _rawproxy_copy_argv, _always, default=False),
    Peer("rawproxy-info", _rawproxy_info_argv, _always, default=False),
    Peer("rawproxy-base", _rawproxy_base_argv, _rawproxy_base_check, default=False),
    Peer("floor", _floor_argv, _floor_check, default=False),
)
