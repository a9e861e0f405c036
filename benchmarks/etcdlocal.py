"""Local etcd clusters on loopback, for the tests, ``make fleet`` and ``make bench-fleet``.

:class:`EtcdCluster` starts one member or three (``etcd`` from Debian's
etcd-server), each with a data directory under a given directory and
ports below the kernel's ephemeral range, so a member that is killed can
be started again on the same ports.  A member that cannot bind (a port
taken meanwhile) makes the whole cluster start again on other ports.
Members are stopped by PID.  Nothing is mocked: callers speak to etcd
through its JSON gateway (:mod:`rawproxy.etcd`).

``make_tls(directory)`` makes a CA, a server certificate for 127.0.0.1 and
a client certificate with the openssl command (dev-only, ECDSA, one day).

Standard library only (and rawproxy.etcd): ``make fleet`` runs it with the
system's python3.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from rawproxy.etcd import Client, Endpoint, EtcdError, make_ssl_context

HOST = "127.0.0.1"
ETCD = shutil.which("etcd")
OPENSSL = shutil.which("openssl")
# Raft timings of a local cluster: etcd's defaults.  A new leader is
# elected about a second after the leader is killed.
RAFT_ARGS = ("--heartbeat-interval", "100", "--election-timeout", "1000")
START_TIMEOUT_S = 30.0


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0,
               message: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {message}")
        time.sleep(0.02)


def stable_ports(count: int) -> list[int]:
    """Free ports below the ephemeral range, in the upper half of the 16384
    below it (the probe's local mode takes the lower half): a port there is
    never taken meanwhile as the source port of a connection, so a member
    can be started again on it."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            low = int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    start = max(1024, low - 16384)
    candidates = list(range(start + (low - start) // 2, low))
    random.shuffle(candidates)
    chosen: list[int] = []
    for port in candidates:
        with socket.socket() as probe:
            try:
                probe.bind((HOST, port))
            except OSError:
                continue
        chosen.append(port)
        if len(chosen) == count:
            return chosen
    raise RuntimeError("no free port below the ephemeral range")


@dataclass(frozen=True)
class TLSFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    assert OPENSSL is not None, "the openssl command is needed for the TLS tests"
    subprocess.run([OPENSSL, *args], cwd=str(cwd), check=True, capture_output=True, timeout=60)


def make_tls(directory: Path) -> TLSFiles:
    """A throw-away CA and two certificates it signed (for tests only)."""
    directory.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
             "-subj", "/CN=rawproxy test CA", cwd=directory)
    # The server certificate is a client's too: etcd's JSON gateway dials
    # the member's own gRPC port with it.
    for name, usage in (("server", "serverAuth,clientAuth"), ("client", "clientAuth")):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=directory)
        (directory / f"{name}.ext").write_text(
            f"subjectAltName=IP:{HOST}\nextendedKeyUsage={usage}\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "1",
                 "-extfile", f"{name}.ext", cwd=directory)
    return TLSFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key",
                    directory / "client.crt", directory / "client.key")


