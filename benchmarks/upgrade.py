"""An upgrade in place against a restart, under churn (``make bench-upgrade``).

``python -m benchmarks.upgrade [--seconds S] [--clients N] [--concurrency C]``
runs the same churn load three times, each against a fresh rawproxy:

* **baseline** -- nothing happens;
* **upgrade** -- SIGUSR2 at time T: the proxy starts itself again, hands
  over its sockets and drains (SPEC 12);
* **restart** -- SIGTERM at T, then, once that process has exited, the same
  command again: what ``systemctl restart`` does.

The load is ``N`` client processes with ``C`` connections in flight each
(wrk's model): connect, 8 bytes there and back, close, at once again.  The
proxy runs on CPU 0, the clients and the echo backend on CPU 1.  For the
two seconds from T - 0.5 s to T + 1.5 s it reports the connections started
and completed a second, how many were refused, reset (or cut before their
echo) or timed out, and the p50/p99 of the connect and of connect-to-echo;
over the whole run, how many failed and the time from the first failure to
the last (the outage).  A refused connect is retried at once, as wrk does,
so an outage shows as thousands of refusals.  The harness plays
systemd: it hears ``READY=1`` and the new ``MAINPID=`` on a notify socket,
and is the child subreaper the upgraded process ends up under, so it can
stop and reap it.  Results go to ``benchmarks/results/upgrade.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.procs import (LOAD_CPU, PROXY_CPU, BenchError, Proc, free_port,  # noqa: E402
                              pinned, raise_nofile)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "upgrade.json"
HOST = "127.0.0.1"
PAYLOAD = b"churn123"
IO_TIMEOUT_S = 5.0
WINDOW_BEFORE_S = 0.5
WINDOW_AFTER_S = 1.5
KINDS = ("baseline", "upgrade", "restart")
# (monotonic start, outcome, connect s or -1, connect-to-echo s or -1)
Event = tuple[float, str, float, float]


# -- the churn client (one per process, run with --churn-client) ------------------------------

class _Conn:
    __slots__ = ("sock", "started", "connected", "got")

    def __init__(self, sock: socket.socket, started: float) -> None:
        self.sock = sock
        self.started = started
        self.connected = -1.0
        self.got = b""


def _outcome(err: int) -> str:
    if err == errno.ECONNREFUSED:
        return "refused"
    if err in (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED):
        return "reset"
    return errno.errorcode.get(err, str(err)).lower()


def churn(port: int, until: float, concurrency: int) -> list[Event]:
    """Connections to ``port`` until the monotonic time ``until``, ``concurrency``
    at a time; every one's outcome and timings."""
    sel = selectors.DefaultSelector()
    events: list[Event] = []
    conns: dict[int, _Conn] = {}

    def finish(conn: _Conn, outcome: str) -> None:
        now = time.monotonic()
        events.append((conn.started, outcome,
                       conn.connected - conn.started if conn.connected >= 0 else -1.0,
                       now - conn.started if outcome == "ok" else -1.0))
        if conn.sock.fileno() in conns:
            sel.unregister(conn.sock)
            del conns[conn.sock.fileno()]
        conn.sock.close()

    while True:
        now = time.monotonic()
        while now < until and len(conns) < concurrency:
            _open(port, sel, conns, finish)
        if not conns:
            break
        for key, _ in sel.select(0.05):
            _step(conns[key.fd], sel, finish)
        for conn in [c for c in conns.values() if now - c.started > IO_TIMEOUT_S]:
            finish(conn, "timeout")
    sel.close()
    return events


def _open(port: int, sel: selectors.BaseSelector, conns: dict[int, _Conn],
          finish: Any) -> None:
    sock = socket.socket()
    sock.setblocking(False)
    conn = _Conn(sock, time.monotonic())
    err = sock.connect_ex((HOST, port))
    if err not in (0, errno.EINPROGRESS):
        finish(conn, _outcome(err))
        return
    conns[sock.fileno()] = conn
    sel.register(sock, selectors.EVENT_WRITE)


