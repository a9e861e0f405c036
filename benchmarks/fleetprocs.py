"""A fleet of ``rawproxy --etcd`` processes on one host, for ``make fleet``
and ``make bench-fleet``.

Instance ``i`` listens on its own loopback address (127.0.0.<10+i>: the
whole of 127/8 is loopback on Linux), so every instance serves the same
config's ports, as edges on separate hosts would; its admin endpoint is on
127.0.0.1 at a free port.  Each instance's stderr is read by a thread and
kept, so a log line (and its timestamp) can be looked up.  Instances are
stopped by PID.  Standard library only.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence, cast

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class Instance:
    """One ``rawproxy --etcd`` process."""

    def __init__(self, index: int, endpoints: str, *extra: str,
                 python: str = sys.executable) -> None:
        self.index = index
        self.endpoints = endpoints
        self.listen_host = f"127.0.0.{10 + index}"
        self.admin_port = free_port()
        argv = [python, str(REPO / "rawproxy.py"), "--etcd", endpoints,
                "--listen-host", self.listen_host, "--admin", f"{HOST}:{self.admin_port}",
                *extra]
        self.proc = subprocess.Popen(argv, cwd=str(REPO), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._lock:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def exited(self) -> bool:
        """True once the process is gone and all it said has been read."""
        if self.proc.poll() is None:
            return False
        self._reader.join(5)
        return True

    def find(self, pattern: str) -> Optional[str]:
        regex = re.compile(pattern)
        with self._lock:
            return next((line for line in self.lines if regex.search(line)), None)

    def logged_at(self, pattern: str) -> Optional[float]:
        """The wall-clock time (epoch seconds) of the first line matching ``pattern``."""
        line = self.find(pattern)
        match = _STAMP.match(line) if line else None
        if match is None:
            return None
        stamp = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
        return stamp.timestamp()

    def get(self, path: str, timeout_s: float = 5.0) -> bytes:
        conn = http.client.HTTPConnection(HOST, self.admin_port, timeout=timeout_s)
        try:
            conn.request("GET", path)
            return conn.getresponse().read()
        finally:
            conn.close()

    def revision(self) -> int:
        """The etcd revision served (-1 if the admin endpoint does not answer)."""
        try:
            return int(json.loads(self.get("/config", 2.0)).get("Revision", -1))
        except (OSError, ValueError, http.client.HTTPException):
            return -1

    def accepts(self, port: int) -> bool:
        try:
            with socket.create_connection((self.listen_host, port), timeout=1.0):
                return True
        except OSError:
            return False

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def poll_round(instances: Sequence[Instance], port: int, revision: int,
               timeout_s: float = 2.0) -> tuple[set[int], set[int]]:
    """One round over ``instances``, all at once: (indexes whose address
    accepts on ``port``, indexes whose /config is at ``revision`` or later).
    Non-blocking sockets under one selector, so a round costs about the
    slowest answer, not the sum of them."""
    selector = selectors.DefaultSelector()
    accepting: set[int] = set()
    current: set[int] = set()
    replies: dict[socket.socket, bytearray] = {}
    request = b"GET /config HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    for instance in instances:
        for address, kind in (((instance.listen_host, port), "port"),
                              ((HOST, instance.admin_port), "config")):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(address)
            selector.register(sock, selectors.EVENT_WRITE, (instance.index, kind))
    deadline = time.monotonic() + timeout_s
    try:
        while selector.get_map() and time.monotonic() < deadline:
            for key, _events in selector.select(max(0.0, deadline - time.monotonic())):
                sock = cast(socket.socket, key.fileobj)
                index, kind = key.data
                failed = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
                if kind == "port" or failed:
                    if kind == "port" and not failed:
                        accepting.add(index)
                    selector.unregister(sock)
                    sock.close()
                elif sock not in replies:
                    sock.sendall(request)
                    replies[sock] = bytearray()
                    selector.modify(sock, selectors.EVENT_READ, key.data)
                elif not _read_reply(sock, replies[sock]):
                    if _revision_of(bytes(replies[sock])) >= revision:
                        current.add(index)
                    selector.unregister(sock)
                    sock.close()
    finally:
        for key in list(selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        selector.close()
    return accepting, current


def _read_reply(sock: socket.socket, into: bytearray) -> bool:
    """Read what arrived; False at the end of the reply."""
    try:
        chunk = sock.recv(65536)
    except BlockingIOError:
        return True
    except OSError:
        return False
    into += chunk
    return bool(chunk)


def _revision_of(reply: bytes) -> int:
    _head, _sep, body = reply.partition(b"\r\n\r\n")
    try:
        return int(json.loads(body).get("Revision", -1))
    except (ValueError, AttributeError):
        return -1


def start_fleet(count: int, endpoints: str, *extra: str,
                timeout_s: float = 120.0) -> list[Instance]:
    """``count`` instances, returned once every one is serving.  Instance
    ``i`` gets the endpoints rotated by ``i``: a proxy watches the first
    one that answers, so the watches spread over the members."""
    urls = endpoints.split(",")
    instances = [Instance(i, ",".join(urls[i % len(urls):] + urls[:i % len(urls)]), *extra)
                 for i in range(count)]
    deadline = time.monotonic() + timeout_s
    try:
        for position, instance in enumerate(instances):
            for _attempt in range(3):
                if _wait_ready(instance, deadline):
                    break
                # Its free admin port was taken meanwhile: another one.
                instance.stop()
                instance = instances[position] = Instance(
                    instance.index, instance.endpoints, *extra)
            else:
                raise RuntimeError(f"instance {instance.index}: no free admin port")
    except BaseException:
        stop_fleet(instances)
        raise
    return instances


def _wait_ready(instance: Instance, deadline: float) -> bool:
    """True once serving; False if it exited because a port was taken."""
    while instance.find(r"rawproxy\.server\b.*\bready: ") is None:
        if instance.exited() and instance.find("already in use"):
            return False
        if instance.exited() or time.monotonic() > deadline:
            raise RuntimeError(f"instance {instance.index} did not start:\n"
                               + "\n".join(instance.lines[-10:]))
        time.sleep(0.05)
    return True


def stop_fleet(instances: Sequence[Instance]) -> None:
    for instance in instances:
        if instance.proc.poll() is None:
            os.kill(instance.proc.pid, signal.SIGTERM)
    for instance in instances:
        instance.stop()
