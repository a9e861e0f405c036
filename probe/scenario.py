"""What a run does: one phase against a running proxy, or the local scenario.

Local scenario: start ``LocalEnv`` -> phase 1, every port checked with all
backends up -> stop one live backend of each app that has two or more ->
phase 2, every port checked again (new connections must fail over) ->
stop everything -> judge: how connections spread over the targets, that
every probe connection was served by exactly one backend of its own app
(phases 1 and 2; phase 3, autostart, has an app of its own whose machine
starts stopped and must be started by one hook call: probe.autostart)
(backends record the stream id each connection started with), that
failover left stopped and down targets alone, and that the proxy exited 0
on SIGTERM without logging an error.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .checks import Options, Planner, PortResult, Progress, Target, run_checks
from .config import App
from .autostart import APP_NAME
from .local import LocalEnv, LocalTarget
from .stopsignals import StopSignals
from .report import Check, Phase, Report, SpreadRow


def run_remote(apps: Sequence[App], host: str, options: Options, planner: Planner,
               progress: Optional[Progress] = None) -> Report:
    started = time.perf_counter()
    targets = [Target(app.name, port, host, port) for app in apps for port in app.ports]
    results = run_checks(targets, options, planner, progress)
    return Report(host, [Phase(f"probe connections to {host}", results)],
                  time.perf_counter() - started, load=options.duration_s is not None)


def run_local(apps: Sequence[App], raw: Mapping[str, Any], down: frozenset[str],
              launcher: Path, options: Options, planner: Planner,
              progress: Optional[Progress] = None,
              signals: Optional[StopSignals] = None) -> Report:
    """``signals``: the caller's stop signals (probe.stopsignals), whose
    ``stop_all()`` closes the env should an interrupt land between the
    ``finally`` below and the shield inside ``env.close()``."""
    started = time.perf_counter()
    env = LocalEnv(apps, raw, down, launcher, signals)
    try:
        env.start()
        assert env.proxy is not None
        targets = [Target(app.name, port, "127.0.0.1", env.port_map[port])
                   for app in apps for port in app.ports]
        phase1 = run_checks(targets, options, planner, progress, env.stopping)
        after1 = {id(t): env.served(t) for row in env.targets for t in row}
        stopped = [live[0] for live in ([t for t in row if t.backend is not None]
                                        for row in env.targets) if len(live) >= 2]
        for target in stopped:
            env.stop_target(target)
        phase2 = run_checks(targets, options, planner, progress, env.stopping)
        after2 = {id(t): env.served(t) for row in env.targets for t in row}
        states = {id(t): _state(t) for row in env.targets for t in row}
        autostart = _autostart_phase(env, options, planner, progress)
        pid = env.proxy.proc.pid
    finally:
        env.close()
    down_now = [f"{t.app}'s {t.address}" for row in env.targets for t in row
                if t.backend is None]
    phases = [
        Phase(f"phase 1: rawproxy (pid {pid}) on 127.0.0.1, a local echo backend for each "
              f"target" + (f" but {', '.join(down_now)} (down)" if down_now else ""), phase1),
        Phase("phase 2 (failover): new connections after stopping "
              + (", ".join(f"{t.app}'s {t.address}" for t in stopped) or "nothing"), phase2),
        autostart[0]]
    spread = [SpreadRow(t.app, t.address, f"127.0.0.1:{t.port}",
                        (after1[id(t)][0], after2[id(t)][0] - after1[id(t)][0]), states[id(t)])
              for row in env.targets for t in row]
    checks = [_isolation(env.targets, phases[:2], after2), _failover(stopped, phase2, spread),
              autostart[1], _proxy(env)]
    return Report("127.0.0.1", phases, time.perf_counter() - started, env.port_map,
                  spread, checks, load=options.duration_s is not None)


def _autostart_phase(env: LocalEnv, options: Options, planner: Planner,
                     progress: Optional[Progress]) -> tuple[Phase, Check]:
    """Phase 3: the autostart app's port, its machine stopped until the
    first connection makes rawproxy call the Start hook (SPEC 10)."""
    stub = env.autostart
    assert stub is not None
    target = Target(APP_NAME, env.autostart_port, "127.0.0.1", env.autostart_port)
    began = time.perf_counter()
    [result] = run_checks([target], options, planner, progress, env.stopping)
    first = min((c.latencies_s[0] for c in result.conns if c.latencies_s), default=0.0)
    served = len(stub.backend.streams) if stub.backend is not None else 0
    hook_ms = ((stub.first_call_at - began) * 1e3) if stub.first_call_at else 0.0
    title = (f"phase 3 (autostart): {APP_NAME}'s one machine stopped, started by the first "
             f"connection ({stub.calls} Start hook call(s), {hook_ms:.1f} ms after it)")
    passed = stub.calls == 1 and result.passed and served == len(result.conns)
    detail = (f"{stub.calls} Start hook call for {len(result.conns)} connections, all served "
              f"by the started machine; the first frame's round trip, start included: "
              f"{first * 1e3:.1f} ms")
    if not passed:
        detail = (f"{stub.calls} Start hook calls (want 1), {served} of "
                  f"{len(result.conns)} connections served by the machine")
    return Phase(title, [result]), Check("autostart", passed, detail)


def _state(target: LocalTarget) -> str:
    return {"down": "down: nothing listens", "stopped": "stopped after phase 1"}.get(
        target.state, target.state)


def _isolation(targets: Sequence[Sequence[LocalTarget]], phases: Sequence[Phase],
               served: Mapping[int, tuple[int, tuple[int, ...]]]) -> Check:
    owner = {c.stream_id: r.target for p in phases for r in p.results for c in r.conns}
    times_served: collections.Counter[int] = collections.Counter()
    problems = []
    for target in (t for row in targets for t in row):
        for stream in served[id(target)][1]:
            times_served[stream] += 1
            want = owner.get(stream)
            if want is None:
                problems.append(f"{target.app}'s {target.address} served a connection "
                                "the probe never made")
            elif want.app != target.app:
                problems.append(f"a connection to {want.app} port {want.port} reached "
                                f"{target.app}'s {target.address}")
    passed = [(c.stream_id, r.target) for p in phases for r in p.results for c in r.conns
              if c.defect is None]
    problems += [f"a connection to {t.app} port {t.port} was served by {times_served[s]} "
                 "backends" for s, t in passed if times_served[s] != 1]
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return Check("isolation", False, problems[0] + more)
    return Check("isolation", True, f"each of the {len(passed)} passed connections was "
                 "served by exactly one target of its own app")


def _failover(stopped: Sequence[LocalTarget], phase2: Sequence[PortResult],
              spread: Sequence[SpreadRow]) -> Check:
    idle = [r for r in spread if r.state != "up"]
    leaks = [f"{r.app}'s {r.target} ({r.state}) served {r.counts[1]}"
             for r in idle if r.counts[1]]
    failed = sum(not r.passed for r in phase2)
    if leaks or failed:
        return Check("failover", False, "; ".join(leaks + (
            [f"{failed} ports failed after the stop"] if failed else [])))
    return Check("failover", True, f"every phase 2 connection passed; the {len(stopped)} "
                 f"stopped and {len(idle) - len(stopped)} down targets served none")


def _proxy(env: LocalEnv) -> Check:
    assert env.proxy is not None
    errors = [line for line in env.proxy.lines if " ERROR " in line]
    failed_over = env.proxy.count("connect failed")
    detail = (f"exit status {env.exit_code} after SIGTERM; it logged {failed_over} failed "
              f"connects (each failed over) and {len(errors)} errors")
    if errors:
        detail += f"; first: {errors[0][:200]}"
    return Check("proxy", env.exit_code == 0 and not errors, detail)