class Member:
    """One etcd process; ``client_port``/``peer_port`` stay across restarts."""

    def __init__(self, name: str, directory: Path, client_port: int, peer_port: int,
                 tls: Optional[TLSFiles]) -> None:
        self.name = name
        self.directory = directory
        self.client_port = client_port
        self.peer_port = peer_port
        self.tls = tls
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.log_path = directory / f"{name}.log"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{HOST}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{HOST}:{self.peer_port}"

    def start(self, initial_cluster: str) -> None:
        assert ETCD is not None, "etcd is not installed (apt-get install etcd-server)"
        argv = [ETCD, "--name", self.name, "--data-dir", str(self.directory / self.name),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", self.peer_url,
                "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", initial_cluster, "--initial-cluster-state", "new",
                "--initial-cluster-token", f"t-{self.directory.name}", *RAFT_ARGS]
        if self.tls is not None:
            argv += ["--cert-file", str(self.tls.server_cert),
                     "--key-file", str(self.tls.server_key),
                     "--trusted-ca-file", str(self.tls.ca), "--client-cert-auth"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL by PID: the member vanishes, its connections reset."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def bind_failed(self) -> bool:
        try:
            return b"address already in use" in self.log_path.read_bytes()
        except OSError:
            return False


class EtcdCluster:
    """``size`` members on loopback; :meth:`close` stops them all by PID."""

    def __init__(self, directory: Path, size: int = 1, tls: Optional[TLSFiles] = None) -> None:
        self.directory = directory
        self.size = size
        self.tls = tls
        self.members: list[Member] = []

    def start(self) -> EtcdCluster:
        for _attempt in range(5):
            ports = stable_ports(2 * self.size)
            run = self.directory / f"etcd-{ports[0]}"
            run.mkdir(parents=True)
            self.members = [Member(f"m{i}", run, ports[2 * i], ports[2 * i + 1], self.tls)
                            for i in range(self.size)]
            initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
            for member in self.members:
                member.start(initial)
            if self._wait_healthy():
                return self
            self.close()
        raise AssertionError("etcd did not start")

    def _wait_healthy(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if any(m.bind_failed() or not m.alive for m in self.members):
                if any(m.bind_failed() for m in self.members):
                    return False  # a port clash: start again elsewhere
                raise AssertionError("etcd exited:\n" + self.members[0].log_path.read_text())
            if all(self._answers(m) for m in self.members):
                return True
            time.sleep(0.05)
        raise AssertionError("etcd not healthy in time:\n" + self.members[0].log_path.read_text())

    def _answers(self, member: Member) -> bool:
        try:
            self.client(member, timeout_s=1.0).range_prefix(b"/health-check/")
            return True
        except EtcdError:
            return False

    # -- talking to it -----------------------------------------------------------

    @property
    def endpoints(self) -> str:
        return ",".join(m.url for m in self.members)

    def client(self, member: Optional[Member] = None, timeout_s: float = 5.0,
               user: Optional[str] = None, password: str = "") -> Client:
        """A client of ``member``, or of the first member alive."""
        if member is None:
            member = next(m for m in self.members if m.alive)
        context = None
        if self.tls is not None:
            context = make_ssl_context(str(self.tls.ca), str(self.tls.client_cert),
                                       str(self.tls.client_key))
        scheme = "https" if self.tls else "http"
        return Client(Endpoint(scheme, HOST, member.client_port), timeout_s,
                      ssl_context=context, user=user, password=password)

    def put(self, key: str, value: Any, lease: int = 0) -> int:
        """Put ``value`` (bytes as they are, anything else as JSON); returns
        the revision."""
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        return int(self._any(lambda c: c.put(key.encode(), raw, lease)))

    def put_config(self, apps: list[dict[str, Any]], prefix: str = "/rawproxy/") -> int:
        return self.put(prefix + "config", {"Apps": apps})

    def _any(self, call: Any) -> Any:
        """``call(client)`` on the members alive, until one answers (a new
        leader may be being elected)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            for member in [m for m in self.members if m.alive]:
                try:
                    return call(self.client(member, timeout_s=2.0))
                except EtcdError:
                    if time.monotonic() > deadline:
                        raise
            time.sleep(0.05)

    def grant(self, ttl_s: int) -> int:
        return int(self._any(lambda c: c.grant(ttl_s)))

    def compact(self, revision: int) -> None:
        self._any(lambda c: c.call("/v3/kv/compaction", {"revision": str(revision),
                                                         "physical": True}))

    def leader(self) -> Member:
        """The member the others follow (asked of each member alive)."""
        def find() -> Optional[Member]:
            for member in [m for m in self.members if m.alive]:
                try:
                    status = self.client(member, timeout_s=1.0).call("/v3/maintenance/status", {})
                except EtcdError:
                    continue
                header = status.get("header")
                if isinstance(header, dict) and status.get("leader") == header.get("member_id"):
                    return member
            return None
        found: list[Member] = []

        def found_one() -> bool:
            member = find()
            if member is not None:
                found.append(member)
            return member is not None

        wait_until(found_one, timeout_s=START_TIMEOUT_S, message="an etcd leader")
        return found[0]

    def restart(self, member: Member) -> None:
        """Start a stopped member again, same ports and data."""
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        member.start(initial)
        wait_until(lambda: self._answers(member), timeout_s=START_TIMEOUT_S,
                   message=f"etcd {member.name} back")

    def enable_auth(self, user: str, password: str) -> None:
        """A root user with ``password``, then auth on."""
        client = self.client()
        client.call("/v3/auth/role/add", {"name": "root"})
        client.call("/v3/auth/user/add", {"name": user, "password": password})
        if user != "root":
            client.call("/v3/auth/user/add", {"name": "root", "password": password})
            client.call("/v3/auth/user/grant", {"user": user, "role": "root"})
        client.call("/v3/auth/user/grant", {"user": "root", "role": "root"})
        client.call("/v3/auth/enable", {})

    def close(self) -> None:
        for member in self.members:
            member.kill()
        for member in self.members:
            shutil.rmtree(member.directory / member.name, ignore_errors=True)
