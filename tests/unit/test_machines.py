"""Machines (SPEC 10): the pure state (rawproxy.machines), the hook runner
(rawproxy.hooks), the config key (rawproxy.configmachines), the election
(Counters.claim) and the metrics rows."""

from __future__ import annotations

import json
import random
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator

import pytest

from rawproxy.config import ConfigError, app_view, format_summary, parse_config
from rawproxy.configtypes import Hook, Machines, Target
from rawproxy.counters import SharedCounters
from rawproxy.hooks import HookRunner, call_hook, expand
from rawproxy.machines import MachineSet, State
from rawproxy.metrics import Snapshot, TargetView, render
from rawproxy.stats import Stats

A, B, C = (Target("127.0.0.1", port) for port in (1001, 1002, 1003))
START = Hook(url="http://127.0.0.1:9/start")


def machine_set(stop_after_s: float = 10.0, min_running: int = 0,
                targets: tuple[Target, ...] = (A, B)) -> MachineSet:
    config = Machines(start=START, stop=START, stop_after_s=stop_after_s,
                      min_running=min_running)
    return MachineSet(config, targets, random.Random(1))


def test_a_refused_target_is_stopped_and_a_start_makes_it_up() -> None:
    machines = machine_set()
    assert machines.on_refused(A.address) is True
    assert machines.on_refused(A.address) is False  # no news
    machine = machines.choose_start()
    assert machine is not None and machine.target == A
    machines.begin_start(machine)
    assert machine.shown == "starting" and machines.choose_start() is None
    assert machines.on_accepted(A.address, now=5.0)
    assert machine.state is State.UP and machine.idle_since == 5.0


def test_a_failed_start_leaves_it_stopped_and_others_can_be_chosen() -> None:
    machines = machine_set()
    machines.on_refused(A.address)
    machines.on_refused(B.address)
    first = machines.choose_start()
    assert first is not None
    machines.begin_start(first)
    machines.start_failed(first)
    assert first.state is State.STOPPED
    other = machines.choose_start(exclude=[first.target.address])
    assert other is not None and other is not first


def test_choice_of_a_start_is_weighted() -> None:
    heavy = Target("127.0.0.1", 2000, weight=9)
    machines = machine_set(targets=(A, heavy))
    machines.on_refused(A.address)
    machines.on_refused(heavy.address)
    picks = [machines.choose_start() for _ in range(1000)]
    share = sum(1 for m in picks if m is not None and m.target == heavy) / 1000
    assert 0.85 < share < 0.95


def test_idle_machines_are_stopped_after_stop_after_above_min_running() -> None:
    machines = machine_set(stop_after_s=10.0, min_running=1)
    assert machines.due_stops(0.0, {}) == []  # idle from now on
    assert machines.due_stops(9.9, {}) == []
    due = machines.due_stops(10.0, {})
    assert len(due) == 1  # MinRunning 1 of 2
    machines.begin_stop(due[0])
    assert due[0].shown == "stopped" and machines.running == 1
    assert machines.due_stops(100.0, {}) == []


def test_an_open_connection_resets_the_idle_clock() -> None:
    machines = machine_set(stop_after_s=10.0)
    machines.due_stops(0.0, {})
    assert machines.due_stops(5.0, {A.address: 1}) == []
    due = machines.due_stops(12.0, {A.address: 0, B.address: 0})
    assert [m.target for m in due] == [B]  # A was busy at 5 s: idle since 12 s only


def test_a_failed_stop_leaves_it_up_and_reload_keeps_states() -> None:
    machines = machine_set()
    machine = machines.machines[A.address]
    machines.begin_stop(machine)
    machines.stop_ended(machine, accepted=False, now=3.0)
    assert machine.state is State.UP and machine.idle_since == 3.0
    machines.on_refused(B.address)
    again = machine_set(targets=(A, B, C))
    again.adopt(machines)
    assert [m.state for m in again.machines.values()] == [State.UP, State.STOPPED, State.UP]


# -- hooks ------------------------------------------------------------------------

