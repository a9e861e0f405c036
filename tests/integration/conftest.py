"""Fixtures for tests against a real proxy process on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.etcd_fixtures import FleetFactory
from tests.support import Backend, ProxyFactory


@pytest.fixture
def proxies(tmp_path: Path) -> Iterator[ProxyFactory]:
    factory = ProxyFactory(tmp_path)
    yield factory
    factory.close()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[FleetFactory]:
    """Proxies fed by etcd (``--etcd``), each stopped at teardown."""
    factory = FleetFactory(tmp_path)
    yield factory
    factory.close()


@pytest.fixture
def backend() -> Iterator[Callable[..., Backend]]:
    started: list[Backend] = []

    def start(mode: str = "echo", **kwargs: object) -> Backend:
        server = Backend(mode, **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()
