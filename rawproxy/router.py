"""Which target a new connection goes to: pure decisions, no sockets.

* :class:`Router` maps a listening port to its app's :class:`Route`; a
  router built for a reloaded config adopts the health state of targets
  that are still there (by address), so a reload forgets nothing it knew.
* :class:`Balancer` picks a target by weighted random choice among those not
  marked down and not yet tried for this client, and keeps passive health:
  each failed connect marks the target down for a back-off that doubles with
  every consecutive failure (``base_s``, ``2*base_s``, ... up to ``max_s``);
  one success clears it.  An active health check (``HealthCheck``) can also
  hold a target down until a check succeeds.  When every untried target is
  down, they are tried
  anyway: a proxy that refuses because of stale health is worse than one
  that spends a connect attempt finding out.

Time comes in as an argument (``now``), randomness from an injected
``random.Random``, so tests drive it with a fake clock and a seed.
"""

from __future__ import annotations

import functools
import random
from typing import Callable, Collection, Iterable, Mapping, Optional

from .config import App, Config, Target
from .stats import AppStats, Stats


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
                 "check_failed")

    def __init__(self, target: Target) -> None:
        self.target = target
        self.consecutive_failures = 0
        self.down_until = 0.0
        self.last_failure = ""
        self.check_failed = False

    def is_down(self, now: float) -> bool:
        return self.check_failed or now < self.down_until

    def adopt(self, old: TargetHealth) -> None:
        self.consecutive_failures = old.consecutive_failures
        self.down_until = old.down_until
        self.last_failure = old.last_failure
        self.check_failed = old.check_failed


# (target address, down until on the monotonic clock; 0.0 when up again)
HealthChange = Callable[[str, float], None]


class Balancer:
    def __init__(self, targets: Iterable[Target], rng: random.Random,
                 backoff: Optional[Backoff] = None,
                 on_change: Optional[HealthChange] = None) -> None:
        self._health = {t: TargetHealth(t) for t in targets}
        if not self._health:
            raise ValueError("a balancer needs at least one target")
        self._rng = rng
        self._backoff = backoff or Backoff()
        # Told when this balancer's own passive health marks a target down
        # (up -> down) or up again, so sibling workers can share it; never of
        # changes that came from apply_shared.
        self._on_change = on_change

    @property
    def targets(self) -> tuple[Target, ...]:
        return tuple(self._health)

    def health(self, target: Target) -> TargetHealth:
        return self._health[target]

    def healths(self) -> tuple[TargetHealth, ...]:
        return tuple(self._health.values())

    def choose(self, now: float, tried: Collection[Target] = ()) -> Optional[Target]:
        """A target for the next attempt, or None when all were tried."""
        untried = [h for h in self._health.values() if h.target not in tried]
        if not untried:
            return None
        up = [h for h in untried if not h.is_down(now)]
        return self._weighted_pick(up or untried)

    def _weighted_pick(self, candidates: list[TargetHealth]) -> Target:
        if len(candidates) == 1:
            return candidates[0].target
        total = sum(h.target.weight for h in candidates)
        point = self._rng.random() * total
        for health in candidates:
            point -= health.target.weight
            if point < 0:
                return health.target
        return candidates[-1].target  # float rounding at the very top end

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
        health = self._health.get(target)
        if health is not None and (health.consecutive_failures or health.down_until):
            health.consecutive_failures = 0
            health.down_until = 0.0
            if self._on_change is not None:
                self._on_change(target.address, 0.0)

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
        """An active check's verdict: down until a later check succeeds."""
        health = self._health.get(target)
        if health is None:
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


class Route:
    """An app, the balancing state of its targets and its counters."""

    __slots__ = ("app", "balancer", "stats")

    def __init__(self, app: App, balancer: Balancer, stats: AppStats) -> None:
        self.app = app
        self.balancer = balancer
        self.stats = stats


class Router:
    def __init__(self, config: Config, rng: random.Random,
                 backoff: Optional[Backoff] = None, *, stats: Optional[Stats] = None,
                 previous: Optional[Router] = None,
                 on_change: Optional[Callable[[str, str, float], None]] = None) -> None:
        """``on_change(app, address, down_until)``: see :class:`Balancer`."""
        stats = stats or Stats()

        def balancer(app: App) -> Balancer:
            hook = None if on_change is None else functools.partial(on_change, app.name)
            return Balancer(app.targets, rng, backoff, hook)

        self.routes: dict[str, Route] = {
            app.name: Route(app, balancer(app), stats.app(app.name)) for app in config.apps
        }
        if previous is not None:
            for name, route in self.routes.items():
                old = previous.routes.get(name)
                if old is not None:
                    route.balancer.adopt(old.balancer)
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
