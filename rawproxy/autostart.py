"""Starting and stopping machines (SPEC 10): the shell around :mod:`rawproxy.machines`.

A session whose every target failed, on an app with ``Machines``, asks
:meth:`Autostart.wait` instead of closing.  One :class:`_Start` per target
being started, however many sessions wait on it::

    wait -> [join the start in flight | choose a stopped target] ->
      Start hook (a thread, rawproxy.hooks)  +  probe connects (Connector),
      retried with a back-off from PROBE_FIRST_S to PROBE_MAX_S
      -> a probe connects: target UP, every waiter ``machine_ready()``
      -> the hook fails: the next stopped target is started for the same
         waiters, or they are closed (``end=start-failed``)
      -> StartTimeout: they are closed (``end=start-timeout``)

A probe's socket is closed at once: the waiters then connect for real, as
any session does (their clients' bytes stayed in the kernel all along).
A client that arrives while its app's only stopped target is being
stopped waits for the stop, and then for a start.  A target goes STOPPED
when a connect to it is refused (:meth:`note_refused`).

Autostop: every :data:`TICK_S` (or a quarter of the shortest StopAfter)
the open connections of every target (the whole process's, from the shared
counters) feed :meth:`MachineSet.due_stops`; a due machine gets ``Stop``.

With ``--workers`` each worker has its own Autostart; the one that calls a
hook is elected through the shared counters (:meth:`Counters.claim`), the
others only probe (a start) or mark the target stopped (a stop).
"""

from __future__ import annotations

import logging
import socket
from typing import Callable, Optional, Protocol

from . import netio, outcomes
from .connect import Connector
from .counters import Counters
from .hooks import HookRunner
from .loop import EventLoop, Timer
from .machines import Machine, State
from .resolver import Resolver
from .router import Route, Router

log = logging.getLogger("rawproxy.machines")

PROBE_FIRST_S = 0.002  # a machine that is a process listens within ms
PROBE_MAX_S = 0.015    # the most a probe adds to a start: under 20 ms (NOTES 3)
# A Start hook still hanging when StartTimeout passes: its clients end with
# start-timeout (the machine did not come up in time), and the hook's own
# timeout comes this much later, so the two never race for the verdict.
HOOK_GRACE_S = 1.0
TICK_S = 1.0
_OTHER_WORKER = "stopped by another worker"


class Waiter(Protocol):
    route: Route  # the route it was accepted on (a reload may have replaced it since)

    def machine_ready(self) -> None: ...

    def close(self, end: str, reset: bool, detail: str = "") -> None: ...


class _Start:
    __slots__ = ("app", "address", "waiters", "tried", "deadline", "probe", "retry",
                 "delay_s", "done", "started_at", "claimed")

    def __init__(self, app: str, address: str, started_at: float) -> None:
        self.app = app
        self.address = address
        self.waiters: list[tuple[Waiter, float]] = []  # (waiter, since)
        self.tried: list[str] = []  # addresses whose start failed, for this waiters
        self.deadline: Optional[Timer] = None
        self.probe: Optional[Connector] = None
        self.retry: Optional[Timer] = None
        self.delay_s = PROBE_FIRST_S
        self.done = False
        self.started_at = started_at
        self.claimed = False  # this worker called the hook (and holds the claim)