@pytest.fixture
def http_api() -> Iterator[tuple[str, list[tuple[str, dict[str, str]]], threading.Event]]:
    seen: list[tuple[str, dict[str, str]]] = []
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body))
            if "hang" in self.path:
                release.wait(10)
                return
            self.send_response(500 if "fail" in self.path else 204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen, release
    release.set()
    server.shutdown()
    server.server_close()


def test_expand_quotes_in_urls_only() -> None:
    assert expand("/s/{app}/{target}", "a b", "[::1]:80", quote=True) == "/s/a%20b/%5B%3A%3A1%5D%3A80"
    assert expand("{target}", "a", "[::1]:80", quote=False) == "[::1]:80"


def test_an_http_hook_posts_json_and_2xx_is_accepted(http_api: tuple[str, list, threading.Event]) -> None:  # type: ignore[type-arg]
    base, seen, _ = http_api
    assert call_hook(Hook(url=base + "/ok/{target}"), "app", "127.0.0.1:5", 5.0) == (
        True, "HTTP 204")
    assert seen == [("/ok/127.0.0.1%3A5", {"app": "app", "target": "127.0.0.1:5"})]
    assert call_hook(Hook(url=base + "/fail"), "app", "t", 5.0) == (False, "HTTP 500")


def test_an_http_hook_that_hangs_times_out(http_api: tuple[str, list, threading.Event]) -> None:  # type: ignore[type-arg]
    base, _, _ = http_api
    ok, detail = call_hook(Hook(url=base + "/hang"), "app", "t", 0.3)
    assert not ok and "timed out" in detail


def test_a_command_hook_exit_status_and_timeout() -> None:
    assert call_hook(Hook(command=(sys.executable, "-c", "import sys; sys.exit('{target}' != 'x:1')")),
                     "a", "x:1", 10.0) == (True, "exit status 0")
    assert call_hook(Hook(command=(sys.executable, "-c", "raise SystemExit(1)")),
                     "a", "t", 10.0) == (False, "exit status 1")
    ok, detail = call_hook(Hook(command=(sys.executable, "-c", "import time; time.sleep(30)")),
                           "a", "t", 0.3)
    assert not ok and "killed" in detail
    ok, detail = call_hook(Hook(command=("/nonexistent/hook",)), "a", "t", 1.0)
    assert not ok and "/nonexistent/hook" in detail


def test_the_runner_reports_through_the_loop_hand_off() -> None:
    delivered: list[tuple[bool, str]] = []
    done = threading.Event()

    def hand_off(callback: object) -> None:
        callback()  # type: ignore[operator]
        done.set()

    HookRunner(hand_off).run(Hook(command=(sys.executable, "-c", "")), "a", "t", 10.0,
                             lambda ok, detail: delivered.append((ok, detail)))
    assert done.wait(10)
    assert delivered == [(True, "exit status 0")]


def test_a_hook_thread_that_cannot_start_is_a_failed_hook_delivered_later(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    posted: list[Callable[[], None]] = []
    delivered: list[tuple[bool, str]] = []
    HookRunner(posted.append).run(START, "a", "t", 10.0,
                                  lambda ok, detail: delivered.append((ok, detail)))
    assert delivered == []  # not from inside run(): the caller sets up after calling it
    [callback] = posted
    callback()
    assert delivered == [(False, "cannot start a thread for the hook: can't start new thread")]


# -- config -------------------------------------------------------------------------

def config_with(machines: object) -> str:
    return json.dumps({"Apps": [{"Name": "m", "Ports": [1], "Targets": ["127.0.0.1:2"],
                                 "Machines": machines}]})


def test_the_machines_key_round_trips_and_is_summarised() -> None:
    text = config_with({"Start": {"URL": "http://127.0.0.1:8/s/{target}"},
                        "Stop": {"Command": ["stop", "{target}"]},
                        "StopAfter": 60, "MinRunning": 1, "StartTimeout": 5})
    config = parse_config(text, "c.json")
    machines = config.apps[0].machines
    assert machines == Machines(start=Hook(url="http://127.0.0.1:8/s/{target}"),
                                stop=Hook(command=("stop", "{target}")),
                                start_timeout_s=5.0, stop_after_s=60.0, min_running=1)
    again = parse_config(json.dumps({"Apps": [app_view(config.apps[0])]}), "c.json")
    assert again == config
    assert "machines: start timeout 5s, stop after 60s idle, min running 1" in (
        format_summary(config))


@pytest.mark.parametrize("machines,message", [
    ({}, 'Machines: missing required key "Start"'),
    ({"Start": {}}, 'Machines Start: needs exactly one of "URL" or "Command"'),
    ({"Start": {"URL": "https://x/"}}, 'Start URL: "https://x/" is not an http:// URL'),
    ({"Start": {"Command": []}}, "Start Command: must be a non-empty list"),
    ({"Start": {"Command": ["a"]}, "StopAfter": 3}, '"StopAfter" needs a "Stop" hook'),
    ({"Start": {"Command": ["a"]}, "MinRunning": True}, "MinRunning: true is not a count"),
    ({"Start": {"Command": ["a"]}, "StartTimeout": 0}, "StartTimeout: 0 is not a duration"),
    ({"Start": {"Command": ["a"]}, "Stopafter": 1}, 'unknown key "Stopafter" (allowed: Start'),
])
def test_bad_machines_keys_give_one_line_errors(machines: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(config_with(machines), "c.json")
    text = str(caught.value)
    assert message in text and "\n" not in text and text.startswith('c.json: Apps[0] "m"')


# -- the election across workers, and the metrics ---------------------------------

def test_one_worker_at_a_time_claims_a_start() -> None:
    shared = SharedCounters(workers=2, capacity=8)
    try:
        first, second = shared.worker(0), shared.worker(1)
        slot = first.slot("m", "\0machine a")
        assert first.claim(slot, now_ms=1000, until_ms=2000)
        assert not second.claim(slot, now_ms=1500, until_ms=2500)
        assert second.claim(slot, now_ms=2001, until_ms=3000)  # the first claim lapsed
        shared.clear_worker(1)
        assert first.claim(slot, now_ms=2002, until_ms=4000)  # a dead worker's claim is gone
    finally:
        shared.close()


def test_target_state_and_machine_metrics_are_exported() -> None:
    stats = Stats(start_time=0.0)
    app = stats.app("m")
    app.machine_starts["ok"] = 2
    app.machine_stops["failed"] = 1
    app.start_wait.observe(0.02)
    text = render(Snapshot(stats, {}, {}, {}, {"m": [TargetView("h:1", False, 0, 0, "starting")]},
                           False))
    assert 'rawproxy_target_state{app="m",target="h:1",state="starting"} 1' in text
    assert 'rawproxy_target_state{app="m",target="h:1",state="down"} 0' in text
    assert 'rawproxy_machine_starts_total{app="m",result="ok"} 2' in text
    assert 'rawproxy_machine_stops_total{app="m",result="failed"} 1' in text
    assert 'rawproxy_machine_start_wait_seconds_bucket{app="m",le="0.025"} 1' in text


def test_a_stopped_target_is_no_candidate_even_when_every_other_is_down() -> None:
    from rawproxy.router import Balancer

    balancer = Balancer((A, B), random.Random(3))
    balancer.set_stopped(A, True)
    balancer.record_failure(B, now=0.0, reason="timeout")  # B down: still tried
    assert balancer.acquire(0.5) == B
    assert balancer.acquire(0.5, tried=[B]) is None  # A is stopped: not tried
    assert balancer.health(A).is_down(0.5)
    balancer.set_stopped(A, False)
    assert balancer.acquire(0.5, tried=[B]) == A


def test_views_show_a_machine_state_before_health() -> None:
    from rawproxy.config import parse_config
    from rawproxy.router import Router
    from rawproxy.views import target_state

    config = parse_config(config_with({"Start": {"Command": ["start"]}}), "c.json")
    route = Router(config, random.Random(1)).routes["m"]
    [health] = route.balancer.healths()
    assert target_state(route, health, 0.0) == "up"
    assert route.machines is not None
    route.machines.on_refused(health.target.address)
    route.balancer.set_stopped(health.target, True)
    assert target_state(route, health, 0.0) == "stopped"
    machine = route.machines.choose_start()
    assert machine is not None
    route.machines.begin_start(machine)
    assert target_state(route, health, 0.0) == "starting"


def test_a_reload_keeps_machine_states_and_dropping_machines_lifts_stopped() -> None:
    from rawproxy.config import parse_config
    from rawproxy.router import Router

    with_key = parse_config(config_with({"Start": {"Command": ["start"]}}), "c.json")
    first = Router(with_key, random.Random(1))
    route = first.routes["m"]
    [health] = route.balancer.healths()
    assert route.machines is not None
    route.machines.on_refused(health.target.address)
    route.balancer.set_stopped(health.target, True)
    again = Router(with_key, random.Random(1), previous=first).routes["m"]
    assert again.machines is not None
    assert again.machines.machines[health.target.address].state is State.STOPPED
    assert again.balancer.healths()[0].stopped
    without = parse_config(json.dumps({"Apps": [{"Name": "m", "Ports": [1],
                                                 "Targets": ["127.0.0.1:2"]}]}), "c.json")
    plain = Router(without, random.Random(1), previous=first).routes["m"]
    assert plain.machines is None and not plain.balancer.healths()[0].stopped
