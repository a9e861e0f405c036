"""Active health checks (an app's ``HealthCheck``): a TCP connect per target
every ``Interval`` seconds, each given ``Timeout`` seconds.

A target whose check fails is marked down in its app's balancer until a
later check succeeds (SPEC 2); passive health (failed client connects)
works on top of it.  A check is a connect and an immediate close -- what
HAProxy's plain ``check`` does in mode tcp -- resolved and connected on
the event loop like any other connect, never blocking it.  State changes
are logged once, not every interval.  A target whose previous check is
still in flight (``Timeout`` > ``Interval``) is skipped that round.
"""

from __future__ import annotations

import logging
import socket
from . import netio, outcomes
from .config import Target
from .connect import Connector
from .loop import EventLoop, Timer
from .resolver import Resolver
from .router import Route, Router

log = logging.getLogger("rawproxy.health")


class _Check:
    """One check of one target: a connect (see :class:`Connector`), then close."""

    __slots__ = ("route", "target", "_connector")

    def __init__(self, loop: EventLoop, resolver: Resolver, route: Route,
                 target: Target, timeout_s: float) -> None:
        self.route = route
        self.target = target
        self._connector = Connector(loop, resolver, target.host, target.port, timeout_s,
                                    self._on_connected, self._on_failed)

    def start(self) -> None:
        self._connector.start()

    @property
    def done(self) -> bool:
        return self._connector.done

    def cancel(self) -> None:
        """Abandon the check without a verdict, closing its socket."""
        self._connector.cancel()

    def _on_connected(self, sock: socket.socket) -> None:
        netio.close(sock)
        self._verdict(True, "")

    def _on_failed(self, reason: str, detail: str) -> None:
        if reason != outcomes.NO_RESOURCES:  # no verdict: the shortage is ours
            self._verdict(False, reason)

    def _verdict(self, ok: bool, reason: str) -> None:
        balancer = self.route.balancer
        was_failing = balancer.health(self.target).check_failed
        balancer.record_check(self.target, ok, reason)
        if ok and was_failing:
            log.info("app %s: target %s is up (health check passed)",
                     self.route.app.name, self.target.address)
        elif not ok and not was_failing:
            log.warning("app %s: target %s is down (health check: %s)",
                        self.route.app.name, self.target.address, reason)


class HealthChecks:
    """Runs the checks of every app of the current router that asks for them."""

    def __init__(self, loop: EventLoop, resolver: Resolver) -> None:
        self._loop = loop
        self._resolver = resolver
        self._timers: list[Timer] = []
        self._checks: list[_Check] = []  # in flight, so stop() can close their sockets

    def start(self, router: Router) -> None:
        """Check ``router``'s apps from now on (replacing any earlier router)."""
        self.stop()
        for route in router.routes.values():
            if route.app.health_check is not None:
                self._run(route)

    def _run(self, route: Route) -> None:
        check = route.app.health_check
        assert check is not None
        self._checks = [c for c in self._checks if not c.done]
        # A check still in flight (Timeout > Interval) is not doubled: checks
        # of a silent target would otherwise pile up (HAProxy never overlaps).
        busy = {(id(c.route), c.target) for c in self._checks}
        for target in route.balancer.targets:
            if (id(route), target) in busy:
                continue
            attempt = _Check(self._loop, self._resolver, route, target, check.timeout_s)
            self._checks.append(attempt)
            attempt.start()
        self._timers = [t for t in self._timers if not t.cancelled]
        self._timers.append(self._loop.call_later(check.interval_s, lambda: self._run(route)))

    def stop(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for attempt in self._checks:
            attempt.cancel()
        self._checks.clear()
