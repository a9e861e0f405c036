"""A stop signal at any moment of a local run stops everything the probe started.

Each case runs the probe's command line through tests/probe/interrupt_driver.py,
which sends the probe a signal at one point of the run (a seam), and then
checks: the documented exit status, one line and no traceback, no process
it started still running, its temporary config gone, and a prompt exit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import pytest

from tests.support import REPO, pid_running

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")

TIMEOUT_S = 90.0
PROMPT_S = 20.0   # from the signal to the exit; the cleanup's own limit is about 12 s

CONFIG = {"Apps": [{"Name": "a", "Ports": [5001, 5002],
                    "Targets": ["one.invalid:1", "two.invalid:2", "dead.invalid:3"]}]}
PROBE_ARGS = ["--local", "--down", "dead.invalid:3", "--connections", "2", "--frames", "3",
              "--max-frame", "4096", "--json"]


class Outcome:
    """What a run left: exit status, stderr, its record, what was still running."""

    def __init__(self, code: int, err: str, entries: list[dict[str, Any]],
                 left: list[int]) -> None:
        self.code = code
        self.err = err
        self.entries = entries
        self.left = left     # pids of its children still running when it had exited

    def assert_all_stopped(self) -> None:
        assert not self.left, f"still running after the probe exited: {self.left}"
        for child in (e for e in self.entries if "pid" in e):
            config = Path(child["argv"][child["argv"].index("--config") + 1])
            assert not config.parent.exists(), f"{config.parent} left behind"

    @property
    def started_proxy(self) -> bool:
        return any("rawproxy.py" in " ".join(e.get("argv", ())) for e in self.entries)


def interrupt(tmp_path: Path, at: Sequence[str], ignore_sigint: bool = False) -> Outcome:
    """Run the probe with signals at ``at`` ("seam:INT") and see what it left."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    record = tmp_path / "record.jsonl"
    record.touch()
    argv = [sys.executable, "-m", "tests.probe.interrupt_driver", str(record)]
    argv += [f"--at={a}" for a in at] + (["--ignore-sigint"] if ignore_sigint else [])
    argv += ["--", "--config", str(config), *PROBE_ARGS]
    driver = subprocess.Popen(argv, cwd=str(REPO), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = driver.communicate(timeout=TIMEOUT_S)
        exited = time.monotonic()
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate(timeout=10)
        entries = [json.loads(line) for line in record.read_text().splitlines()]
        left = [e["pid"] for e in entries if "pid" in e and pid_running(e["pid"])]
        for pid in left:   # whatever the outcome, leave nothing running
            os.kill(pid, signal.SIGKILL)
    for entry in (e for e in entries if "signal" in e):
        assert exited - entry["at"] < PROMPT_S, \
            f"exited {exited - entry['at']:.1f}s after the signal at {entry['seam']}: {err}"
    return Outcome(driver.returncode, err, entries, left)


@pytest.mark.parametrize("seam, started", [
    ("load", False),        # nothing started yet
    ("echo", False),        # backends starting, no proxy yet
    ("spawn", True),        # inside Popen: the proxy runs, its pid not yet kept
    ("ready", True),        # waiting for the proxy's ready line
    ("checks", True),       # phase 1
    ("close", True),        # between the run's finally and close(): close never starts
    ("echo-close", True),   # inside close(), after a run that ended normally
    ("report", True),       # everything stopped, the report not yet written
])
def test_sigint_at_any_moment_stops_everything(tmp_path: Path, seam: str,
                                               started: bool) -> None:
    run = interrupt(tmp_path, [f"{seam}:INT"])
    assert run.code == 130, run.err
    assert run.err.strip().splitlines() == [
        "probe: interrupted (SIGINT); everything it started is stopped"], run.err
    assert run.started_proxy is started
    run.assert_all_stopped()


@pytest.mark.parametrize("at, code", [
    (["phase2:TERM"], 143),
    (["checks:HUP"], 129),
    (["checks:INT", "stop:INT"], 130),     # a second Ctrl-C while stopping
    (["spawn:TERM", "stop:TERM"], 143),
])
def test_other_stop_signals_and_a_second_one(tmp_path: Path, at: list[str],
                                             code: int) -> None:
    run = interrupt(tmp_path, at)
    assert run.code == code, run.err
    assert "Traceback" not in run.err, run.err
    assert "everything it started is stopped" in run.err, run.err
    run.assert_all_stopped()


def test_sigint_stops_it_even_when_inherited_ignored(tmp_path: Path) -> None:
    # Python leaves an inherited SIG_IGN alone; the probe must not, or it runs
    # on deaf to Ctrl-C (and to the test that stops it that way).
    run = interrupt(tmp_path, ["checks:INT"], ignore_sigint=True)
    assert run.code == 130, run.err
    run.assert_all_stopped()
