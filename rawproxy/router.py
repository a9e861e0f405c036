"""Which target a new connection goes to: pure decisions, no sockets.

* :class:`Router` maps a listening port to its app's :class:`Route`; a
  router built for a reloaded config adopts the health state of targets
  that are still there (by address), so a reload forgets nothing it knew.
* :class:`Balancer` picks a target by weighted random choice among those not
  marked down and not yet tried for this client, and keeps passive health:
  each failed connect marks the target down for a back-off that doubles with
  every consecutive failure (``base_s``, ``2*base_s``, ... up to ``max_s``);
  one success clears it.  An active health check (``HealthCheck``) can also
  hold a target down until a check succeeds; only a balancer built with
  ``active_checks`` (its app has a ``HealthCheck``) takes check verdicts,
  and one without drops those it adopts, since no check would ever lift
  them.  When every untried target is down, they are tried anyway: a proxy
  that refuses because of stale health is worse than one that spends a
  connect attempt finding out.

Load (SPEC 9): :meth:`Balancer.acquire` makes the choice of
:func:`rawproxy.balance.pick` -- health, then the app's ``Concurrency``
tiers, then ``Balance`` -- and counts the connection to the chosen target
in the shared :class:`~rawproxy.counters.Counters` in the same step (under
their lock when the app has limits, so two workers cannot both take the
last slot); :meth:`Balancer.release` gives it back.  A :class:`Route` also
carries its app's own slot, which the server counts ``MaxConnections`` in.
Slots are found by (app name, target address), so the connections a
session opened under an older config are given back to the same count.

Time comes in as an argument (``now``), randomness from an injected
``random.Random``, so tests drive it with a fake clock and a seed.
"""

from __future__ import annotations

import functools
import random
from typing import Callable, Collection, Iterable, Mapping, Optional, Union

from .balance import Candidate, Choice, Verdict, pick
from .config import BALANCE_LEAST_CONNECTIONS, App, Config, ConfigError, Target
from .counters import Counters, CountersFull, SharedCounters
from .machines import MachineSet
from .stats import AppStats, Stats

# What acquire() answers: a target (counted: release it), WAIT, or None.
Acquired = Union[Target, Verdict, None]


class Backoff:
    __slots__ = ("base_s", "max_s")

    def __init__(self, base_s: float = 1.0, max_s: float = 30.0) -> None:
        self.base_s = base_s
        self.max_s = max_s

    def delay_s(self, consecutive_failures: int) -> float:
        if consecutive_failures <= 0:
            return 0.0
        # Cap the exponent first so a long outage cannot overflow a float.
        return min(self.max_s, self.base_s * 2.0 ** min(consecutive_failures - 1, 32))


class TargetHealth:
    __slots__ = ("target", "consecutive_failures", "down_until", "last_failure",
                 "check_failed", "slot", "candidate", "stopped")

    def __init__(self, target: Target, slot: int = 0, index: int = 0) -> None:
        self.target = target
        self.slot = slot  # its open connections' cell in the shared counters
        self.candidate = Candidate(target.weight, tag=index)  # refilled for each choice
        self.consecutive_failures = 0
        self.down_until = 0.0
        self.last_failure = ""
        self.check_failed = False
        self.stopped = False  # its machine is not running (SPEC 10): skipped as down

    def is_down(self, now: float) -> bool:
        return self.check_failed or self.stopped or now < self.down_until

    def adopt(self, old: TargetHealth) -> None:
        self.consecutive_failures = old.consecutive_failures
        self.down_until = old.down_until
        self.last_failure = old.last_failure
        self.check_failed = old.check_failed
        self.stopped = old.stopped


# (target address, down until on the monotonic clock; 0.0 when up again)
HealthChange = Callable[[str, float], None]


def _draw(point: float, healths: list[TargetHealth]) -> int:
    """The index ``point`` (in [0, total weight)) falls on, the targets'
    weights laid end to end in order (balance._weighted's walk)."""
    for index, health in enumerate(healths):
        point -= health.target.weight
        if point < 0:
            return index
    return len(healths) - 1  # float rounding at the very top end


