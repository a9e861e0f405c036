"""The typed result of a config (:mod:`rawproxy.config` makes them): immutable
dataclasses, with the defaults the config file's optional keys take.

Pure: nothing but the standard library's ``ipaddress`` and ``dataclasses``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Optional, Union

__all__ = ["BALANCE_LEAST_CONNECTIONS", "BALANCE_POLICIES", "BALANCE_RANDOM",
           "DEFAULT_CONNECT_TIMEOUT_S", "DEFAULT_QUEUE_TIMEOUT_S", "App", "Concurrency",
           "Config", "DEFAULT_START_TIMEOUT_S", "HealthCheck", "Hook", "IPNetwork", "Machines",
           "PerClient", "Target"]

DEFAULT_CONNECT_TIMEOUT_S = 3.0
# fly-proxy's default wait for a machine slot is of this order; a client
# that waits longer has most likely given up already.
DEFAULT_QUEUE_TIMEOUT_S = 5.0
# fly-proxy waits about this long for a machine to start (SPEC 10).
DEFAULT_START_TIMEOUT_S = 10.0
BALANCE_RANDOM = "random"  # weighted random (SPEC 4)
BALANCE_LEAST_CONNECTIONS = "least-connections"  # weighted power of two choices
BALANCE_POLICIES = (BALANCE_RANDOM, BALANCE_LEAST_CONNECTIONS)

# Evaluated at run time (isinstance, dataclass field types for
# typing.get_type_hints), so Union rather than ``|`` on Python 3.9.
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


@dataclass(frozen=True)
class Target:
    """One backend of an app; ``host`` is canonical (see rawproxy.config)."""

    host: str
    port: int
    weight: int = 1
    # ``host:port`` or ``[v6]:port``: the target's identity in logs and
    # metrics; computed once, since the relay reads it per connection.
    address: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        host = f"[{self.host}]" if ":" in self.host else self.host
        object.__setattr__(self, "address", f"{host}:{self.port}")


@dataclass(frozen=True)
class HealthCheck:
    interval_s: float
    timeout_s: float


@dataclass(frozen=True)
class PerClient:  # per client address (IPv4, or IPv6 /64): see rawproxy.limits
    max_connections: Optional[int] = None
    rate: Optional[float] = None  # new connections a second, burst max(rate, 1)


@dataclass(frozen=True)
class Concurrency:
    """Open connections per target, in the whole process (SPEC 9): below
    ``soft_limit`` a target is preferred, at ``hard_limit`` it takes no more."""

    soft_limit: int
    hard_limit: int


@dataclass(frozen=True)
class Hook:
    """How a machine is started or stopped (SPEC 10): an HTTP POST to
    ``url``, or ``command`` run without a shell; exactly one is set."""

    url: Optional[str] = None
    command: tuple[str, ...] = ()


@dataclass(frozen=True)
class Machines:
    """Targets started on demand and stopped when idle (SPEC 10)."""

    start: Hook
    stop: Optional[Hook] = None
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S
    stop_after_s: Optional[float] = None  # None: no autostop
    min_running: int = 0


@dataclass(frozen=True)
class App:
    name: str
    ports: tuple[int, ...]
    targets: tuple[Target, ...]
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    idle_timeout_s: Optional[float] = None
    max_connections: Optional[int] = None
    proxy_protocol: Optional[str] = None
    health_check: Optional[HealthCheck] = None
    allow_from: tuple[IPNetwork, ...] = ()
    per_client: Optional[PerClient] = None
    concurrency: Optional[Concurrency] = None
    queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S
    balance: str = BALANCE_RANDOM
    machines: Optional[Machines] = None


@dataclass(frozen=True)
class Config:
    """Every app; ``source`` names where it came from (used in messages)."""

    apps: tuple[App, ...]
    source: str
    _by_port: Mapping[int, App] = field(
        init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        by_port = {port: app for app in self.apps for port in app.ports}
        # Frozen dataclass: the derived index is set once, here.
        object.__setattr__(self, "_by_port", MappingProxyType(by_port))

    @property
    def ports(self) -> Mapping[int, App]:
        """Read-only ``port -> app`` for every listening port."""
        return self._by_port

    def app_for_port(self, port: int) -> Optional[App]:
        return self._by_port.get(port)
