"""The upgrade's parts: the command line, the hand-over variable, the old
process's state machine (with small Python programs as the new version),
and descriptors sent over the control channel."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from typing import Callable, Iterator, Optional, Sequence

import pytest

from rawproxy.channel import Channel
from rawproxy.lifecycle import Lifecycle
from rawproxy.loop import EventLoop
from rawproxy.upgrade import (ENV_VAR, State, Upgrader, UpgradeError, decode_handover,
                              encode_handover, relaunch_argv)

PY = "/usr/bin/python3"


# -- the same program again ----------------------------------------------------------------

@pytest.mark.parametrize("orig_argv, argv, module, expected", [
    # 3.10+: exactly what was run, interpreter options included.
    (["python3", "-X", "dev", "rawproxy.py", "-c", "x.json"], ["rawproxy.py", "-c", "x.json"],
     None, [PY, "-X", "dev", "rawproxy.py", "-c", "x.json"]),
    # 3.9: a checkout's launcher, a .pyz, an installed script: argv[0] is the program.
    (None, ["rawproxy.py", "--workers", "2"], None, [PY, "rawproxy.py", "--workers", "2"]),
    (None, ["dist/rawproxy.pyz", "--check"], None, [PY, "dist/rawproxy.pyz", "--check"]),
    # 3.9: python -m rawproxy.
    (None, ["/src/rawproxy/__main__.py", "--watch"], "rawproxy.__main__",
     [PY, "-m", "rawproxy", "--watch"]),
])
def test_the_program_is_started_again_with_the_same_arguments(
        orig_argv: Optional[list[str]], argv: list[str], module: Optional[str],
        expected: list[str]) -> None:
    assert relaunch_argv(PY, orig_argv, argv, module) == expected


@pytest.mark.parametrize("argv", [["-c", "--config", "x"], [""], []])
def test_a_program_run_from_a_string_cannot_be_started_again(argv: list[str]) -> None:
    with pytest.raises(UpgradeError, match="-c or from a prompt"):
        relaunch_argv(PY, None, argv, None)


def test_without_an_interpreter_path_there_is_nothing_to_start() -> None:
    with pytest.raises(UpgradeError, match="sys.executable"):
        relaunch_argv("", ["python3", "rawproxy.py"], ["rawproxy.py"], None)


def test_the_handover_variable_round_trips_and_rejects_garbage() -> None:
    assert decode_handover(encode_handover(100, 9, [3, 4, 7])) == (100, 9, [3, 4, 7])
    assert decode_handover(encode_handover(100, 9, [])) == (100, 9, [])
    for bad in ("", "1:2", "a:2:3", "1:2:3,x", "1:2:3:4"):
        assert decode_handover(bad) is None


def still_to_announce(life: Lifecycle) -> bool:
    return life.upgraded


def test_the_new_process_reads_and_removes_the_variable() -> None:
    read_end, write_end = os.pipe()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    handed = os.dup(listener.fileno())
    env = {ENV_VAR: encode_handover(os.getpid(), write_end, [handed]), "KEEP": "1"}
    previous = signal.getsignal(signal.SIGUSR2)
    try:
        life = Lifecycle.from_environment(env)
        assert env == {"KEEP": "1"}
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN  # never fatal
        assert len(life.sockets) == 1 and still_to_announce(life)
        life.serving()  # no port took it: closed; the old process hears "ready"
        assert len(life.sockets) == 0 and not still_to_announce(life)
        assert os.read(read_end, 100) == f"ready {os.getpid()}\n".encode()
        assert os.read(read_end, 100) == b""  # and the pipe is closed
        life.close()
    finally:
        signal.signal(signal.SIGUSR2, previous)
        os.close(read_end)
        listener.close()


# -- the old process -----------------------------------------------------------------------

# The "new version": reads the hand-over variable, checks each descriptor is
# a listening socket, then does what argv[1] says.
PROGRAM = """import os, socket, sys, time
_, ready_fd, fds = os.environ["RAWPROXY_UPGRADE"].split(":")
for fd in fds.split(","):
    sock = socket.socket(fileno=int(fd))
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    sock.detach()
action = sys.argv[1]
if action == "ready":
    os.write(int(ready_fd), b"ready %d\\n" % os.getpid())
    time.sleep(30)
elif action == "garbage":
    os.write(int(ready_fd), b"hello\\n")
    time.sleep(30)
elif action == "hang":
    time.sleep(30)
else:
    sys.exit(int(action))
