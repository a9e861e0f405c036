"""A proxy fed by a real 3-member etcd cluster (SPEC 11): members die, the
watch moves on and misses nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.etcd_fixtures import EtcdCluster, FleetFactory, needs_etcd, serve
from tests.support import HOST, Backend, connect, wait_until

pytestmark = [needs_etcd, pytest.mark.slow]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    three = EtcdCluster(tmp_path / "etcd", size=3).start()
    yield three
    three.close()


@pytest.fixture
def backend() -> Iterator[Backend]:
    server = Backend("name", name="a")
    yield server
    server.close()


def registered(count: int) -> list[str]:
    return [f"{HOST}:{9000 + i}" for i in range(count)]


def test_the_leader_killed_the_watch_moves_and_misses_nothing(
        cluster: EtcdCluster, fleet: FleetFactory, backend: Backend) -> None:
    leader = cluster.leader()
    # The proxy watches its first endpoint: make that the leader.
    cluster.members.remove(leader)
    cluster.members.insert(0, leader)
    proxy, (port,) = serve(cluster, fleet, lambda ports: [
        {"Name": "web", "Ports": ports, "Targets": [f"{HOST}:{backend.port}"]}], 1)
    proxy.process.wait_for_line(rf"watching /rawproxy/ on {leader.url}")
    leader.kill()
    # Puts right after the kill, while the proxy is finding another member
    # and the rest elect a new leader: every one must arrive.
    revisions = [cluster.put(f"/rawproxy/targets/web/m{i}", address)
                 for i, address in enumerate(registered(5))]
    proxy.process.wait_for_line(rf"etcd: lost {leader.url} .*; switching to ")
    proxy.wait_revision(revisions[-1])
    assert proxy.targets("web") == [f"{HOST}:{backend.port}", *registered(5)]
    with connect(port) as sock:
        assert sock.recv(64).startswith(b"a")
    assert proxy.metric("rawproxy_etcd_watch_restarts_total") >= 1


def test_every_member_down_it_keeps_serving_then_catches_up(
        cluster: EtcdCluster, fleet: FleetFactory, backend: Backend) -> None:
    proxy, (port,) = serve(cluster, fleet, lambda ports: [
        {"Name": "web", "Ports": ports, "Targets": [f"{HOST}:{backend.port}"]}], 1)
    for member in cluster.members:
        member.kill()
    wait_until(lambda: proxy.metric("rawproxy_etcd_connected") == 0, message="disconnected")
    with connect(port) as sock:
        assert sock.recv(64).startswith(b"a")
    for member in cluster.members:
        member.start(",".join(f"{m.name}={m.peer_url}" for m in cluster.members))
    revision = cluster.put("/rawproxy/targets/web/late", f"{HOST}:9999")
    proxy.wait_revision(revision, timeout_s=30.0)
    assert proxy.targets("web") == [f"{HOST}:{backend.port}", f"{HOST}:9999"]
    assert proxy.metric("rawproxy_etcd_connected") == 1
