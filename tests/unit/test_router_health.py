"""Unit tests for the health state in rawproxy.router: active check verdicts
(``record_check``) layered with passive back-off, and health carried across
a reload (``Router(previous=...)``, ``Balancer.adopt``).

Seeded ``random.Random`` and explicit ``now`` values; no sockets.  Targets
are IP literals from the documentation ranges.
"""

from __future__ import annotations

import json
import random
from typing import Any, Optional

from rawproxy.config import Config, Target, parse_config
from rawproxy.router import Backoff, Balancer, Router
from rawproxy.stats import Stats

A, B, C, D = "192.0.2.1:80", "192.0.2.2:80", "192.0.2.3:80", "192.0.2.4:80"
CHECK: dict[str, float] = {"Interval": 5}


def make_config(apps: dict[str, list[Any]],
                check: Optional[dict[str, float]] = CHECK) -> Config:
    """Apps with active checks unless ``check`` is None."""
    document: dict[str, Any] = {"Apps": [
        {"Name": name, "Ports": [5001 + index], "Targets": targets}
        for index, (name, targets) in enumerate(apps.items())]}
    if check is not None:
        for app in document["Apps"]:
            app["HealthCheck"] = check
    return parse_config(json.dumps(document), "test.json")


def make_balancer(targets: list[Any], seed: int = 7, active_checks: bool = True) -> Balancer:
    app = make_config({"app": targets}).apps[0]
    return Balancer(app.targets, random.Random(seed), Backoff(base_s=1.0, max_s=30.0),
                    active_checks=active_checks)


def by_address(balancer: Balancer) -> dict[str, Target]:
    return {t.address: t for t in balancer.targets}


def chosen(balancer: Balancer, now: float, picks: int = 200) -> set[Target]:
    out = set()
    for _ in range(picks):
        target = balancer.acquire(now)
        assert isinstance(target, Target)
        out.add(target)
    return out


# -- record_check ----------------------------------------------------------------

def test_a_failed_check_holds_the_target_down_whatever_the_time() -> None:
    balancer = make_balancer([A, B])
    a, b = balancer.targets
    balancer.record_check(a, False, "refused")
    health = balancer.health(a)
    assert health.check_failed and health.last_failure == "refused"
    for now in (0.0, 1.0, 1e6, 1e12):
        assert health.is_down(now)
        assert chosen(balancer, now) == {b}
    # A check failure is not a passive failure: it does not start a back-off.
    assert health.consecutive_failures == 0 and health.down_until == 0.0


def test_a_passive_success_does_not_lift_a_check_failure() -> None:
    balancer = make_balancer([A, B])
    a, _ = balancer.targets
    balancer.record_check(a, False, "timeout")
    balancer.record_success(a)  # a client got through while every target was down
    assert balancer.health(a).is_down(0.0)


def test_a_successful_check_brings_the_target_back() -> None:
    balancer = make_balancer([A, B])
    a, b = balancer.targets
    balancer.record_check(a, False, "refused")
    balancer.record_check(a, False, "refused")  # still down, not worse
    assert balancer.health(a).is_down(5.0)
    balancer.record_check(a, True)
    assert not balancer.health(a).is_down(5.0)
    assert chosen(balancer, 5.0) == {a, b}


def test_a_successful_check_clears_the_passive_backoff() -> None:
    balancer = make_balancer([A, B])
    a, _ = balancer.targets
    for now in (100.0, 101.0, 102.0):
        balancer.record_failure(a, now, "refused")
    health = balancer.health(a)
    assert health.consecutive_failures == 3 and health.is_down(105.0)
    balancer.record_check(a, True)
    assert health.consecutive_failures == 0 and health.down_until == 0.0
    assert not health.is_down(102.0)


def test_passive_failures_still_apply_while_checks_pass() -> None:
    balancer = make_balancer([A, B])
    a, b = balancer.targets
    balancer.record_check(a, True)
    balancer.record_failure(a, 100.0, "reset")
    health = balancer.health(a)
    assert not health.check_failed
    assert health.is_down(100.5) and chosen(balancer, 100.5) == {b}
    assert not health.is_down(101.0)
    balancer.record_failure(a, 101.0, "reset")  # the back-off still doubles
    assert health.down_until == 103.0


def test_a_failed_check_keeps_the_passive_backoff_count() -> None:
    balancer = make_balancer([A, B])
    a, _ = balancer.targets
    balancer.record_failure(a, 10.0, "refused")
    balancer.record_failure(a, 11.0, "refused")
    balancer.record_check(a, False, "timeout")
    health = balancer.health(a)
    assert health.consecutive_failures == 2 and health.down_until == 13.0
    assert health.last_failure == "timeout"


def test_when_every_target_failed_its_check_they_are_tried_anyway() -> None:
    balancer = make_balancer([A, B])
    a, b = balancer.targets
    balancer.record_check(a, False, "refused")
    balancer.record_check(b, False, "refused")
    assert chosen(balancer, 0.0) == {a, b}
    assert balancer.acquire(0.0, tried=[a]) == b


