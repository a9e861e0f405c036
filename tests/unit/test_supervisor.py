"""The supervisor's control channel and exposition merging, without forking."""

from __future__ import annotations

import os
import socket
import threading
from typing import Callable, Iterator, Optional

import pytest

from rawproxy import supervisor
from rawproxy.supervisor import Supervisor, merge_expositions, read_frame, write_frame


@pytest.fixture
def channel() -> Iterator[tuple[Supervisor, socket.socket]]:
    sup = Supervisor(1, lambda index, control: 0)
    ours, theirs = socket.socketpair()
    worker = sup._workers[0]
    worker.pid = os.getpid()  # any live pid: _ask only checks that one is set
    worker.control = ours
    yield sup, theirs
    ours.close()
    theirs.close()


def request_line(sock: socket.socket) -> tuple[str, str]:
    line = b""
    while not line.endswith(b"\n"):
        line += sock.recv(1)
    request_id, _, request = line.decode().strip().partition(" ")
    return request_id, request


def ask_while(sup: Supervisor, request: str, worker_side: Callable[[], None]) -> Optional[str]:
    """Worker 0's answer to ``request`` while ``worker_side`` plays the worker."""
    thread = threading.Thread(target=worker_side)
    thread.start()
    try:
        return sup._ask(sup._workers[0], request)
    finally:
        thread.join(5)


def test_an_answer_is_matched_to_its_question(channel: tuple[Supervisor, socket.socket],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    sup, worker_end = channel
    monkeypatch.setattr(supervisor, "CONTROL_TIMEOUT_S", 0.2)
    # The first question times out: the worker was too slow.
    assert sup._ask(sup._workers[0], "metrics") is None
    late_id, late_request = request_line(worker_end)
    assert late_request == "metrics"
    write_frame(worker_end, f"{late_id}\nstale metrics")  # ...and answers late
    # The next question must not get the late answer.
    monkeypatch.setattr(supervisor, "CONTROL_TIMEOUT_S", 5.0)

    def answer_next() -> None:
        request_id, request = request_line(worker_end)
        write_frame(worker_end, f"{request_id}\n{{\"asked\": \"{request}\"}}")

    assert ask_while(sup, "config", answer_next) == '{"asked": "config"}'


def test_frames_round_trip() -> None:
    left, right = socket.socketpair()
    with left, right:
        write_frame(left, "héllo\nworld")
        assert read_frame(right) == "héllo\nworld"


def test_merge_keeps_each_family_header_once() -> None:
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


@pytest.fixture
def two_workers() -> Iterator[tuple[Supervisor, list[socket.socket]]]:
    sup = Supervisor(2, lambda index, control: 0)
    worker_ends = []
    for worker in sup._workers:
        ours, theirs = socket.socketpair()
        worker.pid = os.getpid()
        worker.control = ours
        worker_ends.append(theirs)
    yield sup, worker_ends
    for worker in sup._workers:
        assert worker.control is not None
        worker.control.close()
    for end in worker_ends:
        end.close()


def test_health_events_are_decoded_as_they_were_encoded() -> None:
    text = supervisor.encode_health('app "x"\nnew', "[::1]:80", 12.5)
    assert "\n" not in text
    assert supervisor.decode_health(text) == ('app "x"\nnew', "[::1]:80", 12.5)
    assert supervisor.decode_health("health [1, 2]") is None
    assert supervisor.decode_health("metrics") is None


def test_an_event_that_arrives_during_a_question_is_passed_to_the_other_workers(
        two_workers: tuple[Supervisor, list[socket.socket]]) -> None:
    sup, (first, second) = two_workers
    event = supervisor.encode_health("web", "127.0.0.1:80", 99.0)

    def first_worker() -> None:
        request_id, request = request_line(first)
        write_frame(first, f"{supervisor.EVENT_ID}\n{event}")  # before its answer
        write_frame(first, f"{request_id}\nanswer to {request}")

    assert ask_while(sup, "config", first_worker) == "answer to config"
    second.settimeout(5)
    assert request_line(second) == (supervisor.EVENT_ID, event)
    first.setblocking(False)
    with pytest.raises(BlockingIOError):
        first.recv(1)  # not echoed back to the worker it came from


def test_an_event_read_between_questions_is_passed_on_and_late_answers_dropped(
        two_workers: tuple[Supervisor, list[socket.socket]]) -> None:
    sup, (first, second) = two_workers
    event = supervisor.encode_health("web", "127.0.0.1:80", 0.0)
    data = frames("7\nlate answer", f"{supervisor.EVENT_ID}\n{event}")
    second.sendall(data[:5])  # a frame may arrive in pieces
    sup._on_control_readable(sup._workers[1])
    second.sendall(data[5:])
    sup._on_control_readable(sup._workers[1])
    first.settimeout(5)
    assert request_line(first) == (supervisor.EVENT_ID, event)
    assert not sup._workers[1].inbox


def frames(*texts: str) -> bytes:
    out = b""
    for text in texts:
        encoded = text.encode()
        out += len(encoded).to_bytes(4, "big") + encoded
    return out


def test_an_event_read_together_with_an_answer_is_still_passed_on(
        two_workers: tuple[Supervisor, list[socket.socket]]) -> None:
    sup, (first, second) = two_workers
    event = supervisor.encode_health("web", "127.0.0.1:80", 5.0)

    def first_worker() -> None:
        request_id, _ = request_line(first)
        first.sendall(frames(f"{request_id}\nthe answer", f"{supervisor.EVENT_ID}\n{event}"))

    assert ask_while(sup, "metrics", first_worker) == "the answer"
    second.settimeout(5)
    assert request_line(second) == (supervisor.EVENT_ID, event)
    assert not sup._workers[0].inbox


def test_a_frame_length_no_worker_sends_empties_the_inbox(
        two_workers: tuple[Supervisor, list[socket.socket]]) -> None:
    sup, (first, _) = two_workers
    first.sendall((supervisor.MAX_FRAME_BYTES + 1).to_bytes(4, "big") + b"junk")
    sup._on_control_readable(sup._workers[0])
    assert not sup._workers[0].inbox
