"""What the admin endpoint shows of a running :class:`~rawproxy.server.Server`.

Read-only functions of the server's state, called only when someone asks
(a scrape of ``/metrics``, a ``GET /config``, or the supervisor asking a
worker), so nothing here is on the relay path.

* :func:`metrics_snapshot` -- the counters plus the gauges that need the
  live server (open connections, bytes of open connections, target health);
* :func:`config_view` -- ``{"Source", "ListenHost", "Draining", "Apps"}``
  (and ``"Revision"``, the etcd revision served, under ``--etcd``),
  each app being :func:`rawproxy.config.app_view` (exactly what the config
  file would say) plus one key, ``"Status"``: ``{"ActiveConnections": n,
  "QueueLength": n, "Targets": [{"Address", "Up", "ConsecutiveFailures",
  "LastFailure", "HealthCheckFailing", "OpenConnections", "State"}]}`` (counts of
  this process: under ``--workers``, of this worker).  Dropping ``"Status"`` from every app leaves a
  document ``parse_config`` accepts and that gives the running config back.
"""

from __future__ import annotations

from .config import app_view
from .metrics import Snapshot, TargetView
from .machines import State as MachineState
from .router import Route, TargetHealth
from .server import Server


def metrics_snapshot(server: Server) -> Snapshot:
    live_in: dict[str, int] = {}
    live_out: dict[str, int] = {}
    for session in server.sessions:
        name = session.route.app.name
        live_in[name] = live_in.get(name, 0) + session.bytes_from_client
        live_out[name] = live_out.get(name, 0) + session.bytes_from_target
    now = server.loop.time()
    targets = {
        name: [TargetView(h.target.address, not h.is_down(now), h.consecutive_failures,
                          route.balancer.open_connections(h.target),
                          target_state(route, h, now))
               for h in route.balancer.healths()]
        for name, route in server.router.routes.items()
    }
    return Snapshot(server.stats, dict(server.active_by_app), live_in, live_out, targets,
                    server.draining, queued=server.queues.lengths())


def config_view(server: Server) -> dict[str, object]:
    """The running config with each app's live state, for ``GET /config``."""
    now = server.loop.time()
    apps = []
    for route in server.router.routes.values():
        view = app_view(route.app)
        view["Status"] = app_status(route, server.active_by_app.get(route.app.name, 0), now,
                                    server.queues.length(route.app.name))
        apps.append(view)
    top: dict[str, object] = {"Source": server.config.source}
    if server.stats.config_revision is not None:  # --etcd
        top["Revision"] = server.stats.config_revision
    top.update({"ListenHost": server.listen_host, "Draining": server.draining, "Apps": apps})
    return top


def app_status(route: Route, active: int, now: float, queued: int = 0) -> dict[str, object]:
    """An app's runtime state: open connections, clients waiting for a slot,
    and each target's health and open connections (this process's)."""
    return {
        "ActiveConnections": active,
        "QueueLength": queued,
        "Targets": [{
            "Address": h.target.address,
            "Up": not h.is_down(now),
            "ConsecutiveFailures": h.consecutive_failures,
            "LastFailure": h.last_failure or None,
            "HealthCheckFailing": h.check_failed,
            "OpenConnections": route.balancer.open_connections(h.target),
            "State": target_state(route, h, now),
        } for h in route.balancer.healths()],
    }


def target_state(route: Route, health: TargetHealth, now: float) -> str:
    """``up``, ``down``, ``starting`` or ``stopped`` (SPEC 10): a machine
    that is not running says so; otherwise health decides."""
    machine = None if route.machines is None else route.machines.get(health.target.address)
    if machine is not None and machine.state is not MachineState.UP:
        return machine.shown
    return "down" if health.is_down(now) else "up"
