"""rawproxy.limits: per-client keys, tables, token buckets, a log throttle.

No sockets: a fake clock stands in for time.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rawproxy.limits import ClientTable, LogThrottle, PerClientLimits, client_key


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- who a client is -----------------------------------------------------------------

@pytest.mark.parametrize("addr, key", [
    (("127.0.0.1", 5000), "127.0.0.1"),
    (("2001:db8:1:2:aaaa::1", 5000, 0, 0), "2001:db8:1:2::/64"),
    (("2001:db8:1:2:ffff:ffff:ffff:ffff", 1, 0, 0), "2001:db8:1:2::/64"),
    (("2001:db8:1:3::1", 1, 0, 0), "2001:db8:1:3::/64"),
    (("::ffff:192.0.2.7", 1, 0, 0), "192.0.2.7"),
    (("fe80::1%eth0", 1, 0, 2), "fe80::/64"),
    (("::1", 1, 0, 0), "::/64"),
    ("/run/rawproxy.sock", "/run/rawproxy.sock"),
])
def test_client_key_groups_ipv6_by_64_and_maps_ipv4(addr: object, key: str) -> None:
    assert client_key(addr) == key


def test_two_addresses_of_one_64_share_a_limit() -> None:
    table = ClientTable(1, None, FakeClock())
    assert table.admit(client_key(("2001:db8::1", 1, 0, 0))) == ""
    assert "MaxConnections 1" in table.admit(client_key(("2001:db8::2", 1, 0, 0)))
    assert table.admit(client_key(("2001:db8:0:1::1", 1, 0, 0))) == ""


# -- MaxConnections -------------------------------------------------------------------

def test_max_connections_refuses_beyond_the_limit_until_one_closes() -> None:
    table = ClientTable(2, None, FakeClock())
    assert table.admit("a") == table.admit("a") == ""
    assert table.admit("a") == "a over PerClient MaxConnections 2"
    assert table.admit("b") == ""  # another client has its own count
    table.release("a")
    assert table.admit("a") == ""
    assert table.open_count("a") == 2


def test_without_rate_a_client_with_nothing_open_is_forgotten_at_once() -> None:
    table = ClientTable(2, None, FakeClock())
    table.admit("a")
    table.release("a")
    assert len(table) == 0
    table.release("a")  # a stray release changes nothing
    assert table.open_count("a") == 0


# -- Rate ---------------------------------------------------------------------------

def test_rate_allows_a_burst_of_r_then_refills_r_a_second() -> None:
    clock = FakeClock()
    table = ClientTable(None, 4.0, clock)
    assert [table.admit("a") for _ in range(4)] == [""] * 4
    assert table.admit("a") == "a over PerClient Rate 4/s"
    assert table.admit("b") == ""  # buckets are per client
    clock.now += 0.2  # 0.8 of a token: still refused, and the refusal spends nothing
    assert table.admit("a") != ""
    clock.now += 0.05
    assert table.admit("a") == ""
    assert table.admit("a") != ""
    clock.now += 10  # refills to the burst, no further
    assert [table.admit("a") for _ in range(5)] == [""] * 4 + ["a over PerClient Rate 4/s"]


def test_a_rate_below_one_still_admits_one_connection() -> None:
    clock = FakeClock()
    table = ClientTable(None, 0.5, clock)
    assert table.admit("a") == ""
    assert table.admit("a") == "a over PerClient Rate 0.5/s"
    clock.now += 1.9
    assert table.admit("a") != ""
    clock.now += 0.1
    assert table.admit("a") == ""


def test_max_connections_and_rate_together() -> None:
    clock = FakeClock()
    table = ClientTable(1, 10.0, clock)
    assert table.admit("a") == ""
    assert "MaxConnections" in table.admit("a")
    table.release("a")
    for _ in range(9):
        assert table.admit("a") == ""
        table.release("a")
    assert "Rate" in table.admit("a")  # 10 spent within no time at all


# -- memory: idle entries expire, and are capped ---------------------------------------

def test_an_idle_client_is_forgotten_once_its_bucket_is_full_again() -> None:
    clock = FakeClock()
    table = ClientTable(None, 2.0, clock)
    table.admit("a")
    table.admit("a")
    table.release("a")
    table.release("a")
    assert len(table) == 1  # two tokens spent: remembered while they refill
    clock.now += 0.99
    table.admit("b")
    assert len(table) == 2
    clock.now += 0.01  # 1 s (burst / rate) after its last close
    table.admit("c")
    assert len(table) == 2  # "a" expired: a fresh entry would say the same
    assert [table.admit("a") for _ in range(3)] == ["", "", "a over PerClient Rate 2/s"]


def test_a_client_with_open_connections_is_never_expired() -> None:
    clock = FakeClock()
    table = ClientTable(1, 1.0, clock)
    table.admit("a")
    clock.now += 3600
    table.admit("b")
    assert "MaxConnections" in table.admit("a")


def test_a_flood_of_distinct_addresses_is_capped_and_the_oldest_forgotten() -> None:
    clock = FakeClock()
    table = ClientTable(None, 1.0, clock, max_idle=100)
    for n in range(10_000):
        key = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
        assert table.admit(key) == ""
        table.release(key)
        assert len(table) <= 100
    assert table.admit("10.0.0.0") == ""  # forgotten at the cap: a full bucket again
    assert table.admit("10.0.39.15") != ""  # the last one is still remembered


def test_refusals_add_no_entries() -> None:
    clock = FakeClock()
    table = ClientTable(1, 1.0, clock)
    table.admit("a")
    for _ in range(1000):
        assert table.admit("a") != ""
    assert len(table) == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["admit", "release"]), st.integers(0, 30),
                          st.floats(0, 0.3)), max_size=300))
def test_entries_are_bounded_by_open_clients_plus_the_cap(
        steps: list[tuple[str, int, float]]) -> None:
    clock = FakeClock()
    table = ClientTable(3, 5.0, clock, max_idle=5)
    model: dict[str, int] = {}
    for action, n, dt in steps:
        clock.now += dt
        key = f"c{n}"
        if action == "admit":
            if table.admit(key) == "":
                model[key] = model.get(key, 0) + 1
        elif model.get(key):
            table.release(key)
            model[key] -= 1
        assert table.open_count(key) == model.get(key, 0) <= 3
        assert len(table) <= sum(1 for count in model.values() if count) + 5


def test_a_new_configuration_keeps_open_counts() -> None:
    clock = FakeClock()
    table = ClientTable(3, 10.0, clock)
    for _ in range(3):
        table.admit("a")
    table.configure(2, None)
    assert "MaxConnections 2" in table.admit("a")
    table.release("a")
    table.release("a")
    assert table.admit("a") == ""  # rate gone, two open again: that is the limit
    table.configure(None, 1.0)  # burst 1 now: the old 7 tokens are cut to 1
    assert table.admit("a") == ""
    assert "Rate" in table.admit("a")


# -- every app's table, and releases after a reload --------------------------------------

def test_per_client_limits_count_by_holder_across_a_reload() -> None:
    clock = FakeClock()
    limits = PerClientLimits(clock)
    limits.configure({"web": (1, None)})
    first, second, other = object(), object(), object()
    assert limits.admit("web", ("192.0.2.1", 1), first) == ""
    assert limits.admit("web", ("192.0.2.1", 2), second) != ""
    assert limits.admit("db", ("192.0.2.1", 3), other) == ""  # no PerClient: not counted
    assert limits.held() == 1
    old = limits.tables["web"]
    limits.configure({})  # a reload removed web's PerClient
    assert limits.admit("web", ("192.0.2.1", 4), second) == ""
    limits.release(first)
    limits.release(second)
    limits.release(other)
    assert old.open_count("192.0.2.1") == 0 and limits.held() == 0


def test_a_table_that_stays_across_a_reload_keeps_its_counts() -> None:
    limits = PerClientLimits(FakeClock())
    limits.configure({"web": (2, None)})
    holders = [object(), object()]
    for holder in holders:
        assert limits.admit("web", ("192.0.2.1", 1), holder) == ""
    limits.configure({"web": (3, None)})
    assert limits.admit("web", ("192.0.2.1", 1), object()) == ""
    assert limits.admit("web", ("192.0.2.1", 1), object()) != ""


# -- the log throttle ---------------------------------------------------------------------

def test_log_throttle_lets_one_line_a_second_through_and_counts_the_rest() -> None:
    clock = FakeClock()
    throttle = LogThrottle(1.0)
    assert throttle.allow(clock.now)
    assert not throttle.allow(clock.now + 0.1) and not throttle.allow(clock.now + 0.5)
    assert throttle.held == 2 and throttle.window_left(clock.now + 0.25) == 0.75
    clock.now += 1.0
    assert not throttle.allow(clock.now)  # the held count is not reported yet
    assert throttle.take_held() == 3 and throttle.held == 0
    assert throttle.allow(clock.now)


def _churn(limits: PerClientLimits, app: str, clients: int, first: int = 0) -> None:
    for index in range(first, first + clients):
        holder = (app, index)
        assert limits.admit(app, (f"10.0.{index // 250}.{index % 250}", 1), holder) == ""
        limits.release(holder)


def test_the_idle_cap_is_shared_by_every_app() -> None:
    limits = PerClientLimits(FakeClock(), max_idle=4)
    limits.configure({name: (None, 0.01) for name in ("a", "b", "c")})
    for app in ("a", "b", "c"):
        _churn(limits, app, 3)
    assert sum(len(table) for table in limits.tables.values()) <= 4
    # A table that goes returns its share: the others may use the whole cap.
    limits.configure({"a": (None, 0.01)})
    _churn(limits, "a", 10, first=100)
    assert len(limits.tables["a"]) == 4
    assert limits.idle_budget.used == 4
