"""Micro benchmarks: ring buffer, relay flow step, balancer pick, config load, metrics.

Each benchmarked callable does one unit of the work the event loop repeats
(one 16 KiB pass through a ring, one relay step each way, one target
choice, one parse of the shipped ``config.json``, one ``/metrics`` render),
and asserts on its result so a benchmark cannot silently measure a no-op.
Skipped in the normal test run (see ``conftest.py``).
"""

from __future__ import annotations

import random
from pathlib import Path

from rawproxy.config import parse_config
from rawproxy.metrics import Snapshot, TargetView, render
from rawproxy.relay import WANT_READ, WANT_WRITE, Flow, Relay
from rawproxy.ringbuf import BufferPool, RingBuffer
from rawproxy.router import Balancer
from rawproxy.stats import Stats

ROOT = Path(__file__).resolve().parents[2]
BUFFER_BYTES = 64 * 1024
STEP_BYTES = 16 * 1024


def test_ringbuf_cycle(benchmark) -> None:
    """writable -> commit -> readable -> advance, the per-read ring traffic."""
    ring = RingBuffer(BufferPool(BUFFER_BYTES))

    def cycle() -> int:
        region = ring.writable()
        ring.commit(min(STEP_BYTES, len(region)))
        sent = len(ring.readable())
        ring.advance(sent)
        return sent

    assert benchmark(cycle) == STEP_BYTES
    assert len(ring) == 0


def test_ringbuf_cycle_with_backlog(benchmark) -> None:
    """The same cycle while the ring holds bytes (storage kept, wrap-around)."""
    ring = RingBuffer(BufferPool(BUFFER_BYTES))
    ring.writable()
    ring.commit(BUFFER_BYTES // 2 + 1)

    def cycle() -> int:
        region = ring.writable()
        ring.commit(min(STEP_BYTES, len(region)))
        view = ring.readable()
        ring.advance(min(STEP_BYTES, len(view)))
        return len(ring)

    # Short contiguous regions at the wrap make the fill level wander; it
    # must stay strictly between empty and full.
    assert 0 < benchmark(cycle) < BUFFER_BYTES


def test_flow_step(benchmark) -> None:
    """One relay step each way on the copying (ring buffer) path: receive, send, masks."""
    relay: Relay[RingBuffer] = Relay(BufferPool(BUFFER_BYTES))

    def step(flow: Flow[RingBuffer]) -> None:
        if flow.wants_read():
            flow.buffer.writable()
            flow.on_received(STEP_BYTES)
        if flow.wants_write():
            flow.on_sent(len(flow.buffer.readable()))

    def both_ways() -> tuple[int, int]:
        step(relay.upstream)
        step(relay.downstream)
        return relay.client_mask(), relay.target_mask()

    assert benchmark(both_ways) == (WANT_READ, WANT_READ)
    assert relay.upstream.bytes_sent > 0 and relay.bytes_buffered() == 0
    assert WANT_WRITE not in (relay.client_mask(), relay.target_mask())


def test_balancer_choose(benchmark) -> None:
    config = parse_config(
        '{"Apps": [{"Name": "a", "Ports": [5001], "Targets": ['
        '{"Address": "192.0.2.1:80", "Weight": 3}, "192.0.2.2:80", "192.0.2.3:80"]}]}',
        "bench.json")
    balancer = Balancer(config.apps[0].targets, random.Random(6))
    assert benchmark(balancer.acquire, 0.0) in balancer.targets


def test_config_parse_shipped(benchmark) -> None:
    text = (ROOT / "config.json").read_text()
    config = benchmark(parse_config, text, "config.json")
    assert len(config.apps) == 3


def test_metrics_render(benchmark) -> None:
    """A scrape of the shipped config's apps with some traffic recorded."""
    config = parse_config((ROOT / "config.json").read_text(), "config.json")
    stats = Stats(start_time=0.0)
    targets: dict[str, list[TargetView]] = {}
    for app in config.apps:
        app_stats = stats.app(app.name)
        app_stats.accepted = app_stats.closed = 1000
        app_stats.bytes_in = app_stats.bytes_out = 1 << 30
        app_stats.ended("done")
        for target in app.targets:
            target_stats = app_stats.target(target.address)
            target_stats.attempts = target_stats.connected = 500
            target_stats.failed("refused")
            for latency_s in (0.0002, 0.003, 0.04):
                target_stats.latency.observe(latency_s)
        targets[app.name] = [TargetView(t.address, True, 0) for t in app.targets]
    names = [app.name for app in config.apps]
    snapshot = Snapshot(stats, {n: 10 for n in names}, {n: 0 for n in names},
                        {n: 0 for n in names}, targets, False)
    text = benchmark(render, snapshot)
    assert "rawproxy_" in text
