"""Which target a new connection goes to: pure decisions, no sockets.

* :class:`Router` maps a listening port to its app's :class:`Route`.
* :class:`Balancer` picks a target by weighted random choice among those not
  marked down and not yet tried for this client, and keeps passive health:
  each failed connect marks the target down for a back-off that doubles with
  every consecutive failure (``base_s``, ``2*base_s``, ... up to ``max_s``);
  one success clears it.  When every untried target is down, they are tried
  anyway: a proxy that refuses because of stale health is worse than one
  that spends a connect attempt finding out.

Time comes in as an argument (``now``), randomness from an injected
``random.Random``, so tests drive it with a fake clock and a seed.
"""

from __future__ import annotations

import random
from typing import Collection, Iterable, Mapping, Optional

from .config import App, Config, Target


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
    __slots__ = ("target", "consecutive_failures", "down_until", "last_failure")

    def __init__(self, target: Target) -> None:
        self.target = target
        self.consecutive_failures = 0
        self.down_until = 0.0
        self.last_failure = ""

    def is_down(self, now: float) -> bool:
        return now < self.down_until


class Balancer:
    def __init__(self, targets: Iterable[Target], rng: random.Random,
                 backoff: Optional[Backoff] = None) -> None:
        self._health = {t: TargetHealth(t) for t in targets}
        if not self._health:
            raise ValueError("a balancer needs at least one target")
        self._rng = rng
        self._backoff = backoff or Backoff()

    @property
    def targets(self) -> tuple[Target, ...]:
        return tuple(self._health)

    def health(self, target: Target) -> TargetHealth:
        return self._health[target]

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
        health.consecutive_failures += 1
        health.last_failure = reason
        health.down_until = now + self._backoff.delay_s(health.consecutive_failures)

    def record_success(self, target: Target) -> None:
        health = self._health.get(target)
        if health is not None:
            health.consecutive_failures = 0
            health.down_until = 0.0


class Route:
    """An app and the balancing state of its targets."""

    __slots__ = ("app", "balancer")

    def __init__(self, app: App, balancer: Balancer) -> None:
        self.app = app
        self.balancer = balancer


class Router:
    def __init__(self, config: Config, rng: random.Random,
                 backoff: Optional[Backoff] = None) -> None:
        self.routes: dict[str, Route] = {
            app.name: Route(app, Balancer(app.targets, rng, backoff))
            for app in config.apps
        }
        self._by_port: dict[int, Route] = {
            port: self.routes[app.name] for app in config.apps for port in app.ports
        }

    @property
    def ports(self) -> Mapping[int, Route]:
        return self._by_port

    def route_for_port(self, port: int) -> Optional[Route]:
        return self._by_port.get(port)