def test_a_check_for_a_target_the_balancer_does_not_have_is_ignored() -> None:
    balancer = make_balancer([A, B])
    stranger = make_balancer([C]).targets[0]
    balancer.record_check(stranger, False, "refused")
    assert not any(h.is_down(0.0) for h in balancer.healths())


def test_healths_lists_every_target_in_order() -> None:
    balancer = make_balancer([A, B, C])
    assert [h.target for h in balancer.healths()] == list(balancer.targets)
    assert [h.target.address for h in balancer.healths()] == [A, B, C]


# -- adopt and Router(previous=...) ---------------------------------------------------------

def test_adopt_carries_health_by_address() -> None:
    old = make_balancer([A, B, C])
    oa, ob, oc = old.targets
    old.record_check(oa, False, "refused")
    old.record_failure(ob, 100.0, "timeout")
    old.record_failure(ob, 101.0, "timeout")
    # A with a new weight is still A; C is gone; D is new.
    new = make_balancer([{"Address": A, "Weight": 3}, B, D])
    new.adopt(old)
    targets = by_address(new)
    assert targets[A].weight == 3 and targets[A] != oa
    assert new.health(targets[A]).check_failed
    assert new.health(targets[A]).last_failure == "refused"
    hb = new.health(targets[B])
    assert (hb.consecutive_failures, hb.down_until, hb.last_failure) == (2, 103.0, "timeout")
    hd = new.health(targets[D])
    assert (hd.check_failed, hd.consecutive_failures, hd.down_until) == (False, 0, 0.0)
    assert C not in targets


def test_adopted_health_is_a_copy() -> None:
    old = make_balancer([A])
    (oa,) = old.targets
    old.record_check(oa, False, "refused")
    new = make_balancer([A])
    new.adopt(old)
    new.record_check(new.targets[0], True)
    assert not new.health(new.targets[0]).check_failed
    assert old.health(oa).check_failed


def test_router_reload_keeps_health_drops_gone_targets_and_starts_new_ones_up() -> None:
    rng = random.Random(3)
    stats = Stats(start_time=0.0)
    first = Router(make_config({"web": [A, B, "[2001:db8::1]:80"], "db": [C]}), rng,
                   stats=stats)
    web = first.routes["web"].balancer
    old = by_address(web)
    web.record_check(old[A], False, "refused")
    web.record_failure(old[B], 50.0, "reset")
    web.record_check(old["[2001:db8::1]:80"], False, "timeout")
    first.routes["db"].balancer.record_check(first.routes["db"].balancer.targets[0],
                                             False, "refused")
    stats.app("web").accepted = 9

    # B is removed, the IPv6 target is spelled differently, D is added, db is gone.
    second = Router(make_config({"web": [A, "[2001:DB8:0::1]:80", D], "cache": [C]}), rng,
                    stats=stats, previous=first)
    web2 = second.routes["web"].balancer
    new = by_address(web2)
    assert set(new) == {A, "[2001:db8::1]:80", D}
    assert web2.health(new[A]).is_down(1e9)
    assert web2.health(new["[2001:db8::1]:80"]).last_failure == "timeout"
    assert not web2.health(new[D]).is_down(0.0)
    assert chosen(web2, 0.0) == {new[D]}
    # A stale attempt's verdicts on the dropped B land nowhere and break nothing.
    web2.record_failure(old[B], 60.0, "refused")
    web2.record_check(old[B], False, "refused")
    assert len(web2.healths()) == 3
    # An app that is new by name starts with healthy targets.
    assert not second.routes["cache"].balancer.healths()[0].is_down(0.0)
    assert "db" not in second.routes
    # Counters are kept per app name across the reload.
    assert second.routes["web"].stats is first.routes["web"].stats
    assert second.routes["web"].stats.accepted == 9


def test_health_survives_two_reloads() -> None:
    rng = random.Random(5)
    first = Router(make_config({"web": [A, B]}), rng)
    balancer = first.routes["web"].balancer
    balancer.record_check(by_address(balancer)[A], False, "refused")
    second = Router(make_config({"web": [A, B, C]}), rng, previous=first)
    third = Router(make_config({"web": [C, A]}), rng, previous=second)
    last = third.routes["web"].balancer
    assert last.health(by_address(last)[A]).check_failed
    assert not last.health(by_address(last)[C]).check_failed
    last.record_check(by_address(last)[A], True)
    assert not any(h.is_down(0.0) for h in last.healths())


