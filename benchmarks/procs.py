"""Child processes for the benchmark: pinning, ports, readiness, memory, stop.

Every proxy runs under ``taskset -c 0`` and every backend and load generator
under ``taskset -c 1`` (the harness pins itself to CPU 1 too, so its own
Python clients stay off the proxy's core).  Readiness is read from
``/proc/net/tcp{,6}`` (a socket in LISTEN state on the port) rather than by
connecting: a probe connection through a proxy would reach the backend, and
iperf3's server, for one, takes a stray connection for a broken test.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO, Optional, Sequence, Union

PROXY_CPU = 0
LOAD_CPU = 1

# Listening ports come from below the kernel's ephemeral range (32768-60999
# on Linux), so churn's client ports can never collide with a listener that
# starts later, and each port is used once per run.
_PORT_FIRST = 21000
_PORT_LAST = 32000
_next_port = _PORT_FIRST


class BenchError(Exception):
    """A measurement could not be made (start failure, timeout, bad output)."""


def can_pin() -> bool:
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2


def pinned(cpus: Union[int, str], argv: Sequence[str]) -> list[str]:
    """``argv`` under ``taskset -c CPUS`` (``0`` or ``0,1``) when pinning is possible."""
    if can_pin():
        return ["taskset", "-c", str(cpus), *argv]
    return list(argv)


def pin_self(cpu: int) -> bool:
    if not can_pin() or not hasattr(os, "sched_setaffinity"):
        return False
    os.sched_setaffinity(0, {cpu})
    return True


def raise_nofile() -> int:
    """Lift the soft descriptor limit to the hard one (inherited by children)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return hard if hard != resource.RLIM_INFINITY else soft


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on, never handed out twice in one run."""
    global _next_port
    while _next_port <= _PORT_LAST:
        port = _next_port
        _next_port += 1
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
        except OSError:
            continue
        finally:
            probe.close()
        return port
    raise BenchError("ran out of benchmark ports")


def _listening_ports() -> set[int]:
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def is_listening(port: int) -> bool:
    if os.path.exists("/proc/net/tcp"):
        return port in _listening_ports()
    # Not Linux: fall back to a connect (harmless for the backends that need it).
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Proc:
    """A child process whose stderr goes to a file, stopped with SIGTERM."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path,
                 cwd: Optional[Path] = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")
        try:
            self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                          stdout=self._log, stderr=subprocess.STDOUT,
                                          cwd=cwd)
        except OSError as exc:
            self._log.close()
            raise BenchError(f"{name}: cannot start {self.argv[0]}: {exc}") from exc

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_listening(self, ports: Sequence[int], timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.popen.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.popen.returncode} "
                                 f"before listening: {self.log_tail()}")
            if all(is_listening(port) for port in ports):
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} not listening on {list(ports)} "
                                 f"after {timeout_s:.0f} s: {self.log_tail()}")
            time.sleep(0.02)

    def log_tail(self, max_chars: int = 400) -> str:
        self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text[-max_chars:].strip().splitlines())

    def log_lines(self) -> int:
        self._log.flush()
        try:
            return len(self.log_path.read_text(errors="replace").splitlines())
        except OSError:
            return 0

    def rss_kib(self) -> int:
        """VmRSS of the process and its descendants (nginx's worker, say)."""
        return sum(_vmrss_kib(pid) for pid in _tree(self.pid))

    def cpu_times(self) -> tuple[float, float]:
        """(user, system) CPU seconds of the process and its live descendants."""
        ticks = [_cpu_ticks(pid) for pid in _tree(self.pid)]
        return (sum(t[0] for t in ticks) / _CLOCK_TICKS, sum(t[1] for t in ticks) / _CLOCK_TICKS)

    def stop(self, timeout_s: float = 5.0) -> Optional[int]:
        """SIGTERM, then SIGKILL after ``timeout_s``; the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5.0)
        self._log.close()
        return self.popen.returncode


def _tree(root: int) -> list[int]:
    pids = [root]
    index = 0
    while index < len(pids):
        pid = pids[index]
        index += 1
        for task in Path(f"/proc/{pid}/task").glob("*/children"):
            try:
                pids.extend(int(child) for child in task.read_text().split())
            except OSError:
                pass
    return pids


_CLOCK_TICKS = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0


def parse_stat_cpu_ticks(stat: str) -> tuple[int, int]:
    """(utime, stime) from a /proc/PID/stat line (the name may hold spaces)."""
    fields = stat[stat.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(fields[11]), int(fields[12])


def _cpu_ticks(pid: int) -> tuple[int, int]:
    try:
        return parse_stat_cpu_ticks(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, ValueError, IndexError):
        return 0, 0


def _vmrss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_tool(argv: Sequence[str], timeout_s: float,
             check: bool = True) -> tuple[int, str, str]:
    """Run a load generator to completion: (exit status, stdout, stderr).

    With ``check``, a non-zero exit raises :class:`BenchError` naming the
    last lines of its output.
    """
    name = Path(argv[0]).name if argv else "?"
    if name == "taskset" and len(argv) > 3:
        name = Path(argv[3]).name
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{name} timed out after {timeout_s:.0f} s") from exc
    out = done.stdout.decode(errors="replace")
    err = done.stderr.decode(errors="replace")
    if check and done.returncode != 0:
        lines = (err or out).strip().splitlines()
        raise BenchError(f"{name} exited {done.returncode}: {' | '.join(lines[-3:])}")
    return done.returncode, out, err
