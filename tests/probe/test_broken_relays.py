"""The probe must fail, with the right reason, against relays that are wrong.

A probe that cannot fail proves nothing.  Each relay (tests/probe/relays.py)
listens on 127.0.0.1:0 and forwards to a local echo backend; the probe's
non-local check runs against it through its Python API (fixed frame sizes,
so the reason is known to the byte) and through its command line.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from probe import cli
from probe.checks import ConnResult, run_connection
from probe.framing import HEADER_SIZE
from tests.support import Backend, dead_port

from .relays import Relay

SIZES = [1, 1000, 5000]
TOTAL = sum(SIZES) + HEADER_SIZE * len(SIZES)          # 6067 bytes each way
THIRD_FRAME = 2 * HEADER_SIZE + 1 + 1000               # stream byte where frame 2 starts
STALL_S = 5.0


@pytest.fixture
def backend() -> Iterator[Backend]:
    server = Backend("echo")
    yield server
    server.close()


@pytest.fixture
def relay(backend: Backend) -> Iterator[Relay]:
    started: list[Relay] = []

    def start(fault: str, at: int = 0) -> Relay:
        started.append(Relay(backend.port, fault, at))
        return started[-1]

    yield start  # type: ignore[misc]
    for r in started:
        r.close()


def probe_once(port: int, stream_id: int = 0xC0FFEE, stall_s: float = STALL_S) -> ConnResult:
    return run_connection("127.0.0.1", port, stream_id, SIZES, stall_s)


def test_an_honest_relay_passes(relay) -> None:
    result = probe_once(relay("none").port)
    assert result.defect is None
    assert result.bytes_verified == TOTAL
    assert len(result.latencies_s) == len(SIZES)


def test_a_flipped_byte_is_named(relay) -> None:
    result = probe_once(relay("flip", at=HEADER_SIZE + 1 + HEADER_SIZE + 3).port)
    assert str(result.defect) == "corrupted: frame 1 payload byte 3 of 1000 (stream byte 48)"


def test_a_dropped_tail_is_truncated(relay) -> None:
    result = probe_once(relay("drop_tail", at=TOTAL - 100).port)
    assert str(result.defect) == ("truncated: frame 2 ended after 4900 of 5000 payload bytes "
                                  "(2 of 3 frames whole)")
    assert result.bytes_verified == THIRD_FRAME


def test_an_early_close_is_a_reset(relay) -> None:
    result = probe_once(relay("close_early", at=TOTAL - 100).port)
    assert str(result.defect) == (f"reset: connection reset after {THIRD_FRAME} of {TOTAL} "
                                  "bytes echoed")


def test_a_silent_relay_stalls(relay) -> None:
    result = probe_once(relay("swallow").port, stall_s=0.3)
    assert str(result.defect) == (f"stalled: no byte for 0.3s, waiting for the echo of frame 0 "
                                  f"(0 of {TOTAL} bytes echoed)")


def test_mixed_connections_are_named(relay) -> None:
    port = relay("mix").port
    results: dict[int, ConnResult] = {}

    def run(stream_id: int) -> None:
        results[stream_id] = probe_once(port, stream_id)

    threads = [threading.Thread(target=run, args=(s,)) for s in (0xAAAA0001, 0xBBBB0002)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(STALL_S * 3)
    assert str(results[0xAAAA0001].defect) == (
        "mixed: frame 0 of stream bbbb0002 arrived on stream aaaa0001 where its frame 0 was "
        "due (stream byte 0)")
    assert str(results[0xBBBB0002].defect).startswith("mixed: frame 0 of stream aaaa0001 ")


def test_nothing_listening_is_refused() -> None:
    port = dead_port()
    assert str(probe_once(port).defect) == f"refused: 127.0.0.1:{port} refused the connection"


def run_cli(tmp_path: Path, port: int, capsys: pytest.CaptureFixture[str], *extra: str
            ) -> tuple[int, dict[str, Any]]:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"Apps": [{"Name": "app", "Ports": [port],
                                            "Targets": ["somewhere.invalid:1"]}]}))
    code = cli.main(["--config", str(config), "--host", "127.0.0.1", "--json",
                     "--connections", "2", "--frames", "2", "--max-frame", "65536", *extra])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("fault, at, reason", [
    ("none", 0, ""),
    ("flip", 48, "corrupted: frame 1 "),
    ("drop_tail", 40_000, "truncated: frame 1 ended after "),
    ("close_early", 40_000, "reset: connection reset after "),
    ("mix", 0, "mixed: frame 0 of stream "),
])
def test_the_command_line_fails_for_the_right_reason(relay, tmp_path: Path, capsys, fault: str,
                                                     at: int, reason: str) -> None:
    code, report = run_cli(tmp_path, relay(fault, at).port, capsys)
    [port] = report["phases"][0]["ports"]
    assert report["ok"] is (fault == "none")
    assert code == (0 if fault == "none" else 1)
    assert port["passed"] is (fault == "none")
    assert port["reason"].startswith(reason), port["reason"]
    assert port["connections"] == 2
    if fault == "none":
        assert port["bytes_verified"] > 65536
        assert report["summary"].startswith("PASS: all 1 checks passed; 2 connections")


def test_the_text_report_shows_the_failure(relay, tmp_path: Path, capsys) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"Apps": [{"Name": "app", "Ports": [relay("swallow").port],
                                            "Targets": ["somewhere.invalid:1"]}]}))
    code = cli.main(["--config", str(config), "--host", "127.0.0.1", "--timeout", "0.2",
                     "--connections", "1"])
    out = capsys.readouterr().out
    assert code == 1
    assert " FAIL " in out and "stalled: no byte for 0.2s" in out
    assert out.rstrip().splitlines()[-1].startswith("FAIL: 1 of 1 checks failed; 1 connections")
