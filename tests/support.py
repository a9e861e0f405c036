"""Test helpers: local backends, a proxy subprocess, polling for conditions.

Everything binds to 127.0.0.1 with port 0 (or ports freshly taken from the
kernel's ephemeral range), so tests can run in parallel.  Nothing here
sleeps for a fixed time: ``wait_until`` polls a condition with a deadline.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = REPO / "rawproxy.py"
HOST = "127.0.0.1"
IO_TIMEOUT_S = 15.0
# The weight that makes a target the first pick of weighted random choice
# against weight-1 targets bar one time in a million (at 1000 one CI run in a
# few hundred lost the draw).
FIRST_PICK = 1_000_000


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0,
               interval_s: float = 0.005, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {message}")
        time.sleep(interval_s)


def pid_running(pid: int) -> bool:
    """``pid`` exists and is not a zombie (Linux: reads /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def free_ports(count: int) -> list[int]:
    """Ports the kernel just handed out, released for the caller to bind."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((HOST, 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def stable_port_candidates(low: int) -> list[int]:
    """The upper half of the 16384 ports below ``low``; the probe's local mode
    takes the lower half (probe.ports), so a probe run never takes a port a
    test is about to bind again."""
    start = max(1024, low - 16384)
    return list(range(start + (low - start) // 2, low))


def stable_ports(count: int) -> list[int]:
    """Free ports below the kernel's ephemeral range.

    For a listener that is stopped and started again on the same port (a
    backend killed by a test): a port from the ephemeral range may be taken
    meanwhile as the source port of some outgoing connection, and then it
    cannot be bound again.  Ports below the range are never handed out so.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            low = int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    candidates = stable_port_candidates(low)
    random.shuffle(candidates)
    chosen: list[int] = []
    for port in candidates:
        probe = socket.socket()
        try:
            probe.bind((HOST, port))
        except OSError:
            continue
        finally:
            probe.close()
        chosen.append(port)
        if len(chosen) == count:
            return chosen
    raise RuntimeError("no free port below the ephemeral range")


def dead_port() -> int:
    """A loopback port with nothing listening: connects are refused."""
    return free_ports(1)[0]


def connect(port: int, timeout_s: float = IO_TIMEOUT_S) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, nbytes: int) -> bytes:
    chunks: list[bytes] = []
    remaining = nbytes
    while remaining:
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def recv_until_eof(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


class Backend:
    """A threaded TCP server on 127.0.0.1:0 with a pluggable behaviour.

    Modes: ``echo`` echoes until EOF then closes; ``name`` sends its name and a
    newline first, then echoes; ``sink`` accepts and never reads;
    ``collect`` reads until EOF, remembers the bytes, then replies with
    ``reply`` and closes.  ``accepted`` counts connections.
    """

    def __init__(self, mode: str = "echo", name: str = "", reply: bytes = b"",
                 backlog: int = 128) -> None:
        self.mode = mode
        self.name = name
        self.reply = reply
        self.accepted = 0
        self.received: list[bytes] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._sock = socket.socket()
        self._sock.bind((HOST, 0))
        self._sock.listen(backlog)
        self.port: int = self._sock.getsockname()[1]
        self.address = f"{HOST}:{self.port}"
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self.accepted += 1
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(60)
            if self.mode == "sink":
                return
            if self.mode == "name":
                conn.sendall(self.name.encode() + b"\n")
            if self.mode == "collect":
                data = recv_until_eof(conn)
                with self._lock:
                    self.received.append(data)
                conn.sendall(self.reply)
                return
            while True:
                data = conn.recv(1 << 18)
                if not data:
                    return
                conn.sendall(data)
        except OSError as exc:
            with self._lock:
                self.errors.append(exc)
        finally:
            if self.mode != "sink":
                conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = list(self._conns)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        for conn in conns:
            try:
                conn.close()
            except OSError:
                pass
        self._thread.join(5)


class Blackhole:
    """A listener whose accept queue is full: further connects hang (SYN dropped)."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind((HOST, 0))
        self.listener.listen(0)
        self.port: int = self.listener.getsockname()[1]
        self.fillers: list[socket.socket] = []
        while True:
            sock = socket.socket()
            sock.setblocking(False)
            self.fillers.append(sock)
            sock.connect_ex((HOST, self.port))
            _, writable, _ = select.select([], [sock], [], 0.3)
            if not writable:
                return  # this connect hangs: the queue is full, SYNs are dropped
            if len(self.fillers) > 16:
                raise RuntimeError("accept queue never filled")

    def close(self) -> None:
        for sock in self.fillers:
            sock.close()
        self.listener.close()


class ProxyProcess:
    """``python3 rawproxy.py`` in a subprocess, its stderr collected."""

    def __init__(self, argv: Sequence[str], config_path: Path,
                 preexec_fn: Optional[Callable[[], None]] = None) -> None:
        self.config_path = config_path
        self.proc = subprocess.Popen(
            list(argv), cwd=str(REPO), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=preexec_fn)
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for_line(self, pattern: str, timeout_s: float = 10.0) -> str:
        """The first stderr line matching ``pattern`` (a regex)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for line in self.lines:
                    if regex.search(line):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"no stderr line matching {pattern!r}; got:\n" + "\n".join(self.lines))
                self._cond.wait(min(remaining, 0.1))

    def count_lines(self, pattern: str) -> int:
        regex = re.compile(pattern)
        with self._cond:
            return sum(1 for line in self.lines if regex.search(line))

    def wait_ready(self, timeout_s: float = 10.0) -> bool:
        """True once listening; False if it exited first (e.g. a bind race)."""
        try:
            self.wait_for_line(r"rawproxy\.server\b.*\bready: ", timeout_s)
            return True
        except AssertionError:
            if self.proc.poll() is not None:
                return False
            raise

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signum)

    def wait(self, timeout_s: float = 10.0) -> int:
        code = self.proc.wait(timeout_s)
        self._reader.join(timeout_s)
        return code

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it does not exit; returns the exit code."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        code = self.proc.wait(5)
        self._reader.join(5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return code


def proxy_argv(config_path: Path, *extra: str, wrapper: Sequence[str] = (),
               launcher: Path = LAUNCHER) -> list[str]:
    return [*wrapper, sys.executable, str(launcher), "--config", str(config_path),
            "--listen-host", HOST, *extra]


def write_config(path: Path, apps: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Write a config; an app whose ``Ports`` is an int gets that many fresh ports."""
    wanted = sum(a["Ports"] for a in apps if isinstance(a.get("Ports"), int))
    fresh: Iterator[int] = iter(free_ports(wanted))
    out = []
    ports: dict[str, list[int]] = {}
    for app in apps:
        app = dict(app)
        if isinstance(app.get("Ports"), int):
            app["Ports"] = [next(fresh) for _ in range(app["Ports"])]
        ports[app["Name"]] = list(app["Ports"])
        out.append(app)
    path.write_text(json.dumps({"Apps": out}, indent=2))
    return ports


class ProxyFactory:
    """Starts proxies on fresh ports and stops every one at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self._tmp_path = tmp_path
        self._started: list[ProxyProcess] = []
        self._count = 0
        self.default_args: list[str] = []  # added to every proxy this factory starts

    def start(self, apps: list[dict[str, Any]], *extra: str,
              wrapper: Sequence[str] = (), launcher: Path = LAUNCHER,
              preexec_fn: Optional[Callable[[], None]] = None
              ) -> tuple[ProxyProcess, dict[str, list[int]]]:
        for _attempt in range(5):
            self._count += 1
            path = self._tmp_path / f"config-{self._count}.json"
            ports = write_config(path, apps)
            proxy = ProxyProcess(proxy_argv(path, "--log-level", "debug", *self.default_args,
                                            *extra, wrapper=wrapper, launcher=launcher),
                                 path, preexec_fn=preexec_fn)
            self._started.append(proxy)
            if proxy.wait_ready():
                return proxy, ports
            # Another test took one of the fresh ports in the meantime: retry.
            if not any("Address already in use" in line for line in proxy.lines):
                raise AssertionError("proxy exited:\n" + "\n".join(proxy.lines))
        raise AssertionError("could not find free ports for the proxy")

    def close(self) -> None:
        for proxy in self._started:
            proxy.stop()


def admin_get(port: int, path: str, token: Optional[str] = None) -> tuple[int, str]:
    """GET ``path`` from an admin endpoint on loopback: (status, body)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=IO_TIMEOUT_S)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def admin_body(port: int, path: str) -> str:
    """The body of a GET that must answer 200."""
    status, body = admin_get(port, path)
    assert status == 200, (path, status, body)
    return body


def run_cli(*args: str, cwd: Optional[Path] = None,
            timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(LAUNCHER), *args], cwd=str(cwd or REPO),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout_s)


class SelectorEcho:
    """An echo server for thousands of connections on one thread (selectors)."""

    def __init__(self) -> None:
        import selectors
        self._selectors = selectors
        self._sel = selectors.DefaultSelector()
        self._sock = socket.socket()
        self._sock.bind((HOST, 0))
        self._sock.listen(4096)
        self._sock.setblocking(False)
        self.port: int = self._sock.getsockname()[1]
        self.address = f"{HOST}:{self.port}"
        self.accepted = 0
        self._pending: dict[socket.socket, bytearray] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel.register(self._sock, selectors.EVENT_READ)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        read, write = self._selectors.EVENT_READ, self._selectors.EVENT_WRITE
        while not self._stop:
            for key, events in self._sel.select(1.0):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._wake_r:
                    continue
                if sock is self._sock:
                    for _ in range(256):
                        try:
                            conn, _ = self._sock.accept()
                        except BlockingIOError:
                            break
                        conn.setblocking(False)
                        self.accepted += 1
                        self._pending[conn] = bytearray()
                        self._sel.register(conn, read)
                    continue
                pending = self._pending[sock]
                try:
                    if events & read:
                        data = sock.recv(65536)
                        if not data:
                            self._drop(sock)
                            continue
                        pending += data
                    if pending:
                        sent = sock.send(pending)
                        del pending[:sent]
                except OSError:
                    self._drop(sock)
                    continue
                self._sel.modify(sock, write if pending else read)

    def _drop(self, sock: socket.socket) -> None:
        self._sel.unregister(sock)
        del self._pending[sock]
        sock.close()

    @property
    def open_connections(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        self._stop = True
        self._wake_w.send(b"x")
        self._thread.join(5)
        for sock in list(self._pending):
            sock.close()
        self._sel.close()
        self._sock.close()
        self._wake_r.close()
        self._wake_w.close()


# A standalone echo server for tests that SIGKILL their backend.
ECHO_SCRIPT = """
import socket, sys, threading
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen(128)
print("listening", flush=True)
def serve(conn):
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(data)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


def start_echo_process(port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", ECHO_SCRIPT, str(port)],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "listening":
        proc.kill()
        proc.wait(5)
        raise AssertionError("echo process did not start")
    return proc