def _step(conn: _Conn, sel: selectors.BaseSelector, finish: Any) -> None:
    sock = conn.sock
    try:
        if conn.connected < 0:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                finish(conn, _outcome(err))
                return
            conn.connected = time.monotonic()
            sock.send(PAYLOAD)
            sel.modify(sock, selectors.EVENT_READ)
            return
        data = sock.recv(64)
    except OSError as exc:
        finish(conn, _outcome(exc.errno or 0))
        return
    if not data:
        finish(conn, "reset")  # cut before its echo: as bad as a reset to a client
        return
    conn.got += data
    if len(conn.got) >= len(PAYLOAD):
        finish(conn, "ok")


# -- the harness --------------------------------------------------------------------------

def percentile(values: Sequence[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def summarize(events: Sequence[Event], at: float) -> dict[str, float]:
    """The window from ``at - 0.5 s`` to ``at + 1.5 s``: counts and latencies (ms)."""
    window = [e for e in events if at - WINDOW_BEFORE_S <= e[0] < at + WINDOW_AFTER_S]
    outcomes = [e[1] for e in window]
    connects = [e[2] * 1000 for e in window if e[2] >= 0]
    echoes = [e[3] * 1000 for e in window if e[3] >= 0]
    failed = [e[0] for e in events if e[1] != "ok"]
    return {
        "started": len(window),
        "ok": outcomes.count("ok"),
        "ok_per_s": outcomes.count("ok") / (WINDOW_BEFORE_S + WINDOW_AFTER_S),
        "refused": outcomes.count("refused"),
        "reset": outcomes.count("reset"),
        "timeout": outcomes.count("timeout"),
        "other": sum(o not in ("ok", "refused", "reset", "timeout") for o in outcomes),
        "connect_p50_ms": percentile(connects, 0.50),
        "connect_p99_ms": percentile(connects, 0.99),
        "echo_p50_ms": percentile(echoes, 0.50),
        "echo_p99_ms": percentile(echoes, 0.99),
        "echo_max_ms": max(echoes, default=float("nan")),
        # The whole run, not the window: how many failed, from the first to the last.
        "run_failures": len(failed),
        "outage_ms": (max(failed) - min(failed)) * 1000 if failed else 0.0,
    }


class Notify:
    """The harness's stand-in for systemd's notify socket."""

    def __init__(self) -> None:
        self.name = f"rawproxy-bench-{os.getpid()}-{time.monotonic_ns()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)

    def wait_for(self, prefix: str, timeout_s: float = 30.0) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                fields = self.sock.recv(4096).decode().split("\n")
            except socket.timeout:
                raise BenchError(f"no {prefix} from rawproxy in {timeout_s:.0f} s") from None
            for field in fields:
                if field.startswith(prefix):
                    return field[len(prefix):]

    def close(self) -> None:
        self.sock.close()


def become_subreaper() -> bool:
    """The upgraded proxy is re-parented here when the old one exits."""
    try:
        return bool(ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def stop_pid(pid: int, timeout_s: float = 30.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not ours to reap (no subreaper): poll /proc
            done = pid if not Path(f"/proc/{pid}").exists() else 0
        if done:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


class Scenario:
    def __init__(self, kind: str, workdir: Path, args: argparse.Namespace) -> None:
        self.kind = kind
        self.args = args
        self.workdir = workdir
        self.backend_port = free_port()
        self.port = free_port()
        config = workdir / f"{kind}.json"
        config.write_text(json.dumps({"Apps": [{"Name": "bench", "Ports": [self.port],
                                                "Targets": [f"{HOST}:{self.backend_port}"]}]}))
        self.argv = [sys.executable, str(ROOT / "rawproxy.py"), "--config", str(config),
                     "--listen-host", HOST, "--log-level", "warning",
                     *(["--workers", str(args.workers)] if args.workers > 1 else [])]
        self.notify = Notify()
        self.log = open(workdir / f"{kind}.log", "ab")

    def start_proxy(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(pinned(PROXY_CPU, self.argv), stdin=subprocess.DEVNULL,
                                stdout=self.log, stderr=self.log,
                                env={**os.environ, "NOTIFY_SOCKET": "@" + self.notify.name})
        try:
            self.notify.wait_for("READY=1")
        except BenchError as exc:
            proc.kill()
            proc.wait(10)
            self.log.flush()
            tail = (self.workdir / f"{self.kind}.log").read_text(errors="replace")[-600:]
            raise BenchError(f"{exc}; exit status {proc.returncode}; log: {tail}") from None
        return proc

    def run(self) -> dict[str, float]:
        backend = Proc("echo", pinned(LOAD_CPU, [sys.executable,
                                                 str(ROOT / "benchmarks" / "echo_server.py"),
                                                 str(self.backend_port)]),
                       self.workdir / f"{self.kind}-echo.log")
        try:
            backend.wait_listening([self.backend_port])
            return self._measure()
        finally:
            backend.stop()
            self.notify.close()
            self.log.close()

    def _measure(self) -> dict[str, float]:
        proxy = self.start_proxy()
        main_pid = proxy.pid
        start = time.monotonic()
        at, until = start + self.args.seconds / 2, start + self.args.seconds
        clients = [subprocess.Popen(
            pinned(LOAD_CPU, [sys.executable, "-m", "benchmarks.upgrade", "--churn-client",
                              str(self.port), repr(until), str(self.args.concurrency)]),
            cwd=str(ROOT), stdout=subprocess.PIPE) for _ in range(self.args.clients)]
        try:
            time.sleep(max(0.0, at - time.monotonic()))  # the load runs meanwhile
            main_pid, proxy = self._act(proxy, main_pid)
            events: list[Event] = []
            for client in clients:
                out, _ = client.communicate(timeout=self.args.seconds + 60)
                events.extend((float(started), str(outcome), float(connect_s), float(echo_s))
                              for started, outcome, connect_s, echo_s in json.loads(out))
        finally:
            for client in clients:
                if client.poll() is None:
                    client.kill()
            stop_pid(main_pid)
            proxy.wait(30)
        return summarize(events, at)

    def _act(self, proxy: subprocess.Popen[bytes], main_pid: int
             ) -> tuple[int, subprocess.Popen[bytes]]:
        if self.kind == "upgrade":
            os.kill(main_pid, signal.SIGUSR2)
            return int(self.notify.wait_for("MAINPID=")), proxy
        if self.kind == "restart":
            proxy.send_signal(signal.SIGTERM)
            proxy.wait(60)
            proxy = self.start_proxy()
            return proxy.pid, proxy
        return main_pid, proxy


def render(results: dict[str, dict[str, float]]) -> str:
    columns = [("started", "{:.0f}"), ("ok_per_s", "{:.0f}"), ("refused", "{:.0f}"),
               ("reset", "{:.0f}"), ("timeout", "{:.0f}"), ("connect_p50_ms", "{:.2f}"),
               ("connect_p99_ms", "{:.2f}"), ("echo_p50_ms", "{:.1f}"), ("echo_p99_ms", "{:.1f}"),
               ("run_failures", "{:.0f}"), ("outage_ms", "{:.0f}")]
    lines = ["| run | " + " | ".join(name for name, _ in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for kind, row in results.items():
        lines.append(f"| {kind} | " + " | ".join(fmt.format(row[name])
                                                   for name, fmt in columns) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.upgrade", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="each run (default 8)")
    parser.add_argument("--clients", type=int, default=2, help="client processes (default 2)")
    parser.add_argument("--concurrency", type=int, default=25,
                        help="connections in flight per client (default 25)")
    parser.add_argument("--workers", type=int, default=1, help="rawproxy --workers (default 1)")
    parser.add_argument("--churn-client", nargs=3, metavar=("PORT", "UNTIL", "CONCURRENCY"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    raise_nofile()
    if args.churn_client:
        port, until, concurrency = args.churn_client
        print(json.dumps(churn(int(port), float(until), int(concurrency))))
        return 0
    if not become_subreaper():
        print("note: not a subreaper here; the upgraded proxy is stopped by its PID only")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="rawproxy-upgrade-") as workdir:
        for kind in KINDS:
            results[kind] = Scenario(kind, Path(workdir), args).run()
            print(f"{kind}: {json.dumps(results[kind])}", flush=True)
    print(render(results))
    RESULTS.write_text(json.dumps({"args": {k: v for k, v in vars(args).items()
                                            if k != "churn_client"},
                                   "results": results}, indent=2) + "\n")
    print(f"written to {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
