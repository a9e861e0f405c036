"""Soak: rawproxy under a mix of clients while its backends die and come back.

``python -m tests.soak.soak --duration 60 [--seed N] [--json]`` (``make soak``).

Three echo backends, each its own subprocess (``echo_server.py``) so that it
can be SIGKILLed and restarted on the same port, sit behind one app with two
ports.  The run is split into rounds (3 at least, about 10 s each).  During a
round, client threads run streams of four kinds through the proxy, each on a
random one of its ports:

- ``short``: 1-8 KiB, echoed back;
- ``bulk``: 2-8 MiB each way, compared as it arrives and by sha256;
- ``slow``: 1-3 MiB, read back 4 KiB at a time with pauses, so the proxy's
  buffers fill and backpressure holds the sender;
- ``reset``: sends part of 64 KiB-2 MiB, then closes with SO_LINGER 0 (RST).

Meanwhile a chaos thread SIGKILLs a random backend every 1-3 s and restarts
it on its port 0.2-1 s later; at most one backend is down at a time.

Every stream ends one way:

- completed: the whole echo arrived byte-exact (chunk by chunk and by
  sha256) followed by EOF -- for ``reset``, the RST went out as planned
  after an exact prefix of the echo;
- interrupted: the connection ended early (reset, or EOF before the whole
  echo) after an exact prefix, while a backend was down: allowed;
- violation: wrong or extra bytes, no progress for STALL_S, the proxy not
  accepting, or an interruption while every backend was up.

After every round the clients and the chaos stop, every backend is back up,
and these must settle: ``rawproxy_connections_active`` 0, the proxy's
descriptor count back to its baseline (taken after start-up), and no
connection to or from the proxy's or backends' ports in /proc/net/tcp other
than LISTEN and TIME_WAIT.  VmRSS is recorded per round.  At the end: no
violation; the proxy alive and serving (echoes through each port); VmRSS at
the end of the last round within RSS_TOLERANCE_BYTES of round 2's (round 1
holds the warm-up: the allocator's arenas, the first buffers); accepted ==
closed in the metrics and one access-log line per closed connection; no
traceback or "unhandled"/"unexpected" error in the proxy's log; exit 0 on
SIGTERM.  It prints a summary table (``--json``: one JSON object) and exits 1
when any check failed.
"""

from __future__ import annotations

import argparse
import enum
import hashlib
import http.client
import json
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Optional, Sequence

from tests.support import HOST, ProxyFactory, ProxyProcess, stable_ports, wait_until

ECHO_SERVER = Path(__file__).resolve().with_name("echo_server.py")
MiB = 1 << 20
KiB = 1 << 10
CONNECT_TIMEOUT_S = 5.0
STALL_S = 10.0                 # no byte moved either way for this long: a violation
STREAM_DEADLINE_S = 45.0       # hard bound on one stream
SETTLE_S = 10.0                # for active/fd/connection counts to settle after a round
DOWN_SLACK_S = 1.0             # a kill's effects (RSTs, EOFs) reach clients within this
RSS_TOLERANCE_BYTES = 8 * MiB
SEND_CHUNK_BYTES = 256 * KiB
ACCESS_LINE = re.compile(r"rawproxy\.access\b.*\bclient=\S*:(\d+) target=(\S+) .*\bend=(\S+)")
INTERNAL_ERROR = re.compile(r"Traceback|unhandled error|unexpected socket error")


class Kind:
    __slots__ = ("name", "workers", "min_bytes", "max_bytes", "read_bytes", "read_pause_s")

    def __init__(self, name: str, workers: int, min_bytes: int, max_bytes: int,
                 read_bytes: int, read_pause_s: float = 0.0) -> None:
        self.name = name
        self.workers = workers
        self.min_bytes = min_bytes
        self.max_bytes = max_bytes
        self.read_bytes = read_bytes
        self.read_pause_s = read_pause_s


KINDS = (
    Kind("short", 3, 1 * KiB, 8 * KiB, 64 * KiB),
    Kind("bulk", 2, 2 * MiB, 8 * MiB, 256 * KiB),
    Kind("slow", 2, 1 * MiB, 3 * MiB, 4 * KiB, read_pause_s=0.001),
    Kind("reset", 2, 64 * KiB, 2 * MiB, 64 * KiB),
)
KIND_BY_NAME = {kind.name: kind for kind in KINDS}


