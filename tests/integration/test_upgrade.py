"""SIGUSR2 upgrades (SPEC 12): real processes on loopback, under load.

Each proxy runs below ``tests.integration.reaper``, a child subreaper: the
process an upgrade starts outlives its parent, and the reaper is where it
is re-parented, so its exit status can be read (``reaper: pid N exited C``)
and nothing outlives the test.  The load is a churn client (connect, 8
bytes each way, close, as fast as it can) and long-lived streams moving
seeded random bytes through an echo backend, checksummed both ways.  The
bar: nothing refused, nothing reset, every stream's bytes intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import pytest

from rawproxy.upgrade import READY_TIMEOUT_S
from tests.support import (HOST, IO_TIMEOUT_S, LAUNCHER, REPO, SelectorEcho, admin_get,
                           recv_exactly, recv_until_eof, stable_ports, wait_until, write_config)

REAPER = [sys.executable, "-m", "tests.integration.reaper", "--"]
# Slow start-ups on a loaded host: the upgrade itself allows READY_TIMEOUT_S.
START_TIMEOUT_S = 30.0
# Generous on a loaded host: a stall is not what these tests look for, and
# the drain must outlast the streams the old process still relays.
LOAD_IO_TIMEOUT_S = 60.0
DRAIN_TIMEOUT = ("--drain-timeout", "300")
LAUNCH_SCRIPT = f"""import sys
sys.path.insert(0, {str(REPO)!r})
from rawproxy.cli import main
raise SystemExit(main())
"""


class Proc:
    """A process whose stderr lines are kept, but for the access lines of
    connections that ended well (the churn would make them most of the
    lines); optional environment and inherited descriptors."""

    def __init__(self, argv: Sequence[str], env: Optional[dict[str, str]] = None,
                 pass_fds: Sequence[int] = ()) -> None:
        self.proc = subprocess.Popen(
            list(argv), cwd=str(REPO), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, pass_fds=tuple(pass_fds),
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            if " rawproxy.access: " not in line or "end=done" not in line:
                with self._lock:
                    self.lines.append(line)

    def count_lines(self, pattern: str) -> int:
        regex = re.compile(pattern)
        with self._lock:
            return sum(1 for line in self.lines if regex.search(line))

    def wait_for_count(self, pattern: str, count: int,
                       timeout_s: float = START_TIMEOUT_S) -> int:
        """How many lines match once ``count`` have (or the time is up):
        each worker logs for itself, and a late one's lines come later."""
        try:
            wait_until(lambda: self.count_lines(pattern) >= count, timeout_s,
                       interval_s=0.02, message=repr(pattern))
        except AssertionError:
            pass  # the caller's assertion shows what was counted
        return self.count_lines(pattern)

    def wait_for_line(self, pattern: str, timeout_s: float = START_TIMEOUT_S) -> str:
        regex = re.compile(pattern)
        found: list[str] = []

        def seen() -> bool:
            with self._lock:
                found.extend(line for line in self.lines if regex.search(line))
            return bool(found)

        try:
            wait_until(seen, timeout_s, interval_s=0.02, message=repr(pattern))
        except AssertionError:
            with self._lock:
                raise AssertionError(f"no line matching {pattern!r}; got:\n"
                                     + "\n".join(self.lines)) from None
        return found[0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(5)
        self._reader.join(5)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


class Tree:
    """rawproxy below the reaper: the PIDs in its stderr, and their exits."""

    def __init__(self, proc: Proc, config_path: Path, ports: dict[str, list[int]]) -> None:
        self.proc = proc
        self.config_path = config_path
        self.ports = ports
        line = proc.wait_for_line(r"reaper: pid \d+ started")
        self.first_pid = int(re.findall(r"pid (\d+) started", line)[0])

    @property
    def port(self) -> int:
        return self.ports["a"][0]

    def new_pid(self, nth: int = 1, timeout_s: float = START_TIMEOUT_S) -> int:
        """The pid of the ``nth`` process an upgrade made ready."""
        wait_until(lambda: self.proc.count_lines(r"upgrade: new process \d+ ready") >= nth,
                   timeout_s, interval_s=0.02, message="the new process to be ready")
        with self.proc._lock:
            lines = [line for line in self.proc.lines
                     if re.search(r"upgrade: new process \d+ ready", line)]
        return int(re.findall(r"new process (\d+) ready", lines[nth - 1])[0])

    def exit_code(self, pid: int, timeout_s: float = START_TIMEOUT_S) -> int:
        line = self.proc.wait_for_line(rf"reaper: pid {pid} exited -?\d+", timeout_s)
        return int(line.rsplit(" ", 1)[1])

    def stop(self, pid: int) -> int:
        os.kill(pid, signal.SIGTERM)
        return self.exit_code(pid)


@pytest.fixture
def trees() -> Iterator[list[Tree]]:
    started: list[Tree] = []
    yield started
    for tree in started:
        tree.proc.stop()  # SIGTERM to the reaper: whatever is left is killed


def start(trees: list[Tree], tmp_path: Path, targets: list[str], *extra: str,
          launcher: Optional[Path] = None, env: Optional[dict[str, str]] = None,
          settings: Optional[dict[str, object]] = None) -> Tree:
    """A proxy for app "a" (one fresh port) on ``targets``, below the reaper."""
    for attempt in range(5):
        path = tmp_path / f"config-{attempt}.json"
        ports = write_config(path, [{"Name": "a", "Ports": 1, "Targets": targets,
                                     **(settings or {})}])
        argv = [*REAPER, sys.executable, str(launcher or LAUNCHER), "--config", str(path),
                "--listen-host", HOST, *DRAIN_TIMEOUT, *extra]
        tree = Tree(Proc(argv, env), path, ports)
        trees.append(tree)
        ready = "supervising" if "--workers" in extra else r"rawproxy\.server\b.*\bready: "
        tree.proc.wait_for_line(f"{ready}|reaper: pid \\d+ exited")
        if tree.proc.count_lines(ready):
            return tree
        if not tree.proc.count_lines("Address already in use"):
            raise AssertionError("proxy exited:\n" + "\n".join(tree.proc.lines))
    raise AssertionError("could not find free ports for the proxy")


class Churn(threading.Thread):
    """Open, 8 bytes there and back, close: as fast as it can, every failure kept."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.done = 0
        self.failures: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            payload = b"%08d" % (self.done % 10**8)
            try:
                with socket.create_connection((HOST, self.port),
                                              timeout=LOAD_IO_TIMEOUT_S) as sock:
                    sock.sendall(payload)
                    echoed = recv_exactly(sock, len(payload))
            except ConnectionRefusedError:
                self.failures.append("refused")
                continue
            except ConnectionResetError:
                self.failures.append("reset")
                continue
            except OSError as exc:
                self.failures.append(repr(exc))
                continue
            if echoed != payload:
                self.failures.append(f"echo {echoed!r} for {payload!r}")
            else:
                self.done += 1

    def finish(self) -> list[str]:
        self.halt.set()
        self.join(LOAD_IO_TIMEOUT_S + 5)
        return self.failures


class Stream(threading.Thread):
    """One connection for the whole test: seeded random chunks out, the
    echo back, both sides hashed; at the end, FIN and the rest to EOF."""

    CHUNK_BYTES = 32 * 1024

    def __init__(self, port: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.rng = random.Random(seed)
        self.sent = hashlib.sha256()
        self.received = hashlib.sha256()
        self.sent_bytes = 0
        self.received_bytes = 0
        self.error: Optional[BaseException] = None
        self.connected = threading.Event()
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            with socket.create_connection((HOST, self.port),
                                          timeout=LOAD_IO_TIMEOUT_S) as sock:
                self.connected.set()
                while not self.halt.wait(0.01):  # paced: the churn must get the cores
                    chunk = self.rng.randbytes(self.CHUNK_BYTES)
                    sock.sendall(chunk)
                    self._took(chunk, recv_exactly(sock, len(chunk)))
                sock.shutdown(socket.SHUT_WR)
                self._took(b"", recv_until_eof(sock))
        except OSError as exc:
            self.error = exc

    def _took(self, sent: bytes, received: bytes) -> None:
        self.sent.update(sent)
        self.sent_bytes += len(sent)
        self.received.update(received)
        self.received_bytes += len(received)

    def finish(self) -> None:
        self.halt.set()
        self.join(LOAD_IO_TIMEOUT_S + 5)
        assert not self.is_alive()
        assert self.error is None, f"stream failed: {self.error!r}"
        assert self.sent_bytes > 0 and self.received_bytes == self.sent_bytes
        assert self.received.digest() == self.sent.digest()


class Load:
    def __init__(self, port: int, streams: int = 4) -> None:
        self.churn = Churn(port)
        self.streams = [Stream(port, seed) for seed in range(streams)]
        for thread in (self.churn, *self.streams):
            thread.start()
        for stream in self.streams:
            assert stream.connected.wait(IO_TIMEOUT_S)
        self.wait_for_churn(100)

    def wait_for_churn(self, more: int, timeout_s: float = LOAD_IO_TIMEOUT_S) -> None:
        target = self.churn.done + more
        wait_until(lambda: self.churn.done >= target or bool(self.churn.failures), timeout_s,
                   message=f"{more} more churned connections")

    def finish(self) -> None:
        for stream in self.streams:
            stream.finish()
        assert self.churn.finish() == []
        assert self.churn.done > 0



def unix_get(path: str, target: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(IO_TIMEOUT_S)
        sock.connect(path)
        sock.sendall(f"GET {target} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        return recv_until_eof(sock).decode()


def upgrade_under_load(tree: Tree, signal_pid: int) -> int:
    """SIGUSR2 mid-way through the load; the new pid, once the old one exited 0."""
    load = Load(tree.port)
    old_pid = signal_pid
    os.kill(old_pid, signal.SIGUSR2)
    new_pid = tree.new_pid()
    assert new_pid != old_pid
    load.wait_for_churn(100)  # the new one serves; the old one drains its streams
    for stream in load.streams:
        stream.finish()  # ... which end here, so it can exit
    assert tree.exit_code(old_pid) == 0
    load.wait_for_churn(100)  # the new one alone
    assert load.churn.finish() == []
    assert os.path.exists(f"/proc/{new_pid}")
    return new_pid


# -- the upgrade ---------------------------------------------------------------------------

def test_sigusr2_under_load_refuses_and_resets_nothing(trees: list[Tree],
                                                        tmp_path: Path) -> None:
    echo = SelectorEcho()
    admin_path = str(tmp_path / "admin.sock")
    try:
        tree = start(trees, tmp_path, [echo.address], "--admin", f"unix:{admin_path}")
        new_pid = upgrade_under_load(tree, tree.first_pid)
        # The admin socket was handed over too: its file is still there and
        # answered by the new process.
        assert "200 OK" in unix_get(admin_path, "/healthz")
        assert tree.proc.wait_for_count(r"hands over 2 sockets", 1) == 1
        assert tree.proc.wait_for_count(r"not binding", 2) == 2
        assert tree.stop(new_pid) == 0
        assert not os.path.exists(admin_path), "the last process removes its socket file"
    finally:
        echo.close()


def test_sigusr2_with_two_workers_hands_over_every_socket(trees: list[Tree],
                                                          tmp_path: Path) -> None:
    echo = SelectorEcho()
    (admin,) = stable_ports(1)
    try:
        tree = start(trees, tmp_path, [echo.address], "--workers", "2",
                     "--admin", f"{HOST}:{admin}")
        halt = threading.Event()
        admin_failures: list[str] = []

        def poll_admin() -> None:  # the admin port, handed over too, never refuses
            while not halt.is_set():
                try:
                    status, _ = admin_get(admin, "/healthz")
                    if status != 200:
                        admin_failures.append(f"status {status}")
                except OSError as exc:
                    admin_failures.append(repr(exc))
                halt.wait(0.02)

        poller = threading.Thread(target=poll_admin, daemon=True)
        poller.start()
        new_pid = upgrade_under_load(tree, tree.first_pid)
        halt.set()
        poller.join(IO_TIMEOUT_S + 5)
        assert admin_failures == []
        # Two workers' sockets (one port each) and the admin socket; each new
        # worker took one of the two, none bound its own.
        assert tree.proc.wait_for_count(r"hands over 3 sockets", 1) == 1
        assert tree.proc.wait_for_count(rf"port {tree.port}: serving the inherited", 2) == 2
        status, _ = admin_get(admin, "/metrics")
        assert status == 200
        assert tree.stop(new_pid) == 0
    finally:
        echo.close()


class Waiter(threading.Thread):
    """A client that sends a byte, waits for its echo, then holds on until
    ``release``: those the proxy does not take yet wait in its listen queue."""

    def __init__(self, port: int, release: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.release = release
        self.connected = threading.Event()
        self.echoed = threading.Event()
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            with socket.create_connection((HOST, self.port), timeout=60) as sock:
                self.connected.set()
                sock.sendall(b"x")
                if recv_exactly(sock, 1) != b"x":
                    raise ConnectionError("no echo")
                self.echoed.set()
                self.release.wait(60)
                sock.shutdown(socket.SHUT_WR)
                if recv_until_eof(sock) != b"":
                    raise ConnectionError("bytes after the echo")
        except OSError as exc:
            self.error = exc


@pytest.mark.parametrize("workers", [1, 2])
def test_clients_waiting_in_the_listen_queue_are_served_by_the_new_process(
        trees: list[Tree], tmp_path: Path, workers: int) -> None:
    # MaxConnections 1: each process (or worker) serves one client and the
    # others wait in the kernel's listen queue -- the queue of the very
    # socket the upgrade hands over.  Had the new process bound sockets of
    # its own, the old one would reset them when it closes its sockets.
    echo = SelectorEcho()
    release = threading.Event()
    try:
        tree = start(trees, tmp_path, [echo.address], *(["--workers", "2"] if workers > 1 else []),
                     settings={"MaxConnections": 1})
        waiters = [Waiter(tree.port, release) for _ in range(8)]
        for waiter in waiters:
            waiter.start()
            assert waiter.connected.wait(IO_TIMEOUT_S)
        wait_until(lambda: any(waiter.echoed.is_set() for waiter in waiters))
        queued = sum(not waiter.echoed.is_set() for waiter in waiters)
        assert queued >= 8 - 2 * workers
        os.kill(tree.first_pid, signal.SIGUSR2)
        new_pid = tree.new_pid()
        release.set()
        for waiter in waiters:
            waiter.join(90)
            assert waiter.error is None, f"{waiter.error!r}: " + "\n".join(tree.proc.lines)
            assert waiter.echoed.is_set()
        assert tree.exit_code(tree.first_pid) == 0
        assert tree.stop(new_pid) == 0
    finally:
        release.set()
        echo.close()


# -- a new version that fails --------------------------------------------------------------

def failed_upgrade_under_load(tree: Tree, expect: str, timeout_s: float = START_TIMEOUT_S,
                              during: Sequence[int] = ()) -> None:
    """SIGUSR2 to a new version that fails: ``expect`` in the old one's log,
    which serves on, nothing refused.  ``during``: signals sent meanwhile."""
    load = Load(tree.port)
    os.kill(tree.first_pid, signal.SIGUSR2)
    for signum in during:
        tree.proc.wait_for_line(r"upgrade: started .* as pid \d+", START_TIMEOUT_S)
        os.kill(tree.first_pid, signum)
    line = tree.proc.wait_for_line(r"upgrade failed: ", timeout_s)
    assert expect in line and "goes on serving" in line, line
    load.wait_for_churn(200)
    load.finish()
    assert os.path.exists(f"/proc/{tree.first_pid}")
    assert tree.proc.count_lines(r"upgrade: new process \d+ ready") == 0
    assert tree.stop(tree.first_pid) == 0


def test_an_invalid_config_on_disk_leaves_the_old_process_serving(trees: list[Tree],
                                                                  tmp_path: Path) -> None:
    echo = SelectorEcho()
    try:
        tree = start(trees, tmp_path, [echo.address])
        tree.config_path.write_text(json.dumps(
            {"Apps": [{"Name": "a", "Ports": [70000], "Targets": [echo.address]}]}))
        failed_upgrade_under_load(tree, "exit status 2")
        assert tree.proc.wait_for_count(r"rawproxy: error: .*70000", 1) == 1
    finally:
        echo.close()


def test_a_new_version_that_exits_at_once_leaves_the_old_process_serving(
        trees: list[Tree], tmp_path: Path) -> None:
    echo = SelectorEcho()
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCH_SCRIPT)
    try:
        tree = start(trees, tmp_path, [echo.address], launcher=launcher)
        launcher.write_text("raise SystemExit(3)\n")  # the new version on disk
        failed_upgrade_under_load(tree, "exit status 3")
    finally:
        echo.close()


def test_a_new_version_never_ready_is_killed_and_a_second_sigusr2_is_refused(
        trees: list[Tree], tmp_path: Path) -> None:
    echo = SelectorEcho()
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCH_SCRIPT)
    try:
        tree = start(trees, tmp_path, [echo.address], launcher=launcher)
        launcher.write_text("import time\ntime.sleep(600)\n")
        started = time.monotonic()
        failed_upgrade_under_load(tree, f"not ready within {READY_TIMEOUT_S:g}s",
                                  timeout_s=READY_TIMEOUT_S + START_TIMEOUT_S,
                                  during=[signal.SIGUSR2])
        assert time.monotonic() - started >= READY_TIMEOUT_S
        assert tree.proc.count_lines(
            r"SIGUSR2 ignored: an upgrade is already under way \(new process \d+\)") == 1
        assert tree.proc.wait_for_count(r"killed it: killed by SIGKILL", 1) == 1
    finally:
        echo.close()


# -- systemd ---------------------------------------------------------------------------------

# What systemd does between fork and exec: the passed sockets become
# descriptors 3, 4, ..., and LISTEN_PID names the process that will run.
ACTIVATE = """import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index, inheritable=True)
    os.close(fd)