class Balancer:
    def __init__(self, targets: Iterable[Target], rng: random.Random,
                 backoff: Optional[Backoff] = None,
                 on_change: Optional[HealthChange] = None, *,
                 active_checks: bool = False, counters: Optional[Counters] = None,
                 app_name: str = "", limits: Optional[tuple[int, int]] = None,
                 least_connections: bool = False) -> None:
        """``limits``: (SoftLimit, HardLimit) of the app's Concurrency;
        ``counters`` default to a private one-process block."""
        self._counters = counters or SharedCounters().worker(0)
        # Empty only under --etcd, for an app whose registered targets all
        # left: acquire() answers None and the server closes its clients.
        self._health = {t: TargetHealth(t, self._counters.slot(app_name, t.address), index)
                        for index, t in enumerate(targets)}
        self._by_tag = list(self._health.values())
        # The same, by the identity of the balancer's own Target objects (the
        # ones acquire() hands out): a dataclass __hash__ is a Python call,
        # twice per connection; id() is not.  Equal Targets made elsewhere
        # fall back to _health.
        self._by_id = {id(h.target): h for h in self._by_tag}
        self._total_weight = sum(t.weight for t in self._health)
        self._limits = limits
        self._least_connections = least_connections
        self._rng = rng
        self._backoff = backoff or Backoff()
        # Told when this balancer's own passive health marks a target down
        # (up -> down) or up again, so sibling workers can share it; never of
        # changes that came from apply_shared.
        self._on_change = on_change
        self._active_checks = active_checks

    @property
    def targets(self) -> tuple[Target, ...]:
        return tuple(self._health)

    def health(self, target: Target) -> TargetHealth:
        return self._health[target]

    def healths(self) -> tuple[TargetHealth, ...]:
        return tuple(self._health.values())

    def acquire(self, now: float, tried: Collection[Target] = ()) -> Acquired:
        """The target for the next attempt, counted as open (give it back
        with :meth:`release`); WAIT when every eligible target is at its
        hard limit; None when every target was tried."""
        healths = self._by_tag
        if self._limits is None and not self._least_connections and not tried and healths:
            # The usual first attempt, without building candidates: one
            # weighted draw among all targets, kept when it is up (SPEC 4's
            # distribution: a draw that hits an up target is one drawn among
            # the up targets alone); else the full decision below draws again.
            health = healths[0] if len(healths) == 1 else healths[_draw(
                self._rng.random() * self._total_weight, healths)]
            if not (health.check_failed or health.stopped or now < health.down_until):
                self._counters.add(health.slot, 1)
                return health.target
        # A stopped machine (SPEC 10) is no candidate at all, even when
        # every target is down: its start is rawproxy.autostart's business.
        untried = [h for h in self._health.values()
                   if h.target not in tried and not h.stopped]
        if self._limits is None:
            return self._take(self._choose(untried, now))
        with self._counters.lock:
            choice = self._choose(untried, now)
            if choice is Verdict.WAIT:
                self._counters.mark_waiting()
                return choice
            return self._take(choice)

    def _choose(self, untried: list[TargetHealth], now: float) -> Choice:
        loaded = self._limits is not None or self._least_connections
        total = self._counters.total
        candidates = []
        for health in untried:
            candidate = health.candidate
            candidate.down = health.is_down(now)
            if loaded:
                candidate.open = total(health.slot)
            candidates.append(candidate)
        return pick(candidates, self._rng, least_connections=self._least_connections,
                    limits=self._limits)

    def _take(self, choice: Choice) -> Acquired:
        if choice is None or choice is Verdict.WAIT:
            return choice
        health = self._by_tag[choice.tag]
        self._counters.add(health.slot, 1)
        return health.target

    def release(self, target: Target) -> None:
        """A connection counted by :meth:`acquire` closed (or failed)."""
        health = self._by_id.get(id(target)) or self._health[target]
        slot = health.slot
        if self._limits is None:
            self._counters.add(slot, -1)
        else:
            self._counters.give_back(slot)  # and wakes workers waiting for a slot

    def open_connections(self, target: Target) -> int:
        """Open to ``target`` from this worker (the metrics' and views' count)."""
        return self._counters.own(self._health[target].slot)

    def record_failure(self, target: Target, now: float, reason: str) -> None:
        health = self._health.get(target)
        if health is None:
            return  # removed by a reload while the attempt was running
        was_down = now < health.down_until
        health.consecutive_failures += 1
        health.last_failure = reason
        health.down_until = now + self._backoff.delay_s(health.consecutive_failures)
        if self._on_change is not None and not was_down:
            # Only the edge: failures of a target already down (connects in
            # flight, or an app whose every target is down) are not news.
            self._on_change(target.address, health.down_until)

    def record_success(self, target: Target) -> None:
        health = self._by_id.get(id(target)) or self._health.get(target)
        if health is not None and (health.consecutive_failures or health.down_until):
            health.consecutive_failures = 0
            health.down_until = 0.0
            if self._on_change is not None:
                self._on_change(target.address, 0.0)

    def set_stopped(self, target: Target, stopped: bool) -> None:
        """Its machine stopped (skip it, as down) or runs again (SPEC 10)."""
        health = self._health.get(target)
        if health is not None:
            health.stopped = stopped

    def apply_shared(self, address: str, down_until: float) -> None:
        """Another worker's passive verdict on ``address``: down until
        ``down_until`` (the later of theirs and ours wins), or up (0.0)."""
        for target, health in self._health.items():
            if target.address != address:
                continue
            if down_until <= 0.0:
                health.consecutive_failures = 0
                health.down_until = 0.0
            else:
                health.down_until = max(health.down_until, down_until)

    def record_check(self, target: Target, ok: bool, reason: str = "") -> None:
        """An active check's verdict: down until a later check succeeds.

        Ignored without ``active_checks``: a check still in flight when a
        reload removed the app's ``HealthCheck`` must not mark a target down
        that no later check would bring back."""
        health = self._health.get(target)
        if health is None or not self._active_checks:
            return
        health.check_failed = not ok
        if ok:
            self.record_success(target)
        else:
            health.last_failure = reason

    def adopt(self, old: Balancer) -> None:
        """Carry over what ``old`` knew of targets that are still here."""
        by_address = {t.address: h for t, h in old._health.items()}
        for target, health in self._health.items():
            previous = by_address.get(target.address)
            if previous is not None:
                health.adopt(previous)
                # Without checks (the reload removed HealthCheck) nothing
                # would ever lift an adopted check failure.
                health.check_failed = health.check_failed and self._active_checks


