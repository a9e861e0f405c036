"""rawproxy.autostart without sockets: what a hook's verdict may still do
once the proxy is shutting down (Autostart.close)."""

from __future__ import annotations

import json
import random
from typing import Iterator

import pytest

from rawproxy.autostart import Autostart
from rawproxy.config import parse_config
from rawproxy.configtypes import Hook
from rawproxy.hooks import HookRunner, OnHookDone
from rawproxy.loop import EventLoop
from rawproxy.machines import State
from rawproxy.resolver import Resolver
from rawproxy.router import Route, Router

STOP_URL = "http://127.0.0.1:9/stop"
MACHINES = {"Start": {"URL": "http://127.0.0.1:9/start"},
            "Stop": {"URL": STOP_URL}, "StopAfter": 1}


class RecordingHooks(HookRunner):
    """Calls nothing; keeps each call's verdict callback for the test."""

    def __init__(self) -> None:
        super().__init__(lambda callback: None)
        self.calls: list[tuple[Hook, str, OnHookDone]] = []

    def run(self, hook: Hook, app: str, target: str, timeout_s: float,
            on_done: OnHookDone) -> None:
        self.calls.append((hook, target, on_done))


class Client:
    def __init__(self, route: Route) -> None:
        self.route = route
        self.events: list[str] = []

    def machine_ready(self) -> None:
        self.events.append("ready")

    def close(self, end: str, reset: bool, detail: str = "") -> None:
        self.events.append(end)


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    event_loop = EventLoop()
    yield event_loop
    event_loop.close()


def test_a_stop_verdict_after_close_starts_nothing(loop: EventLoop) -> None:
    config = parse_config(json.dumps({"Apps": [{"Name": "m", "Ports": [1], "Targets": [
        "127.0.0.1:2"], "Machines": MACHINES}]}), "c.json")
    router = Router(config, random.Random(1))
    route = router.routes["m"]
    assert route.machines is not None
    [machine] = route.machines.in_state(State.UP)
    hooks = RecordingHooks()
    resolver = Resolver(loop.call_soon_threadsafe)
    autostart = Autostart(loop, resolver, lambda: router, router.counters, hooks)
    try:
        autostart._stop(route, machine)  # what the idle tick does
        client = Client(route)
        assert autostart.wait(route, client)  # came while it stops: waits for it to start
        [(stop_hook, _, on_done)] = hooks.calls
        assert stop_hook.url == STOP_URL
        autostart.close()  # shutting down
        on_done(True, "HTTP 200")  # the Stop hook's verdict comes late
        assert len(hooks.calls) == 1, "a Start hook was called during shutdown"
        assert client.events == []
    finally:
        autostart.close()
        resolver.close()