os.environ.update(LISTEN_FDS=str(len(fds)), LISTEN_PID=str(os.getpid()))
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def listening_socket(listen: bool = True) -> socket.socket:
    sock = socket.socket()
    sock.bind((HOST, 0))
    if listen:
        sock.listen(128)
    return sock


@pytest.mark.parametrize("workers", [1, 2])
def test_socket_activation_serves_the_sockets_systemd_passed(trees: list[Tree], tmp_path: Path,
                                                             workers: int) -> None:
    echo = SelectorEcho()
    served, unused = listening_socket(), listening_socket()
    read_end, write_end = os.pipe()  # not a socket: closed with a warning
    # The test keeps its copies open: binding the port again would fail
    # (EADDRINUSE), so serving proves the passed socket was taken.
    port = served.getsockname()[1]
    path = tmp_path / "config.json"
    write_config(path, [{"Name": "a", "Ports": [port], "Targets": [echo.address]}])
    fds = [served.fileno(), unused.fileno(), read_end]
    argv = [*REAPER, sys.executable, "-c", ACTIVATE, ",".join(map(str, fds)), str(LAUNCHER),
            "--config", str(path), "--listen-host", HOST, "--workers", str(workers)]
    try:
        tree = Tree(Proc(argv, pass_fds=fds), path, {"a": [port]})
        trees.append(tree)
        for index in range(50):
            with socket.create_connection((HOST, port), timeout=IO_TIMEOUT_S) as sock:
                sock.sendall(b"%d" % index)
                sock.shutdown(socket.SHUT_WR)
                assert recv_until_eof(sock) == b"%d" % index
        proc = tree.proc
        assert proc.wait_for_count(r"systemd passed 3 sockets", 1) == 1
        assert proc.wait_for_count(rf"port {port}: serving the inherited socket",
                                   workers) == workers
        assert proc.wait_for_count(r"descriptor 5 is not a socket", 1) == 1
        assert proc.wait_for_count(r"closing the inherited socket on 127\.0\.0\.1:"
                                   rf"{unused.getsockname()[1]}", workers) == workers
        inode = os.fstat(served.fileno()).st_ino
        assert os.stat(f"/proc/{tree.first_pid}/fd/3").st_ino == inode
        assert tree.stop(tree.first_pid) == 0
    finally:
        for sock in (served, unused):
            sock.close()
        os.close(read_end)
        os.close(write_end)
        echo.close()