"""


class Harness:
    def __init__(self, action: str, ready_timeout_s: float = 10.0,
                 problem: Optional[str] = None) -> None:
        self.loop = EventLoop()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.ready_pids: list[int] = []
        self.problem = problem
        self.upgrader = Upgrader(self.loop, self.collect, self.ready_pids.append,
                                 argv=lambda: [sys.executable, "-c", PROGRAM, action],
                                 ready_timeout_s=ready_timeout_s)

    def collect(self, deliver: Callable[[Sequence[int], Optional[str]], None]) -> None:
        deliver([self.listener.fileno()], self.problem)

    def run_until(self, condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            self.loop.run_once(max_wait_s=0.05)

    def close(self) -> None:
        proc = self.upgrader.proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        self.upgrader.close()
        self.loop.close()
        self.listener.close()


@pytest.fixture
def harnesses() -> Iterator[list[Harness]]:
    made: list[Harness] = []
    yield made
    for harness in made:
        harness.close()


def state_of(harness: Harness) -> State:
    return harness.upgrader.state


def make(harnesses: list[Harness], *args: object, **kwargs: object) -> Harness:
    harness = Harness(*args, **kwargs)  # type: ignore[arg-type]
    harnesses.append(harness)
    return harness


def test_ready_hands_over_once_and_refuses_another_sigusr2(
        harnesses: list[Harness], caplog: pytest.LogCaptureFixture) -> None:
    harness = make(harnesses, "ready")
    harness.upgrader.request()
    assert harness.upgrader.state is State.STARTING
    harness.upgrader.request()
    assert "SIGUSR2 ignored: an upgrade is already under way (new process" in caplog.text
    harness.run_until(lambda: bool(harness.ready_pids))
    assert harness.upgrader.proc is not None
    assert harness.ready_pids == [harness.upgrader.proc.pid]
    assert state_of(harness) is State.HANDED_OVER
    harness.upgrader.request()
    assert "has handed over already" in caplog.text


@pytest.mark.parametrize("action, reason", [
    ("3", "exit status 3"),
    ("garbage", "said 'hello' instead of ready"),
])
def test_a_new_version_that_fails_is_reaped_and_the_old_one_may_try_again(
        harnesses: list[Harness], caplog: pytest.LogCaptureFixture, action: str,
        reason: str) -> None:
    caplog.set_level(logging.INFO, "rawproxy.upgrade")
    harness = make(harnesses, action)
    harness.upgrader.request()
    harness.run_until(lambda: harness.upgrader.state is State.IDLE)
    assert reason in caplog.text and "goes on serving" in caplog.text
    assert harness.ready_pids == []
    harness.upgrader.request()  # IDLE again: a fixed version may be tried
    assert state_of(harness) is State.STARTING


def test_a_new_version_never_ready_is_killed_at_the_deadline(
        harnesses: list[Harness], caplog: pytest.LogCaptureFixture) -> None:
    harness = make(harnesses, "hang", ready_timeout_s=0.5)
    harness.upgrader.request()
    started = time.monotonic()
    harness.run_until(lambda: harness.upgrader.state is State.IDLE)
    assert time.monotonic() - started >= 0.5
    assert "not ready within 0.5s (killed it: killed by SIGKILL)" in caplog.text


def test_a_collector_that_cannot_hand_over_everything_refuses_the_upgrade(
        harnesses: list[Harness], caplog: pytest.LogCaptureFixture) -> None:
    harness = make(harnesses, "ready", problem="worker 1 did not hand over its sockets")
    harness.upgrader.request()
    assert harness.upgrader.state is State.IDLE and harness.upgrader.proc is None
    assert "upgrade failed: worker 1 did not hand over its sockets" in caplog.text


# -- descriptors on the control channel -----------------------------------------------------

def test_descriptors_travel_with_their_frame_and_unclaimed_ones_are_closed() -> None:
    loop = EventLoop()
    ours, theirs = socket.socketpair()
    got: list[tuple[str, list[int]]] = []
    receiver: list[Channel] = []

    def on_frame(text: str) -> None:
        got.append((text, receiver[0].take_fds() if text.startswith("take") else []))

    sender = Channel(loop, ours, lambda text: None, lambda: None)
    receiver.append(Channel(loop, theirs, on_frame, lambda: None))
    listeners = [socket.socket() for _ in range(300)]  # more than one sendmsg takes
    try:
        for sock in listeners:
            sock.bind(("127.0.0.1", 0))
        fds = [sock.fileno() for sock in listeners]
        open_before = len(os.listdir("/proc/self/fd"))
        assert sender.send("plain") and sender.send("take these", fds)
        assert sender.send("leave these", fds[:2]) and sender.send("take one", fds[:1])
        deadline = time.monotonic() + 10
        while len(got) < 4:
            assert time.monotonic() < deadline
            loop.run_once(max_wait_s=0.05)
        assert [text for text, _ in got] == ["plain", "take these", "leave these", "take one"]
        taken = got[1][1] + got[3][1]
        assert len(taken) == 301
        names = [socket.socket(fileno=fd) for fd in taken]
        try:
            assert [s.getsockname() for s in names] == [s.getsockname() for s in listeners] + [
                listeners[0].getsockname()]
        finally:
            for sock in names:
                sock.close()
        # The sender's duplicates went with the frames, the two left were closed.
        assert len(os.listdir("/proc/self/fd")) == open_before
    finally:
        sender.close()
        receiver[0].close()
        loop.close()
        for sock in listeners:
            sock.close()


# -- the benchmark's arithmetic ---------------------------------------------------------------

def test_the_benchmark_counts_the_window_around_the_event_and_the_outage() -> None:
    from benchmarks.upgrade import summarize
    at = 100.0
    events = [
        (99.0, "ok", 0.001, 0.002),      # before the window
        (99.6, "ok", 0.001, 0.004),
        (100.1, "refused", 0.0001, -1.0),
        (100.2, "reset", 0.001, -1.0),
        (101.0, "ok", 0.003, 0.010),
        (101.4, "refused", 0.0001, -1.0),
        (101.6, "ok", 0.001, 0.002),     # after it
    ]
    row = summarize(events, at)
    assert (row["started"], row["ok"], row["refused"], row["reset"]) == (5, 2, 2, 1)
    assert row["ok_per_s"] == 1.0
    assert row["echo_p50_ms"] == pytest.approx(10.0) and row["echo_p99_ms"] == pytest.approx(10.0)
    assert row["run_failures"] == 3
    assert row["outage_ms"] == pytest.approx(1300.0)
