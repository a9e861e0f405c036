"""Which target a new connection goes to, given health and load: pure.

:func:`pick` is the whole decision of SPEC 4 and 9 for one attempt.  It gets
the targets not yet tried for this client (:class:`Candidate`: weight, open
connections in the whole process, marked down or not) and answers an index
and answers the one to try, :data:`Verdict.WAIT` (every eligible target is
at its hard limit: the client waits in its app's queue), or None (nothing
left to try).  A candidate's ``tag`` says which target it stands for.

The order, as fly-proxy's::

    targets not marked down (all of them, if every one is down)
      -> those below SoftLimit, if any       (preferred)
      -> else those below HardLimit, if any  (accepted)
      -> else WAIT
    then, within the tier: weighted random ("random"), or the weighted
    power of two choices ("least-connections")

Without ``Concurrency`` there are no limits: the tier is every eligible
target.  The power of two choices draws two distinct candidates, each with
probability proportional to its weight, and takes the one with fewer open
connections per unit of weight (compared as ``a.open * b.weight <
b.open * a.weight``, exact in integers); a tie goes to the first drawn, so
equal loads split by weight.  Two random draws rather than "the least
loaded of all": every worker would otherwise pile onto the same target
between two updates of the counts (the herd effect), and the draw costs
O(candidates) whatever the load.

Randomness comes from the ``random.Random`` passed in: tests seed it.
"""

from __future__ import annotations

import enum
import random
from typing import Optional, Sequence, Union

__all__ = ["Candidate", "Choice", "Verdict", "pick"]


class Verdict(enum.Enum):
    WAIT = "wait"  # every eligible target is at HardLimit: queue the client


class Candidate:
    """One untried target as the decision sees it; ``tag`` is the caller's
    (which target this is); the caller may reuse one object per target."""

    __slots__ = ("weight", "open", "down", "tag")

    def __init__(self, weight: int, open_connections: int = 0, down: bool = False,
                 tag: int = 0) -> None:
        self.weight = weight
        self.open = open_connections
        self.down = down
        self.tag = tag

    def __repr__(self) -> str:
        return (f"Candidate(weight={self.weight}, open={self.open}, down={self.down}, "
                f"tag={self.tag})")


# The candidate to try, WAIT, or None (no candidate at all).
Choice = Union[Candidate, Verdict, None]


def pick(candidates: Sequence[Candidate], rng: random.Random, *,
         least_connections: bool = False,
         limits: Optional[tuple[int, int]] = None) -> Choice:
    """The candidate to try next (see the module docstring).

    ``limits`` is ``(soft, hard)`` from the app's ``Concurrency``, or None.
    """
    if not candidates:
        return None
    eligible = [c for c in candidates if not c.down] or list(candidates)  # all down: try anyway
    if limits is not None:
        soft, hard = limits
        tier = [c for c in eligible if c.open < soft] or [c for c in eligible if c.open < hard]
        if not tier:
            return Verdict.WAIT
        eligible = tier
    if least_connections:
        return _two_choices(eligible, rng)
    return _weighted(eligible, rng)


def _weighted(pool: list[Candidate], rng: random.Random) -> Candidate:
    """One of ``pool``, with probability proportional to its weight."""
    if len(pool) == 1:
        return pool[0]
    total = 0
    for candidate in pool:
        total += candidate.weight
    point = rng.random() * total
    for candidate in pool:
        point -= candidate.weight
        if point < 0:
            return candidate
    return pool[-1]  # float rounding at the very top end


def _two_choices(pool: list[Candidate], rng: random.Random) -> Candidate:
    first = _weighted(pool, rng)
    if len(pool) == 1:
        return first
    second = _weighted([c for c in pool if c is not first], rng)
    return second if second.open * first.weight < first.open * second.weight else first
