"""The supervisor and its control channels, with no fork: the workers are
played by the test over socketpairs, or (for restarts) by tiny processes
started through the ``start_process`` seam."""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

from rawproxy import control, supervisor
from rawproxy.config import parse_config
from rawproxy.control import (EVENT_ID, Channel, WorkerControl, config_text, decode_health,
                              encode_frame, encode_health, take_frame)
from rawproxy.loop import EventLoop
from rawproxy.metricsmerge import merge_expositions
from rawproxy.supervisor import Supervisor


def read_frame(sock: socket.socket) -> str:
    """One frame off a blocking socket (the test's end), and not a byte more."""
    length = int.from_bytes(recv_exactly(sock, 4), "big")
    return recv_exactly(sock, length).decode()


def recv_exactly(sock: socket.socket, nbytes: int) -> bytes:
    data = b""
    while len(data) < nbytes:
        chunk = sock.recv(nbytes - len(data))
        assert chunk, "control socket closed"
        data += chunk
    return data


def run_until(loop: EventLoop, condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        loop.run_once(max_wait_s=0.01)


@pytest.fixture
def workers() -> Iterator[tuple[Supervisor, list[socket.socket]]]:
    """A supervisor of three ready workers; the list holds the workers' ends."""
    sup = Supervisor(3, lambda index, sock, accepted: 0)
    ends = []
    for worker in sup._workers:
        ours, theirs = socket.socketpair()
        sup._attach(worker, ours)
        worker.ready = True
        theirs.settimeout(5)
        ends.append(theirs)
    yield sup, ends
    for worker in sup._workers:
        if worker.link is not None:
            worker.link.close()
    for end in ends:
        end.close()
    sup._loop.close()


def ask(sup: Supervisor, request: str) -> list[Optional[list[Optional[str]]]]:
    """Start ``ask_all``; the list gets the answers once they are delivered."""
    delivered: list[Optional[list[Optional[str]]]] = []
    sup.ask_all(request, delivered.append)
    return delivered


# -- frames and events --------------------------------------------------------------

def test_frames_round_trip_and_may_arrive_in_pieces() -> None:
    data = encode_frame("héllo\nworld") + encode_frame("2\nnext")
    inbox = bytearray(data[:5])
    assert take_frame(inbox) is None
    inbox += data[5:]
    assert take_frame(inbox) == "héllo\nworld"
    assert take_frame(inbox) == "2\nnext"
    assert not inbox


def test_a_frame_length_no_peer_sends_is_an_error() -> None:
    with pytest.raises(ValueError):
        take_frame(bytearray((control.MAX_FRAME_BYTES + 1).to_bytes(4, "big") + b"junk"))


def test_health_events_are_decoded_as_they_were_encoded() -> None:
    text = encode_health('app "x"\nnew', "[::1]:80", 12.5)
    assert "\n" not in text
    assert decode_health(text) == ('app "x"\nnew', "[::1]:80", 12.5)
    assert decode_health("health [1, 2]") is None
    assert decode_health("metrics") is None


def test_the_config_text_parses_back_to_the_same_apps() -> None:
    config = parse_config(json.dumps({"Apps": [
        {"Name": "a", "Ports": [8080, 8081], "Targets": ["127.0.0.1:9000",
                                                          {"Address": "[::1]:9", "Weight": 3}],
         "IdleTimeout": 5, "AllowFrom": ["10.0.0.0/8"]}]}), "c.json")
    assert parse_config(config_text(config), "c.json") == config


def test_metrics_merge_keeps_each_family_header_once() -> None:
    one = ('# HELP rawproxy_a A.\n# TYPE rawproxy_a counter\nrawproxy_a{worker="0"} 1\n'
           '# HELP rawproxy_b B.\n# TYPE rawproxy_b gauge\nrawproxy_b{worker="0"} 2\n')
    two = one.replace('worker="0"', 'worker="1"').replace("} 1", "} 3")
    merged = merge_expositions([one, two]).splitlines()
    assert merged == [
        "# HELP rawproxy_a A.", "# TYPE rawproxy_a counter",
        'rawproxy_a{worker="0"} 1', 'rawproxy_a{worker="1"} 3',
        "# HELP rawproxy_b B.", "# TYPE rawproxy_b gauge",
        'rawproxy_b{worker="0"} 2', 'rawproxy_b{worker="1"} 2',
    ]
    assert merge_expositions([]) == ""


# -- the channel ---------------------------------------------------------------------

def test_a_frame_the_peer_is_slow_to_read_waits_whole_and_the_next_follows_intact() -> None:
    # Issue #18 (13): a send that gave up mid-frame put the stream out of step.
    loop = EventLoop()
    ours, theirs = socket.socketpair()
    channel = Channel(loop, ours, lambda frame: None, lambda: None)
    try:
        big = "1\n" + "x" * (8 << 20)  # far more than the socket buffers hold
        started = time.monotonic()
        assert channel.send(big) and channel.send("2\nsmall")
        assert time.monotonic() - started < 1.0, "send blocked the loop"
        theirs.settimeout(5)
        reader = bytearray()

        def read_some() -> bool:
            loop.run_once(max_wait_s=0)  # the loop writes what the peer makes room for
            try:
                reader.extend(theirs.recv(1 << 20))
            except socket.timeout:
                pass
            return len(reader) >= len(encode_frame(big)) + len(encode_frame("2\nsmall"))

        run_until(loop, read_some, timeout_s=20)
        assert take_frame(reader) == big
        assert take_frame(reader) == "2\nsmall"
    finally:
        channel.close()
        theirs.close()
        loop.close()


def test_a_frame_length_no_peer_sends_closes_the_channel() -> None:
    loop = EventLoop()
    ours, theirs = socket.socketpair()
    lost: list[bool] = []
    channel = Channel(loop, ours, lambda frame: None, lambda: lost.append(True))
    try:
        theirs.sendall((control.MAX_FRAME_BYTES + 1).to_bytes(4, "big") + b"junk")
        run_until(loop, lambda: bool(lost))
        assert channel.closed
        theirs.settimeout(5)
        assert theirs.recv(1) == b""  # the worker sees EOF: it drains and exits
    finally:
        channel.close()
        theirs.close()
        loop.close()


def test_the_worker_end_answers_questions_and_takes_orders() -> None:
    loop = EventLoop()
    ours, theirs = socket.socketpair()
    done: list[str] = []
    worker = WorkerControl(
        loop, ours, 0, metrics_text=lambda: "the metrics", config_view=lambda: {"a": 1},
        on_stop=lambda: done.append("stop"), on_reload=lambda: done.append("reload"),
        on_orphaned=lambda: done.append("orphaned"),
        on_shared_health=lambda *shared: done.append(repr(shared)))
    try:
        theirs.settimeout(5)
        worker.announce_ready()
        assert read_frame(theirs) == f"{EVENT_ID}\nready"
        theirs.sendall(encode_frame("7\nmetrics") + encode_frame("8\nconfig")
                       + encode_frame(f"{EVENT_ID}\nreload") + encode_frame(f"{EVENT_ID}\nstop")
                       + encode_frame(f"{EVENT_ID}\n" + encode_health("a", "t:1", 3.0)))
        run_until(loop, lambda: len(done) == 3)
        assert read_frame(theirs) == "7\nthe metrics"
        assert read_frame(theirs) == '8\n{"a": 1}'
        assert done == ["reload", "stop", repr(("a", "t:1", 3.0))]
        theirs.close()  # the supervisor died
        run_until(loop, lambda: done[-1] == "orphaned")
    finally:
        worker.close()
        theirs.close()
        loop.close()


# -- asking the workers --------------------------------------------------------------

def answer(end: socket.socket, text: str) -> None:
    request_id, _, _ = read_frame(end).partition("\n")
    end.sendall(encode_frame(f"{request_id}\n{text}"))


def test_every_worker_is_asked_at_once_and_one_deadline_bounds_the_answer(
        workers: tuple[Supervisor, list[socket.socket]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    sup, (first, silent, third) = workers
    monkeypatch.setattr(supervisor, "CONTROL_TIMEOUT_S", 0.3)
    started = time.monotonic()
    delivered = ask(sup, "metrics")
    answer(first, "one")
    answer(third, "three")  # the silent one is asked too, and never answers
    assert read_frame(silent).endswith("\nmetrics")
    run_until(sup._loop, lambda: bool(delivered))
    elapsed = time.monotonic() - started
    assert delivered == [["one", None, "three"]]
    assert 0.3 <= elapsed < 0.3 + 1.0


def test_the_answers_are_delivered_as_soon_as_every_worker_has_answered(
        workers: tuple[Supervisor, list[socket.socket]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    sup, ends = workers
    monkeypatch.setattr(supervisor, "CONTROL_TIMEOUT_S", 30.0)
    delivered = ask(sup, "config")
    for index, end in enumerate(ends):
        answer(end, f"view {index}")
    run_until(sup._loop, lambda: bool(delivered), timeout_s=5)
    assert delivered == [["view 0", "view 1", "view 2"]]


def test_a_late_answer_is_not_taken_for_the_next_question(
        workers: tuple[Supervisor, list[socket.socket]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    sup, ends = workers
    monkeypatch.setattr(supervisor, "CONTROL_TIMEOUT_S", 0.1)
    first = ask(sup, "metrics")
    run_until(sup._loop, lambda: bool(first))
    assert first == [[None, None, None]]
    for end in ends:
        answer(end, "stale")  # ...too late
    second = ask(sup, "metrics")
    for index, end in enumerate(ends):
        answer(end, f"fresh {index}")
    run_until(sup._loop, lambda: bool(second))
    assert second == [["fresh 0", "fresh 1", "fresh 2"]]
    assert all(worker.link is not None and not worker.link._asks for worker in sup._workers)


def test_a_health_event_is_passed_to_the_other_workers_not_back(
        workers: tuple[Supervisor, list[socket.socket]]) -> None:
    sup, (first, second, third) = workers
    event = f"{EVENT_ID}\n" + encode_health("web", "127.0.0.1:80", 99.0)
    first.sendall(encode_frame("5\nlate answer") + encode_frame(event))
    second.setblocking(False)
    run_until(sup._loop, lambda: _readable(second))
    second.settimeout(5)
    assert read_frame(second) == event
    assert read_frame(third) == event
    first.setblocking(False)
    with pytest.raises(BlockingIOError):
        first.recv(1)  # not echoed back to the worker it came from


def _readable(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False


def test_an_accepted_config_is_kept_for_the_next_worker_started(
        workers: tuple[Supervisor, list[socket.socket]]) -> None:
    sup, (first, _, _) = workers
    first.sendall(encode_frame(f"{EVENT_ID}\naccepted " + '{"Apps": []}'))
    run_until(sup._loop, lambda: sup._accepted_config is not None)
    assert sup._accepted_config == '{"Apps": []}'


def test_healthz_is_503_while_no_worker_is_ready(
        workers: tuple[Supervisor, list[socket.socket]]) -> None:
    # Issue #18 (13): it said 200 with every worker dead.
    sup, _ = workers
    views = sup._views()
    assert views.respond("GET", "/healthz")[0] == 200
    for worker in sup._workers:
        worker.ready = False
    assert views.respond("GET", "/healthz") == (503, "text/plain", b"no worker ready\n")


def test_the_admin_views_are_built_from_the_answers(
        workers: tuple[Supervisor, list[socket.socket]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    sup, (first, second, third) = workers
    monkeypatch.setattr(supervisor, "CONTROL_TIMEOUT_S", 5.0)
    replies: list[tuple[int, str, bytes]] = []
    sup._views().respond_async("GET", "/config", replies.append)
    answer(first, '{"Apps": []}')
    answer(second, "not json")
    answer(third, '{"Apps": [1]}')
    run_until(sup._loop, lambda: bool(replies))
    status, content_type, body = replies[0]
    assert (status, content_type) == (200, "application/json")
    assert json.loads(body) == {"Workers": [{"Apps": []}, None, {"Apps": [1]}],
                                "Draining": False}


# -- restarts ------------------------------------------------------------------------

# A worker as small as can be: it says it is ready (once the gate file, if
# given, exists), then exits 0 when the supervisor says anything (its stop)
# or goes away.
FAKE_WORKER = r"""
import os, socket, struct, sys, time
sock = socket.socket(fileno=int(sys.argv[1]))
while len(sys.argv) > 2 and not os.path.exists(sys.argv[2]):
    time.sleep(0.01)
sock.sendall(struct.pack("!I", 7) + b"0\nready")
sock.recv(1)
"""


class FakeWorkers:
    """The ``start_process`` seam: each start is a FAKE_WORKER process, or the
    OSError given for that attempt; ``gates`` holds a gate file by attempt."""

    def __init__(self, failures: dict[int, OSError], gates: dict[int, str]) -> None:
        self.failures = failures
        self.gates = gates
        self.attempts: list[tuple[int, float]] = []  # (worker index, when)
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, index: int, sock: socket.socket) -> int:
        self.attempts.append((index, time.monotonic()))
        failure = self.failures.get(len(self.attempts))
        if failure is not None:
            raise failure
        gate = self.gates.get(len(self.attempts))
        proc = subprocess.Popen([sys.executable, "-c", FAKE_WORKER, str(sock.fileno()),
                                 *([gate] if gate else [])], pass_fds=[sock.fileno()])
        self.procs.append(proc)
        return proc.pid

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()  # a no-op for one the supervisor reaped
            proc.wait(5)


def run_with_script(sup: Supervisor, fakes: FakeWorkers,
                    step: Callable[[], bool]) -> int:
    """Run the supervisor, calling ``step`` on its loop every 10 ms until it
    returns True; past 20 s the workers are stopped and the test fails."""
    deadline = time.monotonic() + 20

    def tick() -> None:
        if time.monotonic() > deadline:
            sup.stop()
            sup.stop()
            fakes.close()
        elif not step():
            sup._loop.call_later(0.01, tick)

    sup._loop.call_later(0.01, tick)
    try:
        code = sup.run()
    finally:
        fakes.close()
    assert time.monotonic() <= deadline, "the script did not finish"
    return code


def test_a_restart_whose_fork_failed_is_retried_with_back_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Issue #18 (10): a restart whose fork() failed was never tried again.
    monkeypatch.setattr(supervisor, "RESTART_MIN_S", 0.05)
    fakes = FakeWorkers({2: OSError(errno.EAGAIN, "Resource temporarily unavailable")}, {})
    sup = Supervisor(1, lambda index, sock, accepted: 0, start_process=fakes.start)
    worker = sup._workers[0]
    killed: list[int] = []

    def step() -> bool:
        if worker.ready and not killed:
            killed.append(fakes.procs[0].pid)
            fakes.procs[0].kill()
        elif worker.ready and len(fakes.procs) == 2:
            sup.stop()
            return True
        return False

    assert run_with_script(sup, fakes, step) == 0
    assert [index for index, _ in fakes.attempts] == [0, 0, 0]
    # The retry after the failed fork waited, twice as long as the first restart.
    assert fakes.attempts[2][1] - fakes.attempts[1][1] >= 2 * 0.05


def test_a_worker_that_dies_while_a_later_one_starts_is_restarted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "RESTART_MIN_S", 0.05)
    gate = tmp_path / "worker 1 may be ready"
    fakes = FakeWorkers({}, {2: str(gate)})
    sup = Supervisor(2, lambda index, sock, accepted: 0, start_process=fakes.start)
    first, second = sup._workers
    killed: list[int] = []

    def step() -> bool:
        if first.ready and len(fakes.procs) == 2 and not killed:
            killed.append(fakes.procs[0].pid)
            fakes.procs[0].kill()  # while worker 1 is not ready yet
        elif killed and (not first.pid or len(fakes.attempts) == 3) and not gate.exists():
            gate.touch()  # its exit was handled (a restart, not a failed start-up)
        elif first.ready and second.ready and len(fakes.procs) == 3:
            sup.stop()
            return True
        return False

    assert run_with_script(sup, fakes, step) == 0
    assert [index for index, _ in fakes.attempts] == [0, 1, 0]


def test_a_failed_fork_at_start_up_is_one_error_and_exit_1() -> None:
    def start_process(index: int, sock: socket.socket) -> int:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    sup = Supervisor(2, lambda index, sock, accepted: 0, start_process=start_process)
    assert sup.run() == 1



def test_a_worker_that_exits_while_asked_counts_as_answered(
        workers: tuple[Supervisor, list[socket.socket]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    sup, (first, _, third) = workers
    monkeypatch.setattr(supervisor, "CONTROL_TIMEOUT_S", 30.0)
    delivered = ask(sup, "metrics")
    answer(first, "one")
    answer(third, "three")
    run_until(sup._loop, lambda: all(w.link is not None and not w.link._asks
                                     for w in (sup._workers[0], sup._workers[2])))
    sup._detach(sup._workers[1])  # what its exit does: no waiting out the deadline
    assert delivered == [["one", None, "three"]]
