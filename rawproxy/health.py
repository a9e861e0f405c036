"""Active health checks (an app's ``HealthCheck``): a TCP connect per target
every ``Interval`` seconds, each given ``Timeout`` seconds.

A target whose check fails is marked down in its app's balancer until a
later check succeeds (SPEC 2); passive health (failed client connects)
works on top of it.  A check is a connect and an immediate close -- what
HAProxy's plain ``check`` does in mode tcp -- resolved and connected on
the event loop like any other connect, never blocking it.  State changes
are logged once, not every interval.
"""

from __future__ import annotations

import logging
import socket
from typing import Optional

from . import netio
from .config import Target
from .loop import EVENT_WRITE, EventLoop, Timer
from .resolver import Address, Resolution, Resolver
from .router import Route, Router

log = logging.getLogger("rawproxy.health")


class _Check:
    """One connect attempt to one target, over its addresses in turn."""

    __slots__ = ("_loop", "_resolver", "_route", "_target", "_sock", "_fd",
                 "_timer", "_addresses", "_reason", "_done")

    def __init__(self, loop: EventLoop, resolver: Resolver, route: Route,
                 target: Target, timeout_s: float) -> None:
        self._loop = loop
        self._resolver = resolver
        self._route = route
        self._target = target
        self._sock: Optional[socket.socket] = None
        self._fd = -1
        self._addresses: list[Address] = []
        self._reason = "no address"
        self._done = False
        self._timer: Optional[Timer] = loop.call_later(timeout_s, self._on_timeout)

    def start(self) -> None:
        resolution = self._resolver.resolve(self._target.host, self._target.port,
                                            self._on_resolved)
        if resolution is not None:
            self._on_resolved(resolution)

    def _on_resolved(self, resolution: Resolution) -> None:
        if self._done:
            return
        if resolution.error:
            self._finish(False, "dns")
            return
        self._addresses = list(resolution.addresses)
        self._connect_next()

    def _connect_next(self) -> None:
        try:
            sock, reason = netio.connect_next(self._addresses, self._reason)
        except netio.LocalResourceError:
            self.cancel()  # no verdict: the shortage is ours, not the target's
            return
        if sock is None:
            self._finish(False, reason)
            return
        self._sock = sock
        self._fd = sock.fileno()
        self._loop.watch(self._fd, self._on_writable)
        self._loop.set_interest(self._fd, EVENT_WRITE)

    def _on_writable(self, events: int) -> None:
        sock = self._sock
        assert sock is not None
        try:
            if not netio.finish_connect(sock):
                return  # a stale wake-up: the connect is still under way
        except netio.ConnectFailed as exc:
            self._reason = exc.reason
            self._drop_socket()
            self._connect_next()
            return
        self._finish(True, "")

    def _on_timeout(self) -> None:
        self._timer = None
        self._finish(False, "timeout")

    @property
    def done(self) -> bool:
        return self._done

    def cancel(self) -> None:
        """Abandon the check without a verdict, closing its socket."""
        self._stop()

    def _stop(self) -> bool:
        """Release the timer and socket; False if already stopped."""
        if self._done:
            return False
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._drop_socket()
        return True

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._loop.unwatch(self._fd)
            netio.close(self._sock)
            self._sock = None

    def _finish(self, ok: bool, reason: str) -> None:
        if not self._stop():
            return
        balancer = self._route.balancer
        was_failing = balancer.health(self._target).check_failed
        balancer.record_check(self._target, ok, reason)
        if ok and was_failing:
            log.info("app %s: target %s is up (health check passed)",
                     self._route.app.name, self._target.address)
        elif not ok and not was_failing:
            log.warning("app %s: target %s is down (health check: %s)",
                        self._route.app.name, self._target.address, reason)


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
        for target in route.balancer.targets:
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
