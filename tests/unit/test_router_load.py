"""Unit tests for the load-aware side of rawproxy.router (SPEC 9):
``Balancer.acquire``/``release`` over shared counters, Concurrency tiers,
least-connections, and slots that survive a reload.

Seeded ``random.Random`` and a fake clock; no sockets.  Targets are IP
literals from the documentation ranges.
"""

from __future__ import annotations

import json
import random
import select
from typing import Any, Iterator

import pytest

from rawproxy.balance import Verdict
from rawproxy.config import ConfigError, Target, parse_config
from rawproxy.counters import SharedCounters
from rawproxy.router import Balancer, Router

A, B, C = "192.0.2.1:80", "192.0.2.2:80", "192.0.2.3:80"


def config(targets: list[Any], **keys: Any) -> Any:
    document = {"Apps": [{"Name": "web", "Ports": [5001], "Targets": targets, **keys}]}
    return parse_config(json.dumps(document), "test.json")


@pytest.fixture
def block() -> Iterator[SharedCounters]:
    shared = SharedCounters(2, 64)
    yield shared
    shared.close()


def balancer_of(router: Router) -> Balancer:
    return router.routes["web"].balancer


def take(balancer: Balancer, now: float = 0.0, tried: Any = ()) -> Target:
    target = balancer.acquire(now, tried)
    assert isinstance(target, Target)
    return target


def test_acquire_counts_and_release_gives_back() -> None:
    balancer = balancer_of(Router(config([A, B]), random.Random(1)))
    first = take(balancer)
    assert balancer.open_connections(first) == 1
    balancer.release(first)
    assert [balancer.open_connections(t) for t in balancer.targets] == [0, 0]


def test_soft_then_hard_then_wait_then_a_freed_slot() -> None:
    router = Router(config([A, B], Concurrency={"SoftLimit": 1, "HardLimit": 2}),
                    random.Random(3))
    balancer = balancer_of(router)
    a, b = balancer.targets
    # Both below soft: one each, before either gets a second.
    assert {take(balancer), take(balancer)} == {a, b}
    assert {take(balancer), take(balancer)} == {a, b}  # below hard
    assert balancer.acquire(0.0) is Verdict.WAIT
    balancer.release(b)
    assert take(balancer) == b
    assert balancer.acquire(0.0) is Verdict.WAIT


def test_a_waiting_client_that_tried_everything_gets_none() -> None:
    balancer = balancer_of(Router(config([A], Concurrency={"HardLimit": 1}), random.Random(1)))
    (a,) = balancer.targets
    assert balancer.acquire(0.0, [a]) is None


def test_a_down_target_below_its_limits_is_passed_over() -> None:
    balancer = balancer_of(Router(config([A, B], Concurrency={"SoftLimit": 1, "HardLimit": 50}),
                                  random.Random(1)))
    a, b = balancer.targets
    balancer.record_failure(a, 10.0, "refused")  # down for 1 s
    assert {take(balancer, 10.5) for _ in range(20)} == {b}
    assert take(balancer, 11.5) == a  # up again, and the only one below SoftLimit


def test_least_connections_sends_to_the_less_loaded() -> None:
    balancer = balancer_of(Router(config([A, B, C], Balance="least-connections"),
                                  random.Random(2)))
    a, b, c = balancer.targets
    for _ in range(3):
        take(balancer, tried=[b, c])  # a gets 3
    take(balancer, tried=[a, c])  # b gets 1
    assert take(balancer) != a  # a loses to either of the others
    # A long run: each new one stays open, so the loads even out.
    for _ in range(60):
        take(balancer)
    loads = [balancer.open_connections(t) for t in (a, b, c)]
    assert max(loads) - min(loads) <= 2


def test_a_reload_keeps_the_counts_by_name() -> None:
    first = Router(config([A, B]), random.Random(1))
    target = take(balancer_of(first), tried=[t for t in balancer_of(first).targets
                                            if t.address != A])
    second = Router(config([{"Address": A, "Weight": 5}, C]), random.Random(1),
                    previous=first)
    assert second.counters is first.counters
    renewed = balancer_of(second)
    a = next(t for t in renewed.targets if t.address == A)
    assert renewed.open_connections(a) == 1
    balancer_of(first).release(target)  # the old session closes
    assert renewed.open_connections(a) == 0


def test_workers_share_the_hard_limit_and_the_wake(block: SharedCounters) -> None:
    cfg = config([A], Concurrency={"HardLimit": 2})
    zero = balancer_of(Router(cfg, random.Random(1), counters=block.worker(0)))
    one = balancer_of(Router(cfg, random.Random(1), counters=block.worker(1)))
    held = [take(zero), take(zero)]
    assert one.acquire(0.0) is Verdict.WAIT
    zero.release(held[0])
    wake_fd = block.worker(1).wake_fd
    assert wake_fd is not None and select.select([wake_fd], [], [], 0)[0]
    assert take(one) == held[0]
    assert zero.acquire(0.0) is Verdict.WAIT


def test_routes_count_their_app_in_its_own_slot(block: SharedCounters) -> None:
    router = Router(config([A]), random.Random(1), counters=block.worker(1))
    route = router.routes["web"]
    assert route.counters is router.counters
    assert route.slot == block.worker(0).slot("web")
    assert route.slot != block.worker(0).slot("web", A)


def test_a_full_counter_block_is_a_config_error() -> None:
    tiny = SharedCounters(1, 2)
    try:
        with pytest.raises(ConfigError, match=r"^test\.json: more than 2 distinct apps"):
            Router(config([A, B]), random.Random(1), counters=tiny.worker(0))
    finally:
        tiny.close()