class Outcome(enum.Enum):
    COMPLETED = "completed"
    INTERRUPTED = "interrupted"
    VIOLATION = "violation"


class StreamResult:
    __slots__ = ("kind", "port", "client_port", "outcome", "verified_bytes", "started", "ended",
                 "detail")

    def __init__(self, kind: str, port: int, client_port: int, outcome: Outcome,
                 verified_bytes: int, started: float, ended: float, detail: str = "") -> None:
        self.kind = kind
        self.port = port
        self.client_port = client_port
        self.outcome = outcome
        self.verified_bytes = verified_bytes
        self.started = started
        self.ended = ended
        self.detail = detail


# -- one client stream ---------------------------------------------------------

class Exchange:
    """Sends ``payload`` (only its first ``send_limit`` bytes for a reset) on
    a non-blocking socket while reading the echo and comparing it with what
    was sent as it arrives; shuts down writing once everything was sent.

    ``run`` returns when the echo ended (EOF), the send limit was reached, or
    the echo went wrong (``wrong`` says how); it raises OSError when the
    connection breaks and TimeoutError when nothing moved for STALL_S.
    """

    def __init__(self, sock: socket.socket, payload: bytes, kind: Kind, send_limit: int) -> None:
        self.sock = sock
        self.payload = memoryview(payload)
        self.kind = kind
        self.send_limit = send_limit
        self.cut = send_limit < len(payload)
        self.sent = 0
        self.received = 0
        self.eof = False
        self.wrong = ""
        self.sent_hash = hashlib.sha256()
        self.got_hash = hashlib.sha256()

    def _send(self) -> None:
        piece = self.payload[self.sent:min(self.send_limit, self.sent + SEND_CHUNK_BYTES)]
        count = self.sock.send(piece)
        self.sent_hash.update(piece[:count])
        self.sent += count
        if self.sent == len(self.payload):
            self.sock.shutdown(socket.SHUT_WR)

    def _recv(self) -> None:
        data = self.sock.recv(self.kind.read_bytes)
        if not data:
            self.eof = True
            return
        expected = self.payload[self.received:self.received + len(data)]
        if len(expected) < len(data):
            self.wrong = f"{len(data) - len(expected)} bytes past the end of the echo"
        elif expected != data:
            offset = next(i for i in range(len(data)) if data[i] != expected[i])
            self.wrong = f"echo differs from what was sent at byte {self.received + offset}"
        self.got_hash.update(data)
        self.received += len(data)

    def run(self, deadline: float) -> None:
        poller = select.poll()
        fd = self.sock.fileno()
        poller.register(fd, 0)
        next_read = last_progress = time.monotonic()
        while not (self.eof or self.wrong or self.cut and self.sent >= self.send_limit):
            now = time.monotonic()
            if now - last_progress > STALL_S or now > deadline:
                raise TimeoutError(f"no progress for {now - last_progress:.1f}s")
            mask = select.POLLOUT if self.sent < self.send_limit else 0
            if now >= next_read:
                mask |= select.POLLIN
            if mask == 0:
                time.sleep(next_read - now)   # a slow reader's pause
                continue
            poller.modify(fd, mask)
            # Writing only: wake for the next read too (a slow reader's pace).
            wake_s = STALL_S if mask & select.POLLIN else next_read - now
            events = poller.poll(max(0.0, min(wake_s, deadline - now)) * 1000)
            before = (self.sent, self.received, self.eof)
            if any(event & (select.POLLIN | select.POLLERR | select.POLLHUP) and mask & select.POLLIN
                   for _, event in events):
                self._recv()
                next_read = time.monotonic() + self.kind.read_pause_s
            if any(event & (select.POLLOUT | select.POLLERR) and mask & select.POLLOUT
                   for _, event in events) and not self.eof:
                self._send()
            if (self.sent, self.received, self.eof) != before:
                last_progress = time.monotonic()


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def run_stream(kind: Kind, port: int, rng: random.Random) -> StreamResult:
    payload = rng.randbytes(rng.randint(kind.min_bytes, kind.max_bytes))
    cut = kind.name == "reset"
    send_limit = rng.randint(1, len(payload) - 1) if cut else len(payload)
    started = time.monotonic()
    client_port = 0

    def result(outcome: Outcome, verified: int, detail: str = "") -> StreamResult:
        return StreamResult(kind.name, port, client_port, outcome, verified, started,
                            time.monotonic(), detail)

    sock = socket.socket()
    try:
        sock.settimeout(CONNECT_TIMEOUT_S)
        sock.bind((HOST, 0))  # known before connecting, to find its access-log line
        client_port = sock.getsockname()[1]
        sock.connect((HOST, port))
    except ConnectionResetError as exc:
        # The proxy accepted, its target died at once (chaos) and it reset us
        # before connect() returned: an interruption, judged like the others
        # against the access log and the kill times.
        sock.close()
        return result(Outcome.INTERRUPTED, 0, f"reset while connecting: {exc}")
    except OSError as exc:
        sock.close()
        return result(Outcome.VIOLATION, 0, f"connecting to the proxy failed: {exc}")
    exchange = Exchange(sock, payload, kind, send_limit)
    where = ""
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        exchange.run(started + STREAM_DEADLINE_S)
    except TimeoutError as exc:
        where = f"stalled ({exc})"
    except OSError as exc:
        where = f"broken: {exc.strerror or exc}"
    finally:
        if cut and not where and not exchange.wrong and not exchange.eof:
            reset(sock)
        else:
            sock.close()
    progress = f"sent {exchange.sent}/{exchange.send_limit}, echoed {exchange.received}"
    if exchange.wrong:
        return result(Outcome.VIOLATION, 0, f"{exchange.wrong} ({progress})")
    if where.startswith("stalled"):
        return result(Outcome.VIOLATION, exchange.received, f"{where} ({progress})")
    if where or (exchange.eof and exchange.received < exchange.send_limit):
        return result(Outcome.INTERRUPTED, exchange.received,
                      f"{where or 'early EOF'} ({progress})")
    if cut:
        return result(Outcome.COMPLETED, exchange.received)
    if exchange.sent_hash.digest() != exchange.got_hash.digest():
        return result(Outcome.VIOLATION, 0, f"sha256 of the echo differs ({progress})")
    return result(Outcome.COMPLETED, exchange.received)