class Autostart:
    """Starts, stops and the clients waiting on them, for one worker."""

    def __init__(self, loop: EventLoop, resolver: Resolver, router: Callable[[], Router],
                 counters: Counters, hooks: Optional[HookRunner] = None) -> None:
        self._loop = loop
        self._resolver = resolver
        self._router = router
        self._counters = counters
        self._hooks = hooks or HookRunner(loop.call_soon_threadsafe)
        self._starts: dict[tuple[str, str], _Start] = {}
        self._after_stop: dict[str, list[tuple[Waiter, float]]] = {}
        self._tick: Optional[Timer] = None
        self._closed = False

    # -- what sessions tell -----------------------------------------------------

    def note_refused(self, route: Route, address: str) -> None:
        machines = route.machines
        if machines is not None and machines.on_refused(address):
            self._set_stopped(route, address, True)
            log.info("app %s: target %s: refused: its machine is stopped",
                     route.app.name, address)

    def wait(self, route: Route, waiter: Waiter) -> bool:
        """Hold ``waiter`` until a target of ``route`` is started; False if
        there is nothing to start (the caller closes as before)."""
        machines = route.machines
        if machines is None:
            return False
        now = self._loop.time()
        for start in self._starts.values():
            if start.app == route.app.name:
                start.waiters.append((waiter, now))
                return True
        machine = machines.choose_start()
        if machine is not None:
            self._begin(route, machine, [(waiter, now)], [])
            return True
        if machines.in_state(State.STOPPING):
            self._after_stop.setdefault(route.app.name, []).append((waiter, now))
            return True
        return False

    # -- starting ---------------------------------------------------------------

    def _begin(self, route: Route, machine: Machine, waiters: list[tuple[Waiter, float]],
               tried: list[str]) -> None:
        assert route.machines is not None
        config = route.machines.config
        route.machines.begin_start(machine)
        address = machine.target.address
        start = _Start(route.app.name, address, self._loop.time())
        start.waiters, start.tried = waiters, tried
        self._starts[(start.app, address)] = start
        log.info("app %s: target %s: starting its machine (%d waiting)",
                 start.app, address, len(waiters))
        start.claimed = self._claim(route, address, config.start_timeout_s)
        if start.claimed:
            self._hooks.run(config.start, start.app, address,
                            config.start_timeout_s + HOOK_GRACE_S,
                            lambda ok, detail: self._on_start_hook(start, ok, detail))
        start.deadline = self._loop.call_later(config.start_timeout_s,
                                               lambda: self._on_start_timeout(start))
        self._probe(start)

    def _probe(self, start: _Start) -> None:
        start.retry = None
        route, machine = self._current(start.app, start.address)
        if start.done:
            return
        if route is None or machine is None:
            self._abandon(start)  # a reload removed the target: no start to wait for
            return
        target = machine.target
        start.probe = Connector(self._loop, self._resolver, target.host, target.port,
                                route.app.connect_timeout_s,
                                lambda sock: self._on_probe_connected(start, sock),
                                lambda reason, detail: self._on_probe_failed(start))
        start.probe.start()

    def _on_probe_failed(self, start: _Start) -> None:
        start.probe = None
        if not start.done:
            start.retry = self._loop.call_later(start.delay_s, lambda: self._probe(start))
            start.delay_s = min(PROBE_MAX_S, start.delay_s * 2)

    def _on_probe_connected(self, start: _Start, sock: socket.socket) -> None:
        start.probe = None
        netio.close(sock)
        route, machine = self._current(start.app, start.address)
        if start.done:
            return
        if route is None or machine is None:
            self._abandon(start)
            return
        self._finish(start, route, "ok")
        now = self._loop.time()
        assert route.machines is not None
        route.machines.on_accepted(start.address, now)
        self._set_stopped(route, start.address, False)
        route.balancer.record_success(machine.target)
        log.info("app %s: target %s: machine up after %.3fs", start.app, start.address,
                 now - start.started_at)
        for waiter, since in start.waiters:
            route.stats.start_wait.observe(now - since)
            if waiter.route is not route:  # it came before a reload: its balancer too
                self._set_stopped(waiter.route, start.address, False)
            _tell(waiter.machine_ready)

    def _on_start_hook(self, start: _Start, ok: bool, detail: str) -> None:
        if ok:
            log.info("app %s: target %s: start hook accepted (%s)", start.app,
                     start.address, detail)
            return
        log.warning("app %s: target %s: start hook failed: %s", start.app, start.address,
                    detail)
        route = self._start_failed(start, "failed")
        if route is None:
            return
        assert route.machines is not None
        tried = start.tried + [start.address]
        following = route.machines.choose_start(exclude=tried)
        if following is not None:
            self._begin(route, following, start.waiters, tried)
        else:
            self._fail(start, route, outcomes.START_FAILED, f"start hook failed: {detail}")

    def _on_start_timeout(self, start: _Start) -> None:
        start.deadline = None
        route = self._start_failed(start, "timeout")
        if route is None:
            return
        assert route.machines is not None
        log.warning("app %s: target %s: machine not accepting after StartTimeout %gs",
                    start.app, start.address, route.machines.config.start_timeout_s)
        self._fail(start, route, outcomes.START_TIMEOUT,
                   f"{start.address} did not accept within StartTimeout")

    def _start_failed(self, start: _Start, result: str) -> Optional[Route]:
        """End a start that failed (``result``) and mark its machine so; the
        route to go on with, or None: already over, or abandoned because a
        reload removed the target."""
        route, machine = self._current(start.app, start.address)
        if start.done:
            return None
        if route is None or route.machines is None or machine is None:
            self._abandon(start)
            return None
        self._finish(start, route, result)
        route.machines.start_failed(machine)
        return route

    def _fail(self, start: _Start, route: Route, end: str, detail: str) -> None:
        now = self._loop.time()
        for waiter, since in start.waiters:
            route.stats.start_wait.observe(now - since)
            _tell(waiter.close, end, reset=False, detail=detail)

    def _abandon(self, start: _Start) -> None:
        """A reload removed the target (or its app, or its Machines) while it
        was starting: close its clients now rather than leave them, and every
        later client of the app, waiting on a start nothing will finish.  A
        claim this worker holds lapses at its deadline."""
        self._stop_start(start)
        log.warning("app %s: target %s: removed by a reload while starting: closing its "
                    "%d waiting clients", start.app, start.address, len(start.waiters))
        for waiter, _ in start.waiters:
            _tell(waiter.close, outcomes.START_FAILED, reset=False,
                  detail=f"{start.address} was removed by a reload while starting")

    def _stop_start(self, start: _Start) -> None:
        start.done = True
        self._starts.pop((start.app, start.address), None)
        for timer in (start.deadline, start.retry):
            if timer is not None:
                timer.cancel()
        if start.probe is not None:
            start.probe.cancel()

    def _finish(self, start: _Start, route: Route, result: str) -> None:
        self._stop_start(start)
        if start.claimed:  # counted once, by the worker that called the hook
            self._claim(route, start.address, 0.0, release=True)  # the next start: anyone's
            starts = route.stats.machine_starts
            starts[result] = starts.get(result, 0) + 1

    # -- helpers ------------------------------------------------------------------

    def _current(self, app: str, address: str) -> tuple[Optional[Route], Optional[Machine]]:
        """The app's route now (a reload may have replaced it) and the machine."""
        route = self._router().routes.get(app)
        if route is None or route.machines is None:
            return route, None
        return route, route.machines.get(address)

    def _set_stopped(self, route: Route, address: str, stopped: bool) -> None:
        for target in route.balancer.targets:
            if target.address == address:
                route.balancer.set_stopped(target, stopped)

    def _claim(self, route: Route, address: str, hold_s: float, release: bool = False) -> bool:
        """Whether this worker calls the hook for ``address`` (see the module
        doc); ``release``: give up this worker's claim."""
        try:
            slot = self._counters.slot(route.app.name, "\0machine " + address)
        except Exception:  # the counters are full: better two calls than none
            return True
        now_ms = int(self._loop.time() * 1000)
        return self._counters.claim(slot, now_ms, 0 if release else now_ms + int(hold_s * 1000))

    # -- stopping -----------------------------------------------------------------

    def start_ticking(self) -> None:
        """Check for idle machines from now on (until :meth:`close`)."""
        if self._tick is None:
            self._tick = self._loop.call_later(self._tick_s(), self._on_tick)

    def close(self) -> None:
        self._closed = True  # a Stop hook's late verdict must not start anything
        self._after_stop.clear()
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        for start in list(self._starts.values()):
            start.done = True
            for timer in (start.deadline, start.retry):
                if timer is not None:
                    timer.cancel()
            if start.probe is not None:
                start.probe.cancel()
        self._starts.clear()

    def _tick_s(self) -> float:
        periods = [route.machines.config.stop_after_s / 4
                   for route in self._router().routes.values()
                   if route.machines is not None and route.machines.config.stop_after_s]
        return min([TICK_S] + periods)

    def _on_tick(self) -> None:
        now = self._loop.time()
        for route in self._router().routes.values():
            machines = route.machines
            if machines is None or machines.config.stop_after_s is None:
                continue
            open_now = {h.target.address: self._counters.total(h.slot)
                        for h in route.balancer.healths()}
            for machine in machines.due_stops(now, open_now):
                self._stop(route, machine)
        self._tick = self._loop.call_later(self._tick_s(), self._on_tick)

    def _stop(self, route: Route, machine: Machine) -> None:
        assert route.machines is not None
        config = route.machines.config
        stop_hook = config.stop
        assert stop_hook is not None  # MachineSet.due_stops needs StopAfter, which needs Stop
        route.machines.begin_stop(machine)
        address, app = machine.target.address, route.app.name
        self._set_stopped(route, address, True)
        log.info("app %s: target %s: idle for StopAfter %gs: stopping its machine",
                 app, address, config.stop_after_s or 0.0)
        if self._claim(route, address, config.start_timeout_s):
            self._hooks.run(stop_hook, app, address, config.start_timeout_s,
                            lambda ok, detail: self._on_stop_hook(app, address, ok, detail))
        else:
            self._on_stop_hook(app, address, True, _OTHER_WORKER)

    def _on_stop_hook(self, app: str, address: str, ok: bool, detail: str) -> None:
        route, machine = self._current(app, address)
        if self._closed or route is None or route.machines is None or machine is None:
            return
        route.machines.stop_ended(machine, ok, self._loop.time())
        if detail != _OTHER_WORKER:  # counted once, by the worker that called the hook
            self._claim(route, address, 0.0, release=True)
            stops = route.stats.machine_stops
            result = "ok" if ok else "failed"
            stops[result] = stops.get(result, 0) + 1
        if ok:
            log.info("app %s: target %s: machine stopped (%s)", app, address, detail)
        else:
            self._set_stopped(route, address, False)
            log.warning("app %s: target %s: stop hook failed: %s", app, address, detail)
        waiters = self._after_stop.pop(app, [])
        if waiters:  # clients came while it stopped: start it again for them
            following = route.machines.choose_start()
            if following is None:
                for waiter, _since in waiters:
                    waiter.machine_ready()  # the stop failed: it still runs
            else:
                self._begin(route, following, waiters, [])


def _tell(call: Callable[..., None], *args: object, **kwargs: object) -> None:
    """Tell one waiter: a waiter that raises must not leave the rest of the
    list untold (each would then wait for nothing)."""
    try:
        call(*args, **kwargs)
    except Exception:
        log.exception("a waiting client failed to take the news")
