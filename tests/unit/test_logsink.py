"""The log sink: lines leave through a bounded queue and never block the caller."""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from typing import Iterator

import pytest

from rawproxy.logsink import LogSink, SinkHandler


class StuckStream(io.StringIO):
    """A stream whose writes block until ``release`` is set (a pipe nobody reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()

    def write(self, text: str) -> int:
        self.entered.set()
        self.release.wait(10)
        return super().write(text)


@pytest.fixture
def stuck() -> Iterator[StuckStream]:
    stream = StuckStream()
    yield stream
    stream.release.set()


def test_lines_are_written_in_order_and_flush_waits_for_them() -> None:
    stream = io.StringIO()
    sink = LogSink(stream)
    for n in range(1000):
        sink.put(f"line {n}")
    assert sink.flush(5.0)
    assert stream.getvalue() == "".join(f"line {n}\n" for n in range(1000))
    sink.close(5.0)


def test_a_stuck_stream_never_blocks_put_and_overflow_is_counted(stuck: StuckStream) -> None:
    sink = LogSink(stuck, max_lines=100)
    sink.put("first")
    assert stuck.entered.wait(5), "the writer never started writing"
    started = time.monotonic()
    for n in range(150):  # the writer holds "first"; 100 fit in the queue
        sink.put(f"queued {n}")
    assert time.monotonic() - started < 1.0
    assert sink.dropped == 50
    assert not sink.flush(0.05)  # still stuck: a bounded wait, not a hang
    stuck.release.set()
    assert sink.flush(5.0)
    written = stuck.getvalue().splitlines()
    assert written[0] == "first"
    assert written[1:101] == [f"queued {n}" for n in range(100)]
    assert written[101] == "rawproxy: 50 log lines dropped: stderr was not taking them"
    sink.close(5.0)


def test_close_writes_what_is_queued_then_drops_later_lines() -> None:
    stream = io.StringIO()
    sink = LogSink(stream)
    sink.put("before close")
    sink.close(5.0)
    sink.put("after close")
    assert stream.getvalue() == "before close\n"
    assert sink.dropped == 1


def test_handler_formats_on_the_calling_thread(stuck: StuckStream) -> None:
    handler = SinkHandler(LogSink(stuck), exit_timeout_s=5.0)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("rawproxy.test_logsink")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        values = [1]
        logger.warning("value %s", values)
        values.append(2)  # changed after the call: the line must show [1]
        stuck.release.set()
        handler.flush()
        assert stuck.getvalue() == "WARNING value [1]\n"
    finally:
        logger.removeHandler(handler)
        handler.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_logs_through_its_own_writer() -> None:
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    sink = LogSink(stream)
    sink.put("parent before fork")
    pid = os.fork()
    if pid == 0:  # the child: its own writer, none of the parent's queue
        try:
            sink.put("child")
            ok = sink.flush(5.0)
            sink.close(5.0)
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    sink.put("parent after fork")
    sink.close(5.0)
    stream.close()
    with os.fdopen(read_end) as reader:
        lines = reader.read().splitlines()
    assert lines == ["parent before fork", "child", "parent after fork"]


def test_after_close_neither_close_nor_flush_waits_again(stuck: StuckStream) -> None:
    sink = LogSink(stuck)
    sink.put("stuck")
    assert stuck.entered.wait(5)
    sink.close(0.1)  # gives up: the stream never takes the line
    started = time.monotonic()
    sink.close(5.0)
    assert not sink.flush(5.0)
    assert time.monotonic() - started < 1.0


def test_a_stream_that_raises_does_not_stop_the_writer() -> None:
    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            if "bad" in text:
                raise RuntimeError("cannot write that")
            return super().write(text)

    stream = Broken()
    sink = LogSink(stream)
    sink.put("bad line")
    assert sink.flush(5.0)
    sink.put("good line")
    assert sink.flush(5.0)
    assert stream.getvalue() == "good line\n"
    sink.close(5.0)