class NotifySocket:
    """What systemd listens on for sd_notify: a unix datagram socket (abstract)."""

    def __init__(self) -> None:
        self.name = f"rawproxy-test-{os.getpid()}-{random.getrandbits(48):x}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.sock.settimeout(START_TIMEOUT_S)
        self.heard: list[str] = []

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": "@" + self.name}

    def wait_for(self, field: str) -> str:
        """The next datagram with ``field`` among its lines (others are kept)."""
        while True:
            message = self.sock.recv(4096).decode()
            self.heard.append(message)
            if field in message.split("\n"):
                return message

    def close(self) -> None:
        self.sock.close()


def test_notify_socket_hears_ready_reloading_stopping_and_the_new_main_pid(
        trees: list[Tree], tmp_path: Path) -> None:
    echo = SelectorEcho()
    notify = NotifySocket()
    try:
        tree = start(trees, tmp_path, [echo.address], env=notify.env)
        notify.wait_for("READY=1")
        os.kill(tree.first_pid, signal.SIGHUP)
        assert re.search(r"^MONOTONIC_USEC=\d+$", notify.wait_for("RELOADING=1"), re.M)
        notify.wait_for("READY=1")
        os.kill(tree.first_pid, signal.SIGUSR2)
        notify.wait_for("RELOADING=1")
        new_pid = tree.new_pid()
        assert f"MAINPID={new_pid}" in notify.wait_for("READY=1").split("\n")
        assert tree.exit_code(tree.first_pid) == 0  # its drain after the upgrade: no STOPPING
        os.kill(new_pid, signal.SIGTERM)
        notify.wait_for("STOPPING=1")
        assert tree.exit_code(new_pid) == 0
        fields = [line for message in notify.heard for line in message.split("\n")
                  if line.endswith("=1") or line.startswith("MAINPID=")]
        assert fields == ["READY=1", "RELOADING=1", "READY=1", "RELOADING=1",
                          f"MAINPID={new_pid}", "READY=1", "STOPPING=1"]
    finally:
        notify.close()
        echo.close()