# -- backends and their chaos ---------------------------------------------------

class EchoBackend:
    """``echo_server.py`` on a fixed port, killed and restarted at will."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.address = f"{HOST}:{port}"
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def is_up(self) -> bool:
        return self.proc is not None

    def start(self, attempts: int = 5) -> None:
        """Start and wait until it listens; RuntimeError if the port stays taken."""
        why = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(0.2)   # the port is someone else's for now: try again shortly
            proc = subprocess.Popen([sys.executable, str(ECHO_SERVER), str(self.port)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 10.0)
            if ready and proc.stdout.readline() == b"listening\n":
                self.proc = proc
                return
            proc.kill()
            _, err = proc.communicate(timeout=10)
            why = err.decode(errors="replace").strip() or "no 'listening' line"
        raise RuntimeError(f"backend on port {self.port} does not start: {why}")

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.kill()
        proc.wait(10)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


class Chaos:
    """Kills a random live backend every 1-3 s and restarts it 0.2-1 s later;
    one down at a time.  Remembers when each port was down, (port, killed_at,
    up_again_at), to tell an interruption a kill explains from one it does not."""

    def __init__(self, backends: Sequence[EchoBackend]) -> None:
        self.backends = backends
        self.kills = 0
        self.restart_failures: list[str] = []
        self._lock = threading.Lock()
        self._downs: list[tuple[int, float, float]] = []
        self._down: Optional[tuple[int, float]] = None

    def run(self, rng: random.Random, stop: threading.Event) -> None:
        while not stop.wait(rng.uniform(1.0, 3.0)):
            live = [backend for backend in self.backends if backend.is_up()]
            if len(live) < 2:
                continue
            victim = rng.choice(live)
            with self._lock:
                self._down = (victim.port, time.monotonic())
                self.kills += 1
            victim.kill()
            stop.wait(rng.uniform(0.2, 1.0))
            self.revive()

    def revive(self) -> None:
        for backend in self.backends:
            if not backend.is_up():
                try:
                    backend.start()
                except RuntimeError as exc:
                    self.restart_failures.append(str(exc))
        with self._lock:
            if self._down is not None:
                self._downs.append((*self._down, time.monotonic()))
                self._down = None

    def was_down_during(self, started: float, ended: float, port: Optional[int]) -> bool:
        """Was backend ``port`` (any backend, for None) down during [started, ended]?"""
        with self._lock:
            downs = list(self._downs)
            if self._down is not None:
                downs.append((*self._down, time.monotonic()))
        return any(down <= ended and up + DOWN_SLACK_S >= started
                   for victim, down, up in downs if port in (None, victim))


# -- what the proxy says about itself -------------------------------------------

METRIC_LINE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$")
METRIC_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1",
              "05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT",
              "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING"}


class Metrics:
    def __init__(self, text: str) -> None:
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for line in text.splitlines():
            match = METRIC_LINE.match(line)
            if match and not line.startswith("#"):
                labels = dict(METRIC_LABEL.findall(match.group(2) or ""))
                self.samples.append((match.group(1), labels, float(match.group(3))))

    def total(self, name: str, **labels: str) -> int:
        return int(sum(value for sample, got, value in self.samples if sample == name
                       and all(got.get(key) == want for key, want in labels.items())))

    def by_label(self, name: str, label: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for sample, labels, value in self.samples:
            if sample == name and value:
                out[labels.get(label, "")] = out.get(labels.get(label, ""), 0) + int(value)
        return out


def scrape(admin_port: int) -> Metrics:
    conn = http.client.HTTPConnection(HOST, admin_port, timeout=CONNECT_TIMEOUT_S)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        if response.status != 200:
            raise AssertionError(f"GET /metrics: {response.status}")
        return Metrics(response.read().decode())
    finally:
        conn.close()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KiB
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def open_connections(ports: set[int]) -> list[str]:
    """Loopback connections on ``ports`` the kernel still tracks, bar LISTEN and TIME_WAIT."""
    found = []
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            local, remote = (int(end.split(":")[1], 16) for end in fields[1:3])
            state = TCP_STATES.get(fields[3], fields[3])
            if state not in ("LISTEN", "TIME_WAIT") and ports & {local, remote}:
                found.append(f"{local}->{remote} {state}")
    return found


def settles(condition: Callable[[], bool], timeout_s: float = SETTLE_S) -> bool:
    try:
        wait_until(condition, timeout_s, interval_s=0.05)
        return True
    except AssertionError:
        return False


# -- the run ------------------------------------------------------------------------

class Round:
    __slots__ = ("index", "streams", "kills", "active", "fds", "connections", "rss_bytes")

    def __init__(self, index: int) -> None:
        self.index = index
        self.streams: list[StreamResult] = []
        self.kills = 0
        self.active = -1
        self.fds = -1
        self.connections: list[str] = []
        self.rss_bytes = 0

    def count(self, outcome: Outcome) -> int:
        return sum(1 for stream in self.streams if stream.outcome is outcome)


class Soak:
    def __init__(self, seed: int, workdir: Path) -> None:
        self.seed = seed
        self.rounds: list[Round] = []
        self.final: list[StreamResult] = []
        self.harness_errors: list[str] = []
        self.backends: list[EchoBackend] = []
        self.chaos = Chaos(self.backends)
        self._proxies = ProxyFactory(workdir)
        self.proxy: Optional[ProxyProcess] = None
        self.ports: list[int] = []
        self.admin_port = 0
        self.fd_baseline = -1
        self.end = Round(0)
        self.metrics = Metrics("")

    def start(self) -> None:
        for port in stable_ports(3):  # they are killed and restarted on the same port
            backend = EchoBackend(port)
            backend.start()
            self.backends.append(backend)
        self.proxy, ports = self._proxies.start(
            [{"Name": "soak", "Ports": 2, "ConnectTimeout": 2,
              "Targets": [backend.address for backend in self.backends]}],
            "--admin", f"{HOST}:0", "--log-level", "info")
        self.ports = ports["soak"]
        line = self.proxy.wait_for_line(r"admin endpoint on http://")
        match = re.search(r":(\d+)/", line)
        assert match, line
        self.admin_port = int(match.group(1))
        self.fd_baseline = self.proxy.fd_count()

    def close(self) -> int:
        for backend in self.backends:
            backend.kill()
        code = self.proxy.stop() if self.proxy else 0
        self._proxies.close()
        return code

    def run_round(self, index: int, round_s: float) -> Round:
        report = Round(index)
        stop = threading.Event()
        lock = threading.Lock()

        def worker(kind: Kind, rng: random.Random) -> None:
            try:
                while not stop.is_set():
                    result = run_stream(kind, rng.choice(self.ports), rng)
                    with lock:
                        report.streams.append(result)
            except Exception as exc:   # a bug of the soak, not of the proxy
                self.harness_errors.append(f"{kind.name} worker: {exc!r}")

        def rng(name: str) -> random.Random:
            return random.Random(f"{self.seed}-{index}-{name}")

        # Daemons, and stopped in a finally: an interrupted run must not hang at exit.
        threads = [threading.Thread(target=worker, args=(kind, rng(f"{kind.name}{i}")),
                                    daemon=True)
                   for kind in KINDS for i in range(kind.workers)]
        threads.append(threading.Thread(target=self.chaos.run, args=(rng("chaos"), stop),
                                        daemon=True))
        kills_before = self.chaos.kills
        first_line = len(self.proxy.lines) if self.proxy else 0
        try:
            for thread in threads:
                thread.start()
            stop.wait(round_s)
        finally:
            stop.set()
        for thread in threads:
            thread.join(STREAM_DEADLINE_S + 15)
            if thread.is_alive():
                self.harness_errors.append(f"round {index}: a thread did not stop")
        self.chaos.revive()
        report.kills = self.chaos.kills - kills_before
        self.measure(report)
        self.explain_interruptions(report.streams, first_line)
        return report

    def explain_interruptions(self, streams: list[StreamResult], first_line: int) -> None:
        """An interrupted stream is a violation unless its target -- named by the
        access-log line with its client port, when exactly one has it -- or,
        failing that, some backend was down while it ran."""
        assert self.proxy is not None
        sessions: dict[int, list[tuple[str, str]]] = {}
        for line in self.proxy.lines[first_line:]:
            match = ACCESS_LINE.search(line)
            if match:
                sessions.setdefault(int(match.group(1)), []).append((match.group(2), match.group(3)))
        for stream in streams:
            if stream.outcome is not Outcome.INTERRUPTED:
                continue
            seen = sessions.get(stream.client_port, [])
            target, end = seen[0] if len(seen) == 1 else ("", "")
            target_port = int(target.rsplit(":", 1)[1]) if ":" in target else None
            if target:
                stream.detail += f"; proxy: target={target} end={end}"
            if not self.chaos.was_down_during(stream.started, stream.ended, target_port):
                stream.outcome = Outcome.VIOLATION
                stream.detail += "; interrupted while its target was up"

    def measure(self, report: Round) -> None:
        """Let the proxy settle with no client running, and record where it settled."""
        assert self.proxy is not None
        proxy = self.proxy

        def active() -> int:
            report.active = scrape(self.admin_port).total("rawproxy_connections_active")
            return report.active

        def fds() -> int:
            report.fds = proxy.fd_count()
            return report.fds

        def connections() -> list[str]:
            report.connections = open_connections(
                {*self.ports, *(backend.port for backend in self.backends)})
            return report.connections

        settles(lambda: active() == 0)
        settles(lambda: fds() <= self.fd_baseline)
        settles(lambda: not connections())
        report.rss_bytes = rss_bytes(proxy.pid)

    def final_checks(self, rss_tolerance: int) -> list[tuple[str, bool, str]]:
        assert self.proxy is not None
        for port in self.ports:
            for kind in ("short", "short", "short", "bulk"):
                self.final.append(run_stream(KIND_BY_NAME[kind], port, random.Random(port)))
        end = Round(len(self.rounds) + 1)
        self.measure(end)
        self.end = end
        metrics = self.metrics = scrape(self.admin_port)
        streams = [s for r in self.rounds for s in r.streams]
        bad = [s for s in streams if s.outcome is Outcome.VIOLATION]
        final_bad = [s for s in self.final if s.outcome is not Outcome.COMPLETED]
        accepted = metrics.total("rawproxy_connections_accepted_total")
        closed = metrics.total("rawproxy_connections_closed_total")
        access = self.proxy.count_lines(r"rawproxy\.access\b")
        internal = [line for line in self.proxy.lines if INTERNAL_ERROR.search(line)]
        rss = [r.rss_bytes for r in self.rounds]
        growth = rss[-1] - rss[1] if len(rss) >= 3 else 0
        after_round = [*self.rounds, end]
        return [
            ("every completed stream byte-exact, no violation", not bad,
             "; ".join(f"{s.kind}: {s.detail}" for s in bad[:5])),
            ("proxy alive, every port echoes", self.proxy.proc.poll() is None and not final_bad,
             "; ".join(f"port {s.port} {s.kind}: {s.outcome.value} {s.detail}"
                       for s in final_bad[:5])),
            ("connections_active 0 after every round", all(r.active == 0 for r in after_round),
             " ".join(str(r.active) for r in after_round)),
            (f"fd count back to baseline {self.fd_baseline} after every round",
             all(r.fds <= self.fd_baseline for r in after_round),
             " ".join(str(r.fds) for r in after_round)),
            ("no connection left open", not any(r.connections for r in after_round),
             "; ".join(c for r in after_round for c in r.connections[:3])),
            ("accepted == closed, one access-log line each", accepted == closed == access,
             f"accepted {accepted} closed {closed} access lines {access}"),
            (f"RSS growth round 2 -> last <= {rss_tolerance // MiB} MiB",
             growth <= rss_tolerance, f"{growth / MiB:+.1f} MiB"),
            ("no internal error logged", not internal, "; ".join(internal[:3])),
            ("no harness error, every backend restarted",
             not self.harness_errors and not self.chaos.restart_failures,
             "; ".join([*self.harness_errors, *self.chaos.restart_failures][:3])),
        ]


# -- the report ----------------------------------------------------------------------

def summarize(soak: Soak, checks: list[tuple[str, bool, str]], duration_s: float) -> dict[str, Any]:
    streams = [stream for r in soak.rounds for stream in r.streams]
    kinds = {}
    for kind in KINDS:
        mine = [s for s in streams if s.kind == kind.name]
        kinds[kind.name] = {
            "streams": len(mine),
            **{o.value: sum(1 for s in mine if s.outcome is o) for o in Outcome},
            "verified_bytes": sum(s.verified_bytes for s in mine
                                  if s.outcome is not Outcome.VIOLATION)}
    ends: dict[str, int] = {}
    for line in soak.proxy.lines if soak.proxy else []:
        match = re.search(r"rawproxy\.access\b.*\bend=(\S+)", line)
        if match:
            ends[match.group(1)] = ends.get(match.group(1), 0) + 1
    interruptions: dict[str, int] = {}
    for stream in streams:
        if stream.outcome is Outcome.INTERRUPTED:
            why = stream.detail.split(" (")[0]
            interruptions[why] = interruptions.get(why, 0) + 1
    return {
        "passed": all(ok for _, ok, _ in checks), "seed": soak.seed, "duration_s": duration_s,
        "ports": soak.ports, "backends": [b.port for b in soak.backends],
        "streams": kinds, "backend_kills": soak.chaos.kills,
        "rounds": [{"round": r.index, "streams": len(r.streams), "kills": r.kills,
                    "active": r.active, "fds": r.fds, "rss_bytes": r.rss_bytes}
                   for r in soak.rounds],
        "fd_baseline": soak.fd_baseline, "fd_end": soak.end.fds,
        "rss_end_bytes": soak.end.rss_bytes, "rss_tolerance_bytes": RSS_TOLERANCE_BYTES,
        "proxy_ends": ends, "interruptions": interruptions,
        "connect_failures": soak.metrics.by_label("rawproxy_connect_failures_total", "reason"),
        "interrupted_samples": [f"{s.kind} port {s.port}: {s.detail}" for s in streams
                                if s.outcome is Outcome.INTERRUPTED][:5],
        "violations": [f"{s.kind} port {s.port}: {s.detail}" for s in streams
                       if s.outcome is Outcome.VIOLATION][:20],
        "checks": [{"check": name, "ok": ok, "detail": detail} for name, ok, detail in checks],
    }


def mib(nbytes: int) -> str:
    return f"{nbytes / MiB:.1f}"


def print_table(summary: dict[str, Any], out: IO[str]) -> None:
    rounds = summary["rounds"]
    print(f"rawproxy soak: {summary['duration_s']:g} s in {len(rounds)} rounds, seed "
          f"{summary['seed']}, proxy ports {summary['ports']}, backends {summary['backends']}",
          file=out)
    print(f"{'kind':<7}{'streams':>9}{'completed':>11}{'interrupted':>13}{'violations':>12}"
          f"{'MiB verified':>14}", file=out)
    rows = list(summary["streams"].items())
    total = {key: sum(row[key] for _, row in rows) for key in rows[0][1]}
    for name, row in [*rows, ("total", total)]:
        print(f"{name:<7}{row['streams']:>9}{row['completed']:>11}{row['interrupted']:>13}"
              f"{row['violation']:>12}{mib(row['verified_bytes']):>14}", file=out)
    print(f"{'round':<7}{'streams':>9}{'kills':>7}{'active':>8}{'fds':>6}{'RSS MiB':>9}", file=out)
    for r in rounds:
        print(f"{r['round']:<7}{r['streams']:>9}{r['kills']:>7}{r['active']:>8}{r['fds']:>6}"
              f"{mib(r['rss_bytes']):>9}", file=out)
    growth = rounds[-1]["rss_bytes"] - rounds[min(1, len(rounds) - 1)]["rss_bytes"]
    print(f"backend kills {summary['backend_kills']}; fds baseline {summary['fd_baseline']}, "
          f"end {summary['fd_end']}; RSS end {mib(summary['rss_end_bytes'])} MiB, round 2 -> "
          f"last {growth / MiB:+.1f} MiB (tolerance {summary['rss_tolerance_bytes'] // MiB} MiB)",
          file=out)

    def pairs(counts: dict[str, int]) -> str:
        return " ".join(f"{key}={value}" for key, value in sorted(counts.items())) or "none"

    print(f"proxy access-log ends: {pairs(summary['proxy_ends'])}", file=out)
    print(f"connect failures: {pairs(summary['connect_failures'])}; client-side "
          f"interruptions: {pairs(summary['interruptions'])}", file=out)
    for violation in summary["violations"]:
        print(f"violation: {violation}", file=out)
    for check in summary["checks"]:
        detail = f"  [{check['detail']}]" if check["detail"] else ""
        print(f"  {'PASS' if check['ok'] else 'FAIL'}  {check['check']}{detail}", file=out)
    print("PASS" if summary["passed"] else "FAIL", file=out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak.soak", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of traffic (60)")
    parser.add_argument("--rounds", type=int, help="default: one per 10 s, at least 3")
    parser.add_argument("--seed", type=int, help="seeds payloads, sizes and the chaos")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    rounds = args.rounds or max(3, round(args.duration / 10))
    if rounds < 3 or args.duration <= 0:
        parser.error("need a positive --duration and at least 3 rounds")

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)     # so that the finally below stops everything

    signal.signal(signal.SIGTERM, on_signal)
    with tempfile.TemporaryDirectory(prefix="rawproxy-soak-") as workdir:
        soak = Soak(seed, Path(workdir))
        try:
            soak.start()
            for index in range(1, rounds + 1):
                soak.rounds.append(soak.run_round(index, args.duration / rounds))
            checks = soak.final_checks(RSS_TOLERANCE_BYTES)
        finally:
            code = soak.close()
    checks.append(("proxy exits 0 on SIGTERM", code == 0, f"exit {code}"))
    summary = summarize(soak, checks, args.duration)
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        print()
    else:
        print_table(summary, sys.stdout)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
