"""Targets that start and stop (SPEC 10): the state of each, and the decisions.

Pure: no sockets, no threads, no clock of its own (``now`` comes in as an
argument, randomness from an injected ``random.Random``);
:mod:`rawproxy.autostart` is the shell that calls hooks and connects.

One :class:`Machine` per target of an app with ``Machines``::

    UP -(connect refused)-> STOPPED -(begin_start)-> STARTING -(it accepts)-> UP
    STARTING -(hook failed / StartTimeout)-> STOPPED
    UP -(idle StopAfter, above MinRunning)-> STOPPING -(Stop accepted)-> STOPPED
    STOPPING -(Stop failed)-> UP

A target starts UP (the proxy cannot know better before it tries): the
first refused connect makes it STOPPED -- on an app with ``Machines`` a
refusal means "not running", not "broken"; a connect that times out is
still passive health's ``down``.  STOPPING counts as not running (nothing
new is sent to it) and is shown as ``stopped``.
"""

from __future__ import annotations

import enum
import random
from typing import Iterable, Mapping, Optional, Sequence

from .configtypes import Machines, Target

__all__ = ["Machine", "MachineSet", "State"]


class State(enum.Enum):
    UP = "up"
    STARTING = "starting"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Machine:
    """One target's machine: its state, and since when it has been idle."""

    __slots__ = ("target", "state", "idle_since")

    def __init__(self, target: Target) -> None:
        self.target = target
        self.state = State.UP
        self.idle_since: Optional[float] = None  # no open connection since then

    @property
    def shown(self) -> str:
        """The state as views show it (``up``/``starting``/``stopped``)."""
        return State.STOPPED.value if self.state is State.STOPPING else self.state.value


class MachineSet:
    """The machines of one app, and the decisions on them."""

    def __init__(self, config: Machines, targets: Iterable[Target],
                 rng: random.Random) -> None:
        self.config = config
        self._rng = rng
        self.machines = {t.address: Machine(t) for t in targets}

    def get(self, address: str) -> Optional[Machine]:
        return self.machines.get(address)

    def adopt(self, old: MachineSet) -> None:
        """A reload: keep what ``old`` knew of targets still here."""
        for address, machine in self.machines.items():
            previous = old.machines.get(address)
            if previous is not None:
                machine.state = previous.state
                machine.idle_since = previous.idle_since

    def on_refused(self, address: str) -> bool:
        """A connect was refused: an UP machine is STOPPED; True if it changed."""
        machine = self.machines.get(address)
        if machine is None or machine.state is not State.UP:
            return False
        machine.state = State.STOPPED
        return True

    def on_accepted(self, address: str, now: float) -> bool:
        """A connect succeeded: the machine runs, whoever started it."""
        machine = self.machines.get(address)
        if machine is None or machine.state is State.UP:
            return False
        machine.state = State.UP
        machine.idle_since = now
        return True

    def in_state(self, state: State) -> list[Machine]:
        return [m for m in self.machines.values() if m.state is state]

    def choose_start(self, exclude: Sequence[str] = ()) -> Optional[Machine]:
        """A STOPPED machine to start (weighted random), None if none is."""
        pool = [m for m in self.in_state(State.STOPPED) if m.target.address not in exclude]
        if not pool:
            return None
        point = self._rng.random() * sum(m.target.weight for m in pool)
        for machine in pool:
            point -= machine.target.weight
            if point < 0:
                return machine
        return pool[-1]

    def begin_start(self, machine: Machine) -> None:
        machine.state = State.STARTING

    def start_failed(self, machine: Machine) -> None:
        if machine.state is State.STARTING:
            machine.state = State.STOPPED

    def begin_stop(self, machine: Machine) -> None:
        machine.state = State.STOPPING
        machine.idle_since = None

    def stop_ended(self, machine: Machine, accepted: bool, now: float) -> None:
        if machine.state is not State.STOPPING:
            return
        machine.state = State.STOPPED if accepted else State.UP
        machine.idle_since = None if accepted else now

    @property
    def running(self) -> int:
        """Machines up or coming up (what MinRunning counts)."""
        return sum(1 for m in self.machines.values()
                   if m.state in (State.UP, State.STARTING))

    def due_stops(self, now: float, open_connections: Mapping[str, int]) -> list[Machine]:
        """Note which UP machines are idle; those idle ``StopAfter`` or
        longer, longest idle first, as many as MinRunning allows."""
        stop_after_s = self.config.stop_after_s
        due: list[Machine] = []
        for machine in self.in_state(State.UP):
            if open_connections.get(machine.target.address, 0) > 0:
                machine.idle_since = None
                continue
            if machine.idle_since is None:
                machine.idle_since = now
            elif stop_after_s is not None and now - machine.idle_since >= stop_after_s:
                due.append(machine)
        allowed = max(0, self.running - self.config.min_running)
        due.sort(key=lambda m: m.idle_since or 0.0)
        return due[:allowed]
