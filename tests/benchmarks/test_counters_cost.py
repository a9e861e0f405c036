"""Micro benchmarks: what the shared connection counters cost one connection.

A proxied connection touches the counters four times: the app's slot is
taken before accept and given back at close, the chosen target's slot is
taken by ``Balancer.acquire`` and given back by ``release``.  Each
benchmark runs those four for one connection (and asserts the counts are
back to zero), in the three cases that differ:

* one process (no ``--workers``), or an app without limits: plain adds;
* ``--workers`` with ``MaxConnections`` and ``Concurrency``: each of the
  four under the cross-process lock (``fcntl.lockf``), as the limits need;
* the whole choice, ``Balancer.acquire`` + ``release``, for scale.

Skipped in the normal test run (see ``conftest.py``): ``make bench-micro``.
"""

from __future__ import annotations

import random

from rawproxy.balance import Verdict
from rawproxy.config import parse_config
from rawproxy.counters import SharedCounters
from rawproxy.router import Balancer

TARGETS = '["192.0.2.1:80", "192.0.2.2:80", "192.0.2.3:80"]'


def test_counters_per_connection_unlimited(benchmark) -> None:
    block = SharedCounters(1)
    counters = block.worker(0)
    app, target = counters.slot("web"), counters.slot("web", "192.0.2.1:80")

    def connection() -> int:
        counters.add(app, 1)
        counters.add(target, 1)
        counters.add(target, -1)
        counters.add(app, -1)
        return counters.total(app)

    assert benchmark(connection) == 0
    block.close()


def test_counters_per_connection_limited_under_workers(benchmark) -> None:
    block = SharedCounters(2)
    counters = block.worker(0)
    app, target = counters.slot("web"), counters.slot("web", "192.0.2.1:80")

    def connection() -> int:
        assert counters.take(app, 100) and counters.take(target, 10)
        counters.give_back(target)
        counters.give_back(app)
        return counters.total(app)

    assert benchmark(connection) == 0
    block.close()


def test_balancer_acquire_and_release(benchmark) -> None:
    config = parse_config('{"Apps": [{"Name": "web", "Ports": [5001], "Targets": '
                          + TARGETS + "}]}", "bench.json")
    balancer = Balancer(config.apps[0].targets, random.Random(6), app_name="web")

    def connection() -> bool:
        target = balancer.acquire(0.0)
        assert target is not None and target is not Verdict.WAIT
        balancer.release(target)
        return True

    assert benchmark(connection)