class Route:
    """An app, the balancing state of its targets and its counters; ``slot``
    counts the app's open connections in ``counters``."""

    __slots__ = ("app", "balancer", "stats", "counters", "slot", "machines")

    def __init__(self, app: App, balancer: Balancer, stats: AppStats,
                 counters: Optional[Counters] = None,
                 machines: Optional[MachineSet] = None) -> None:
        self.app = app
        self.machines = machines  # the app's Machines state (SPEC 10), if it has the key
        self.balancer = balancer
        self.stats = stats
        self.counters = counters or SharedCounters().worker(0)
        self.slot = self.counters.slot(app.name)


class Router:
    counters: Counters

    def __init__(self, config: Config, rng: random.Random,
                 backoff: Optional[Backoff] = None, *, stats: Optional[Stats] = None,
                 previous: Optional[Router] = None,
                 on_change: Optional[Callable[[str, str, float], None]] = None,
                 counters: Optional[Counters] = None) -> None:
        """``on_change(app, address, down_until)``: see :class:`Balancer`.
        ``counters``: the shared counts (default: ``previous``'s, else a
        one-process block); ConfigError if they have no room for the names."""
        stats = stats or Stats()
        counts = counters or (previous.counters if previous is not None
                              else SharedCounters().worker(0))
        self.counters = counts

        def make_route(app: App) -> Route:
            hook = None if on_change is None else functools.partial(on_change, app.name)
            limits = None if app.concurrency is None else (
                app.concurrency.soft_limit, app.concurrency.hard_limit)
            balancer = Balancer(app.targets, rng, backoff, hook,
                                active_checks=app.health_check is not None,
                                counters=counts, app_name=app.name, limits=limits,
                                least_connections=app.balance == BALANCE_LEAST_CONNECTIONS)
            machines = (None if app.machines is None
                        else MachineSet(app.machines, app.targets, rng))
            return Route(app, balancer, stats.app(app.name), counts, machines)

        try:
            self.routes: dict[str, Route] = {app.name: make_route(app) for app in config.apps}
        except CountersFull as exc:
            raise ConfigError(f"{config.source}: {exc}") from None
        if previous is not None:
            for name, route in self.routes.items():
                old = previous.routes.get(name)
                if old is not None:
                    route.balancer.adopt(old.balancer)
                    if route.machines is not None and old.machines is not None:
                        route.machines.adopt(old.machines)
                    elif route.machines is None:  # Machines removed: nothing starts them
                        for health in route.balancer.healths():
                            health.stopped = False
        self._by_port: dict[int, Route] = {
            port: self.routes[app.name] for app in config.apps for port in app.ports
        }

    @property
    def ports(self) -> Mapping[int, Route]:
        return self._by_port

    def route_for_port(self, port: int) -> Optional[Route]:
        return self._by_port.get(port)

    def apply_shared(self, app: str, address: str, down_until: float) -> None:
        route = self.routes.get(app)
        if route is not None:
            route.balancer.apply_shared(address, down_until)
