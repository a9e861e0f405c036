"""Where local mode's ports come from, and what happens when one is taken anyway."""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Optional

import pytest

from probe.config import App
from probe.local import LocalEnv
from probe.ports import PortPool, ephemeral_low, probe_candidates
from tests import support
from tests.support import REPO, recv_until_eof


def test_the_probe_takes_the_lower_half_below_the_ephemeral_range() -> None:
    assert probe_candidates(32768) == list(range(16384, 24576))
    assert probe_candidates(10000) == list(range(1024, 5512))
    assert probe_candidates(1024) == []   # a range from 1024 up: the kernel chooses


def test_the_probe_and_stable_ports_never_pick_the_same_port() -> None:
    low = ephemeral_low()
    mine = set(probe_candidates(low))
    theirs = set(support.stable_port_candidates(low))
    assert mine and theirs and not mine & theirs
    assert max(mine | theirs) < low


def test_ephemeral_low_reads_the_range_or_assumes_linux_default(tmp_path: Path) -> None:
    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("40000\t60999\n")
    assert ephemeral_low(str(ranges)) == 40000
    assert ephemeral_low(str(tmp_path / "missing")) == 32768
    ranges.write_text("garbage\n")
    assert ephemeral_low(str(ranges)) == 32768


def test_a_taken_candidate_is_skipped_and_none_left_means_port_0() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with PortPool([port]).bind(listen=True) as got:
            assert got.getsockname()[1] != port
        assert port not in PortPool([port, port]).free(2)


def test_a_down_target_port_refuses_and_cannot_be_taken() -> None:
    with PortPool().bind(listen=False) as held:
        port = held.getsockname()[1]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        with socket.socket() as other, pytest.raises(OSError) as caught:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            other.bind(("127.0.0.1", port))
        assert caught.value.errno == errno.EADDRINUSE


class FirstChoiceTaken(PortPool):
    """The race: a port free when chosen, taken before the proxy binds it."""

    def __init__(self, taken: int) -> None:
        super().__init__()
        self.taken: Optional[int] = taken

    def free(self, count: int) -> list[int]:
        ports = super().free(count)
        if self.taken is not None:
            ports[0], self.taken = self.taken, None
        return ports


def test_a_port_taken_before_the_proxy_binds_it_means_new_ports() -> None:
    apps = [App("w", (5001, 5002), ("a.invalid:1", "b.invalid:2"))]
    raw = {"Apps": [{"Name": "w", "Ports": [5001, 5002],
                     "Targets": ["a.invalid:1", "b.invalid:2"]}]}
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        taken = squatter.getsockname()[1]
        env = LocalEnv(apps, raw, frozenset({"b.invalid:2"}), REPO / "rawproxy.py",
                       ports=FirstChoiceTaken(taken))
        try:
            env.start()
            assert env.starts == 2
            assert taken not in env.port_map.values()
            for port in env.port_map.values():
                with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
                    sock.sendall(b"hello")
                    sock.shutdown(socket.SHUT_WR)
                    sock.settimeout(15)
                    assert recv_until_eof(sock) == b"hello"
        finally:
            env.close()
    assert env.exit_code == 0