def test_a_reload_that_removes_the_health_check_lifts_its_verdicts() -> None:
    # Issue #18 (4): with no HealthCheck nothing checks any more, so an
    # adopted check failure would hold the target down for ever.
    rng = random.Random(2)
    first = Router(make_config({"web": [A, B]}), rng)
    web = first.routes["web"].balancer
    old = by_address(web)
    web.record_check(old[A], False, "refused")
    web.record_check(old[B], False, "timeout")
    web.record_failure(old[B], 100.0, "reset")
    second = Router(make_config({"web": [A, B]}, check=None), rng, previous=first)
    web2 = second.routes["web"].balancer
    new = by_address(web2)
    assert not any(h.check_failed for h in web2.healths())
    assert not web2.health(new[A]).is_down(0.0)
    # Passive health is not the check's: B's back-off is carried over.
    health_b = web2.health(new[B])
    assert health_b.is_down(100.5) and not health_b.is_down(101.0)
    assert health_b.consecutive_failures == 1
    assert chosen(web2, 101.0) == {new[A], new[B]}
    # A check that was in flight during the reload lands nowhere.
    web2.record_check(new[A], False, "refused")
    assert not web2.health(new[A]).is_down(0.0)
    # The old router's verdicts are its own.
    assert web.health(old[A]).check_failed


def test_a_reload_that_keeps_the_health_check_keeps_its_verdicts() -> None:
    rng = random.Random(2)
    first = Router(make_config({"web": [A, B]}), rng)
    web = first.routes["web"].balancer
    web.record_check(by_address(web)[A], False, "refused")
    second = Router(make_config({"web": [A, B]}, check={"Interval": 1, "Timeout": 0.5}),
                    rng, previous=first)
    web2 = second.routes["web"].balancer
    assert web2.health(by_address(web2)[A]).check_failed


def test_a_balancer_without_active_checks_ignores_and_drops_check_verdicts() -> None:
    checked = make_balancer([A, B])
    checked.record_check(checked.targets[0], False, "refused")
    unchecked = make_balancer([A, B], active_checks=False)
    unchecked.adopt(checked)
    assert not any(h.check_failed for h in unchecked.healths())
    assert unchecked.health(unchecked.targets[0]).last_failure == "refused"
    unchecked.record_check(unchecked.targets[1], False, "timeout")
    assert not any(h.is_down(0.0) for h in unchecked.healths())


def test_router_without_previous_starts_every_target_up() -> None:
    router = Router(make_config({"web": [A, B], "db": [C]}), random.Random(1))
    assert all(not h.is_down(0.0) and h.last_failure == ""
               for route in router.routes.values() for h in route.balancer.healths())


# -- health shared between workers ------------------------------------------------

def test_passive_changes_are_reported_once_per_change() -> None:
    changes: list[tuple[str, str, float]] = []
    router = Router(make_config({"web": [A, B]}), random.Random(1), Backoff(1.0, 30.0),
                    on_change=lambda app, address, until: changes.append((app, address, until)))
    balancer = router.routes["web"].balancer
    targets = by_address(balancer)
    balancer.record_success(targets[A])      # already up: nothing to tell
    balancer.record_failure(targets[A], 100.0, "refused")   # down until 101
    balancer.record_failure(targets[A], 100.5, "refused")   # still down (now until 102.5)
    balancer.record_failure(targets[A], 103.0, "refused")   # down again after the back-off
    balancer.record_success(targets[A])      # up again
    balancer.record_success(targets[A])      # still up: nothing to tell
    assert changes == [("web", A, 101.0), ("web", A, 107.0), ("web", A, 0.0)]


def test_a_shared_verdict_marks_down_without_counting_a_failure_or_echoing() -> None:
    changes: list[tuple[str, str, float]] = []
    router = Router(make_config({"web": [A, B], "db": [A]}), random.Random(1),
                    on_change=lambda *change: changes.append(change))
    router.apply_shared("web", A, 50.0)
    web, db = router.routes["web"].balancer, router.routes["db"].balancer
    health = web.health(by_address(web)[A])
    assert health.is_down(49.9) and not health.is_down(50.0)
    assert health.consecutive_failures == 0
    assert not db.health(by_address(db)[A]).is_down(49.9)  # another app's target
    assert chosen(web, 10.0) == {by_address(web)[B]}
    assert changes == []  # applying a sibling's verdict is not news to pass on


def test_a_shared_verdict_never_shortens_a_local_back_off() -> None:
    balancer = make_balancer([A, B])
    target = by_address(balancer)[A]
    for now in (0.0, 0.0, 0.0):  # 1 + 2 + 4: down until 4.0
        balancer.record_failure(target, now, "refused")
    balancer.apply_shared(A, 2.0)
    assert balancer.health(target).is_down(3.9)
    balancer.apply_shared(A, 0.0)  # a sibling connected: it is up
    assert not balancer.health(target).is_down(0.1)
    assert balancer.health(target).consecutive_failures == 0


def test_an_unknown_app_or_address_is_ignored() -> None:
    router = Router(make_config({"web": [A]}), random.Random(1))
    router.apply_shared("gone", A, 50.0)
    router.apply_shared("web", D, 50.0)
    balancer = router.routes["web"].balancer
    assert not balancer.health(by_address(balancer)[A]).is_down(1.0)
