"""rawproxy.views: the admin views of a server, without sockets.

A :class:`Server` is built but never started (nothing is bound), on a loop
with a fake clock; health is set through the router as sessions and checks
would set it.
"""

from __future__ import annotations

import json
import random
from typing import Any, Iterator

import pytest

from rawproxy import outcomes, views
from rawproxy.config import app_view, parse_config
from rawproxy.loop import EventLoop
from rawproxy.resolver import Resolver
from rawproxy.server import Server

CONFIG = {"Apps": [
    {"Name": "web", "Ports": [8080, 8443],
     "Targets": ["10.0.0.1:80", {"Address": "[2001:db8::1]:80", "Weight": 5}],
     "ConnectTimeout": 1.5, "IdleTimeout": 300, "MaxConnections": 100,
     "ProxyProtocol": "v2", "HealthCheck": {"Interval": 5, "Timeout": 2},
     "AllowFrom": ["10.0.0.0/8", "::1"]},
    {"Name": "plain", "Ports": [9000], "Targets": ["backend.example:9000"]},
]}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def server(clock: FakeClock) -> Iterator[Server]:
    loop = EventLoop(clock=clock)
    resolver = Resolver(loop.call_soon_threadsafe)
    server = Server(parse_config(json.dumps(CONFIG), "views.json"), loop, resolver,
                    listen_host="127.0.0.1", rng=random.Random(1))
    yield server
    server.close()
    resolver.close()
    loop.close()


def as_json(view: object) -> Any:
    return json.loads(json.dumps(view, allow_nan=False))


def test_config_view_round_trips_without_status(server: Server) -> None:
    view = as_json(views.config_view(server))
    assert set(view) == {"Source", "ListenHost", "Draining", "Apps"}
    apps = [{k: v for k, v in app.items() if k != "Status"} for app in view["Apps"]]
    again = parse_config(json.dumps({"Apps": apps}), server.config.source)
    assert again == server.config
    assert apps == [app_view(app) for app in server.config.apps]


def test_each_app_is_its_config_keys_plus_status(server: Server) -> None:
    view = as_json(views.config_view(server))
    for app, shown in zip(server.config.apps, view["Apps"]):
        assert set(shown) == set(app_view(app)) | {"Status"}
    assert (view["Source"], view["ListenHost"], view["Draining"]) == (
        "views.json", "127.0.0.1", False)


def test_status_shows_live_health_and_open_connections(server: Server,
                                                       clock: FakeClock) -> None:
    balancer = server.router.routes["web"].balancer
    first, second = balancer.targets
    balancer.record_failure(first, clock.now, outcomes.REFUSED)
    balancer.record_check(second, False, outcomes.TIMEOUT)
    server.active_by_app["web"] = 2
    clock.now += 1.5  # the passive back-off is over: the target may take one
    taken = balancer.acquire(clock.now)
    assert taken == first
    clock.now -= 1.5
    status = as_json(views.config_view(server))["Apps"][0]["Status"]
    assert status == {"ActiveConnections": 2, "QueueLength": 0, "Targets": [
        {"Address": "10.0.0.1:80", "Up": False, "ConsecutiveFailures": 1,
         "LastFailure": "refused", "HealthCheckFailing": False, "OpenConnections": 1,
         "State": "down"},
        {"Address": "[2001:db8::1]:80", "Up": False, "ConsecutiveFailures": 0,
         "LastFailure": "timeout", "HealthCheckFailing": True, "OpenConnections": 0,
         "State": "down"},
    ]}
    clock.now += 3600  # the passive back-off is over; the failed check still holds
    balancer.record_check(second, True)
    targets = as_json(views.config_view(server))["Apps"][0]["Status"]["Targets"]
    assert [t["Up"] for t in targets] == [True, True]
    assert targets[0]["LastFailure"] == "refused", "kept until the next failure"


def test_a_fresh_app_shows_everything_up_and_nothing_open(server: Server) -> None:
    status = as_json(views.config_view(server))["Apps"][1]["Status"]
    assert status == {"ActiveConnections": 0, "QueueLength": 0, "Targets": [
        {"Address": "backend.example:9000", "Up": True, "ConsecutiveFailures": 0,
         "LastFailure": None, "HealthCheckFailing": False, "OpenConnections": 0,
         "State": "up"}]}


def test_metrics_snapshot_reads_health_activity_and_draining(server: Server,
                                                             clock: FakeClock) -> None:
    balancer = server.router.routes["web"].balancer
    balancer.record_failure(balancer.targets[0], clock.now, outcomes.REFUSED)
    server.active_by_app["plain"] = 4
    snap = views.metrics_snapshot(server)
    assert snap.active == {"web": 0, "plain": 4}
    assert [(t.address, t.up, t.consecutive_failures) for t in snap.targets["web"]] == [
        ("10.0.0.1:80", False, 1), ("[2001:db8::1]:80", True, 0)]
    assert snap.draining is False and snap.stats is server.stats
    server.drain(1.0)
    assert views.metrics_snapshot(server).draining is True
    assert as_json(views.config_view(server))["Draining"] is True
