"""Unit tests for rawproxy.router: weighted choice, failover, passive health.

Seeded ``random.Random`` and explicit ``now`` values (a fake clock); no
sockets.  Targets are IP literals from the documentation ranges; nothing is
resolved.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from typing import Any

import pytest

from rawproxy.config import App, Target, parse_config
from rawproxy.router import Backoff, Balancer, Router


def make_app(targets: list[Any], ports: tuple[int, ...] = (5001,), name: str = "app") -> App:
    document = {"Apps": [{"Name": name, "Ports": list(ports), "Targets": targets}]}
    return parse_config(json.dumps(document), "test.json").apps[0]


def make_balancer(targets: list[Any], seed: int = 1,
                  backoff: Backoff | None = None) -> Balancer:
    return Balancer(make_app(targets).targets, random.Random(seed), backoff)


def pick_counts(balancer: Balancer, picks: int, now: float = 0.0) -> Counter[Target]:
    counts: Counter[Target] = Counter()
    for _ in range(picks):
        target = balancer.acquire(now)
        assert isinstance(target, Target)
        counts[target] += 1
    return counts


# -- weighted choice ----------------------------------------------------------

@pytest.mark.parametrize("seed", [1, 2, 3])
def test_equal_targets_split_evenly(seed: int) -> None:
    balancer = make_balancer(["192.0.2.1:80", "192.0.2.2:80"], seed)
    first, second = balancer.targets
    counts = pick_counts(balancer, 10_000)
    assert 4_500 <= counts[first] <= 5_500
    assert counts[first] + counts[second] == 10_000


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_weights_three_to_one(seed: int) -> None:
    balancer = make_balancer([{"Address": "192.0.2.1:80", "Weight": 3},
                              {"Address": "192.0.2.2:80", "Weight": 1}], seed)
    heavy, light = balancer.targets
    assert heavy.weight == 3 and light.weight == 1
    counts = pick_counts(balancer, 10_000)
    assert 7_200 <= counts[heavy] <= 7_800
    assert counts[light] == 10_000 - counts[heavy]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_first_attempts_split_by_weight_among_the_targets_that_are_up(seed: int) -> None:
    # A first attempt draws among all targets and keeps an up one; a draw
    # that hits a down one is drawn again among the up ones: the split is
    # by weight among those up, whatever share the down ones had.
    balancer = make_balancer([{"Address": "192.0.2.1:80", "Weight": 1},
                              {"Address": "192.0.2.2:80", "Weight": 6},
                              {"Address": "192.0.2.3:80", "Weight": 3}], seed)
    light, down, heavy = balancer.targets
    balancer.record_failure(down, 0.0, "refused")
    counts = pick_counts(balancer, 8_000, now=0.5)
    assert counts[down] == 0
    assert 1_800 <= counts[light] <= 2_200  # 1 / (1 + 3) of 8,000
    assert counts[heavy] == 8_000 - counts[light]


def test_a_stopped_target_is_never_a_first_attempt() -> None:
    balancer = make_balancer([{"Address": "192.0.2.1:80", "Weight": 1},
                              {"Address": "192.0.2.2:80", "Weight": 1_000_000}])
    up, stopped = balancer.targets
    balancer.set_stopped(stopped, True)
    assert pick_counts(balancer, 200) == Counter({up: 200})


def test_single_target_is_always_chosen() -> None:
    balancer = make_balancer(["192.0.2.1:80"])
    (only,) = balancer.targets
    assert all(balancer.acquire(0.0) == only for _ in range(10))


def test_a_balancer_without_targets_chooses_none() -> None:
    assert Balancer([], random.Random(1)).acquire(0.0) is None


# -- tried / failover -----------------------------------------------------------

def test_tried_targets_are_excluded() -> None:
    balancer = make_balancer(["192.0.2.1:80", "192.0.2.2:80", "192.0.2.3:80"])
    first, second, third = balancer.targets
    for _ in range(200):
        assert balancer.acquire(0.0, tried=[first, third]) == second
    assert balancer.acquire(0.0, tried={first, second, third}) is None


@pytest.mark.parametrize("seed", range(20))
def test_failover_order_covers_every_target_once(seed: int) -> None:
    balancer = make_balancer(
        ["192.0.2.1:80", {"Address": "192.0.2.2:80", "Weight": 5},
         "[2001:db8::1]:80", {"Address": "192.0.2.4:80", "Weight": 2}, "192.0.2.5:80"],
        seed)
    tried: list[Target] = []
    while True:
        target = balancer.acquire(0.0, tried)
        if target is None:
            break
        assert isinstance(target, Target) and target not in tried
        tried.append(target)
    assert sorted(tried, key=str) == sorted(balancer.targets, key=str)


# -- passive health ------------------------------------------------------------------

def test_failed_target_is_skipped_during_backoff_and_chosen_after() -> None:
    balancer = make_balancer(["192.0.2.1:80", "192.0.2.2:80"],
                             backoff=Backoff(base_s=1.0, max_s=30.0))
    bad, good = balancer.targets
    balancer.record_failure(bad, now=100.0, reason="refused")
    assert balancer.health(bad).is_down(100.5)
    assert pick_counts(balancer, 500, now=100.0)[bad] == 0
    assert pick_counts(balancer, 500, now=100.999)[bad] == 0
    after = pick_counts(balancer, 1_000, now=101.0)
    assert 400 <= after[bad] <= 600
    assert after[good] == 1_000 - after[bad]


def test_backoff_doubles_per_consecutive_failure_and_caps() -> None:
    balancer = make_balancer(["192.0.2.1:80", "192.0.2.2:80"],
                             backoff=Backoff(base_s=0.5, max_s=6.0))
    target = balancer.targets[0]
    health = balancer.health(target)
    delays = []
    for now in (10.0, 20.0, 30.0, 40.0, 50.0, 60.0):
        balancer.record_failure(target, now, "timeout")
        delays.append(health.down_until - now)
    assert delays == [0.5, 1.0, 2.0, 4.0, 6.0, 6.0]
    assert health.consecutive_failures == 6
    assert health.last_failure == "timeout"


def test_backoff_delay_values() -> None:
    backoff = Backoff(base_s=1.0, max_s=30.0)
    assert backoff.delay_s(0) == 0.0
    assert backoff.delay_s(-3) == 0.0
    assert [backoff.delay_s(n) for n in range(1, 7)] == [1, 2, 4, 8, 16, 30]
    assert backoff.delay_s(10_000) == 30.0  # a long outage: no float overflow


def test_success_clears_the_backoff() -> None:
    balancer = make_balancer(["192.0.2.1:80", "192.0.2.2:80"])
    target, other = balancer.targets
    for now in (0.0, 1.0, 2.0):
        balancer.record_failure(target, now, "refused")
    balancer.record_success(target)
    health = balancer.health(target)
    assert health.consecutive_failures == 0
    assert not health.is_down(2.0)
    assert pick_counts(balancer, 200, now=2.0)[target] > 0
    balancer.record_failure(target, 3.0, "refused")
    assert health.down_until - 3.0 == Backoff().base_s, "the count starts over"
    assert balancer.health(other).consecutive_failures == 0


def test_the_balancers_own_targets_are_found_without_hashing_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    balancer = make_balancer(["192.0.2.1:80", "192.0.2.2:80"])
    hashed: list[Target] = []
    plain_hash = Target.__hash__

    def counted(target: Target) -> int:
        hashed.append(target)
        return plain_hash(target)

    monkeypatch.setattr(Target, "__hash__", counted)
    target = balancer.acquire(0.0)
    assert isinstance(target, Target)
    balancer.record_success(target)
    balancer.release(target)
    assert hashed == [], "a dataclass hash is a Python call per connection"
    balancer.record_success(Target(host=target.host, port=target.port, weight=target.weight))
    assert hashed, "an equal Target made elsewhere is found by equality"


def test_an_equal_target_made_elsewhere_counts_as_the_balancers_own() -> None:
    balancer = make_balancer(["192.0.2.1:80", "192.0.2.2:80"])
    first, _ = balancer.targets
    twin = Target(host="192.0.2.1", port=80)
    assert twin == first and twin is not first
    assert balancer.acquire(0.0, tried=[balancer.targets[1]]) is first
    assert balancer.open_connections(first) == 1
    balancer.release(twin)  # the identity map misses; the equal one is found
    assert balancer.open_connections(first) == 0
    balancer.record_failure(first, 0.0, "refused")
    balancer.record_success(twin)
    assert balancer.health(first).consecutive_failures == 0


def test_down_targets_are_used_when_every_untried_one_is_down() -> None:
    balancer = make_balancer(["192.0.2.1:80", "192.0.2.2:80", "192.0.2.3:80"])
    first, second, third = balancer.targets
    for target in (first, second):
        balancer.record_failure(target, 0.0, "refused")
    # One untried target is up: only it is chosen.
    assert {balancer.acquire(0.5) for _ in range(100)} == {third}
    # The up one was tried: the down ones are tried anyway, not refused.
    assert {balancer.acquire(0.5, tried=[third]) for _ in range(200)} == {first, second}
    assert balancer.acquire(0.5, tried=[third, first]) == second
    assert balancer.acquire(0.5, tried=[third, first, second]) is None


def test_failure_for_a_target_removed_by_reload_is_harmless() -> None:
    balancer = make_balancer(["192.0.2.1:80"])
    gone = Target(host="192.0.2.99", port=80)
    balancer.record_failure(gone, 0.0, "refused")
    balancer.record_success(gone)
    assert balancer.targets == (Target(host="192.0.2.1", port=80),)
    assert balancer.health(balancer.targets[0]).consecutive_failures == 0
    with pytest.raises(KeyError):
        balancer.health(gone)


def test_health_is_per_target() -> None:
    balancer = make_balancer(["192.0.2.1:80", "192.0.2.2:80"])
    first, second = balancer.targets
    balancer.record_failure(first, 0.0, "unreachable")
    assert balancer.health(first).is_down(0.0)
    assert not balancer.health(second).is_down(0.0)
    assert balancer.health(second).last_failure == ""


# -- Router --------------------------------------------------------------------------

CONFIG = {
    "Apps": [
        {"Name": "web", "Ports": [5001, 5002], "Targets": ["192.0.2.1:80", "192.0.2.2:80"]},
        {"Name": "db", "Ports": [6001], "Targets": ["[2001:db8::5]:5432"]},
    ]
}


def test_router_maps_each_port_to_its_apps_route() -> None:
    config = parse_config(json.dumps(CONFIG), "test.json")
    router = Router(config, random.Random(1))
    assert set(router.ports) == {5001, 5002, 6001}
    assert set(router.routes) == {"web", "db"}
    web, db = router.route_for_port(5001), router.route_for_port(6001)
    assert web is not None and db is not None
    assert web.app.name == "web" and db.app.name == "db"
    assert router.route_for_port(5002) is web, "one balancer per app, shared by its ports"
    assert web.balancer.targets == config.apps[0].targets
    assert db.balancer.targets == (Target(host="2001:db8::5", port=5432),)
    assert router.route_for_port(7001) is None


def test_router_health_is_shared_across_an_apps_ports() -> None:
    router = Router(parse_config(json.dumps(CONFIG), "test.json"), random.Random(1),
                    Backoff(base_s=2.0, max_s=4.0))
    via_first, via_second = router.route_for_port(5001), router.route_for_port(5002)
    assert via_first is not None and via_second is not None
    target = via_first.balancer.targets[0]
    via_first.balancer.record_failure(target, 0.0, "refused")
    assert via_second.balancer.health(target).down_until == 2.0
