"""Micro benchmarks of the hot paths: run by ``make bench-micro`` only.

In the normal test run (``make test``, ``pytest tests``) every test in this
directory is skipped, so the suite neither slows down nor runs them as
plain tests.  They run when pytest-benchmark is enabled
(``--benchmark-enable``) or ``RAWPROXY_BENCH_MICRO=1`` is set.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _enabled(config: pytest.Config) -> bool:
    return bool(config.getoption("benchmark_enable", default=False)
                or os.environ.get("RAWPROXY_BENCH_MICRO"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _enabled(config):
        return
    skip = pytest.mark.skip(reason="micro benchmark: make bench-micro (or --benchmark-enable)")
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(skip)
